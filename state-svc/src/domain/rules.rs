//! The floor rules as pure functions of the state and the clock. The in-memory store applies
//! them; the Lua scripts of the Redis store (`store/redis/scripts.rs`: `ACQUIRE`, `RENEW`,
//! `RELEASE`, `FORCE_RELEASE`, `live_holder`) take the same branches in the same order, so the
//! two can be read side by side. The contract suite holds both to the same behaviour.

use super::{FloorHolder, FloorReason, FloorRefusal, SessionId, Speaker};

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
