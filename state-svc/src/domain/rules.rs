//! The floor, session and grant rules as pure functions of the state and the clock. The
//! in-memory store applies them; the Lua scripts of the Redis store (`store/redis/scripts.rs`:
//! `ACQUIRE`, `RENEW`, `RELEASE`, `FORCE_RELEASE`, `live_holder`, `UPDATE_GRANTS`) take the same
//! branches in the same order, so the two can be read side by side, and the Redis store's Rust
//! side calls the session rules itself. The contract suite holds both to the same behaviour.

use std::collections::BTreeMap;

use super::{
    ChannelId, FloorHolder, FloorReason, FloorRefusal, GrantChange, NewSession, Resume, Role,
    Session, SessionId, Speaker,
};

/// What an acquire does, decided before anything changes (`ACQUIRE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireDecision {
    /// An emergency broadcast of equal or higher priority holds the channel: denied, no queue.
    EmergencyDenied,
    /// The floor is free: granted.
    Grant,
    /// The requester already holds it (a retried request): same epoch, lease refreshed.
    Refresh,
    /// A lower priority holds it: taken over.
    Preempt,
    /// Busy, and the channel queues requests.
    Queue,
    /// Busy.
    Deny,
}

/// Decides an acquire by `sid` at `priority`. `holder` is the live holder (a lapsed grant
/// already freed); `emergency` the broadcaster whose emergency the channel is under.
pub fn acquire(
    holder: Option<&FloorHolder>,
    emergency: Option<&Speaker>,
    queue_enabled: bool,
    sid: &SessionId,
    priority: u32,
) -> AcquireDecision {
    if emergency.is_some_and(|by| &by.session_id != sid && priority <= by.priority) {
        return AcquireDecision::EmergencyDenied;
    }
    match holder {
        None => AcquireDecision::Grant,
        Some(h) if &h.speaker.session_id == sid => AcquireDecision::Refresh,
        Some(h) if priority > h.speaker.priority => AcquireDecision::Preempt,
        Some(_) if queue_enabled => AcquireDecision::Queue,
        Some(_) => AcquireDecision::Deny,
    }
}

/// What a renewal does (`RENEW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewDecision {
    /// The grant lapsed: it is freed with `reason`, and the renewal refused with `refusal`.
    Lapsed {
        reason: FloorReason,
        refusal: FloorRefusal,
    },
    Refused(FloorRefusal),
    /// Renewed until `expires_at_ms`.
    Renew {
        expires_at_ms: i64,
    },
}

/// Decides a renewal of `sid`'s grant `epoch` at `now`. `holder` is the stored holder, lapsed
/// or not.
pub fn renew(
    holder: Option<&FloorHolder>,
    sid: &SessionId,
    epoch: u64,
    lease_ms: i64,
    now: i64,
) -> RenewDecision {
    match holder {
        Some(h) if lapsed(h, now) => {
            let reason = lapse_reason(h, now);
            let mine = &h.speaker.session_id == sid && h.epoch == epoch;
            let refusal = if mine && reason == FloorReason::MaxTalkTime {
                FloorRefusal::MaxTalkTime
            } else {
                FloorRefusal::NotHeld
            };
            RenewDecision::Lapsed { reason, refusal }
        }
        None => RenewDecision::Refused(FloorRefusal::NotHeld),
        Some(h) if &h.speaker.session_id != sid => RenewDecision::Refused(FloorRefusal::NotHolder),
        Some(h) if h.epoch != epoch => RenewDecision::Refused(FloorRefusal::StaleEpoch),
        Some(h) => RenewDecision::Renew {
            expires_at_ms: lease_until(h, lease_ms, now),
        },
    }
}

