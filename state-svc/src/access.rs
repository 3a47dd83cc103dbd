//! Who may do what, built from the store's primitives: control-plane membership updates, and
//! the emergency broadcast over every channel of an event.
//!
//! Multi-channel operations are a loop of per-channel atomic steps (each one Lua script in one
//! Redis Cluster slot), guarded by the event's emergency record and by the mark each step
//! copies into its channel, so a normal request can never slip in between two steps.

use std::sync::Arc;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::domain::{
    AcquireOutcome, ChannelId, EmergencyHolder, EventId, EventInfo, GrantChange, GrantsUpdate,
    MAX_CHANNELS_PER_EVENT, ReleaseOutcome, Role, SessionId, Speaker, UserGrants, UserId,
};
use crate::error::StoreError;
use crate::hub::Hub;
use crate::metrics::StateMetrics;
use crate::store::Store;

/// Attempts at a compare-and-set grant change before giving up (only concurrent writers to
/// the same user's grants make one fail).
const CAS_ATTEMPTS: usize = 5;

/// A control-plane membership update as published on the membership channel. Unknown fields
/// are refused: a payload we do not fully understand is not applied halfway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMembershipUpdate {
    event_id: String,
    user_id: String,
    channel_ids: Vec<String>,
    action: String,
}

/// A validated membership update: within `event`, `user` may use exactly `channels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipUpdate {
    pub event: EventId,
    pub user: UserId,
    pub channels: Vec<ChannelId>,
}

impl MembershipUpdate {
    /// Parses an untrusted control-plane payload.
    pub fn parse(raw: &str) -> Result<Self, StoreError> {
        let update: RawMembershipUpdate = serde_json::from_str(raw)
            .map_err(|_| StoreError::InvalidArgument("malformed membership update"))?;
        if update.action != "set_user_channels" {
            return Err(StoreError::InvalidArgument("unknown membership action"));
        }
        Self::new(&update.event_id, &update.user_id, &update.channel_ids)
    }

