//! Conversions between protobuf messages and domain types, done once at the gRPC edge.

use talkgroup_proto::state::v1 as pb;

use crate::domain::{
    ChannelConfig, ChannelId, ChannelState, Event, FloorHolder, FloorReason, FloorRefusal,
    MediaNode, Member, MembershipChange, MoveReason, NodeId, Session, SessionId, Speaker, SyncId,
    UserId,
};
use crate::error::StoreError;

pub fn channel_id(raw: &str) -> Result<ChannelId, StoreError> {
    ChannelId::parse(raw)
}

pub fn sync_id(raw: &str) -> Result<SyncId, StoreError> {
    SyncId::parse(raw)
}

pub fn session_id(raw: &str) -> Result<SessionId, StoreError> {
    SessionId::parse(raw)
}

pub fn user_id(raw: &str) -> Result<UserId, StoreError> {
    UserId::parse(raw)
}

pub fn node_id(raw: &str) -> Result<NodeId, StoreError> {
    NodeId::parse(raw)
}

/// 0 means "no particular epoch" on the wire.
pub fn optional_epoch(raw: u64) -> Option<u64> {
    (raw != 0).then_some(raw)
}

pub fn speaker(s: &Speaker) -> pb::Speaker {
    pb::Speaker {
        session_id: s.session_id.to_string(),
        user_id: s.user_id.to_string(),
        user_name: s.user_name.clone(),
        priority: s.priority,
    }
}

pub fn holder(h: &FloorHolder) -> pb::FloorHolder {
    pb::FloorHolder {
        speaker: Some(speaker(&h.speaker)),
        epoch: h.epoch,
        granted_at_ms: h.granted_at_ms,
        expires_at_ms: h.expires_at_ms,
        max_until_ms: h.max_until_ms,
    }
}

pub fn member(m: &Member) -> pb::Member {
    pb::Member {
        session_id: m.session_id.to_string(),
        user_id: m.user_id.to_string(),
        user_name: m.user_name.clone(),
        joined_at_ms: m.joined_at_ms,
    }
}

pub fn channel_state(s: &ChannelState) -> pb::ChannelState {
    pb::ChannelState {
        channel_id: s.channel_id.to_string(),
        holder: s.holder.as_ref().map(holder),
        busy: s.holder.is_some(),
        epoch: s.epoch,
        members: s.members.iter().map(member).collect(),
        media_node_id: s
            .media_node
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        server_time_ms: s.server_time_ms,
        members_version: s.members_version,
    }
}

pub fn channel_config(ch: &ChannelId, c: ChannelConfig) -> pb::ChannelConfig {
    pb::ChannelConfig {
        channel_id: ch.to_string(),
        queue_enabled: c.queue_enabled,
        lease_ms: c.lease_ms,
        max_talk_ms: c.max_talk_ms,
    }
}

pub fn reason(r: FloorReason) -> pb::FloorReason {
    match r {
        FloorReason::Granted => pb::FloorReason::Granted,
        FloorReason::Released => pb::FloorReason::Released,
        FloorReason::Preempted => pb::FloorReason::Preempted,
        FloorReason::LeaseExpired => pb::FloorReason::LeaseExpired,
        FloorReason::MaxTalkTime => pb::FloorReason::MaxTalkTime,
        FloorReason::ForceReleased => pb::FloorReason::ForceReleased,
        FloorReason::LeftChannel => pb::FloorReason::LeftChannel,
        FloorReason::Disconnected => pb::FloorReason::Disconnected,
        FloorReason::QueueGranted => pb::FloorReason::QueueGranted,
        FloorReason::Emergency => pb::FloorReason::Emergency,
        FloorReason::EmergencyEnded => pb::FloorReason::EmergencyEnded,
        FloorReason::Lost => pb::FloorReason::Lost,
    }
}

pub fn refusal(r: Option<FloorRefusal>) -> pb::FloorRefusal {
    match r {
        None => pb::FloorRefusal::Unspecified,
        Some(FloorRefusal::NotHeld) => pb::FloorRefusal::NotHeld,
        Some(FloorRefusal::NotHolder) => pb::FloorRefusal::NotHolder,
        Some(FloorRefusal::StaleEpoch) => pb::FloorRefusal::StaleEpoch,
        Some(FloorRefusal::MaxTalkTime) => pb::FloorRefusal::MaxTalkTime,
    }
}

pub fn session(s: &Session) -> pb::Session {
    pb::Session {
        session_id: s.session_id.to_string(),
        user_id: s.user_id.to_string(),
        user_name: s.user_name.clone(),
        gateway_id: s.gateway_id.clone(),
        created_at_ms: s.created_at_ms,
        expires_at_ms: s.expires_at_ms,
        ttl_ms: s.ttl_ms,
        channel_ids: s.channels.iter().map(ToString::to_string).collect(),
        resume_token: String::new(),
        generation: s.generation,
        resume_grace_ms: 0,
        parked_at_ms: s.parked_at_ms,
    }
}

pub fn node(n: &MediaNode) -> pb::MediaNode {
    pb::MediaNode {
        node_id: n.node_id.to_string(),
        grpc_addr: n.grpc_addr.clone(),
        announced_ip: n.announced_ip.clone(),
        capacity: n.capacity,
        load: n.load,
        channels: n.channels,
        draining: n.draining,
        last_heartbeat_ms: n.last_heartbeat_ms,
        live: n.live,
    }
}

pub fn event(e: &Event) -> pb::WatchEvent {
    let event = match e {
        Event::Floor(f) => pb::watch_event::Event::Floor(pb::FloorChanged {
            channel_id: f.channel_id.to_string(),
            holder: f.holder.as_ref().map(holder),
            previous: f.previous.as_ref().map(speaker),
            epoch: f.epoch,
            reason: reason(f.reason).into(),
            previous_duration_ms: f.previous_duration_ms,
            at_ms: f.at_ms,
        }),
        Event::Membership(m) => pb::watch_event::Event::Membership(pb::MembershipChanged {
            channel_id: m.channel_id.to_string(),
            member: Some(member(&m.member)),
            change: match m.change {
                MembershipChange::Joined => pb::MembershipChange::Joined,
                MembershipChange::Left => pb::MembershipChange::Left,
            }
            .into(),
            member_count: m.member_count,
            at_ms: m.at_ms,
            version: m.version,
        }),
        Event::Moved(m) => pb::watch_event::Event::Moved(pb::ChannelMoved {
            channel_id: m.channel_id.to_string(),
            node: Some(pb::MediaNode {
                node_id: m.node_id.to_string(),
                grpc_addr: m.grpc_addr.clone(),
                ..Default::default()
            }),
            previous_node_id: m.previous.to_string(),
            reason: match m.reason {
                MoveReason::NodeLost => pb::MoveReason::NodeLost,
                MoveReason::NodeDraining => pb::MoveReason::NodeDraining,
            }
            .into(),
            at_ms: m.at_ms,
        }),
    };
    pb::WatchEvent { event: Some(event) }
}

pub fn snapshot(s: &ChannelState) -> pb::WatchEvent {
    pb::WatchEvent {
        event: Some(pb::watch_event::Event::Snapshot(channel_state(s))),
    }
}