/// Decides a release by `sid` (`RELEASE`): `Ok` frees the floor. `holder` is the live holder;
/// `epoch` `None` releases whatever grant `sid` holds.
pub fn release(
    holder: Option<&FloorHolder>,
    sid: &SessionId,
    epoch: Option<u64>,
) -> Result<(), FloorRefusal> {
    match holder {
        Some(h) if &h.speaker.session_id == sid => {
            if epoch.is_some_and(|e| e != h.epoch) {
                Err(FloorRefusal::StaleEpoch)
            } else {
                Ok(())
            }
        }
        Some(_) => Err(FloorRefusal::NotHolder),
        None => Err(FloorRefusal::NotHeld),
    }
}

/// Decides an administrator's release (`FORCE_RELEASE`): `Ok` frees the floor.
pub fn force_release(holder: Option<&FloorHolder>, epoch: Option<u64>) -> Result<(), FloorRefusal> {
    match holder {
        None => Err(FloorRefusal::NotHeld),
        Some(h) if epoch.is_some_and(|e| e != h.epoch) => Err(FloorRefusal::StaleEpoch),
        Some(_) => Ok(()),
    }
}

/// Whether the grant has lapsed at `now` (lease or maximum talk time over).
pub fn lapsed(holder: &FloorHolder, now: i64) -> bool {
    now >= holder.expires_at_ms
}

/// Why a lapsed grant ended (`lapse_reason`).
pub fn lapse_reason(holder: &FloorHolder, now: i64) -> FloorReason {
    if now >= holder.max_until_ms {
        FloorReason::MaxTalkTime
    } else {
        FloorReason::LeaseExpired
    }
}

/// A lease taken or renewed at `now`: never past the grant's maximum talk time.
pub fn lease_until(holder: &FloorHolder, lease_ms: i64, now: i64) -> i64 {
    (now + lease_ms).min(holder.max_until_ms)
}

/// A new session created at `now`: a fresh id, its time to live (what its gateway asked for, or
/// `default_ttl_ms`) and its first expiry.
pub fn new_session(new: NewSession, now: i64, default_ttl_ms: u32) -> Session {
    let ttl_ms = session_ttl_ms(new.ttl_ms, default_ttl_ms);
    Session {
        session_id: new.session_id,
        user_id: new.user_id,
        user_name: new.user_name,
        gateway_id: new.gateway_id,
        created_at_ms: now,
        expires_at_ms: now + i64::from(ttl_ms),
        ttl_ms,
        channels: Vec::new(),
        generation: 0,
        parked_at_ms: 0,
    }
}

/// Why a resume is refused. The caller hears one answer for all of them, so a token tells an
/// outsider nothing about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefusal {
    /// The token is not the session's current one (used, rotated, or made up).
    WrongToken,
    /// The socket is another user's.
    WrongUser,
}

/// Whether `resume` may take `session` over.
pub fn may_resume(
    session: &Session,
    stored_digests: [&str; 2],
    resume: &Resume,
) -> Result<(), ResumeRefusal> {
    if session.user_id != resume.user_id {
        return Err(ResumeRefusal::WrongUser);
    }
    if !stored_digests
        .iter()
        .any(|d| !d.is_empty() && *d == resume.digest)
    {
        return Err(ResumeRefusal::WrongToken);
    }
    Ok(())
}

/// A session parked at `now` waits `grace_ms` for a resume, whatever its time to live.
pub fn parked_until(now: i64, grace_ms: u32) -> i64 {
    now + i64::from(grace_ms)
}

/// A session's time to live: what its gateway asked for, or the deployment's default.
fn session_ttl_ms(requested_ms: u32, default_ms: u32) -> u32 {
    if requested_ms == 0 {
        default_ms
    } else {
        requested_ms
    }
}

/// Whether a user with `live` live sessions may open another under the cap `max` (checked
/// atomically with the creation, in each store).
pub fn room_for_session(live: usize, max: u32) -> bool {
    live < max as usize
}

/// Channels a user is in across their sessions live at `now` (a channel joined from two
/// sessions counts twice: each membership costs its own fan-out).
pub fn channels_joined(sessions: &[Session], now: i64) -> usize {
    sessions
        .iter()
        .filter(|s| session_live(s, now))
        .map(|s| s.channels.len())
        .sum()
}

