//! The in-memory store: the embedded default for a single state-svc instance with no Redis.
//!
//! One mutex guards everything; each operation runs to completion under it (never across an
//! `.await`), which gives the same atomicity the Redis store gets from Lua. Events are handed
//! to the hub while the lock is held, so watchers see them in the order they happened. The
//! floor rules mirror `store::redis::scripts` step for step; the contract tests hold both to
//! the same behaviour. The floor decisions are `domain::rules`, shared with nothing but
//! mirrored by the scripts branch for branch.

mod access;
mod floor;
mod housekeeping;
mod registry;
mod session;
mod sync;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::domain::rules;
use crate::domain::{
    AcquireOutcome, Acquired, ChannelConfig, ChannelId, ChannelMoved, ChannelState, Clock,
    EmergencyHolder, Event, EventId, EventInfo, FloorChanged, FloorHolder, FloorReason,
    FloorRefusal, GrantChange, GrantsUpdate, LeaveOutcome, MAX_GRANTS_PER_USER, MediaNode, Member,
    MembershipChange, MembershipChanged, MoveReason, NewSession, NodeId, NodeRegistration,
    Placement, ReleaseOutcome, RemoveOutcome, RenewOutcome, Renewed, Resume, Role, Session,
    SessionId, Speaker, SyncId, UserGrants, UserId, choose_node, next_epoch, nodes_to_empty,
    nodes_to_forget,
};
use crate::domain::{SyncEvent, UserEvent};
use crate::error::StoreError;
use crate::hub::Hub;
use crate::store::{StoreSettings, SweepReport, event_channel_list};
use crate::sync::SyncSession;

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    hub: Arc<Hub>,
    settings: StoreSettings,
    /// Every expiry and timestamp of this store reads it.
    clock: Clock,
}

#[derive(Debug, Default)]
struct Inner {
    channels: HashMap<ChannelId, Channel>,
    sessions: HashMap<SessionId, Session>,
    /// The digests of each session's current resume token and, until the session's next
    /// touch after a resume, of the one before it.
    resume_digests: HashMap<SessionId, (String, Option<String>)>,
    user_sessions: HashMap<UserId, HashSet<SessionId>>,
    nodes: HashMap<NodeId, MediaNode>,
    node_channels: HashMap<NodeId, HashSet<ChannelId>>,
    grants: HashMap<UserId, (u64, BTreeMap<ChannelId, Role>)>,
    events: HashMap<EventId, Vec<ChannelId>>,
    channel_event: HashMap<ChannelId, EventId>,
    emergencies: HashMap<EventId, EmergencyHolder>,
    /// Sync sessions with their expiry (none while running).
    syncs: HashMap<SyncId, (SyncSession, Option<i64>)>,
}

#[derive(Debug, Default)]
struct Channel {
    floor: Option<FloorHolder>,
    epoch: u64,
    members: HashMap<SessionId, Member>,
    /// Moves on at every join and leave.
    members_version: u64,
    /// Waiting requests: (priority, queued at, session).
    queue: Vec<(u32, i64, SessionId)>,
    config: ChannelConfig,
    media: Option<NodeId>,
    /// The emergency broadcast this channel is under: (event, broadcaster).
    emergency: Option<(EventId, Speaker)>,
}

/// One operation's view of a channel: the clock, the defaults and where events go.
struct Step<'a> {
    id: &'a ChannelId,
    now: i64,
    settings: &'a StoreSettings,
    hub: &'a Hub,
}

