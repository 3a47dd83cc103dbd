//! The in-memory store: the embedded default for a single state-svc instance with no Redis.
//!
//! One mutex guards everything; each operation runs to completion under it (never across an
//! `.await`), which gives the same atomicity the Redis store gets from Lua. Events are handed
//! to the hub while the lock is held, so watchers see them in the order they happened. The
//! floor rules mirror `store::redis::scripts` step for step; the contract tests hold both to
//! the same behaviour.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::domain::{
    AcquireOutcome, Acquired, ChannelConfig, ChannelId, ChannelState, EmergencyHolder, Event,
    EventId, EventInfo, FloorChanged, FloorHolder, FloorReason, FloorRefusal, GrantChange,
    GrantsEvent, GrantsUpdate, LeaveOutcome, MAX_GRANTS_PER_USER, MediaNode, Member,
    MembershipChange, MembershipChanged, NewSession, NodeId, NodeRegistration, Placement,
    ReleaseOutcome, RemoveOutcome, RenewOutcome, Renewed, Role, Session, SessionId, Speaker,
    SyncId, UserGrants, UserId, choose_node, next_epoch, now_ms,
};
use crate::error::StoreError;
use crate::hub::{Hub, SyncEvent};
use crate::store::{Store, StoreSettings, SweepReport, event_channel_list};
use crate::sync::SyncSession;

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    hub: Arc<Hub>,
    settings: StoreSettings,
}

