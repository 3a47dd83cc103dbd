//! `ptt.state.v1.MediaRegistryService`.

use talkgroup_proto::state::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use super::convert::{self, channel_id, node_id};
use crate::domain::NodeRegistration;
use crate::store::Store;

/// Longest accepted address or IP string.
const MAX_ADDR: usize = 256;

fn checked_addr(raw: String, what: &'static str) -> Result<String, Status> {
    if raw.len() > MAX_ADDR || raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Status::invalid_argument(what));
    }
    Ok(raw)
}

impl<S> Api<S> {
    /// A media node registers, heartbeats, drains and deregisters only itself: the node id in
    /// the request must be the one its certificate names.
    fn own_node<T>(&self, request: &Request<T>, node_id: &str) -> Result<(), Status> {
        talkgroup_common::authz::require_node(request, node_id, &self.metrics.refusals)
    }
}

#[tonic::async_trait]
impl<S: Store> pb::media_registry_service_server::MediaRegistryService for Api<S> {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let node = request
            .get_ref()
            .node
            .clone()
            .ok_or_else(|| Status::invalid_argument("node is required"))?;
        self.own_node(&request, &node.node_id)?;
        let grpc_addr = checked_addr(node.grpc_addr, "invalid grpc address")?;
        if grpc_addr.is_empty() {
            return Err(Status::invalid_argument("grpc address is required"));
        }
        let announced_ip = checked_addr(node.announced_ip, "invalid announced ip")?;
        if !announced_ip.is_empty() && announced_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(Status::invalid_argument("invalid announced ip"));
        }
        let most = self.settings().max_node_capacity;
        if node.capacity > most {
            tracing::warn!(node_id = %node.node_id, asked = node.capacity, most, "media node capacity clamped");
        }
        let registration = NodeRegistration {
            node_id: node_id(&node.node_id)?,
            grpc_addr,
            announced_ip,
            capacity: node.capacity.clamp(1, most),
            load: node.load,
        };
        tracing::info!(node_id = %registration.node_id, grpc_addr = %registration.grpc_addr, capacity = registration.capacity, "media node registered");
        self.store.register_node(registration).await?;
        let settings = self.settings();
        Ok(Response::new(pb::RegisterNodeResponse {
            heartbeat_interval_ms: settings.node_heartbeat_ms,
            dead_after_ms: settings.node_dead_after_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.own_node(&request, &request.get_ref().node_id)?;
        let req = request.into_inner();
        let node = node_id(&req.node_id)?;
        let draining = self.store.heartbeat(&node, req.load).await?;
        Ok(Response::new(pb::HeartbeatResponse { draining }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::MediaNode>, Status> {
        self.own_node(&request, &request.get_ref().node_id)?;
        let node = node_id(&request.into_inner().node_id)?;
        let drained = self.store.drain_node(&node).await?;
        tracing::info!(node_id = %node, "media node draining");
        Ok(Response::new(convert::node(&drained)))
    }

    async fn deregister_node(
        &self,
        request: Request<pb::DeregisterNodeRequest>,
    ) -> Result<Response<pb::DeregisterNodeResponse>, Status> {
        self.own_node(&request, &request.get_ref().node_id)?;
        let node = node_id(&request.into_inner().node_id)?;
        self.store.deregister_node(&node).await?;
        tracing::info!(node_id = %node, "media node deregistered");
        Ok(Response::new(pb::DeregisterNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.store.list_nodes().await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(convert::node).collect(),
        }))
    }

    async fn place_channel(
        &self,
        request: Request<pb::PlaceChannelRequest>,
    ) -> Result<Response<pb::Placement>, Status> {
        let ch = channel_id(&request.into_inner().channel_id)?;
        let placement = self.store.place_channel(&ch).await?;
        Ok(Response::new(pb::Placement {
            channel_id: ch.to_string(),
            node: Some(convert::node(&placement.node)),
            placed_now: placement.placed_now,
        }))
    }

    async fn get_placement(
        &self,
        request: Request<pb::GetPlacementRequest>,
    ) -> Result<Response<pb::Placement>, Status> {
        let ch = channel_id(&request.into_inner().channel_id)?;
        let node = self.store.placement(&ch).await?;
        Ok(Response::new(pb::Placement {
            channel_id: ch.to_string(),
            node: node.as_ref().map(convert::node),
            placed_now: false,
        }))
    }
}
