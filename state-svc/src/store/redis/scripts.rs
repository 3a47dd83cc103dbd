//! Every Lua script of the Redis store.
//!
//! Channel scripts share one prelude and one calling convention: `KEYS` are the nine keys of
//! one channel (`keys::ChannelKeys::all`, one hash tag, so one Cluster slot) and `ARGV[1..=5]`
//! are the channel id, the default lease, the default maximum talk time, the garbage-collection
//! grace and the audit policy ([`audit_policy`]); script arguments follow from `ARGV[6]`.
//!
//! Denials are the one audit entry a client can cause at will (pressing a held channel), so
//! they are rate-limited per channel: at most [`DENIALS_PER_WINDOW`] entries per window (the
//! policy's, a minute by default), the rest counted and written as one `denied_aggregate` entry (how
//! many, from when to when) at the channel's first audit entry after the window. With the
//! audit writer on, a stream holding the policy's ceiling of uncopied entries (PostgreSQL
//! away) takes no more denials, only counts them; grants, releases, revocations and
//! pre-emptions are always appended.
//!
//! Each script reads the clock with `TIME` (the server clock decides every expiry), makes its
//! change, publishes the event and appends the audit entry in the same atomic step, and answers
//! with one JSON document. Epochs travel as strings: they exceed the 14 significant digits
//! cjson keeps for numbers.
//!
//! `ACQUIRE`, `RENEW`, `RELEASE`, `FORCE_RELEASE`, `live_holder` and `UPDATE_GRANTS` take the
//! branches of `domain::rules` (which the memory store applies) in the same order: change one,
//! change both.
//!
//! The floor hash is not given a Redis TTL equal to the lease: a key that vanishes by itself
//! cannot publish who lost the floor. Instead the hash records `expires` and `max_until`, every
//! script treats a lapsed grant as free (and announces it), the sweeper expires grants nobody
//! touches, and a generous `PEXPIRE` only collects garbage.

use std::sync::LazyLock;

use redis::Script;

use super::fields;

const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local CH = ARGV[1]
local DEF_LEASE = tonumber(ARGV[2])
local DEF_MAX = tonumber(ARGV[3])
local EMERGENCY_RETRY_MS = 1000
local DENIALS_PER_WINDOW = {DENIALS_PER_WINDOW}
local GC_MS = tonumber(ARGV[4])
local AUDIT_MODE, AUDIT_N, DENIAL_WINDOW = string.match(ARGV[5], '^(%a+):(%d+):(%d+)$')
local DENIAL_WINDOW_MS = tonumber(DENIAL_WINDOW)
local K_FLOOR, K_EPOCH, K_MEMBERS, K_QUEUE, K_QINFO, K_CONFIG, K_EVENTS, K_AUDIT, K_MEDIA =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]

local function estr(e) return string.format('%.0f', e) end

local function config()
  local c = redis.call('HMGET', K_CONFIG, CONFIG.QUEUE, CONFIG.LEASE_MS, CONFIG.MAX_TALK_MS)
  local lease = tonumber(c[2])
  if not lease or lease <= 0 then lease = DEF_LEASE end
  local max = tonumber(c[3])
  if not max or max <= 0 then max = DEF_MAX end
  return c[1] == '1', lease, max
end

local function current_epoch() return tonumber(redis.call('GET', K_EPOCH) or '0') end

-- The highest epoch the caller has seen (an acquire sets it).
local MIN_EPOCH = 0

-- The fencing epoch never goes backwards, even when Redis lost the counter: the clock
-- (milliseconds times 1000) carries it past every earlier value, and past what callers saw
-- (a new master after a failover may have neither the counter nor a clock as far on).
-- The counter itself expires a week after its last move: by then the clock alone carries
-- the next epoch past it, so a channel id used once keeps no key forever.
local function bump_epoch()
  local e = math.max(current_epoch() + 1, now * 1000, MIN_EPOCH + 1)
  redis.call('SET', K_EPOCH, estr(e), 'PX', 604800000)
  return estr(e)
end

-- The members version moves on at every join and leave, and never goes backwards: like the
-- epoch, the clock carries it past every earlier value, so dropping it when the channel
-- empties is safe.
local function bump_mver()
  local v = math.max(tonumber(redis.call('HGET', K_CONFIG, CONFIG.MEMBERS_VERSION) or '0') + 1, now * 1000)
  redis.call('HSET', K_CONFIG, CONFIG.MEMBERS_VERSION, estr(v))
  return estr(v)
end

local function holder()
  local f = redis.call('HMGET', K_FLOOR, 'sid', 'uid', 'name', 'prio', 'epoch', 'granted', 'expires', 'max_until')
  if not f[1] then return nil end
  return { sid = f[1], uid = f[2], name = f[3], prio = tonumber(f[4]), epoch = f[5],
           granted = tonumber(f[6]), expires = tonumber(f[7]), max_until = tonumber(f[8]) }