#[derive(Debug, Default)]
struct Inner {
    channels: HashMap<ChannelId, Channel>,
    sessions: HashMap<SessionId, Session>,
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
        self.hub.dispatch(Event::Floor(FloorChanged {
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

    /// The holder after lazily expiring a lapsed grant.
    fn live_holder(&self, ch: &mut Channel) -> Option<FloorHolder> {
        if let Some(h) = &ch.floor
            && self.now >= h.expires_at_ms
        {
            let reason = if self.now >= h.max_until_ms {
                FloorReason::MaxTalkTime
            } else {
                FloorReason::LeaseExpired
            };
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
            media_node: ch.media.clone(),
            server_time_ms: self.now,
        }
    }

    fn membership_event(&self, ch: &Channel, member: Member, change: MembershipChange) {
        self.hub.dispatch(Event::Membership(MembershipChanged {
            channel_id: self.id.clone(),
            member,
            change,
            member_count: u32::try_from(ch.members.len()).unwrap_or(u32::MAX),
            at_ms: self.now,
        }));
    }
}

impl MemoryStore {
    pub fn new(settings: StoreSettings, hub: Arc<Hub>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            hub,
            settings,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn step<'a>(&'a self, id: &'a ChannelId) -> Step<'a> {
        Step {
            id,
            now: now_ms(),
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

impl Store for MemoryStore {
    async fn acquire_floor(
        &self,
        id: &ChannelId,
        sid: &SessionId,
        priority: u32,
    ) -> Result<AcquireOutcome, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let ch = inner.channels.get_mut(id).ok_or(StoreError::NotMember)?;
        let member = ch.members.get(sid).cloned().ok_or(StoreError::NotMember)?;
        let (lease, max_talk) = step.limits(ch);
        let max_talk_ms = u32::try_from(max_talk).unwrap_or(u32::MAX);
        if let Some((_, by)) = ch.emergency.clone()
            && &by.session_id != sid
            && priority <= by.priority
        {
            // Under an emergency broadcast only a higher priority gets through.
            let holder = step
                .live_holder(ch)
                .unwrap_or_else(|| emergency_placeholder(by, ch.epoch, step.now));
            return Ok(AcquireOutcome {
                result: Acquired::Denied {
                    holder,
                    retry_after_ms: EMERGENCY_RETRY_MS,
                },
                server_time_ms: step.now,
            });
        }
        let result = match step.live_holder(ch) {
            None => {
                let holder = step.grant(ch, &member, priority);
                step.floor_event(ch, FloorReason::Granted, None);
                Acquired::Granted {
                    holder,
                    max_talk_ms,
                    preempted: None,
                }
            }
            Some(mut h) if &h.speaker.session_id == sid => {
                // Idempotent for the holder: same epoch, lease refreshed.
                h.expires_at_ms = (step.now + lease).min(h.max_until_ms);
                ch.floor = Some(h.clone());
                let max_talk_ms =
                    u32::try_from(h.max_until_ms - h.granted_at_ms).unwrap_or(u32::MAX);
                Acquired::Granted {
                    holder: h,
                    max_talk_ms,
                    preempted: None,
                }
            }
            Some(old) if priority > old.speaker.priority => {
                let holder = step.grant(ch, &member, priority);
                step.floor_event(
                    ch,
                    FloorReason::Preempted,
                    Some((&old, step.now - old.granted_at_ms)),
                );
                Acquired::Granted {
                    holder,
                    max_talk_ms,
                    preempted: Some(old.speaker),
                }
            }
            Some(h) if ch.config.queue_enabled => {
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
            Some(h) => {
                let retry_after_ms = h.expires_at_ms - step.now;
                Acquired::Denied {
                    holder: h,
                    retry_after_ms,
                }
            }
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
        let result = match ch.floor.clone() {
            Some(h) if now >= h.expires_at_ms => {
                let mine = &h.speaker.session_id == sid && h.epoch == epoch;
                let max_talk = now >= h.max_until_ms;
                step.live_holder(ch);
                Err(if mine && max_talk {
                    FloorRefusal::MaxTalkTime
                } else {
                    FloorRefusal::NotHeld
                })
            }
            None => Err(FloorRefusal::NotHeld),
            Some(h) if &h.speaker.session_id != sid => Err(FloorRefusal::NotHolder),
            Some(h) if h.epoch != epoch => Err(FloorRefusal::StaleEpoch),
            Some(mut h) => {
                h.expires_at_ms = (now + lease).min(h.max_until_ms);
                let renewed = Renewed {
                    expires_at_ms: h.expires_at_ms,
                    max_until_ms: h.max_until_ms,
                };
                ch.floor = Some(h);
                Ok(renewed)
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
            return Ok(ReleaseOutcome {
                refusal: Some(FloorRefusal::NotHeld),
                epoch: 0,
                dequeued: false,
            });
        };
        let holder = step.live_holder(ch);
        let refusal = match holder {
            Some(h) if &h.speaker.session_id == sid => {
                if epoch.is_some_and(|e| e != h.epoch) {
                    Some(FloorRefusal::StaleEpoch)
                } else {
                    step.free(ch, FloorReason::Released);
                    None
                }
            }
            Some(_) => Some(FloorRefusal::NotHolder),
            None => Some(FloorRefusal::NotHeld),
        };
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
            return Ok(ReleaseOutcome {
                refusal: Some(FloorRefusal::NotHeld),
                epoch: 0,
                dequeued: false,
            });
        };
        let refusal = match step.live_holder(ch) {
            None => Some(FloorRefusal::NotHeld),
            Some(h) if epoch.is_some_and(|e| e != h.epoch) => Some(FloorRefusal::StaleEpoch),
            Some(_) => {
                step.free(ch, FloorReason::ForceReleased);
                None
            }
        };
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

    async fn create_session(&self, new: NewSession) -> Result<Session, StoreError> {
        let now = now_ms();
        let ttl = if new.ttl_ms == 0 {
            self.settings.session_ttl_ms
        } else {
            new.ttl_ms
        };
        let session = Session {
            session_id: SessionId::generate(),
            user_id: new.user_id,
            user_name: new.user_name,
            gateway_id: new.gateway_id,
            created_at_ms: now,
            expires_at_ms: now + i64::from(ttl),
            ttl_ms: ttl,
            channels: Vec::new(),
        };
        let mut inner = self.lock();
        inner
            .user_sessions
            .entry(session.user_id.clone())
            .or_default()
            .insert(session.session_id.clone());
        inner
            .sessions
            .insert(session.session_id.clone(), session.clone());
        Ok(session)
    }

    async fn touch_session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        let now = now_ms();
        let mut inner = self.lock();
        let session = inner
            .sessions
            .get_mut(sid)
            .filter(|s| s.expires_at_ms > now)
            .ok_or(not_found("session"))?;
        session.expires_at_ms = session.expires_at_ms.max(now + i64::from(session.ttl_ms));
        Ok(session.clone())
    }

    async fn session(&self, sid: &SessionId) -> Result<Session, StoreError> {
        self.lock()
            .sessions
            .get(sid)
            .cloned()
            .ok_or(not_found("session"))
    }

    async fn user_sessions(&self, uid: &UserId) -> Result<Vec<Session>, StoreError> {
        let inner = self.lock();
        let mut sessions: Vec<Session> = inner
            .user_sessions
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|sid| inner.sessions.get(sid).cloned())
            .collect();
        sessions.sort_by_key(|s| s.created_at_ms);
        Ok(sessions)
    }

    async fn join_channel(
        &self,
        sid: &SessionId,
        id: &ChannelId,
    ) -> Result<ChannelState, StoreError> {
        let mut inner = self.lock();
        let step = self.step(id);
        let session = inner.sessions.get_mut(sid).ok_or(not_found("session"))?;
        if !session.channels.contains(id) {
            session.channels.push(id.clone());
        }
        let member = Member {
            session_id: sid.clone(),
            user_id: session.user_id.clone(),
            user_name: session.user_name.clone(),
            joined_at_ms: step.now,
        };
        let ch = inner.channels.entry(id.clone()).or_default();
        if !ch.members.contains_key(sid) {
            ch.members.insert(sid.clone(), member.clone());
            step.membership_event(ch, member, MembershipChange::Joined);
        }
        Ok(step.state(ch))
    }

    async fn leave_channel(
        &self,
        sid: &SessionId,
        id: &ChannelId,
    ) -> Result<LeaveOutcome, StoreError> {
        let mut inner = self.lock();
        Ok(self.leave_locked(&mut inner, sid, id, FloorReason::LeftChannel))
    }

    async fn remove_session(&self, sid: &SessionId) -> Result<RemoveOutcome, StoreError> {
        let mut inner = self.lock();
        Ok(self.remove_locked(&mut inner, sid))
    }

    async fn register_node(&self, node: NodeRegistration) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let record = MediaNode {
            node_id: node.node_id.clone(),
            grpc_addr: node.grpc_addr,
            announced_ip: node.announced_ip,
            capacity: node.capacity,
            load: node.load,
            channels: 0,
            draining: false,
            last_heartbeat_ms: now_ms(),
            live: true,
        };
        inner.nodes.insert(node.node_id, record);
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeId, load: u32) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let record = inner.nodes.get_mut(node).ok_or(not_found("media node"))?;
        record.load = load;
        record.last_heartbeat_ms = now_ms();
        Ok(record.draining)
    }

    async fn drain_node(&self, node: &NodeId) -> Result<MediaNode, StoreError> {
        let mut inner = self.lock();
        let record = inner.nodes.get_mut(node).ok_or(not_found("media node"))?;
        record.draining = true;
        let record = record.clone();
        Ok(self.node_view(&inner, &record, now_ms()))
    }

    async fn deregister_node(&self, node: &NodeId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.nodes.remove(node);
        inner.node_channels.remove(node);
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<MediaNode>, StoreError> {
        let inner = self.lock();
        let now = now_ms();
        let mut nodes: Vec<MediaNode> = inner
            .nodes
            .values()
            .map(|n| self.node_view(&inner, n, now))
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(nodes)
    }

    async fn place_channel(&self, id: &ChannelId) -> Result<Placement, StoreError> {
        let mut inner = self.lock();
        let now = now_ms();
        let nodes: Vec<MediaNode> = inner
            .nodes
            .values()
            .map(|n| self.node_view(&inner, n, now))
            .collect();
        let current = inner.channels.get(id).and_then(|c| c.media.clone());
        if let Some(node) = current
            .as_ref()
            .and_then(|c| nodes.iter().find(|n| &n.node_id == c))
            && node.live
        {
            return Ok(Placement {
                node: node.clone(),
                placed_now: false,
            });
        }
        let chosen = choose_node(&nodes).ok_or(StoreError::NoMediaNode)?.clone();
        if let Some(old) = current
            && let Some(set) = inner.node_channels.get_mut(&old)
        {
            set.remove(id);
        }
        inner.channels.entry(id.clone()).or_default().media = Some(chosen.node_id.clone());
        inner
            .node_channels
            .entry(chosen.node_id.clone())
            .or_default()
            .insert(id.clone());
        let node = self.node_view(&inner, &chosen, now);
        Ok(Placement {
            node,
            placed_now: true,
        })
    }

    async fn placement(&self, id: &ChannelId) -> Result<Option<MediaNode>, StoreError> {
        let inner = self.lock();
        let now = now_ms();
        Ok(inner
            .channels
            .get(id)
            .and_then(|c| c.media.as_ref())
            .and_then(|n| inner.nodes.get(n))
            .map(|n| self.node_view(&inner, n, now)))
    }

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
        if change.expect_version.is_some_and(|v| v != current.version) {
            return Ok(GrantsUpdate::VersionMismatch(current));
        }
        let mut next = if change.replace {
            BTreeMap::new()
        } else {
            current.grants.clone()
        };
        for (ch, role) in &change.set {
            match role {
                Some(role) => next.insert(ch.clone(), *role),
                None => next.remove(ch),
            };
        }
        if next == current.grants {
            return Ok(GrantsUpdate::Unchanged(current));
        }
        if next.len() > MAX_GRANTS_PER_USER {
            return Err(StoreError::InvalidArgument("too many grants"));
        }
        let version = current.version + 1;
        inner.grants.insert(uid.clone(), (version, next.clone()));
        let updated = UserGrants {
            user_id: uid.clone(),
            version,
            grants: next,
        };
        self.hub
            .grants_changed(GrantsEvent::Changed(updated.clone()));
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
                started_at_ms: now_ms(),
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
            return Ok(ReleaseOutcome {
                refusal: Some(FloorRefusal::NotHeld),
                epoch: 0,
                dequeued: false,
            });
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

    async fn sync_get(&self, id: &SyncId) -> Result<Option<SyncSession>, StoreError> {
        let mut inner = self.lock();
        let now = now_ms();
        if inner
            .syncs
            .get(id)
            .is_some_and(|(_, exp)| exp.is_some_and(|e| e <= now))
        {
            inner.syncs.remove(id);
        }
        Ok(inner.syncs.get(id).map(|(s, _)| s.clone()))
    }

    async fn sync_put(
        &self,
        session: &SyncSession,
        expected: Option<u64>,
        _action: &str,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let actual = inner.syncs.get(&session.session_id).map(|(s, _)| s.version);
        if actual != expected {
            return Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual: actual.unwrap_or(0),
            });
        }
        let expires = session.ttl_ms().map(|ttl| now_ms() + ttl);
        inner
            .syncs
            .insert(session.session_id.clone(), (session.clone(), expires));
        drop(inner);
        self.hub.sync_changed(SyncEvent {
            session_id: session.session_id.clone(),
            version: session.version,
            state: Some(session.clone()),
        });
        Ok(())
    }

    async fn sync_delete(&self, id: &SyncId, expected: Option<u64>) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let actual = inner
            .syncs
            .get(id)
            .map(|(s, _)| s.version)
            .ok_or(not_found("sync session"))?;
        if expected.is_some_and(|e| e != actual) {
            return Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual,
            });
        }
        inner.syncs.remove(id);
        drop(inner);
        self.hub.sync_changed(SyncEvent {
            session_id: id.clone(),
            version: actual + 1,
            state: None,
        });
        Ok(actual + 1)
    }

    async fn sync_due(&self, now: i64, limit: usize) -> Result<Vec<SyncId>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .syncs
            .values()
            .filter(|(s, _)| s.deadline().is_some_and(|d| d <= now))
            .map(|(s, _)| s.session_id.clone())
            .take(limit)
            .collect())
    }

    async fn sync_reschedule(&self, _id: &SyncId) -> Result<(), StoreError> {
        // Deadlines are computed from the stored sessions on every scan.
        Ok(())
    }

    async fn list_channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        let inner = self.lock();
        let mut channels: Vec<ChannelId> = inner
            .channels
            .iter()
            .filter(|(_, ch)| !ch.members.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        channels.sort();
        Ok(channels)
    }

    async fn list_sessions(&self, limit: usize) -> Result<Vec<Session>, StoreError> {
        let inner = self.lock();
        let mut sessions: Vec<Session> = inner.sessions.values().cloned().collect();
        sessions.sort_by_key(|s| s.expires_at_ms);
        sessions.truncate(limit);
        Ok(sessions)
    }

    async fn kick_user(&self, uid: &UserId, reason: &str) -> Result<u32, StoreError> {
        let mut inner = self.lock();
        let sids: Vec<SessionId> = inner
            .user_sessions
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for sid in &sids {
            self.remove_locked(&mut inner, sid);
        }
        drop(inner);
        self.hub.grants_changed(GrantsEvent::Kicked {
            user_id: uid.clone(),
            reason: reason.to_owned(),
        });
        Ok(u32::try_from(sids.len()).unwrap_or(u32::MAX))
    }

    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let mut inner = self.lock();
        let now = now_ms();
        let mut report = SweepReport::default();
        let expired: Vec<SessionId> = inner
            .sessions
            .values()
            .filter(|s| s.expires_at_ms <= now)
            .map(|s| s.session_id.clone())
            .collect();
        for sid in expired {
            self.remove_locked(&mut inner, &sid);
            report.sessions_expired += 1;
        }
        let due: Vec<ChannelId> = inner
            .channels
            .iter()
            .filter(|(_, c)| c.floor.as_ref().is_some_and(|h| now >= h.expires_at_ms))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let step = self.step(&id);
            if let Some(ch) = inner.channels.get_mut(&id) {
                step.live_holder(ch);
                report.floors_expired += 1;
            }
        }
        Ok(report)
    }

    async fn listen(&self) -> Result<(), StoreError> {
        // Events are dispatched to the hub directly; nothing to subscribe to.
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
