//! The Redis store: production state for any number of state-svc replicas.
//!
//! - `keys`: every key name; `scripts`: every Lua script; `wire`: the JSON they answer with;
//!   `listener`: the pub/sub connection that feeds the hub.
//! - The hot path uses one shared multiplexed connection ([`ConnectionManager`], which
//!   reconnects by itself); pub/sub has its own connection.
//! - Every call is bounded by `timeout`: when Redis is unreachable a call fails with
//!   `Unavailable` (so nobody is granted the floor) instead of hanging, and the next call after
//!   Redis returns succeeds without a restart.

mod keys;
mod listener;
pub mod scripts;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::keys::Keys;
use self::listener::{Listener, RECONCILE_QUEUE, ReconcileRequest};
use self::scripts::CHANNEL;
use self::wire::{
    StoredMember, WireAcquire, WireClaim, WireEmergency, WireExpire, WireGrants, WireLeave,
    WireRelease, WireRenew, WireState, parse,
};
use crate::domain::{
    AcquireOutcome, Acquired, ChannelConfig, ChannelId, ChannelState, EmergencyHolder, EventId,
    EventInfo, FloorRefusal, GrantChange, GrantsUpdate, LeaveOutcome, MAX_GRANTS_PER_USER,
    MediaNode, NewSession, NodeId, NodeRegistration, Placement, ReleaseOutcome, RemoveOutcome,
    RenewOutcome, Renewed, Role, Session, SessionId, Speaker, SyncId, UserGrants, UserId,
    choose_node, now_ms,
};
use crate::error::{STORE_ERRORS, StoreError};
use crate::hub::Hub;
use crate::store::{Store, StoreSettings, SweepReport, event_channel_list};
use crate::sync::SyncSession;

/// How the Redis store connects and bounds its work.
#[derive(Clone)]
pub struct RedisOptions {
    pub url: String,
    /// Prefix of every key (default `ptt`); tests use one per test.
    pub key_prefix: String,
    /// Upper bound of every Redis call.
    pub timeout: Duration,
    /// Approximate length each channel's audit stream is trimmed to.
    pub audit_maxlen: u32,
    /// Pub/sub channel of control-plane membership updates.
    pub membership_channel: String,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("audit_maxlen", &self.audit_maxlen)
            .field("membership_channel", &self.membership_channel)
            .finish()
    }
}

/// The URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A Redis client for `url` with `TCP_NODELAY`: many small pipelined commands share one
/// connection, and with Nagle a write waits for the ACK of the previous one, which Redis delays
/// (up to 40 ms on Linux).
pub fn client(url: &str) -> Result<redis::Client, StoreError> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|_| StoreError::InvalidArgument("invalid redis url"))?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info).map_err(|_| StoreError::InvalidArgument("invalid redis url"))
}

/// Extra time a floor hash outlives its maximum talk time before Redis collects it.
const GC_GRACE_MS: u32 = 60_000;
/// Extra time session keys outlive their expiry, so the sweeper still finds their channels.
const SESSION_GRACE_MS: i64 = 3_600_000;
/// Entries the sweeper takes from a deadline index per pass.
const SWEEP_BATCH: isize = 256;

#[derive(Debug, Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    settings: StoreSettings,
    timeout: Duration,
    audit_maxlen: String,
    listener: mpsc::Sender<ReconcileRequest>,
}

fn split_hash(map: &HashMap<String, String>, field: &str) -> Option<String> {
    map.get(field).cloned()
}