end

local function speaker(h) return { sid = h.sid, uid = h.uid, name = h.name, prio = h.prio } end

local function publish(ev)
  ev.ch = CH
  ev.at = now
  redis.call('PUBLISH', K_EVENTS, cjson.encode(ev))
end

local function xadd(ev, h, extra)
  local args = { 'XADD', K_AUDIT }
  -- 'cap': no writer, the stream is the trail, trimmed to about N entries. 'keep': the
  -- writer trims what it has copied; nothing is capped here.
  if AUDIT_MODE == 'cap' then
    for _, a in ipairs({ 'MAXLEN', '~', AUDIT_N }) do table.insert(args, a) end
  end
  for _, a in ipairs({ '*', 'ev', ev, 'ch', CH, 'sid', h.sid, 'uid', h.uid,
                       'epoch', h.epoch or '', 'at', tostring(now) }) do
    table.insert(args, a)
  end
  if extra then
    for k, v in pairs(extra) do
      table.insert(args, k)
      table.insert(args, tostring(v))
    end
  end
  redis.call(unpack(args))
end

-- The channel's denial window: when it opened, denials appended, denials only counted.
local function denial_window()
  local w = redis.call('HMGET', K_CONFIG, CONFIG.DENIAL_WINDOW, CONFIG.DENIALS,
                       CONFIG.DENIALS_COUNTED)
  return tonumber(w[1] or '0'), tonumber(w[2] or '0'), tonumber(w[3] or '0')
end

-- Ends a window that is over: its counted denials become one entry.
local function close_denial_window(start, counted)
  if counted > 0 then
    xadd('denied_aggregate', { sid = '', uid = '' },
         { count = counted, from = start, to = start + DENIAL_WINDOW_MS })
  end
  redis.call('HDEL', K_CONFIG, CONFIG.DENIAL_WINDOW, CONFIG.DENIALS, CONFIG.DENIALS_COUNTED)
end

local function audit_denial(h, extra)
  local start, appended, counted = denial_window()
  if start > 0 and now - start >= DENIAL_WINDOW_MS then
    close_denial_window(start, counted)
    start, appended, counted = 0, 0, 0
  end
  if start == 0 then start = now end
  local full = AUDIT_MODE == 'keep' and redis.call('XLEN', K_AUDIT) >= tonumber(AUDIT_N)
  if appended < DENIALS_PER_WINDOW and not full then
    xadd('denied', h, extra)
    appended = appended + 1
  else
    counted = counted + 1
  end
  redis.call('HSET', K_CONFIG, CONFIG.DENIAL_WINDOW, start, CONFIG.DENIALS, appended,
             CONFIG.DENIALS_COUNTED, counted)
end

-- Every other entry: appended, after the aggregate of a denial window that is over.
local function audit(ev, h, extra)
  local start, _, counted = denial_window()
  if start > 0 and now - start >= DENIAL_WINDOW_MS then close_denial_window(start, counted) end
  xadd(ev, h, extra)
end

local function grant(sid, m, prio, max_override)
  local _, lease, max = config()
  if max_override then max = max_override end
  local e = bump_epoch()
  local max_until = now + max
  local expires = math.min(now + lease, max_until)
  redis.call('HSET', K_FLOOR, 'sid', sid, 'uid', m.uid, 'name', m.name, 'prio', prio,
             'epoch', e, 'granted', now, 'expires', expires, 'max_until', max_until)
  redis.call('PEXPIRE', K_FLOOR, max + GC_MS)
  redis.call('ZREM', K_QUEUE, sid)
  redis.call('HDEL', K_QINFO, sid)
  local h = { sid = sid, uid = m.uid, name = m.name, prio = prio, epoch = e,
              granted = now, expires = expires, max_until = max_until }
  audit('granted', h, { prio = prio })
  return h, max
end

-- Frees the floor, then grants the head of the queue (still a member) in the same step.
local function emergency()
  local em = redis.call('HGET', K_CONFIG, CONFIG.EMERGENCY)
  if em then return cjson.decode(em) end
  return nil
end

local function free(h, reason)
  redis.call('DEL', K_FLOOR)
  -- Freeing the broadcaster's floor ends the emergency in this channel.
  local em = emergency()
  if em and em.sid == h.sid then redis.call('HDEL', K_CONFIG, CONFIG.EMERGENCY) end
  local e = bump_epoch()
  local held = now - h.granted
  publish({ k = 'floor', epoch = e, reason = reason, prev = speaker(h), prev_ms = held })
  audit(reason, h, { held_ms = held })
  while true do
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
    if not head then return nil end
    local info = redis.call('HGET', K_QINFO, head)
    redis.call('ZREM', K_QUEUE, head)
    redis.call('HDEL', K_QINFO, head)
    local mj = redis.call('HGET', K_MEMBERS, head)
    if mj and info then
      local nh = grant(head, cjson.decode(mj), cjson.decode(info).prio)
      publish({ k = 'floor', epoch = nh.epoch, reason = 'queue_granted', holder = nh })
      return nh
    end
  end