/// Whether a session still lives at `now`.
pub fn session_live(session: &Session, now: i64) -> bool {
    session.expires_at_ms > now
}

/// A live session's expiry after a touch at `now`: its time to live from now, never earlier
/// than it was.
pub fn touched_until(session: &Session, now: i64) -> i64 {
    session.expires_at_ms.max(now + i64::from(session.ttl_ms))
}

/// What a grant change does (`UPDATE_GRANTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantDecision {
    /// The change expected another version.
    VersionMismatch,
    /// Nothing would change.
    Unchanged,
    /// More than `MAX_GRANTS_PER_USER` entries would result.
    TooMany,
    /// The new grants, stored under the next version.
    Changed(BTreeMap<ChannelId, Role>),
}

/// Decides a grant change against the stored grants and their version.
pub fn update_grants(
    current: &BTreeMap<ChannelId, Role>,
    version: u64,
    change: &GrantChange,
    most: usize,
) -> GrantDecision {
    if change.expect_version.is_some_and(|v| v != version) {
        return GrantDecision::VersionMismatch;
    }
    let mut next = if change.replace {
        BTreeMap::new()
    } else {
        current.clone()
    };
    for (ch, role) in &change.set {
        match role {
            Some(role) => next.insert(ch.clone(), *role),
            None => next.remove(ch),
        };
    }
    if &next == current {
        GrantDecision::Unchanged
    } else if next.len() > most {
        GrantDecision::TooMany
    } else {
        GrantDecision::Changed(next)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::domain::UserId;

    fn speaker(sid: &str, priority: u32) -> Speaker {
        Speaker {
            session_id: SessionId::parse(sid).unwrap(),
            user_id: UserId::parse(&format!("u-{sid}")).unwrap(),
            user_name: sid.to_owned(),
            priority,
        }
    }

    fn holder(sid: &str, priority: u32, epoch: u64) -> FloorHolder {
        FloorHolder {
            speaker: speaker(sid, priority),
            epoch,
            granted_at_ms: 1_000,
            expires_at_ms: 6_000,
            max_until_ms: 61_000,
        }
    }

    fn sid(raw: &str) -> SessionId {
        SessionId::parse(raw).unwrap()
    }

    #[test]
    fn acquire_takes_the_branches_of_the_script_in_order() {
        let ana = holder("ana", 0, 7);
        let by = speaker("dispatch", 200);
        use AcquireDecision::*;
        assert_eq!(acquire(None, None, false, &sid("bo"), 0), Grant);
        assert_eq!(acquire(Some(&ana), None, false, &sid("ana"), 0), Refresh);
        assert_eq!(acquire(Some(&ana), None, false, &sid("bo"), 1), Preempt);
        assert_eq!(acquire(Some(&ana), None, true, &sid("bo"), 0), Queue);
        assert_eq!(acquire(Some(&ana), None, false, &sid("bo"), 0), Deny);
        // The emergency comes first, whoever holds the floor, unless outranked or its own.
        assert_eq!(
            acquire(None, Some(&by), true, &sid("bo"), 200),
            EmergencyDenied
        );
        assert_eq!(acquire(None, Some(&by), false, &sid("bo"), 201), Grant);
        assert_eq!(
            acquire(None, Some(&by), false, &sid("dispatch"), 200),
            Grant
        );
    }

    #[test]
    fn a_renewal_never_outlives_the_grant_or_its_maximum() {
        let ana = holder("ana", 0, 7);
        assert_eq!(
            renew(Some(&ana), &sid("ana"), 7, 5_000, 2_000),
            RenewDecision::Renew {
                expires_at_ms: 7_000
            }
        );
        let near_max = FloorHolder {
            expires_at_ms: 60_500,
            ..ana.clone()
        };
        assert_eq!(
            renew(Some(&near_max), &sid("ana"), 7, 5_000, 60_000),
            RenewDecision::Renew {
                expires_at_ms: 61_000
            }
        );
        assert_eq!(
            renew(Some(&ana), &sid("ana"), 6, 5_000, 2_000),
            RenewDecision::Refused(FloorRefusal::StaleEpoch)
        );
        assert_eq!(
            renew(Some(&ana), &sid("bo"), 7, 5_000, 2_000),
            RenewDecision::Refused(FloorRefusal::NotHolder)
        );
        assert_eq!(
            renew(None, &sid("ana"), 7, 5_000, 2_000),
            RenewDecision::Refused(FloorRefusal::NotHeld)
        );
        // Lapsed: the holder learns of its maximum talk time; anyone else that it is free.
        assert_eq!(
            renew(Some(&ana), &sid("ana"), 7, 5_000, 6_000),
            RenewDecision::Lapsed {
                reason: FloorReason::LeaseExpired,
                refusal: FloorRefusal::NotHeld
            }
        );
        assert_eq!(
            renew(Some(&near_max), &sid("ana"), 7, 5_000, 61_000),
            RenewDecision::Lapsed {
                reason: FloorReason::MaxTalkTime,
                refusal: FloorRefusal::MaxTalkTime
            }
        );
    }

    #[test]
    fn grant_changes_are_compared_set_and_bounded() {
        let ops = ChannelId::parse("ops").unwrap();
        let gate = ChannelId::parse("gate").unwrap();
        let current = BTreeMap::from([(ops.clone(), Role::Talk)]);
        let change = |set: Vec<(ChannelId, Option<Role>)>, replace, expect| GrantChange {
            set,
            replace,
            expect_version: expect,
        };
        let same = change(vec![(ops.clone(), Some(Role::Talk))], false, None);
        assert_eq!(
            update_grants(&current, 3, &same, 10),
            GrantDecision::Unchanged
        );
        let stale = change(vec![], false, Some(2));
        assert_eq!(
            update_grants(&current, 3, &stale, 10),
            GrantDecision::VersionMismatch
        );
        let add = change(vec![(gate.clone(), Some(Role::Listen))], false, Some(3));
        let both = BTreeMap::from([(ops.clone(), Role::Talk), (gate.clone(), Role::Listen)]);
        assert_eq!(
            update_grants(&current, 3, &add, 10),
            GrantDecision::Changed(both)
        );
        assert_eq!(update_grants(&current, 3, &add, 1), GrantDecision::TooMany);
        let replace = change(vec![(gate.clone(), Some(Role::Listen))], true, None);
        assert_eq!(
            update_grants(&current, 3, &replace, 10),
            GrantDecision::Changed(BTreeMap::from([(gate, Role::Listen)]))
        );
        let remove = change(vec![(ops, None)], false, None);
        assert_eq!(
            update_grants(&current, 3, &remove, 10),
            GrantDecision::Changed(BTreeMap::new())
        );
    }

    #[test]
    fn only_the_holder_releases_and_only_its_epoch() {
        let ana = holder("ana", 0, 7);
        assert_eq!(release(Some(&ana), &sid("ana"), Some(7)), Ok(()));
        assert_eq!(release(Some(&ana), &sid("ana"), None), Ok(()));
        assert_eq!(
            release(Some(&ana), &sid("ana"), Some(6)),
            Err(FloorRefusal::StaleEpoch)
        );
        assert_eq!(
            release(Some(&ana), &sid("bo"), None),
            Err(FloorRefusal::NotHolder)
        );
        assert_eq!(release(None, &sid("ana"), None), Err(FloorRefusal::NotHeld));
        assert_eq!(force_release(Some(&ana), None), Ok(()));
        assert_eq!(
            force_release(Some(&ana), Some(6)),
            Err(FloorRefusal::StaleEpoch)
        );
        assert_eq!(force_release(None, None), Err(FloorRefusal::NotHeld));
    }
}