fn num<T: std::str::FromStr + Default>(map: &HashMap<String, String>, field: &str) -> T {
    map.get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

/// A failed Redis call, classified and counted: the store's call boundary is where Redis
/// errors are handled.
fn failed(error: &redis::RedisError) -> StoreError {
    let error = StoreError::redis(error);
    if matches!(error, StoreError::Unavailable(_)) {
        STORE_ERRORS.inc();
    }
    error
}

fn timed_out() -> StoreError {
    STORE_ERRORS.inc();
    StoreError::Unavailable("redis call timed out".into())
}

impl RedisStore {
    /// Prepares the store and starts its pub/sub listener. Does not wait for Redis: a store
    /// created while Redis is down answers `Unavailable` until it is back.
    pub fn connect(
        options: &RedisOptions,
        settings: StoreSettings,
        hub: Arc<Hub>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let client = client(&options.url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| StoreError::redis(&e))?;
        let keys = Keys::new(&options.key_prefix);
        let (tx, rx) = mpsc::channel(RECONCILE_QUEUE);
        let listener = Listener {
            client,
            keys: keys.clone(),
            hub,
            membership_channel: options.membership_channel.clone(),
            timeout: options.timeout,
            requests: rx,
            shutdown,
        };
        tasks.spawn(listener.run());
        Ok(Self {
            conn,
            keys,
            settings,
            timeout: options.timeout,
            audit_maxlen: options.audit_maxlen.to_string(),
            listener: tx,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs `fut` within the store's time bound.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| failed(&e)),
            Err(_) => Err(timed_out()),
        }
    }

    /// `EVALSHA` of a channel script with the standard keys and arguments, plus `extra`.
    fn evalsha(&self, script: &Script, ch: &ChannelId, extra: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(9);
        for key in self.keys.channel(ch).all() {
            cmd.arg(key);
        }
        cmd.arg(ch.as_str())
            .arg(self.settings.lease_ms)
            .arg(self.settings.max_talk_ms)
            .arg(GC_GRACE_MS)
            .arg(&self.audit_maxlen);
        for arg in extra {
            cmd.arg(*arg);
        }
        cmd
    }

    /// Runs `pipe`, whose first command is `EVALSHA` of `script`; loads the script and retries
    /// once if Redis does not know it (after a restart or a `SCRIPT FLUSH`).
    async fn run_script_pipe<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut conn)).await {
            Ok(Err(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.bounded(script.prepare_invoke().load_async(&mut conn))
                    .await?;
                self.bounded(pipe.query_async::<T>(&mut conn)).await
            }
            Ok(result) => result.map_err(|e| failed(&e)),
            Err(_) => Err(timed_out()),
        }
    }

    /// Runs a channel script and returns its JSON answer.
    async fn channel_script(
        &self,
        script: &Script,
        ch: &ChannelId,
        extra: &[&str],
    ) -> Result<String, StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.evalsha(script, ch, extra));
        let (answer,): (String,) = self.run_script_pipe(script, &pipe).await?;
        Ok(answer)
    }

    /// Keeps a sync session's entry in the deadline index in step with its state.
    async fn set_sync_deadline(
        &self,
        id: &SyncId,
        deadline: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let index = self.keys.sync_deadlines();
        match deadline {
            Some(at) => {
                self.bounded(conn.zadd::<_, _, _, ()>(index, id.as_str(), at))
                    .await
            }
            None => {
                self.bounded(conn.zrem::<_, _, ()>(index, id.as_str()))
                    .await
            }
        }
    }

    /// Makes sure the sweeper looks at this channel's floor no later than `at_ms`.
    async fn schedule_floor_check(&self, ch: &ChannelId, at_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(self.schedule_cmd(ch, at_ms).query_async::<()>(&mut conn))
            .await
    }

    /// `ZADD LT`: the index entry only ever moves earlier here; the sweeper moves it to the
    /// grant's real expiry when it looks.
    fn schedule_cmd(&self, ch: &ChannelId, at_ms: i64) -> redis::Cmd {
        redis::cmd("ZADD")
            .arg(self.keys.floor_deadlines())
            .arg("LT")
            .arg(at_ms)
            .arg(ch.as_str())
            .to_owned()
    }

    async fn reschedule(
        &self,
        index: &str,
        member: &str,
        seen: &str,
        next: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let next = next.map(|n| n.to_string()).unwrap_or_default();
        let mut invocation = scripts::RESCHEDULE.prepare_invoke();
        invocation.key(index).arg(member).arg(seen).arg(next);
        self.bounded(invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    async fn leave(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
        reason: &str,
    ) -> Result<LeaveOutcome, StoreError> {
        let raw = self
            .channel_script(&CHANNEL.leave, ch, &[sid.as_str(), reason])
            .await?;
        let left: WireLeave = parse(&raw, "leave result")?;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.srem(self.keys.session_channels(sid), ch.as_str())
            .ignore();
        if let Some(node) = left.node.as_deref().and_then(|n| NodeId::parse(n).ok()) {
            pipe.srem(self.keys.media_node_channels(&node), ch.as_str())
                .ignore();
        }
        if left.empty {
            pipe.srem(self.keys.channels_index(), ch.as_str()).ignore();
        }
        self.bounded(pipe.query_async::<()>(&mut conn)).await?;
        Ok(LeaveOutcome {
            was_member: left.was_member,
            released_floor: left.released,
        })
    }

    async fn read_session(&self, sid: &SessionId) -> Result<Option<Session>, StoreError> {
        let mut conn = self.conn.clone();
        let (hash, channels): (HashMap<String, String>, Vec<String>) = self
            .bounded(
                redis::pipe()
                    .hgetall(self.keys.session(sid))
                    .smembers(self.keys.session_channels(sid))
                    .query_async(&mut conn),
            )
            .await?;
        if hash.is_empty() {
            return Ok(None);
        }
        let corrupt = || StoreError::Internal("unreadable session in redis".into());
        let mut channels: Vec<ChannelId> = channels
            .iter()
            .filter_map(|c| ChannelId::parse(c).ok())
            .collect();
        channels.sort();
        Ok(Some(Session {
            session_id: sid.clone(),
            user_id: UserId::parse(&split_hash(&hash, "uid").unwrap_or_default())
                .map_err(|_| corrupt())?,
            user_name: split_hash(&hash, "name").unwrap_or_default(),
            gateway_id: split_hash(&hash, "gw").unwrap_or_default(),
            created_at_ms: num(&hash, "created"),
            expires_at_ms: num(&hash, "expires"),
            ttl_ms: num(&hash, "ttl"),
            channels,
        }))
    }

    fn node_from_hash(
        &self,
        id: NodeId,
        hash: &HashMap<String, String>,
        channels: u32,
        now: i64,
    ) -> MediaNode {
        let last: i64 = num(hash, "last_hb");
        MediaNode {
            node_id: id,
            grpc_addr: split_hash(hash, "addr").unwrap_or_default(),
            announced_ip: split_hash(hash, "ip").unwrap_or_default(),
            capacity: num(hash, "capacity"),
            load: num(hash, "load"),
            channels,
            draining: hash.get("draining").is_some_and(|d| d == "1"),
            last_heartbeat_ms: last,
            live: now - last <= i64::from(self.settings.node_dead_after_ms),
        }
    }

    async fn read_node(&self, id: &NodeId) -> Result<Option<MediaNode>, StoreError> {
        let mut conn = self.conn.clone();
        let (hash, channels): (HashMap<String, String>, u32) = self
            .bounded(
                redis::pipe()
                    .hgetall(self.keys.media_node(id))
                    .scard(self.keys.media_node_channels(id))
                    .query_async(&mut conn),
            )
            .await?;
        if hash.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.node_from_hash(
            id.clone(),
            &hash,
            channels,
            now_ms(),
        )))
    }

    async fn sweep_floors(&self, now: i64) -> Result<u32, StoreError> {
        let index = self.keys.floor_deadlines();
        let mut conn = self.conn.clone();
        let due: Vec<(String, String)> = self
            .bounded(
                redis::cmd("ZRANGE")
                    .arg(&index)
                    .arg("-inf")
                    .arg(now)
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(SWEEP_BATCH)
                    .arg("WITHSCORES")
                    .query_async(&mut conn),
            )
            .await?;
        let mut expired = 0;
        for (member, score) in due {
            let Ok(ch) = ChannelId::parse(&member) else {
                self.reschedule(&index, &member, &score, None).await?;
                continue;
            };
            let raw = self.channel_script(&CHANNEL.expire, &ch, &[]).await?;
            let result: WireExpire = parse(&raw, "expire result")?;
            expired += u32::from(result.expired);
            self.reschedule(&index, &member, &score, result.next)
                .await?;
        }
        Ok(expired)
    }

    async fn sweep_sessions(&self, now: i64) -> Result<u32, StoreError> {
        let index = self.keys.session_deadlines();
        let mut conn = self.conn.clone();
        let due: Vec<(String, String)> = self
            .bounded(
                redis::cmd("ZRANGE")
                    .arg(&index)
                    .arg("-inf")
                    .arg(now)
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(SWEEP_BATCH)
                    .arg("WITHSCORES")
                    .query_async(&mut conn),
            )
            .await?;
        let mut expired = 0;
        for (member, score) in due {
            let Ok(sid) = SessionId::parse(&member) else {
                self.reschedule(&index, &member, &score, None).await?;
                continue;
            };
            match self.read_session(&sid).await? {
                Some(s) if s.expires_at_ms > now => {
                    self.reschedule(&index, &member, &score, Some(s.expires_at_ms))
                        .await?;
                }
                _ => {
                    tracing::info!(session_id = %sid, "session expired");
                    self.remove_session(&sid).await?;
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }
}

fn refusal(r: &str) -> Result<FloorRefusal, StoreError> {
    Ok(match r {
        "not_held" => FloorRefusal::NotHeld,
        "not_holder" => FloorRefusal::NotHolder,
        "stale_epoch" => FloorRefusal::StaleEpoch,
        "max_talk_time" => FloorRefusal::MaxTalkTime,
        other => {
            return Err(StoreError::Internal(format!(
                "unknown script result {other}"
            )));
        }
    })
}

/// Converts an acquire script's answer (also the emergency take's).
fn acquire_outcome(raw: &str) -> Result<AcquireOutcome, StoreError> {
    let a: WireAcquire = parse(raw, "acquire result")?;
    let holder = a.holder.map(wire::WireHolder::into_domain).transpose()?;
    let result = match a.r.as_str() {
        "not_member" => return Err(StoreError::NotMember),
        "granted" => Acquired::Granted {
            holder: holder.ok_or_else(|| missing("holder"))?,
            max_talk_ms: u32::try_from(a.max_talk.unwrap_or_default()).unwrap_or(u32::MAX),
            preempted: a
                .preempted
                .map(wire::WireSpeaker::into_domain)
                .transpose()?,
        },
        "denied" => Acquired::Denied {
            holder: holder.ok_or_else(|| missing("holder"))?,
            retry_after_ms: a.retry.unwrap_or_default(),
        },
        "queued" => Acquired::Queued {
            holder: holder.ok_or_else(|| missing("holder"))?,
            position: a.pos.unwrap_or_default(),
        },
        other => {
            return Err(StoreError::Internal(format!(
                "unknown acquire result {other}"
            )));
        }
    };
    Ok(AcquireOutcome {
        result,
        server_time_ms: a.now,
    })
}

fn release_outcome(raw: &str) -> Result<ReleaseOutcome, StoreError> {
    let r: WireRelease = parse(raw, "release result")?;
    Ok(ReleaseOutcome {
        refusal: if r.r == "released" {
            None
        } else {
            Some(refusal(&r.r)?)
        },
        epoch: wire::epoch(&r.epoch)?,
        dequeued: r.dequeued,
    })
}

fn missing(what: &str) -> StoreError {
    StoreError::Internal(format!("script result without {what}"))
}

impl Store for RedisStore {
    async fn acquire_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        priority: u32,
    ) -> Result<AcquireOutcome, StoreError> {
        let priority_arg = priority.to_string();
        // The acquire and the sweeper's index entry go in one round trip. The entry is an
        // estimate (now + the default lease); a grant that ends sooner is rescheduled below.
        let estimate = now_ms() + i64::from(self.settings.lease_ms);
        let mut pipe = redis::pipe();
        pipe.add_command(self.evalsha(&CHANNEL.acquire, ch, &[sid.as_str(), &priority_arg]))
            .add_command(self.schedule_cmd(ch, estimate))
            .ignore();
        let (raw,): (String,) = self.run_script_pipe(&CHANNEL.acquire, &pipe).await?;
        let outcome = acquire_outcome(&raw)?;
        if let Acquired::Granted { holder, .. } = &outcome.result
            && holder.expires_at_ms < estimate
        {
            self.schedule_floor_check(ch, holder.expires_at_ms).await?;
        }
        Ok(outcome)
    }

    async fn renew_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        epoch: u64,
    ) -> Result<RenewOutcome, StoreError> {
        let epoch_arg = epoch.to_string();
        let raw = self
            .channel_script(&CHANNEL.renew, ch, &[sid.as_str(), &epoch_arg])
            .await?;
        let r: WireRenew = parse(&raw, "renew result")?;
        let result = match r.r.as_str() {
            "renewed" => Ok(Renewed {
                expires_at_ms: r.expires.ok_or_else(|| missing("expiry"))?,
                max_until_ms: r.max_until.ok_or_else(|| missing("max talk time"))?,
            }),
            other => Err(refusal(other)?),
        };
        Ok(RenewOutcome {
            result,
            server_time_ms: r.now,
        })
    }

    async fn release_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        epoch: Option<u64>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let epoch_arg = epoch.unwrap_or(0).to_string();
        let raw = self
            .channel_script(&CHANNEL.release, ch, &[sid.as_str(), &epoch_arg])
            .await?;
        release_outcome(&raw)
    }

    async fn force_release_floor(
        &self,
        ch: &ChannelId,
        epoch: Option<u64>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let epoch_arg = epoch.unwrap_or(0).to_string();
        let raw = self
            .channel_script(&CHANNEL.force_release, ch, &[&epoch_arg])
            .await?;
        // A force release never dequeues anyone.
        Ok(ReleaseOutcome {
            dequeued: false,
            ..release_outcome(&raw)?
        })
    }

    async fn channel_state(&self, ch: &ChannelId) -> Result<ChannelState, StoreError> {
        let raw = self.channel_script(&CHANNEL.state, ch, &[]).await?;
        parse::<WireState>(&raw, "channel state")?.into_domain(ch)
    }

    async fn channel_config(&self, ch: &ChannelId) -> Result<ChannelConfig, StoreError> {
        let mut conn = self.conn.clone();
        let hash: HashMap<String, String> = self
            .bounded(conn.hgetall(self.keys.channel(ch).config))
            .await?;
        Ok(ChannelConfig {
            queue_enabled: hash.get("queue").is_some_and(|q| q == "1"),
            lease_ms: num(&hash, "lease_ms"),
            max_talk_ms: num(&hash, "max_talk_ms"),
        })
    }

    async fn set_channel_config(
        &self,
        ch: &ChannelId,
        config: ChannelConfig,
    ) -> Result<ChannelConfig, StoreError> {
        let config = config.validate()?;
        let mut conn = self.conn.clone();
        let fields = [
            (
                "queue",
                if config.queue_enabled {
                    "1".to_owned()
                } else {
                    "0".to_owned()
                },
            ),
            ("lease_ms", config.lease_ms.to_string()),
            ("max_talk_ms", config.max_talk_ms.to_string()),
        ];
        self.bounded(conn.hset_multiple::<_, _, _, ()>(self.keys.channel(ch).config, &fields))
            .await?;
        Ok(config)
    }

    async fn create_session(&self, new: NewSession) -> Result<Session, StoreError> {
        let now = now_ms();
        let ttl_ms = if new.ttl_ms == 0 {
            self.settings.session_ttl_ms
        } else {
            new.ttl_ms
        };
        let ttl = i64::from(ttl_ms);
        let session = Session {
            session_id: SessionId::generate(),
            user_id: new.user_id,
            user_name: new.user_name,
            gateway_id: new.gateway_id,
            created_at_ms: now,
            expires_at_ms: now + ttl,
            ttl_ms,
            channels: Vec::new(),
        };
        let key = self.keys.session(&session.session_id);
        let sid = session.session_id.as_str();
        let fields = [
            ("uid", session.user_id.as_str().to_owned()),
            ("name", session.user_name.clone()),
            ("gw", session.gateway_id.clone()),
            ("created", now.to_string()),
            ("expires", session.expires_at_ms.to_string()),
            ("ttl", ttl.to_string()),
        ];
        let mut conn = self.conn.clone();
        self.bounded(
            redis::pipe()
                .hset_multiple(&key, &fields)
                .ignore()
                .pexpire(&key, ttl + SESSION_GRACE_MS)
                .ignore()
                .sadd(self.keys.user_sessions(&session.user_id), sid)
                .ignore()
                .zadd(self.keys.session_deadlines(), sid, session.expires_at_ms)
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await?;
        Ok(session)
    }

    async fn touch_session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        let now = now_ms();
        let mut session = self
            .read_session(sid)
            .await?
            .ok_or(StoreError::NotFound("session"))?;
        if session.expires_at_ms <= now {
            return Err(StoreError::NotFound("session"));
        }
        let expires = session.expires_at_ms.max(now + i64::from(session.ttl_ms));
        let mut conn = self.conn.clone();
        let mut invocation = scripts::TOUCH_SESSION.prepare_invoke();
        invocation
            .key(self.keys.session(sid))
            .key(self.keys.session_channels(sid))
            .arg(expires)
            .arg(expires - now + SESSION_GRACE_MS);
        let exists: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if exists == 0 {
            return Err(StoreError::NotFound("session"));
        }
        self.bounded(conn.zadd::<_, _, _, ()>(
            self.keys.session_deadlines(),
            sid.as_str(),
            expires,
        ))
        .await?;
        session.expires_at_ms = expires;
        Ok(session)
    }

    async fn session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        self.read_session(sid)
            .await?
            .ok_or(StoreError::NotFound("session"))
    }

    async fn user_sessions(&self, uid: &UserId) -> Result<Vec<Session>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = self
            .bounded(conn.smembers(self.keys.user_sessions(uid)))
            .await?;
        let mut sessions = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(sid) = SessionId::parse(&id) else {
                continue;
            };
            match self.read_session(&sid).await? {
                Some(s) => sessions.push(s),
                None => {
                    let _: () = self
                        .bounded(conn.srem(self.keys.user_sessions(uid), &id))
                        .await?;
                }
            }
        }
        sessions.sort_by_key(|s| s.created_at_ms);
        Ok(sessions)
    }

    async fn join_channel(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
    ) -> Result<ChannelState, StoreError> {
        let session = self
            .read_session(sid)
            .await?
            .ok_or(StoreError::NotFound("session"))?;
        let member = serde_json::to_string(&StoredMember {
            uid: session.user_id.as_str(),
            name: &session.user_name,
            at: now_ms(),
        })
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        let raw = self
            .channel_script(&CHANNEL.join, ch, &[sid.as_str(), &member])
            .await?;
        let state = parse::<WireState>(&raw, "channel state")?.into_domain(ch)?;
        let mut conn = self.conn.clone();
        let (_, exists): ((), bool) = self
            .bounded(
                redis::pipe()
                    .sadd(self.keys.session_channels(sid), ch.as_str())
                    .exists(self.keys.session(sid))
                    .sadd(self.keys.channels_index(), ch.as_str())
                    .ignore()
                    .query_async(&mut conn),
            )
            .await?;
        if !exists {
            // The session was removed while joining: undo, so no member is left behind.
            self.leave(sid, ch, "disconnected").await?;
            return Err(StoreError::NotFound("session"));
        }
        Ok(state)
    }

    async fn leave_channel(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
    ) -> Result<LeaveOutcome, StoreError> {
        self.leave(sid, ch, "left_channel").await
    }

    async fn remove_session(&self, sid: &SessionId) -> Result<RemoveOutcome, StoreError> {
        // The session disappears first, so nobody sees it after its channels announce it left.
        // Its channel set and deadline entry go last: if this is interrupted, the sweeper finds
        // the entry, sees no session, and finishes the removal.
        let mut conn = self.conn.clone();
        let (uid, channels, ()): (Option<String>, Vec<String>, ()) = self
            .bounded(
                redis::pipe()
                    .hget(self.keys.session(sid), "uid")
                    .smembers(self.keys.session_channels(sid))
                    .del(self.keys.session(sid))
                    .query_async(&mut conn),
            )
            .await?;
        if let Some(uid) = uid.as_deref().and_then(|u| UserId::parse(u).ok()) {
            let _: () = self
                .bounded(conn.srem(self.keys.user_sessions(&uid), sid.as_str()))
                .await?;
        }
        let mut outcome = RemoveOutcome::default();
        for raw in channels {
            let Ok(ch) = ChannelId::parse(&raw) else {
                continue;
            };
            let left = self.leave(sid, &ch, "disconnected").await?;
            if left.was_member {
                outcome.channels_left.push(ch);
            }
            outcome.floors_released += u32::from(left.released_floor);
        }
        self.bounded(
            redis::pipe()
                .del(self.keys.session_channels(sid))
                .ignore()
                .zrem(self.keys.session_deadlines(), sid.as_str())
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await?;
        outcome.channels_left.sort();
        Ok(outcome)
    }

    async fn register_node(&self, node: NodeRegistration) -> Result<(), StoreError> {
        let key = self.keys.media_node(&node.node_id);
        let fields = [
            ("addr", node.grpc_addr),
            ("ip", node.announced_ip),
            ("capacity", node.capacity.to_string()),
            ("load", node.load.to_string()),
            ("draining", "0".to_owned()),
            ("last_hb", now_ms().to_string()),
        ];
        let mut conn = self.conn.clone();
        self.bounded(
            redis::pipe()
                .hset_multiple(&key, &fields)
                .ignore()
                .sadd(self.keys.media_nodes(), node.node_id.as_str())
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await
    }

    async fn heartbeat(&self, node: &NodeId, load: u32) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = scripts::NODE_UPDATE.prepare_invoke();
        invocation
            .key(self.keys.media_node(node))
            .arg("load")
            .arg(load)
            .arg(now_ms());
        let draining: Option<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        draining
            .map(|d| d == "1")
            .ok_or(StoreError::NotFound("media node"))
    }

    async fn drain_node(&self, node: &NodeId) -> Result<MediaNode, StoreError> {
        let mut conn = self.conn.clone();
        let mut invocation = scripts::NODE_UPDATE.prepare_invoke();
        invocation
            .key(self.keys.media_node(node))
            .arg("draining")
            .arg("1");
        let found: Option<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        found.ok_or(StoreError::NotFound("media node"))?;
        self.read_node(node)
            .await?
            .ok_or(StoreError::NotFound("media node"))
    }

    async fn deregister_node(&self, node: &NodeId) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(
            redis::pipe()
                .del(self.keys.media_node(node))
                .ignore()
                .del(self.keys.media_node_channels(node))
                .ignore()
                .srem(self.keys.media_nodes(), node.as_str())
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await
    }

    async fn list_nodes(&self) -> Result<Vec<MediaNode>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = self.bounded(conn.smembers(self.keys.media_nodes())).await?;
        let ids: Vec<NodeId> = ids.iter().filter_map(|i| NodeId::parse(i).ok()).collect();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(self.keys.media_node(id))
                .scard(self.keys.media_node_channels(id));
        }
        let rows: Vec<(HashMap<String, String>, u32)> = if ids.is_empty() {
            Vec::new()
        } else {
            let flat: Vec<redis::Value> = self.bounded(pipe.query_async(&mut conn)).await?;
            flat.chunks(2)
                .map(|pair| {
                    let hash = redis::from_redis_value(pair[0].clone()).unwrap_or_default();
                    let count = redis::from_redis_value(pair[1].clone()).unwrap_or_default();
                    (hash, count)
                })
                .collect()
        };
        let now = now_ms();
        let mut nodes: Vec<MediaNode> = ids
            .into_iter()
            .zip(rows)
            .filter(|(_, (hash, _))| !hash.is_empty())
            .map(|(id, (hash, count))| self.node_from_hash(id, &hash, count, now))
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(nodes)
    }

    async fn place_channel(&self, ch: &ChannelId) -> Result<Placement, StoreError> {
        let media_key = self.keys.channel(ch).media;
        let mut conn = self.conn.clone();
        // A few rounds at most: each round either returns or loses a compare-and-set race to a
        // caller whose answer the next round then accepts.
        for _ in 0..4 {
            let current: Option<String> = self.bounded(conn.get(&media_key)).await?;
            let current_node = current.as_deref().and_then(|c| NodeId::parse(c).ok());
            if let Some(node_id) = &current_node
                && let Some(node) = self.read_node(node_id).await?
                && node.live
            {
                return Ok(Placement {
                    node,
                    placed_now: false,
                });
            }
            let nodes = self.list_nodes().await?;
            let chosen = choose_node(&nodes).ok_or(StoreError::NoMediaNode)?.clone();
            let mut invocation = scripts::PLACE.prepare_invoke();
            invocation
                .key(&media_key)
                .arg(current.as_deref().unwrap_or(""))
                .arg(chosen.node_id.as_str());
            let (_holder, set_now): (String, bool) =
                self.bounded(invocation.invoke_async(&mut conn)).await?;
            if set_now {
                let mut pipe = redis::pipe();
                pipe.sadd(self.keys.media_node_channels(&chosen.node_id), ch.as_str())
                    .ignore();
                if let Some(old) = &current_node {
                    pipe.srem(self.keys.media_node_channels(old), ch.as_str())
                        .ignore();
                }
                self.bounded(pipe.query_async::<()>(&mut conn)).await?;
                tracing::info!(channel_id = %ch, node_id = %chosen.node_id, "channel placed");
                let node = self.read_node(&chosen.node_id).await?.unwrap_or(chosen);
                return Ok(Placement {
                    node,
                    placed_now: true,
                });
            }
        }
        Err(StoreError::Unavailable("placement contended".into()))
    }

    async fn placement(&self, ch: &ChannelId) -> Result<Option<MediaNode>, StoreError> {
        let mut conn = self.conn.clone();
        let current: Option<String> = self.bounded(conn.get(self.keys.channel(ch).media)).await?;
        match current.as_deref().and_then(|c| NodeId::parse(c).ok()) {
            Some(node) => self.read_node(&node).await,
            None => Ok(None),
        }
    }

    async fn user_grants(&self, uid: &UserId) -> Result<UserGrants, StoreError> {
        let mut conn = self.conn.clone();
        let hash: HashMap<String, String> =
            self.bounded(conn.hgetall(self.keys.grants(uid))).await?;
        let version = num(&hash, "#v");
        let g = hash.into_iter().filter(|(k, _)| k != "#v").collect();
        WireGrants {
            r: String::new(),
            uid: None,
            v: version,
            g,
        }
        .into_domain(uid)
    }

    async fn update_grants(
        &self,
        uid: &UserId,
        change: &GrantChange,
    ) -> Result<GrantsUpdate, StoreError> {
        let mut invocation = scripts::UPDATE_GRANTS.prepare_invoke();
        invocation
            .key(self.keys.grants(uid))
            .arg(self.keys.grants_events())
            .arg(uid.as_str())
            .arg(
                change
                    .expect_version
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            )
            .arg(if change.replace { "1" } else { "0" })
            .arg(MAX_GRANTS_PER_USER);
        for (ch, role) in &change.set {
            invocation
                .arg(ch.as_str())
                .arg(role.map(Role::as_str).unwrap_or_default());
        }
        let mut conn = self.conn.clone();
        let raw: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let answer: WireGrants = parse(&raw, "grants result")?;
        let kind = answer.r.clone();
        let grants = answer.into_domain(uid)?;
        match kind.as_str() {
            "changed" => Ok(GrantsUpdate::Changed(grants)),
            "unchanged" => Ok(GrantsUpdate::Unchanged(grants)),
            "mismatch" => Ok(GrantsUpdate::VersionMismatch(grants)),
            "too_many" => Err(StoreError::InvalidArgument("too many grants")),
            other => Err(StoreError::Internal(format!(
                "unknown grants result {other}"
            ))),
        }
    }

    async fn set_event_channels(
        &self,
        eid: &EventId,
        channels: &[ChannelId],
    ) -> Result<EventInfo, StoreError> {
        let channels = event_channel_list(channels)?;
        let joined = channels
            .iter()
            .map(ChannelId::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let keys = self.keys.events();
        let mut invocation = scripts::SET_EVENT.prepare_invoke();
        invocation
            .key(&keys.channels)
            .key(&keys.channel_event)
            .key(&keys.emergency)
            .arg(eid.as_str())
            .arg(joined);
        let mut conn = self.conn.clone();
        let answer: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if answer == "busy" {
            return Err(StoreError::EmergencyActive);
        }
        Ok(EventInfo {
            event_id: eid.clone(),
            channels,
            emergency: None,
        })
    }

    async fn event(&self, eid: &EventId) -> Result<Option<EventInfo>, StoreError> {
        let keys = self.keys.events();
        let mut conn = self.conn.clone();
        let (channels, emergency): (Option<String>, Option<String>) = self
            .bounded(
                redis::pipe()
                    .hget(&keys.channels, eid.as_str())
                    .hget(&keys.emergency, eid.as_str())
                    .query_async(&mut conn),
            )
            .await?;
        let Some(channels) = channels else {
            return Ok(None);
        };
        Ok(Some(EventInfo {
            event_id: eid.clone(),
            channels: wire::channel_list(&channels)?,
            emergency: emergency
                .map(|raw| parse::<WireEmergency>(&raw, "emergency")?.into_domain())
                .transpose()?,
        }))
    }

    async fn channel_event(&self, ch: &ChannelId) -> Result<Option<EventId>, StoreError> {
        let mut conn = self.conn.clone();
        let eid: Option<String> = self
            .bounded(conn.hget(self.keys.events().channel_event, ch.as_str()))
            .await?;
        eid.map(|e| EventId::parse(&e).map_err(|_| missing("event id")))
            .transpose()
    }

    async fn claim_emergency(
        &self,
        eid: &EventId,
        by: &Speaker,
        force: bool,
    ) -> Result<Result<EventInfo, EmergencyHolder>, StoreError> {
        let keys = self.keys.events();
        let record = serde_json::to_string(&WireEmergency::from_speaker(by))
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut invocation = scripts::CLAIM_EMERGENCY.prepare_invoke();
        invocation
            .key(&keys.channels)
            .key(&keys.emergency)
            .arg(eid.as_str())
            .arg(by.session_id.as_str())
            .arg(by.priority)
            .arg(record)
            .arg(if force { "1" } else { "0" });
        let mut conn = self.conn.clone();
        let raw: String = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let claim: WireClaim = parse(&raw, "emergency claim")?;
        let holder = claim.em.map(WireEmergency::into_domain).transpose()?;
        match claim.r.as_str() {
            "no_event" => Err(StoreError::NotFound("event")),
            "busy" => Ok(Err(holder.ok_or_else(|| missing("emergency"))?)),
            "ok" => Ok(Ok(EventInfo {
                event_id: eid.clone(),
                channels: wire::channel_list(claim.chans.as_deref().unwrap_or_default())?,
                emergency: holder,
            })),
            other => Err(StoreError::Internal(format!(
                "unknown claim result {other}"
            ))),
        }
    }

    async fn clear_emergency(
        &self,
        eid: &EventId,
        sid: Option<&SessionId>,
    ) -> Result<Option<EmergencyHolder>, StoreError> {
        let mut invocation = scripts::CLEAR_EMERGENCY.prepare_invoke();
        invocation
            .key(self.keys.events().emergency)
            .arg(eid.as_str())
            .arg(sid.map(SessionId::as_str).unwrap_or_default());
        let mut conn = self.conn.clone();
        let raw: Option<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        raw.map(|r| parse::<WireEmergency>(&r, "emergency")?.into_domain())
            .transpose()
    }

    async fn emergency_take(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        eid: &EventId,
        priority: u32,
    ) -> Result<AcquireOutcome, StoreError> {
        let priority_arg = priority.to_string();
        let max_arg = self.settings.emergency_max_ms.to_string();
        let raw = self
            .channel_script(
                &CHANNEL.emergency_take,
                ch,
                &[sid.as_str(), &priority_arg, eid.as_str(), &max_arg],
            )
            .await?;
        let outcome = acquire_outcome(&raw)?;
        if let Acquired::Granted { holder, .. } = &outcome.result {
            self.schedule_floor_check(ch, holder.expires_at_ms).await?;
        }
        Ok(outcome)
    }

    async fn emergency_release(
        &self,
        ch: &ChannelId,
        sid: Option<&SessionId>,
        eid: &EventId,
    ) -> Result<ReleaseOutcome, StoreError> {
        let raw = self
            .channel_script(
                &CHANNEL.emergency_release,
                ch,
                &[sid.map(SessionId::as_str).unwrap_or_default(), eid.as_str()],
            )
            .await?;
        release_outcome(&raw)
    }

    async fn sync_get(&self, id: &SyncId) -> Result<Option<SyncSession>, StoreError> {
        let [key, _, _] = self.keys.sync(id);
        let mut conn = self.conn.clone();
        let raw: Option<String> = self.bounded(conn.get(key)).await?;
        raw.map(|r| parse::<SyncSession>(&r, "sync session"))
            .transpose()
    }

    async fn sync_put(
        &self,
        session: &SyncSession,
        expected: Option<u64>,
        action: &str,
    ) -> Result<(), StoreError> {
        let [key, audit, events] = self.keys.sync(&session.session_id);
        let doc =
            serde_json::to_string(session).map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut invocation = scripts::SYNC_PUT.prepare_invoke();
        invocation
            .key(key)
            .key(audit)
            .key(events)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(doc)
            .arg(session.version)
            .arg(action)
            .arg(session.ttl_ms().map(|t| t.to_string()).unwrap_or_default())
            .arg(&self.audit_maxlen);
        let mut conn = self.conn.clone();
        let (outcome, version): (String, u64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        if outcome != "ok" {
            return Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual: version,
            });
        }
        self.set_sync_deadline(&session.session_id, session.deadline())
            .await
    }

    async fn sync_delete(&self, id: &SyncId, expected: Option<u64>) -> Result<u64, StoreError> {
        let [key, audit, events] = self.keys.sync(id);
        let mut invocation = scripts::SYNC_DELETE.prepare_invoke();
        invocation
            .key(key)
            .key(audit)
            .key(events)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(id.as_str())
            .arg(&self.audit_maxlen);
        let mut conn = self.conn.clone();
        let (outcome, version): (String, u64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        match outcome.as_str() {
            "ok" => {
                self.set_sync_deadline(id, None).await?;
                Ok(version)
            }
            "missing" => Err(StoreError::NotFound("sync session")),
            _ => Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual: version,
            }),
        }
    }

    async fn sync_due(&self, now: i64, limit: usize) -> Result<Vec<SyncId>, StoreError> {
        let mut conn = self.conn.clone();
        let due: Vec<String> = self
            .bounded(conn.zrangebyscore_limit(
                self.keys.sync_deadlines(),
                "-inf",
                now,
                0,
                isize::try_from(limit).unwrap_or(isize::MAX),
            ))
            .await?;
        // An entry that is not a valid id was never written by this store: skip it.
        Ok(due.iter().filter_map(|id| SyncId::parse(id).ok()).collect())
    }

    async fn sync_reschedule(&self, id: &SyncId) -> Result<(), StoreError> {
        let deadline = self.sync_get(id).await?.and_then(|s| s.deadline());
        self.set_sync_deadline(id, deadline).await
    }

    async fn list_channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = self
            .bounded(conn.smembers(self.keys.channels_index()))
            .await?;
        let mut channels: Vec<ChannelId> = raw
            .iter()
            .filter_map(|c| ChannelId::parse(c).ok())
            .collect();
        channels.sort();
        Ok(channels)
    }

    async fn list_sessions(&self, limit: usize) -> Result<Vec<Session>, StoreError> {
        let mut conn = self.conn.clone();
        let last = isize::try_from(limit.max(1)).unwrap_or(isize::MAX) - 1;
        let ids: Vec<String> = self
            .bounded(conn.zrange(self.keys.session_deadlines(), 0, last))
            .await?;
        let mut sessions = Vec::with_capacity(ids.len());
        for id in ids {
            if let Ok(sid) = SessionId::parse(&id)
                && let Some(session) = self.read_session(&sid).await?
            {
                sessions.push(session);
            }
        }
        Ok(sessions)
    }

    async fn kick_user(&self, uid: &UserId, reason: &str) -> Result<u32, StoreError> {
        let sessions = self.user_sessions(uid).await?;
        for session in &sessions {
            self.remove_session(&session.session_id).await?;
        }
        let kick = serde_json::to_string(&wire::WireKick {
            uid: uid.to_string(),
            reason: reason.to_owned(),
        })
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded(conn.publish(self.keys.kicks(), kick)).await?;
        Ok(u32::try_from(sessions.len()).unwrap_or(u32::MAX))
    }

    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let now = now_ms();
        Ok(SweepReport {
            floors_expired: self.sweep_floors(now).await?,
            sessions_expired: self.sweep_sessions(now).await?,
        })
    }

    async fn listen(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.listener
            .send(tx)
            .await
            .map_err(|_| StoreError::Unavailable("pub/sub listener stopped".into()))?;
        match tokio::time::timeout(self.timeout * 2, rx).await {
            Ok(Ok(result)) => result,
            _ => Err(StoreError::Unavailable(
                "pub/sub subscribe timed out".into(),
            )),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("redis://:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