end

local function lapse_reason(h)
  if now >= h.max_until then return 'max_talk_time' end
  return 'lease_expired'
end

-- The holder after lazily expiring a lapsed grant.
local function live_holder()
  local h = holder()
  if h and now >= h.expires then return free(h, lapse_reason(h)) end
  return h
end

local function state()
  local raw = redis.call('HGETALL', K_MEMBERS)
  local members = {}
  for i = 1, #raw, 2 do
    local m = cjson.decode(raw[i + 1])
    m.sid = raw[i]
    members[#members + 1] = m
  end
  local h = holder()
  if h and now >= h.expires then h = nil end
  return { members = members, holder = h, epoch = estr(current_epoch()),
           node = redis.call('GET', K_MEDIA) or nil, now = now,
           mver = redis.call('HGET', K_CONFIG, CONFIG.MEMBERS_VERSION) or '0' }
end
"#;

const ACQUIRE: &str = r#"
local sid, prio = ARGV[6], tonumber(ARGV[7])
MIN_EPOCH = tonumber(ARGV[8] or '0') or 0
local mj = redis.call('HGET', K_MEMBERS, sid)
if not mj then return cjson.encode({ r = 'not_member', now = now }) end
local m = cjson.decode(mj)
local queue_on, lease, max = config()
local h = live_holder()
-- Under an emergency broadcast only a higher priority gets through (no queueing).
local em = emergency()
if em and em.sid ~= sid and prio <= em.prio then
  local shown = h or { sid = em.sid, uid = em.uid, name = em.name, prio = em.prio,
                       epoch = estr(current_epoch()), granted = now, expires = now, max_until = now }
  audit_denial({ sid = sid, uid = m.uid, epoch = shown.epoch }, { holder = em.sid, emergency = em.eid })
  return cjson.encode({ r = 'denied', holder = shown, retry = EMERGENCY_RETRY_MS, now = now })
end
if not h then
  local nh = grant(sid, m, prio)
  publish({ k = 'floor', epoch = nh.epoch, reason = 'granted', holder = nh })
  return cjson.encode({ r = 'granted', holder = nh, max_talk = max, now = now })
end
if h.sid == sid then
  -- Idempotent for the holder (a retried request): same epoch, lease refreshed.
  h.expires = math.min(now + lease, h.max_until)
  redis.call('HSET', K_FLOOR, 'expires', h.expires)
  return cjson.encode({ r = 'granted', holder = h, max_talk = h.max_until - h.granted, now = now })
end
if prio > h.prio then
  local held = now - h.granted
  audit('preempted', h, { held_ms = held, by = sid })
  local nh = grant(sid, m, prio)
  publish({ k = 'floor', epoch = nh.epoch, reason = 'preempted', holder = nh,
            prev = speaker(h), prev_ms = held })
  return cjson.encode({ r = 'granted', holder = nh, max_talk = max, preempted = speaker(h), now = now })
end
audit_denial({ sid = sid, uid = m.uid, epoch = h.epoch }, { holder = h.sid })
if queue_on then
  if not redis.call('ZSCORE', K_QUEUE, sid) then
    redis.call('ZADD', K_QUEUE, (255 - prio) * 1e13 + now, sid)
    redis.call('HSET', K_QINFO, sid, cjson.encode({ prio = prio }))
  end
  local pos = redis.call('ZRANK', K_QUEUE, sid) + 1
  return cjson.encode({ r = 'queued', holder = h, pos = pos, now = now })
end
return cjson.encode({ r = 'denied', holder = h, retry = h.expires - now, now = now })
"#;

const RENEW: &str = r#"
local sid, ep = ARGV[6], ARGV[7]
local _, lease = config()
local h = holder()
if h and now >= h.expires then
  local reason = lapse_reason(h)
  free(h, reason)
  if h.sid == sid and h.epoch == ep and reason == 'max_talk_time' then
    return cjson.encode({ r = 'max_talk_time', now = now })
  end
  return cjson.encode({ r = 'not_held', now = now })
end
if not h then
  -- Released or expired floors moved the epoch past the holder's. An epoch behind it means
  -- the store lost the floor (an empty restart, a failover to a replica that had not seen
  -- the grant): nobody ever said the floor ended, so say it now, once (the next renewal
  -- finds the bumped epoch).
  if current_epoch() < tonumber(ep) then
    local e = bump_epoch()
    publish({ k = 'floor', epoch = e, reason = 'lost' })
    audit('lost', { sid = sid, uid = '', epoch = ep }, nil)
  end
  return cjson.encode({ r = 'not_held', now = now })
end
if h.sid ~= sid then return cjson.encode({ r = 'not_holder', now = now }) end
if h.epoch ~= ep then return cjson.encode({ r = 'stale_epoch', now = now }) end
local expires = math.min(now + lease, h.max_until)
redis.call('HSET', K_FLOOR, 'expires', expires)
return cjson.encode({ r = 'renewed', expires = expires, max_until = h.max_until, now = now })
"#;

const RELEASE: &str = r#"
local sid, ep = ARGV[6], ARGV[7]
local h = live_holder()
if h and h.sid == sid then
  if ep ~= '0' and h.epoch ~= ep then
    return cjson.encode({ r = 'stale_epoch', epoch = estr(current_epoch()), now = now })
  end
  free(h, 'released')
  return cjson.encode({ r = 'released', epoch = estr(current_epoch()), now = now })
end
local dq = redis.call('ZREM', K_QUEUE, sid)
redis.call('HDEL', K_QINFO, sid)
local r = 'not_held'
if h then r = 'not_holder' end
return cjson.encode({ r = r, dequeued = dq == 1, epoch = estr(current_epoch()), now = now })
"#;

const FORCE_RELEASE: &str = r#"
local ep = ARGV[6]
local h = live_holder()
if not h then return cjson.encode({ r = 'not_held', epoch = estr(current_epoch()), now = now }) end
if ep ~= '0' and h.epoch ~= ep then
  return cjson.encode({ r = 'stale_epoch', epoch = estr(current_epoch()), now = now })
end
free(h, 'force_released')
return cjson.encode({ r = 'released', epoch = estr(current_epoch()), now = now })
"#;

/// Sweeper step for one channel: expires a lapsed grant and says when to look again.
const EXPIRE: &str = r#"
local h = holder()
local expired = false
if h and now >= h.expires then
  h = free(h, lapse_reason(h))
  expired = true
end
local next_check = nil
if h then next_check = h.expires end
return cjson.encode({ expired = expired, next = next_check, now = now })
"#;

/// Takes one of a user's session places (`KEYS[1]`, the user's sorted set: session id -> until
/// when it counts) unless the user holds `ARGV[2]` live ones: `ARGV[1]` is the session id,
/// `ARGV[3]` until when it counts, `ARGV[4]` now (ms). Places that ran out leave the set first.
/// Answers 1, or 0 when the user is at the cap.
pub static CLAIM_SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[3]) - tonumber(ARGV[4]), 1000) + 3600000)
return 1
"#)
});