impl Step<'_> {
    fn limits(&self, ch: &Channel) -> (i64, i64) {
        let pick = |v: u32, default: u32| i64::from(if v == 0 { default } else { v });
        (
            pick(ch.config.lease_ms, self.settings.lease_ms),
            pick(ch.config.max_talk_ms, self.settings.max_talk_ms),
        )
    }

    fn floor_event(
        &self,
        ch: &Channel,
        reason: FloorReason,
        previous: Option<(&FloorHolder, i64)>,
    ) {
        self.hub.publish(Event::Floor(FloorChanged {
            channel_id: self.id.clone(),
            holder: ch.floor.clone(),
            previous: previous.map(|(h, _)| h.speaker.clone()),
            epoch: ch.epoch,
            reason,
            previous_duration_ms: previous.map_or(0, |(_, d)| d),
            at_ms: self.now,
        }));
    }

    fn grant(&self, ch: &mut Channel, member: &Member, priority: u32) -> FloorHolder {
        let (_, max_talk) = self.limits(ch);
        self.grant_for(ch, member, priority, max_talk)
    }

    fn grant_for(
        &self,
        ch: &mut Channel,
        member: &Member,
        priority: u32,
        max_talk: i64,
    ) -> FloorHolder {
        let (lease, _) = self.limits(ch);
        ch.epoch = next_epoch(ch.epoch, self.now);
        let max_until = self.now + max_talk;
        let holder = FloorHolder {
            speaker: Speaker {
                session_id: member.session_id.clone(),
                user_id: member.user_id.clone(),
                user_name: member.user_name.clone(),
                priority,
            },
            epoch: ch.epoch,
            granted_at_ms: self.now,
            expires_at_ms: (self.now + lease).min(max_until),
            max_until_ms: max_until,
        };
        ch.queue.retain(|(_, _, sid)| sid != &member.session_id);
        ch.floor = Some(holder.clone());
        holder
    }

    /// Frees the floor, then grants the head of the queue (if any) in the same step.
    fn free(&self, ch: &mut Channel, reason: FloorReason) {
        let Some(old) = ch.floor.take() else { return };
        if ch
            .emergency
            .as_ref()
            .is_some_and(|(_, by)| by.session_id == old.speaker.session_id)
        {
            ch.emergency = None;
        }
        ch.epoch = next_epoch(ch.epoch, self.now);
        self.floor_event(ch, reason, Some((&old, self.now - old.granted_at_ms)));
        ch.queue.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        while !ch.queue.is_empty() {
            let (priority, _, sid) = ch.queue.remove(0);
            if let Some(member) = ch.members.get(&sid).cloned() {
                self.grant(ch, &member, priority);
                self.floor_event(ch, FloorReason::QueueGranted, None);
                return;
            }
        }
    }

    /// The holder after lazily expiring a lapsed grant (`live_holder` in the scripts).
    fn live_holder(&self, ch: &mut Channel) -> Option<FloorHolder> {
        if let Some(h) = &ch.floor
            && rules::lapsed(h, self.now)
        {
            let reason = rules::lapse_reason(h, self.now);
            self.free(ch, reason);
        }
        ch.floor.clone()
    }

    fn state(&self, ch: &Channel) -> ChannelState {
        let mut members: Vec<Member> = ch.members.values().cloned().collect();
        members.sort_by(|a, b| {
            a.joined_at_ms
                .cmp(&b.joined_at_ms)
                .then(a.session_id.cmp(&b.session_id))
        });
        ChannelState {
            channel_id: self.id.clone(),
            holder: ch.floor.clone().filter(|h| self.now < h.expires_at_ms),
            epoch: ch.epoch,
            members,
            members_version: ch.members_version,
            media_node: ch.media.clone(),
            server_time_ms: self.now,
        }
    }

    /// Moves the channel's members version on and announces the change.
    fn membership_event(&self, ch: &mut Channel, member: Member, change: MembershipChange) {
        // Never backwards, even after the channel emptied and was dropped: the clock carries
        // it past every earlier value, as the Redis store does.
        ch.members_version = next_epoch(ch.members_version, self.now);
        self.hub.publish(Event::Membership(MembershipChanged {
            channel_id: self.id.clone(),
            member,
            change,
            member_count: u32::try_from(ch.members.len()).unwrap_or(u32::MAX),
            at_ms: self.now,
            version: ch.members_version,
        }));
    }
}

impl MemoryStore {
    pub fn new(settings: StoreSettings, hub: Arc<Hub>, clock: Clock) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            hub,
            settings,
            clock,
        }
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn step<'a>(&'a self, id: &'a ChannelId) -> Step<'a> {
        Step {
            id,
            now: self.now_ms(),
            settings: &self.settings,
            hub: &self.hub,
        }
    }

    fn node_view(&self, inner: &Inner, node: &MediaNode, now: i64) -> MediaNode {
        let mut node = node.clone();
        node.channels = inner
            .node_channels
            .get(&node.node_id)
            .map_or(0, |s| u32::try_from(s.len()).unwrap_or(u32::MAX));
        node.live = now - node.last_heartbeat_ms <= i64::from(self.settings.node_dead_after_ms);
        node
    }

    fn leave_locked(
        &self,
        inner: &mut Inner,
        sid: &SessionId,
        id: &ChannelId,
        reason: FloorReason,
    ) -> LeaveOutcome {
        let step = self.step(id);
        let Some(ch) = inner.channels.get_mut(id) else {
            return LeaveOutcome::default();
        };
        let Some(member) = ch.members.get(sid).cloned() else {
            return LeaveOutcome::default();
        };
        let mut released_floor = false;
        if ch
            .floor
            .as_ref()
            .is_some_and(|h| &h.speaker.session_id == sid)
        {
            step.free(ch, reason);
            released_floor = true;
        }
        ch.queue.retain(|(_, _, q)| q != sid);
        ch.members.remove(sid);
        step.membership_event(ch, member, MembershipChange::Left);
        if ch.members.is_empty()
            && let Some(node) = ch.media.take()
            && let Some(set) = inner.node_channels.get_mut(&node)
        {
            set.remove(id);
        }
        if let Some(session) = inner.sessions.get_mut(sid) {
            session.channels.retain(|c| c != id);
        }
        LeaveOutcome {
            was_member: true,
            released_floor,
        }
    }

    fn remove_locked(&self, inner: &mut Inner, sid: &SessionId) -> RemoveOutcome {
        let Some(session) = inner.sessions.remove(sid) else {
            return RemoveOutcome::default();
        };
        inner.resume_digests.remove(sid);
        if let Some(set) = inner.user_sessions.get_mut(&session.user_id) {
            set.remove(sid);
            if set.is_empty() {
                inner.user_sessions.remove(&session.user_id);
            }
        }
        let mut outcome = RemoveOutcome::default();
        for ch in &session.channels {
            let left = self.leave_locked(inner, sid, ch, FloorReason::Disconnected);
            if left.was_member {
                outcome.channels_left.push(ch.clone());
            }
            outcome.floors_released += u32::from(left.released_floor);
        }
        outcome.channels_left.sort();
        outcome
    }
}