    pub fn new(event: &str, user: &str, channels: &[String]) -> Result<Self, StoreError> {
        if channels.len() > MAX_CHANNELS_PER_EVENT {
            return Err(StoreError::InvalidArgument("too many channels"));
        }
        Ok(Self {
            event: EventId::parse(event)?,
            user: UserId::parse(user)?,
            channels: channels
                .iter()
                .map(|c| ChannelId::parse(c))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Applies a membership update: every channel of the event that is listed gets access (an
/// existing role is kept, otherwise `member`), every other channel of the event gets `none`.
/// Refused, changing nothing, when the event is unknown or a listed channel is not the event's.
pub async fn apply_membership_update<S: Store>(
    store: &S,
    update: &MembershipUpdate,
) -> Result<GrantsUpdate, StoreError> {
    let event = store
        .event(&update.event)
        .await?
        .ok_or(StoreError::NotFound("event"))?;
    if update.channels.iter().any(|c| !event.channels.contains(c)) {
        return Err(StoreError::PermissionDenied("channel outside the event"));
    }
    for _ in 0..CAS_ATTEMPTS {
        let current = store.user_grants(&update.user).await?;
        let set = event
            .channels
            .iter()
            .filter_map(|ch| {
                let role = current.grants.get(ch).copied();
                let wanted = if update.channels.contains(ch) {
                    match role {
                        Some(r) if r != Role::None => r,
                        _ => Role::Member,
                    }
                } else {
                    Role::None
                };
                (role != Some(wanted)).then(|| (ch.clone(), Some(wanted)))
            })
            .collect::<Vec<_>>();
        if set.is_empty() {
            return Ok(GrantsUpdate::Unchanged(current));
        }
        let change = GrantChange {
            set,
            replace: false,
            expect_version: Some(current.version),
        };
        match store.update_grants(&update.user, &change).await? {
            GrantsUpdate::VersionMismatch(_) => continue,
            done => return Ok(done),
        }
    }
    Err(StoreError::Unavailable(
        "grants kept changing under the update".into(),
    ))
}

/// Applies control-plane membership updates as they arrive, until shutdown. Each replica runs
/// one; replicas applying the same update change the grants once (the others find nothing to
/// change), so it is announced once.
pub async fn run_membership<S: Store>(
    store: Arc<S>,
    hub: Arc<Hub>,
    metrics: Arc<StateMetrics>,
    shutdown: CancellationToken,
) {
    let Some(mut updates) = hub.take_membership_updates() else {
        return;
    };
    loop {
        let raw = tokio::select! {
            raw = updates.recv() => match raw { Some(raw) => raw, None => return },
            () = shutdown.cancelled() => return,
        };
        let update = match MembershipUpdate::parse(&raw) {
            Ok(update) => update,
            Err(error) => {
                metrics.membership_update("refused");
                tracing::warn!(%error, bytes = raw.len(), "membership update refused");
                continue;
            }
        };
        match apply_membership_update(&*store, &update).await {
            Ok(GrantsUpdate::Changed(grants)) => {
                metrics.membership_update("applied");
                tracing::info!(
                    event_id = %update.event, user_id = %update.user, version = grants.version,
                    "membership update applied"
                );
            }
            Ok(_) => {
                metrics.membership_update("unchanged");
                tracing::debug!(user_id = %update.user, "membership update changed nothing");
            }
            Err(error) => {
                metrics.membership_update("refused");
                tracing::warn!(
                    %error, event_id = %update.event, user_id = %update.user,
                    "membership update refused"
                );
            }
        }
    }
}

/// What an emergency start did in each channel.
#[derive(Debug)]
pub struct EmergencyStart {
    pub event: EventInfo,
    pub channels: Vec<(ChannelId, AcquireOutcome)>,
}

/// Starts (or extends to new channels) an emergency broadcast by the session over every
/// channel of the event. A broadcast whose session no longer exists is taken over.
pub async fn start_emergency<S: Store>(
    store: &S,
    eid: &EventId,
    sid: &SessionId,
    priority: u32,
) -> Result<EmergencyStart, StoreError> {
    let session = store.session(sid).await?;
    let by = Speaker {
        session_id: sid.clone(),
        user_id: session.user_id.clone(),
        user_name: session.user_name.clone(),
        priority,
    };
    let event = match store.claim_emergency(eid, &by, false).await? {
        Ok(event) => event,
        Err(holder) if !session_alive(store, &holder).await? => {
            tracing::info!(event_id = %eid, "taking over an emergency whose session is gone");
            store
                .claim_emergency(eid, &by, true)
                .await?
                .map_err(|_| StoreError::EmergencyActive)?
        }
        Err(_) => return Err(StoreError::EmergencyActive),
    };
    let mut channels = Vec::with_capacity(event.channels.len());
    for ch in &event.channels {
        store.join_channel(sid, ch).await?;
        let outcome = store.emergency_take(ch, sid, eid, priority).await?;
        channels.push((ch.clone(), outcome));
    }
    tracing::info!(event_id = %eid, session_id = %sid, channels = channels.len(), "emergency started");
    Ok(EmergencyStart { event, channels })
}

async fn session_alive<S: Store>(store: &S, holder: &EmergencyHolder) -> Result<bool, StoreError> {
    match store.session(&holder.speaker.session_id).await {
        Ok(_) => Ok(true),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Ends the event's emergency if it is the session's (anyone's when `sid` is `None`) and frees
/// its floors. `NotFound` when there is no such emergency.
pub async fn stop_emergency<S: Store>(
    store: &S,
    eid: &EventId,
    sid: Option<&SessionId>,
) -> Result<(EventInfo, Vec<(ChannelId, ReleaseOutcome)>), StoreError> {
    let event = store
        .event(eid)
        .await?
        .ok_or(StoreError::NotFound("event"))?;
    let holder = store
        .clear_emergency(eid, sid)
        .await?
        .ok_or(StoreError::NotFound("emergency"))?;
    let mut channels = Vec::with_capacity(event.channels.len());
    for ch in &event.channels {
        let released = store
            .emergency_release(ch, Some(&holder.speaker.session_id), eid)
            .await?;
        channels.push((ch.clone(), released));
    }
    tracing::info!(event_id = %eid, session_id = %holder.speaker.session_id, "emergency ended");
    Ok((event, channels))
}

/// The grants a user has after `update`, for replies.
pub fn grants_of(update: GrantsUpdate) -> UserGrants {
    match update {
        GrantsUpdate::Changed(g)
        | GrantsUpdate::Unchanged(g)
        | GrantsUpdate::VersionMismatch(g) => g,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_membership_payloads_are_refused() {
        let ok =
            r#"{"eventId":"e1","userId":"u1","channelIds":["a","b"],"action":"set_user_channels"}"#;
        let update = MembershipUpdate::parse(ok).unwrap();
        assert_eq!(update.channels.len(), 2);
        let huge: Vec<String> = (0..=MAX_CHANNELS_PER_EVENT)
            .map(|i| format!("c{i}"))
            .collect();
        let huge = serde_json::json!({"eventId":"e1","userId":"u1","channelIds":huge,"action":"set_user_channels"});
        for bad in [
            r#"{"eventId":"e1","userId":"u1","channelIds":["a"],"action":"set_user_channels","admin":true}"#,
            r#"{"eventId":"e1","userId":"u1","channelIds":["a"],"action":"grant_everything"}"#,
            r#"{"eventId":"e1","userId":"u1","channelIds":"a","action":"set_user_channels"}"#,
            r#"{"eventId":"e{1}","userId":"u1","channelIds":["a"],"action":"set_user_channels"}"#,
            r#"{"eventId":"e1","userId":"u1","channelIds":["a b"],"action":"set_user_channels"}"#,
            r#"{"eventId":"e1","channelIds":["a"],"action":"set_user_channels"}"#,
            "not json",
            &huge.to_string(),
        ] {
            assert!(MembershipUpdate::parse(bad).is_err(), "accepted {bad}");
        }
    }
}