const JOIN: &str = r#"
local sid, member, max_members = ARGV[6], ARGV[7], tonumber(ARGV[8])
if redis.call('HEXISTS', K_MEMBERS, sid) == 0 and redis.call('HLEN', K_MEMBERS) >= max_members then
  return '"full"'
end
if redis.call('HSETNX', K_MEMBERS, sid, member) == 1 then
  local m = cjson.decode(member)
  m.sid = sid
  publish({ k = 'member', change = 'joined', m = m, count = redis.call('HLEN', K_MEMBERS),
            v = bump_mver() })
end
return cjson.encode(state())
"#;

const LEAVE: &str = r#"
local sid, reason = ARGV[6], ARGV[7]
local mj = redis.call('HGET', K_MEMBERS, sid)
if not mj then return cjson.encode({ was_member = false, released = false }) end
local released = false
local h = holder()
if h and h.sid == sid then
  free(h, reason)
  released = true
end
redis.call('ZREM', K_QUEUE, sid)
redis.call('HDEL', K_QINFO, sid)
redis.call('HDEL', K_MEMBERS, sid)
local count = redis.call('HLEN', K_MEMBERS)
local m = cjson.decode(mj)
m.sid = sid
publish({ k = 'member', change = 'left', m = m, count = count, v = bump_mver() })
local node = nil
if count == 0 then
  node = redis.call('GET', K_MEDIA) or nil
  redis.call('DEL', K_MEDIA)
  redis.call('HDEL', K_CONFIG, CONFIG.MEMBERS_VERSION)
end
return cjson.encode({ was_member = true, released = released, node = node, empty = count == 0 })
"#;

const STATE: &str = "return cjson.encode(state())";

/// One channel of an emergency broadcast: marks the channel with the broadcast and grants the
/// session the floor at the emergency priority, pre-empting any lower holder.
const EMERGENCY_TAKE: &str = r#"
local sid, prio, eid, emax = ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local mj = redis.call('HGET', K_MEMBERS, sid)
if not mj then return cjson.encode({ r = 'not_member', now = now }) end
local m = cjson.decode(mj)
local h = live_holder()
local em = emergency()
if em and em.sid ~= sid and em.prio >= prio then
  local shown = h or { sid = em.sid, uid = em.uid, name = em.name, prio = em.prio,
                       epoch = estr(current_epoch()), granted = now, expires = now, max_until = now }
  return cjson.encode({ r = 'denied', holder = shown, retry = EMERGENCY_RETRY_MS, now = now })
