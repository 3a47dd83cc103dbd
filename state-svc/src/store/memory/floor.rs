//! The in-memory store: floors and channel configuration.

use super::*;
use crate::domain::rules::{self, AcquireDecision, RenewDecision};
use crate::store::FloorStore;

impl FloorStore for MemoryStore {
    async fn acquire_floor(
        &self,
        id: &ChannelId,
        sid: &SessionId,
        priority: u32,
        min_epoch: u64,
    ) -> Result<AcquireOutcome, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let ch = inner.channels.get_mut(id).ok_or(StoreError::NotMember)?;
        ch.epoch = ch.epoch.max(min_epoch);
        let member = ch.members.get(sid).cloned().ok_or(StoreError::NotMember)?;
        let (lease, max_talk) = step.limits(ch);
        let max_talk_ms = u32::try_from(max_talk).unwrap_or(u32::MAX);
        let live = step.live_holder(ch);
        let emergency = ch.emergency.as_ref().map(|(_, by)| by);
        let decision = rules::acquire(
            live.as_ref(),
            emergency,
            ch.config.queue_enabled,
            sid,
            priority,
        );
        let result = match (decision, live) {
            (AcquireDecision::EmergencyDenied, live) => {
                let by = emergency.cloned().ok_or_else(|| invariant("emergency"))?;
                let holder = live.unwrap_or_else(|| emergency_placeholder(by, ch.epoch, step.now));
                Acquired::Denied {
                    holder,
                    retry_after_ms: EMERGENCY_RETRY_MS,
                }
            }
            (AcquireDecision::Grant, _) => {
                let holder = step.grant(ch, &member, priority);
                step.floor_event(ch, FloorReason::Granted, None);
                Acquired::Granted {
                    holder,
                    max_talk_ms,
                    preempted: None,
                }
            }
            (AcquireDecision::Refresh, Some(mut h)) => {
                h.expires_at_ms = rules::lease_until(&h, lease, step.now);
                ch.floor = Some(h.clone());
                let max_talk_ms =
                    u32::try_from(h.max_until_ms - h.granted_at_ms).unwrap_or(u32::MAX);
                Acquired::Granted {
                    holder: h,
                    max_talk_ms,
                    preempted: None,
                }
            }
            (AcquireDecision::Preempt, Some(old)) => {
                let holder = step.grant(ch, &member, priority);
                let held = step.now - old.granted_at_ms;
                step.floor_event(ch, FloorReason::Preempted, Some((&old, held)));
                Acquired::Granted {
                    holder,
                    max_talk_ms,
                    preempted: Some(old.speaker),
                }
            }
            (AcquireDecision::Queue, Some(h)) => {
                if !ch.queue.iter().any(|(_, _, q)| q == sid) {
                    ch.queue.push((priority, step.now, sid.clone()));
                }
                ch.queue.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                let position = ch.queue.iter().position(|(_, _, q)| q == sid).unwrap_or(0) + 1;
                Acquired::Queued {
                    holder: h,
                    position: u32::try_from(position).unwrap_or(u32::MAX),
                }
            }
            (AcquireDecision::Deny, Some(h)) => Acquired::Denied {
                retry_after_ms: h.expires_at_ms - step.now,
                holder: h,
            },
            // Refresh, Preempt, Queue and Deny are only decided with a holder.
            (_, None) => return Err(invariant("floor holder")),
        };
        Ok(AcquireOutcome {
            result,
            server_time_ms: step.now,
        })
    }

    async fn renew_floor(
        &self,
        id: &ChannelId,
        sid: &SessionId,
        epoch: u64,
    ) -> Result<RenewOutcome, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let now = step.now;
        let Some(ch) = inner.channels.get_mut(id) else {
            return Ok(RenewOutcome {
                result: Err(FloorRefusal::NotHeld),
                server_time_ms: now,
            });
        };
        let (lease, _) = step.limits(ch);
        let result = match rules::renew(ch.floor.as_ref(), sid, epoch, lease, now) {
            RenewDecision::Lapsed { reason, refusal } => {
                step.free(ch, reason);
                Err(refusal)
            }
            RenewDecision::Refused(refusal) => Err(refusal),
            RenewDecision::Renew { expires_at_ms } => {
                let h = ch.floor.as_mut().ok_or_else(|| invariant("floor holder"))?;
                h.expires_at_ms = expires_at_ms;
                Ok(Renewed {
                    expires_at_ms,
                    max_until_ms: h.max_until_ms,
                })
            }
        };
        Ok(RenewOutcome {
            result,
            server_time_ms: now,
        })
    }

    async fn release_floor(
        &self,
        id: &ChannelId,
        sid: &SessionId,
        epoch: Option<u64>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let Some(ch) = inner.channels.get_mut(id) else {
            return Ok(nothing_held());
        };
        let holder = step.live_holder(ch);
        let refusal = rules::release(holder.as_ref(), sid, epoch).err();
        if refusal.is_none() {
            step.free(ch, FloorReason::Released);
        }
        let before = ch.queue.len();
        if refusal.is_some() {
            ch.queue.retain(|(_, _, q)| q != sid);
        }
        Ok(ReleaseOutcome {
            refusal,
            epoch: ch.epoch,
            dequeued: ch.queue.len() != before,
        })
    }

    async fn force_release_floor(
        &self,
        id: &ChannelId,
        epoch: Option<u64>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let Some(ch) = inner.channels.get_mut(id) else {
            return Ok(nothing_held());
        };
        let holder = step.live_holder(ch);
        let refusal = rules::force_release(holder.as_ref(), epoch).err();
        if refusal.is_none() {
            step.free(ch, FloorReason::ForceReleased);
        }
        Ok(ReleaseOutcome {
            refusal,
            epoch: ch.epoch,
            dequeued: false,
        })
    }

    async fn channel_state(&self, id: &ChannelId) -> Result<ChannelState, StoreError> {
        let inner = self.lock();
        let step = self.step(id);
        Ok(match inner.channels.get(id) {
            Some(ch) => step.state(ch),
            None => step.state(&Channel::default()),
        })
    }

    async fn channel_config(&self, id: &ChannelId) -> Result<ChannelConfig, StoreError> {
        Ok(self
            .lock()
            .channels
            .get(id)
            .map(|c| c.config)
            .unwrap_or_default())
    }

    async fn set_channel_config(
        &self,
        id: &ChannelId,
        config: ChannelConfig,
    ) -> Result<ChannelConfig, StoreError> {
        let config = config.validate()?;
        self.lock().channels.entry(id.clone()).or_default().config = config;
        Ok(config)
    }
}