/// The release of a channel nobody ever used.
fn nothing_held() -> ReleaseOutcome {
    ReleaseOutcome {
        refusal: Some(FloorRefusal::NotHeld),
        epoch: 0,
        dequeued: false,
    }
}

/// A state the store's own rules never produce.
fn invariant(what: &'static str) -> StoreError {
    StoreError::Internal(format!(
        "memory store: no {what} where the rules require one"
    ))
}

fn not_found(what: &'static str) -> StoreError {
    StoreError::NotFound(what)
}

/// Retry hint given to requests denied by an emergency broadcast.
pub const EMERGENCY_RETRY_MS: i64 = 1_000;

/// The holder reported to a request denied by an emergency whose floor is momentarily free.
fn emergency_placeholder(by: Speaker, epoch: u64, now: i64) -> FloorHolder {
    FloorHolder {
        speaker: by,
        epoch,
        granted_at_ms: now,
        expires_at_ms: now,
        max_until_ms: now,
    }
}

fn user_grants(inner: &Inner, uid: &UserId) -> UserGrants {
    let (version, grants) = inner.grants.get(uid).cloned().unwrap_or_default();
    UserGrants {
        user_id: uid.clone(),
        version,
        grants,
    }
}

fn event_info(inner: &Inner, eid: &EventId) -> Option<EventInfo> {
    inner.events.get(eid).map(|channels| EventInfo {
        event_id: eid.clone(),
        channels: channels.clone(),
        emergency: inner.emergencies.get(eid).cloned(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::{FloorStore, Housekeeping, SessionStore};

    /// A store on a manual clock with a 1 s lease, 3 s of talk and 10 s sessions.
    fn store() -> (MemoryStore, Clock) {
        let clock = Clock::manual(1_000_000);
        let settings = StoreSettings {
            lease_ms: 1_000,
            max_talk_ms: 3_000,
            session_ttl_ms: 10_000,
            ..StoreSettings::default()
        };
        (MemoryStore::new(settings, Hub::new(), clock.clone()), clock)
    }

    async fn member(store: &MemoryStore, user: &str, ch: &ChannelId) -> SessionId {
        let session = store
            .create_session(NewSession {
                session_id: SessionId::generate(),
                user_id: UserId::parse(user).unwrap(),
                user_name: user.to_owned(),
                gateway_id: "gw".into(),
                ttl_ms: 0,
                resume_digest: String::new(),
            })
            .await
            .unwrap();
        store.join_channel(&session.session_id, ch).await.unwrap();
        session.session_id
    }

    #[tokio::test]
    async fn leases_talk_time_and_sessions_end_on_the_injected_clock() {
        let (store, clock) = store();
        let ch = ChannelId::parse("ops").unwrap();
        let ana = member(&store, "ana", &ch).await;
        let granted = store.acquire_floor(&ch, &ana, 0, 0).await.unwrap();
        let Acquired::Granted { holder, .. } = granted.result else {
            panic!("a free floor is granted");
        };
        assert_eq!(holder.expires_at_ms, 1_001_000);
        assert_eq!(holder.max_until_ms, 1_003_000);

        // Renewed every 900 ms, the lease moves on but never past the maximum talk time.
        for expected in [1_001_900, 1_002_800, 1_003_000] {
            clock.advance(900);
            let renewed = store.renew_floor(&ch, &ana, holder.epoch).await.unwrap();
            assert_eq!(renewed.result.unwrap().expires_at_ms, expected);
        }
        clock.advance(900);
        let refused = store.renew_floor(&ch, &ana, holder.epoch).await.unwrap();
        assert_eq!(refused.result, Err(FloorRefusal::MaxTalkTime));

        // A lease nobody renews lapses at its expiry, to the millisecond, by the sweep.
        let bo = member(&store, "bo", &ch).await;
        let granted = store.acquire_floor(&ch, &bo, 0, 0).await.unwrap();
        assert!(matches!(granted.result, Acquired::Granted { .. }));
        clock.advance(999);
        assert_eq!(store.sweep().await.unwrap().floors_expired, 0);
        clock.advance(1);
        assert_eq!(store.sweep().await.unwrap().floors_expired, 1);

        // Sessions nobody touches end after their time to live.
        clock.advance(10_000);
        assert_eq!(store.sweep().await.unwrap().sessions_expired, 2);
        assert!(store.session(&ana).await.is_err());
    }
}