end
if h and h.sid ~= sid and h.prio >= prio then
  return cjson.encode({ r = 'denied', holder = h, retry = EMERGENCY_RETRY_MS, now = now })
end
redis.call('HSET', K_CONFIG, CONFIG.EMERGENCY,
           cjson.encode({ eid = eid, sid = sid, uid = m.uid, name = m.name, prio = prio }))
local prev, held = nil, 0
if h and h.sid ~= sid then
  held = now - h.granted
  audit('preempted', h, { held_ms = held, by = sid, emergency = eid })
  prev = speaker(h)
end
local nh = grant(sid, m, prio, emax)
publish({ k = 'floor', epoch = nh.epoch, reason = 'emergency', holder = nh, prev = prev, prev_ms = held })
return cjson.encode({ r = 'granted', holder = nh, max_talk = emax, preempted = prev, now = now })
"#;

/// Ends an emergency broadcast in one channel: clears the mark if it is the event's (and the
/// session's, unless `ARGV[6]` is empty) and frees the broadcaster's floor.
const EMERGENCY_RELEASE: &str = r#"
local sid, eid = ARGV[6], ARGV[7]
local em = emergency()
if not em or em.eid ~= eid or (sid ~= '' and em.sid ~= sid) then
  return cjson.encode({ r = 'not_holder', epoch = estr(current_epoch()), now = now })
end
redis.call('HDEL', K_CONFIG, CONFIG.EMERGENCY)
local h = live_holder()
if h and h.sid == em.sid then
  free(h, 'emergency_ended')
  return cjson.encode({ r = 'released', epoch = estr(current_epoch()), now = now })
end
return cjson.encode({ r = 'not_held', epoch = estr(current_epoch()), now = now })
"#;

/// Changes a user's grants (`KEYS[1]`, a hash of channel -> role plus `#v`, the version:
/// at least the Redis clock in milliseconds times 1000, so it grows across an empty restart)
/// and publishes the change on the user's topic (`KEYS[2]`, same slot). `ARGV`: unused, user id, expected version ('' for any), replace ('1'/'0'), most
/// entries allowed, then pairs of channel and role ('' removes). Publishes the new grants only
/// when something changed, so replicas applying the same update announce it once.
const UPDATE_GRANTS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function vstr(x) return string.format('%.0f', x) end
local v = tonumber(redis.call('HGET', KEYS[1], GRANTS.VERSION) or '0')
local raw = redis.call('HGETALL', KEYS[1])
local cur = {}
for i = 1, #raw, 2 do
  if raw[i] ~= GRANTS.VERSION then cur[raw[i]] = raw[i + 1] end
end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= v then
  return cjson.encode({ r = 'mismatch', v = vstr(v), g = cur })
end
local nxt = {}
if ARGV[4] ~= '1' then
  for k, r in pairs(cur) do nxt[k] = r end
end
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] == '' then nxt[ARGV[i]] = nil else nxt[ARGV[i]] = ARGV[i + 1] end
end
local changed, n = false, 0
for k, r in pairs(nxt) do
  n = n + 1
  if cur[k] ~= r then changed = true end
end
for k, _ in pairs(cur) do
  if nxt[k] == nil then changed = true end
end
if not changed then return cjson.encode({ r = 'unchanged', v = vstr(v), g = cur }) end
if n > tonumber(ARGV[5]) then return cjson.encode({ r = 'too_many', v = vstr(v), g = cur }) end
-- Versions never go backwards, even after Redis lost the hash: like epochs, the clock
-- (milliseconds times 1000) carries them past every earlier value, so gateways holding an
-- old version take the next change.
v = math.max(v + 1, now * 1000)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], GRANTS.VERSION, vstr(v))
for k, r in pairs(nxt) do redis.call('HSET', KEYS[1], k, r) end
redis.call('PUBLISH', KEYS[2], cjson.encode({ k = 'grants', r = 'changed', uid = ARGV[2], v = vstr(v), g = nxt }))
return cjson.encode({ r = 'changed', uid = ARGV[2], v = vstr(v), g = nxt })
"#;

