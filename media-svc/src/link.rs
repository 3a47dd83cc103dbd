//! The node's link to state-svc: registration, heartbeats with load, draining, and a `Watch`
//! on the floors of the channels the node hosts. Gateways tell the node about floor changes
//! directly (`SetFloor`, the fast path); the watch is the safety net that cuts a speaker whose
//! floor was revoked, expired or moved when no gateway said so (a gateway crash, say). Relayed
//! decisions apply only with a strictly higher epoch, so they never undo a renewal.
//!
//! The same watch ends media for sessions that end: a member that leaves a hosted channel (its
//! session removed, expired, kicked, or its gateway gone) has its transports there closed, and
//! a snapshot (at subscribe and after every reconnect) closes those of anyone not listed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use talkgroup_common::grpc::Security;
use talkgroup_common::tls::{Expect, Identity};
use talkgroup_proto::state::v1 as pb;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::node::Node;

const RETRY: Duration = Duration::from_secs(1);
/// How long a call to state-svc may take.
const CALL_DEADLINE: Duration = Duration::from_secs(3);
/// Registration attempts logged at debug before the failures become warnings: a node usually
/// starts beside state-svc, before it listens.
const QUIET_ATTEMPTS: u32 = 5;

/// What the node registers as.
#[derive(Debug, Clone)]
pub struct Registration {
    pub node_id: String,
    pub grpc_url: String,
    pub announced_ip: String,
    pub capacity: u32,
}

pub async fn run(
    node: Arc<Node>,
    state_url: String,
    security: Security,
    me: Registration,
    shutdown: CancellationToken,
) {
    // Every call gets 3 s to be answered (a stream: to start); the watch stream then lives
    // on, with HTTP/2 keepalive to notice a dead state-svc.
    let channel = match talkgroup_common::grpc::channel(
        &state_url,
        Some(CALL_DEADLINE),
        &security,
        Expect::Exactly(Identity::State),
    ) {
        Ok(channel) => channel,
        Err(_) => {
            tracing::error!(url = %state_url, "invalid state-svc url; the node runs unregistered");
            return;
        }
    };
    let watch = tokio::spawn(watch_floors(
        Arc::clone(&node),
        channel.clone(),
        shutdown.clone(),
    ));
    heartbeat(&node, channel.clone(), &me, &shutdown).await;
    watch.abort();
    let mut registry = pb::media_registry_service_client::MediaRegistryServiceClient::new(channel);
    if let Err(error) = registry
        .deregister_node(pb::DeregisterNodeRequest {
            node_id: me.node_id.clone(),
        })
        .await
    {
        tracing::warn!(%error, "deregistration failed; the registry will time the node out");
    }
}

