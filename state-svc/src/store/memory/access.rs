//! The in-memory store: grants, events and emergency broadcasts.

use super::*;
use crate::domain::rules::GrantDecision;
use crate::store::AccessStore;

impl AccessStore for MemoryStore {
    async fn user_grants(&self, uid: &UserId) -> Result<UserGrants, StoreError> {
        Ok(user_grants(&self.lock(), uid))
    }

    async fn update_grants(
        &self,
        uid: &UserId,
        change: &GrantChange,
    ) -> Result<GrantsUpdate, StoreError> {
        let mut inner = self.lock();
        let current = user_grants(&inner, uid);
        let next = match rules::update_grants(
            &current.grants,
            current.version,
            change,
            MAX_GRANTS_PER_USER,
        ) {
            GrantDecision::VersionMismatch => return Ok(GrantsUpdate::VersionMismatch(current)),
            GrantDecision::Unchanged => return Ok(GrantsUpdate::Unchanged(current)),
            GrantDecision::TooMany => return Err(StoreError::InvalidArgument("too many grants")),
            GrantDecision::Changed(next) => next,
        };
        // As in Redis: the clock carries versions past any earlier one.
        let version = next_epoch(current.version, self.now_ms());
        inner.grants.insert(uid.clone(), (version, next.clone()));
        let updated = UserGrants {
            user_id: uid.clone(),
            version,
            grants: next,
        };
        self.hub.publish(UserEvent::Grants(updated.clone()));
        Ok(GrantsUpdate::Changed(updated))
    }

    async fn set_event_channels(
        &self,
        eid: &EventId,
        channels: &[ChannelId],
    ) -> Result<EventInfo, StoreError> {
        let channels = event_channel_list(channels)?;
        let mut inner = self.lock();
        let busy = |e: &EventId| inner.emergencies.contains_key(e);
        if busy(eid)
            || channels
                .iter()
                .filter_map(|ch| inner.channel_event.get(ch))
                .any(|other| other != eid && busy(other))
        {
            return Err(StoreError::EmergencyActive);
        }
        if let Some(old) = inner.events.remove(eid) {
            for ch in old {
                inner.channel_event.remove(&ch);
            }
        }
        for ch in &channels {
            if let Some(other) = inner.channel_event.insert(ch.clone(), eid.clone())
                && let Some(list) = inner.events.get_mut(&other)
            {
                list.retain(|c| c != ch);
                if list.is_empty() {
                    inner.events.remove(&other);
                }
            }
        }
        if !channels.is_empty() {
            inner.events.insert(eid.clone(), channels.clone());
        }
        Ok(EventInfo {
            event_id: eid.clone(),
            channels,
            emergency: None,
        })
    }

    async fn event(&self, eid: &EventId) -> Result<Option<EventInfo>, StoreError> {
        Ok(event_info(&self.lock(), eid))
    }

    async fn channel_event(&self, ch: &ChannelId) -> Result<Option<EventId>, StoreError> {
        Ok(self.lock().channel_event.get(ch).cloned())
    }

    async fn claim_emergency(
        &self,
        eid: &EventId,
        by: &Speaker,
        force: bool,
    ) -> Result<Result<EventInfo, EmergencyHolder>, StoreError> {
        let mut inner = self.lock();
        if !inner.events.contains_key(eid) {
            return Err(not_found("event"));
        }
        if let Some(current) = inner.emergencies.get(eid)
            && current.speaker.session_id != by.session_id
            && current.speaker.priority >= by.priority
            && !force
        {
            return Ok(Err(current.clone()));
        }
        inner.emergencies.insert(
            eid.clone(),
            EmergencyHolder {
                speaker: by.clone(),
                started_at_ms: self.now_ms(),
            },
        );
        event_info(&inner, eid).ok_or(not_found("event")).map(Ok)
    }

    async fn clear_emergency(
        &self,
        eid: &EventId,
        sid: Option<&SessionId>,
    ) -> Result<Option<EmergencyHolder>, StoreError> {
        let mut inner = self.lock();
        let mine = inner
            .emergencies
            .get(eid)
            .is_some_and(|e| sid.is_none_or(|s| &e.speaker.session_id == s));
        Ok(if mine {
            inner.emergencies.remove(eid)
        } else {
            None
        })
    }

    async fn emergency_take(
        &self,
        id: &ChannelId,
        sid: &SessionId,
        eid: &EventId,
        priority: u32,
    ) -> Result<AcquireOutcome, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let ch = inner.channels.get_mut(id).ok_or(StoreError::NotMember)?;
        let member = ch.members.get(sid).cloned().ok_or(StoreError::NotMember)?;
        let current = step.live_holder(ch);
        let outranked = |by: &Speaker| &by.session_id != sid && by.priority >= priority;
        let blocker = match (&ch.emergency, &current) {
            (Some((_, by)), _) if outranked(by) => Some(
                current
                    .clone()
                    .unwrap_or_else(|| emergency_placeholder(by.clone(), ch.epoch, step.now)),
            ),
            (_, Some(h)) if outranked(&h.speaker) => Some(h.clone()),
            _ => None,
        };
        if let Some(holder) = blocker {
            return Ok(AcquireOutcome {
                result: Acquired::Denied {
                    holder,
                    retry_after_ms: EMERGENCY_RETRY_MS,
                },
                server_time_ms: step.now,
            });
        }
        let max_talk = i64::from(self.settings.emergency_max_ms);
        let previous = current
            .filter(|h| &h.speaker.session_id != sid)
            .map(|h| (h.clone(), step.now - h.granted_at_ms));
        let holder = step.grant_for(ch, &member, priority, max_talk);
        ch.emergency = Some((eid.clone(), holder.speaker.clone()));
        step.floor_event(
            ch,
            FloorReason::Emergency,
            previous.as_ref().map(|(h, d)| (h, *d)),
        );
        Ok(AcquireOutcome {
            result: Acquired::Granted {
                holder,
                max_talk_ms: self.settings.emergency_max_ms,
                preempted: previous.map(|(h, _)| h.speaker),
            },
            server_time_ms: step.now,
        })
    }

    async fn emergency_release(
        &self,
        id: &ChannelId,
        sid: Option<&SessionId>,
        eid: &EventId,
    ) -> Result<ReleaseOutcome, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let Some(ch) = inner.channels.get_mut(id) else {
            return Ok(nothing_held());
        };
        let refusal = match ch.emergency.take() {
            Some((e, by)) if &e == eid && sid.is_none_or(|s| s == &by.session_id) => {
                match step.live_holder(ch) {
                    Some(h) if h.speaker.session_id == by.session_id => {
                        step.free(ch, FloorReason::EmergencyEnded);
                        None
                    }
                    _ => Some(FloorRefusal::NotHeld),
                }
            }
            other => {
                ch.emergency = other;
                Some(FloorRefusal::NotHolder)
            }
        };
        Ok(ReleaseOutcome {
            refusal,
            epoch: ch.epoch,
            dequeued: false,
        })
    }
}