/// Sets an event's channels. `KEYS`: event -> channels (comma-joined), channel -> event,
/// event -> emergency. `ARGV`: event id, comma-joined channels ('' deletes the event).
/// Refused ('busy') while this event, or an event losing a channel, has an active emergency.
pub static SET_EVENT: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local eid = ARGV[1]
if redis.call('HEXISTS', KEYS[3], eid) == 1 then return 'busy' end
local new = {}
for ch in string.gmatch(ARGV[2], '[^,]+') do new[#new + 1] = ch end
for _, ch in ipairs(new) do
  local other = redis.call('HGET', KEYS[2], ch)
  if other and other ~= eid and redis.call('HEXISTS', KEYS[3], other) == 1 then return 'busy' end
end
local old = redis.call('HGET', KEYS[1], eid)
if old then
  for ch in string.gmatch(old, '[^,]+') do redis.call('HDEL', KEYS[2], ch) end
end
for _, ch in ipairs(new) do
  local other = redis.call('HGET', KEYS[2], ch)
  if other and other ~= eid then
    local kept = {}
    for c in string.gmatch(redis.call('HGET', KEYS[1], other) or '', '[^,]+') do
      if c ~= ch then kept[#kept + 1] = c end
    end
    if #kept == 0 then redis.call('HDEL', KEYS[1], other)
    else redis.call('HSET', KEYS[1], other, table.concat(kept, ',')) end
  end
  redis.call('HSET', KEYS[2], ch, eid)
end
if #new == 0 then redis.call('HDEL', KEYS[1], eid) else redis.call('HSET', KEYS[1], eid, ARGV[2]) end
return 'ok'
"#)
});

/// Claims an event's emergency. `KEYS`: event -> channels, event -> emergency. `ARGV`: event
/// id, session id, priority, the broadcaster as JSON, force ('1'/'0').
pub static CLAIM_EMERGENCY: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local eid, sid, prio = ARGV[1], ARGV[2], tonumber(ARGV[3])
local chans = redis.call('HGET', KEYS[1], eid)
if not chans then return cjson.encode({ r = 'no_event' }) end
local cur = redis.call('HGET', KEYS[2], eid)
if cur and ARGV[5] ~= '1' then
  local c = cjson.decode(cur)
  if c.sid ~= sid and c.prio >= prio then return cjson.encode({ r = 'busy', em = c }) end
end
local t = redis.call('TIME')
local e = cjson.decode(ARGV[4])
e.started = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], eid, cjson.encode(e))
return cjson.encode({ r = 'ok', chans = chans, em = e })
"#)
});

/// Clears an event's emergency (`KEYS[1]`: event -> emergency) if it is session `ARGV[2]`'s
/// (anyone's when empty); answers the cleared record or nil.
pub static CLEAR_EMERGENCY: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return nil end
if ARGV[2] ~= '' and cjson.decode(cur).sid ~= ARGV[2] then return nil end
redis.call('HDEL', KEYS[1], ARGV[1])
return cur
"#)
});

/// Compare-and-set of a channel's media node (`KEYS[1]`): replaces `ARGV[1]` (empty: unset)
/// with `ARGV[2]`; answers `{node holding the placement afterwards, 1 if this call set it}`.
pub static PLACE: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local cur = redis.call('GET', KEYS[1]) or ''
if cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return { ARGV[2], 1 }
end
return { cur, 0 }
"#)
});

/// Moves channel media key `KEYS[1]` from node `ARGV[1]` to `ARGV[2]` if it is still on
/// `ARGV[1]`, and publishes the move (`ARGV[3]`, JSON) on the channel's events `KEYS[2]`.
/// 1 when moved.
const MOVE: &str = r#"
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"#;

/// Compare-and-set of one member's score in a deadline index (`KEYS[1]`): if `ARGV[1]` still
/// has score `ARGV[2]`, set it to `ARGV[3]`, or remove it when `ARGV[3]` is empty.
pub static RESCHEDULE: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1])
else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
return 1
"#)
});

/// Updates a session hash (`KEYS[1]`) only if it still exists: `ARGV[1]` is the new expiry,
/// `ARGV[2]` the key's time to live. The resume token before the last resume dies here: the
/// socket that was handed the new one has lived a touch interval since. Answers 1 when the
/// session exists.
pub static TOUCH_SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], SESSION.EXPIRES, ARGV[1])
redis.call('HDEL', KEYS[1], SESSION.PREVIOUS_DIGEST)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[2] then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"#)
});

/// Parks session `KEYS[1]` (its channels `KEYS[2]`) if it is still at generation `ARGV[1]`:
/// expiry `ARGV[2]`, key lifetime `ARGV[3]`, parked at `ARGV[4]`. 1 when parked, 0 when gone
/// or taken over. (The deadline index, in another slot, is moved by the caller.)
pub static PARK_SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], SESSION.GENERATION) or '0') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], SESSION.EXPIRES, ARGV[2], SESSION.PARKED, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"#)
});