async fn heartbeat(node: &Node, channel: Channel, me: &Registration, shutdown: &CancellationToken) {
    let mut registry = pb::media_registry_service_client::MediaRegistryServiceClient::new(channel);
    let mut registered = false;
    let mut failed_attempts = 0u32;
    let mut drain_reported = false;
    let mut every = Duration::from_secs(2);
    loop {
        let load = u32::try_from(node.transport_count()).unwrap_or(u32::MAX);
        if !registered {
            let request = pb::RegisterNodeRequest {
                node: Some(pb::MediaNode {
                    node_id: me.node_id.clone(),
                    grpc_addr: me.grpc_url.clone(),
                    announced_ip: me.announced_ip.clone(),
                    capacity: me.capacity,
                    load,
                    ..Default::default()
                }),
            };
            match registry.register_node(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    every = Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(50)));
                    registered = true;
                    failed_attempts = 0;
                    drain_reported = false;
                    tracing::info!(node_id = %me.node_id, "registered with state-svc");
                }
                Err(error) => {
                    failed_attempts += 1;
                    if failed_attempts > QUIET_ATTEMPTS {
                        tracing::warn!(%error, attempts = failed_attempts, "registration failed; retrying");
                    } else {
                        tracing::debug!(%error, attempts = failed_attempts, "registration failed; retrying");
                    }
                }
            }
        } else {
            match registry
                .heartbeat(pb::HeartbeatRequest {
                    node_id: me.node_id.clone(),
                    load,
                })
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::NotFound => {
                    tracing::warn!("registry lost this node; registering again");
                    registered = false;
                    continue;
                }
                Err(error) => tracing::warn!(%error, "heartbeat failed"),
            }
            if node.is_draining() && !drain_reported {
                if registry
                    .drain_node(pb::DrainNodeRequest {
                        node_id: me.node_id.clone(),
                    })
                    .await
                    .is_ok()
                {
                    drain_reported = true;
                    tracing::info!("registry told the node is draining");
                }
                continue;
            }
        }
        let wait = if registered { every } else { RETRY };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn watch_floors(node: Arc<Node>, channel: Channel, shutdown: CancellationToken) {
    loop {
        if let Err(error) = watch_once(&node, channel.clone(), &shutdown).await {
            tracing::warn!(%error, "floor watch interrupted; reconnecting");
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn watch_once(
    node: &Node,
    channel: Channel,
    shutdown: &CancellationToken,
) -> Result<(), tonic::Status> {
    let mut client = pb::channel_service_client::ChannelServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut stream = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut hosted = node.channels();
    let mut subscribed: HashSet<String> = HashSet::new();
    loop {
        let wanted = hosted.borrow_and_update().clone();
        let add: Vec<String> = wanted.difference(&subscribed).cloned().collect();
        let remove: Vec<String> = subscribed.difference(&wanted).cloned().collect();
        for (ids, subscribe) in [(add, true), (remove, false)] {
            if ids.is_empty() {
                continue;
            }
            let set = pb::TopicSet {
                channel_ids: ids.clone(),
                ..Default::default()
            };
            let action = if subscribe {
                pb::watch_request::Action::Subscribe(set)
            } else {
                pb::watch_request::Action::Unsubscribe(set)
            };
            if tx
                .send(pb::WatchRequest {
                    action: Some(action),
                })
                .await
                .is_err()
            {
                return Err(tonic::Status::unavailable("watch closed"));
            }
        }
        subscribed = wanted;
        tokio::select! {
            changed = hosted.changed() => if changed.is_err() { return Ok(()) },
            event = stream.next() => match event {
                Some(Ok(event)) => apply(node, event).await,
                Some(Err(status)) => return Err(status),
                None => return Err(tonic::Status::unavailable("watch ended")),
            },
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn apply(node: &Node, event: pb::WatchEvent) {
    // `at`: the store's clock when the event happened, so a holder's lease end becomes a
    // duration (a snapshot carries the server time instead).
    let (channel, holder, epoch, at) = match event.event {
        Some(pb::watch_event::Event::Floor(f)) => (f.channel_id, f.holder, f.epoch, f.at_ms),
        Some(pb::watch_event::Event::Snapshot(s)) => {
            // A snapshot (at subscribe, and after every reconnect) lists the members: a
            // transport of anyone else belongs to a session that ended meanwhile.
            let members: HashSet<&str> = s.members.iter().map(|m| m.session_id.as_str()).collect();
            let closed = node.keep_members(&s.channel_id, &members).await;
            if closed > 0 {
                tracing::info!(channel = %s.channel_id, closed, "closed transports of sessions no longer in the channel");
            }
            (s.channel_id, s.holder, s.epoch, s.server_time_ms)
        }
        Some(pb::watch_event::Event::Membership(m)) => {
            // A session that left the channel, or ended (disconnect, expiry, kick, its gateway
            // gone), hears nothing more: its transports here close at once.
            if m.change() == pb::MembershipChange::Left
                && let Some(member) = &m.member
            {
                let closed = node.close_member(&m.channel_id, &member.session_id).await;
                if closed > 0 {
                    tracing::info!(channel = %m.channel_id, closed, "closed the transports of a session that left");
                }
            }
            return;
        }
        // The gateways move the channel's transports; the ones here close as they do. Nothing
        // else is sent to a node.
        _ => return,
    };
    if epoch == 0 {
        return;
    }
    if !crate::node::plausible_epoch(epoch, crate::node::wall_ms()) {
        tracing::warn!(%channel, epoch, "floor epoch from state-svc refused: far ahead of this node's clock");
        return;
    }
    let (producer, expires) = match &holder {
        Some(h) => {
            let session = h
                .speaker
                .as_ref()
                .map(|s| s.session_id.as_str())
                .unwrap_or_default();
            // Without the store's time (0) the lease is unknown: the expiry is used as is.
            let lease = if at > 0 {
                u32::try_from(h.expires_at_ms.saturating_sub(at).max(1)).unwrap_or(u32::MAX)
            } else {
                0
            };
            let end = crate::node::floor_end(lease, h.expires_at_ms);
            (node.producer_of(&channel, session), end)
        }
        None => (None, None),
    };
    let applied = node
        .set_floor(&channel, producer, epoch, expires, true)
        .await;
    if applied.applied {
        tracing::debug!(%channel, epoch, "floor applied from state-svc");
    }
}