/// Takes session `KEYS[1]` (channels `KEYS[2]`) over for user `ARGV[1]` presenting digest
/// `ARGV[2]`: stores the next digest `ARGV[3]`, gateway `ARGV[4]`, and an expiry of its time
/// to live from now (`ARGV[5]`); key lifetime is that plus `ARGV[6]`. Answers
/// `{generation, expiry}`; generation 0 when the session is gone or expired, -1 when refused
/// (another user, or neither the current token nor the one before it: a client whose socket
/// died before it got the new token still holds the old one, which stays good until the
/// session's next touch). (The deadline index, in another slot, is moved by the caller.)
pub static RESUME_SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return { 0, 0 } end
local f = redis.call('HMGET', KEYS[1], SESSION.USER_ID, SESSION.RESUME_DIGEST, SESSION.EXPIRES, SESSION.TTL, SESSION.GENERATION, SESSION.PREVIOUS_DIGEST)
local now = tonumber(ARGV[5])
if tonumber(f[3] or '0') <= now then return { 0, 0 } end
local known = (f[2] and f[2] ~= '' and f[2] == ARGV[2]) or (f[6] and f[6] ~= '' and f[6] == ARGV[2])
if f[1] ~= ARGV[1] or not known then return { -1, 0 } end
local gen = tonumber(f[5] or '0') + 1
local ttl = tonumber(f[4] or '0')
local expires = now + ttl
redis.call('HSET', KEYS[1], SESSION.RESUME_DIGEST, ARGV[3], SESSION.PREVIOUS_DIGEST, ARGV[2],
  SESSION.GATEWAY, ARGV[4], SESSION.GENERATION, gen, SESSION.PARKED, 0, SESSION.EXPIRES, expires)
redis.call('PEXPIRE', KEYS[1], ttl + tonumber(ARGV[6]))
redis.call('PEXPIRE', KEYS[2], ttl + tonumber(ARGV[6]))
return { gen, expires }
"#)
});

/// Deletes session `KEYS[1]` (its channel set `KEYS[2]` stays, for the caller to leave each
/// channel) unless `ARGV[1]` names a generation and the session has moved past it (resumed on
/// another socket). Answers `{'ok', user id, channel...}` or `{'moved'}`.
pub static REMOVE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r"
if ARGV[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 1
   and (redis.call('HGET', KEYS[1], SESSION.GENERATION) or '0') ~= ARGV[1] then
  return { 'moved' }
end
local answer = { 'ok', redis.call('HGET', KEYS[1], SESSION.USER_ID) or '' }
for _, ch in ipairs(redis.call('SMEMBERS', KEYS[2])) do table.insert(answer, ch) end
redis.call('DEL', KEYS[1])
return answer
")
});

/// Heartbeat or drain of a registered node (`KEYS[1]`): sets field `ARGV[1]` to `ARGV[2]`
/// (and `last_hb` to `ARGV[3]` when given) only if the node exists. Answers its `draining`
/// flag, or nil when unknown.
pub static NODE_UPDATE: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] then redis.call('HSET', KEYS[1], NODE.LAST_HEARTBEAT, ARGV[3]) end
return redis.call('HGET', KEYS[1], NODE.DRAINING) or '0'
"#)
});

/// A script with the shared hash field names ([`fields::substitute`]) in place.
fn lua(body: &str) -> Script {
    Script::new(&fields::substitute(body))
}

/// Denials appended to a channel's audit stream per window; the rest are counted.
pub const DENIALS_PER_WINDOW: i64 = 20;

/// The audit policy every channel script takes as `ARGV[5]`: `cap:N:W` without the audit
/// writer (each stream is the trail, trimmed to about `N` entries), `keep:N:W` with it (the
/// writer trims what it has copied; a stream with `N` entries waiting takes no more denials);
/// `W` is the denial window in milliseconds.
pub fn audit_policy(writer: bool, n: u32, denial_window_ms: u32) -> String {
    let mode = if writer { "keep" } else { "cap" };
    format!("{mode}:{n}:{denial_window_ms}")
}

fn channel_script(body: &str, sharded: bool) -> Script {
    let prelude = PRELUDE.replace("{DENIALS_PER_WINDOW}", &DENIALS_PER_WINDOW.to_string());
    lua(&sharded_publish(&format!("{prelude}\n{body}"), sharded))
}

/// Under Cluster, channel and user events go out on sharded pub/sub (`SPUBLISH`, Redis 7):
/// only the master of the topic's slot carries them, instead of every node of the cluster.
fn sharded_publish(script: &str, sharded: bool) -> String {
    if sharded {
        script.replace("redis.call('PUBLISH', ", "redis.call('SPUBLISH', ")
    } else {
        script.to_owned()
    }
}

/// The scripts that publish on a channel's or a user's topic, compiled (hashed) once per
/// process.
#[derive(Debug)]
pub struct ChannelScripts {
    pub acquire: Script,
    pub renew: Script,
    pub release: Script,
    pub force_release: Script,
    pub expire: Script,
    pub join: Script,
    pub leave: Script,
    pub state: Script,
    pub emergency_take: Script,
    pub emergency_release: Script,
    /// [`MOVE`]'s script.
    pub moved: Script,
    /// [`UPDATE_GRANTS`]'s script (it publishes on the user's topic).
    pub update_grants: Script,
}

impl ChannelScripts {
    fn new(sharded: bool) -> Self {
        Self {
            acquire: channel_script(ACQUIRE, sharded),
            renew: channel_script(RENEW, sharded),
            release: channel_script(RELEASE, sharded),
            force_release: channel_script(FORCE_RELEASE, sharded),
            expire: channel_script(EXPIRE, sharded),
            join: channel_script(JOIN, sharded),
            leave: channel_script(LEAVE, sharded),
            state: channel_script(STATE, sharded),
            emergency_take: channel_script(EMERGENCY_TAKE, sharded),
            emergency_release: channel_script(EMERGENCY_RELEASE, sharded),
            moved: lua(&sharded_publish(MOVE, sharded)),
            update_grants: lua(&sharded_publish(UPDATE_GRANTS, sharded)),
        }
    }

    /// The channel scripts for one server (`PUBLISH`) or a Cluster (`SPUBLISH`).
    pub fn get(sharded: bool) -> &'static Self {
        if sharded { &CHANNEL_SHARDED } else { &CHANNEL }
    }
}

static CHANNEL: LazyLock<ChannelScripts> = LazyLock::new(|| ChannelScripts::new(false));
static CHANNEL_SHARDED: LazyLock<ChannelScripts> = LazyLock::new(|| ChannelScripts::new(true));

/// Compare-and-set of a sync session. `KEYS`: state, audit stream, event channel. `ARGV`:
/// expected version ('' = must not exist), new state (JSON), new version, action, time to live
/// in ms ('' = none: running), audit stream length, what the audit entry records (the whole
/// state on creation, the change otherwise). Answers `{'ok', version}` or
/// `{'conflict', stored version}`.
pub static SYNC_PUT: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local cur = redis.call('GET', KEYS[1])
local actual = 0
if cur then actual = tonumber(cjson.decode(cur).version) end
if ARGV[1] == '' then
  if cur then return { 'conflict', actual } end
elseif tonumber(ARGV[1]) ~= actual or not cur then
  return { 'conflict', actual }
end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[5] == '' then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[6] == '0' then
  redis.call('XADD', KEYS[2], '*', 'action', ARGV[4], 'version', ARGV[3],
             'at', tostring(now), 'state', ARGV[7])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'action', ARGV[4], 'version', ARGV[3],
             'at', tostring(now), 'state', ARGV[7])
end
redis.call('PUBLISH', KEYS[3], ARGV[2])
return { 'ok', tonumber(ARGV[3]) }
"#)
});

/// Deletes a sync session if its version is `ARGV[1]` ('' = any). `KEYS` as for `SYNC_PUT`;
/// `ARGV[2]` the session id, `ARGV[3]` the audit stream length. Answers `{'ok', version}`,
/// `{'conflict', stored}` or `{'missing', 0}`.
pub static SYNC_DELETE: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return { 'missing', 0 } end
local st = cjson.decode(cur)
local actual = tonumber(st.version)
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= actual then return { 'conflict', actual } end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local doc = cjson.encode({ deleted = true, session_id = ARGV[2], version = actual + 1,
                          channel_id = st.channel_id })
if ARGV[3] == '0' then
  redis.call('XADD', KEYS[2], '*', 'action', 'delete',
             'version', tostring(actual + 1), 'at', tostring(now), 'state', doc)
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'action', 'delete',
             'version', tostring(actual + 1), 'at', tostring(now), 'state', doc)
end
redis.call('PUBLISH', KEYS[3], doc)
return { 'ok', actual + 1 }
"#)
});

/// Trims what the audit writer's group (`ARGV[1]`) has copied from audit stream `KEYS[1]`, in
/// one step with the check that nothing is pending (an entry another replica has read but not
/// yet copied must stay readable). Then drops the whole stream when its newest entry is the
/// last copied and it has ended: its owner `KEYS[2]` (a sync session) is gone, or, with no
/// owner (a channel), nothing was appended for `ARGV[2]` ms. Answers 0 (entries pending),
/// 1 (trimmed) or 2 (dropped).
pub static TRIM_COPIED: LazyLock<Script> = LazyLock::new(|| {
    lua(r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last, pending
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  if f['name'] == ARGV[1] then last, pending = f['last-delivered-id'], f['pending'] end
end
if not last or pending > 0 then return 0 end
redis.call('XTRIM', KEYS[1], 'MINID', last)
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if newest and newest[1] ~= last then return 1 end
local ended
if KEYS[2] then
  ended = redis.call('EXISTS', KEYS[2]) == 0
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local at = newest and tonumber(string.match(newest[1], '^(%d+)')) or 0
  ended = now - at >= tonumber(ARGV[2])
end
if not ended then return 1 end
redis.call('DEL', KEYS[1])
return 2
")
});
