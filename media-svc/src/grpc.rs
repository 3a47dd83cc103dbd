//! `ptt.media.v1.MediaService` over a [`Node`]. Requests are validated here; errors map to
//! gRPC codes in one table and never carry internal details.

use std::sync::Arc;

use talkgroup_proto::error::{Reason, ServiceError};
use talkgroup_proto::media::v1 as pb;
use tonic::{Request, Response, Status};

use crate::engine::{Candidate, EngineError, OPUS_FMTP, OPUS_PAYLOAD_TYPE};
use crate::node::{Direction, Node, NodeError};

/// Largest accepted SDP answer.
pub const MAX_SDP_BYTES: usize = 16 * 1024;
/// Largest accepted ICE candidate line.
const MAX_CANDIDATE_BYTES: usize = 1024;

impl From<NodeError> for Status {
    fn from(error: NodeError) -> Self {
        let reason = match &error {
            NodeError::InvalidArgument(_) => Reason::InvalidArgument,
            NodeError::NotFound(_) => Reason::NotFound,
            NodeError::FailedPrecondition(_) => Reason::FailedPrecondition,
            NodeError::Exhausted(_) => Reason::Exhausted,
            NodeError::Draining | NodeError::Stopping => Reason::Unavailable,
            NodeError::Engine(EngineError::BadDescription | EngineError::BadCandidate) => {
                Reason::InvalidArgument
            }
            NodeError::Engine(EngineError::Setup(_)) => {
                tracing::warn!(%error, "transport failure");
                return ServiceError::new(
                    Reason::Unavailable,
                    "media transport could not be set up",
                )
                .into();
            }
        };
        ServiceError::new(reason, error.to_string()).into()
    }
}

fn id(raw: &str, what: &'static str) -> Result<(), Status> {
    let ok = talkgroup_proto::id::valid(raw);
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(what))
    }
}

#[derive(Debug)]
pub struct MediaApi {
    node: Arc<Node>,
}

impl MediaApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl pb::media_service_server::MediaService for MediaApi {
    async fn get_router_capabilities(
        &self,
        request: Request<pb::GetRouterCapabilitiesRequest>,
    ) -> Result<Response<pb::RouterCapabilities>, Status> {
        id(&request.into_inner().channel_id, "invalid channel id")?;
        Ok(Response::new(pb::RouterCapabilities {
            codecs: vec![pb::Codec {
                mime_type: "audio/opus".into(),
                clock_rate: 48_000,
                channels: 2,
                payload_type: u32::from(OPUS_PAYLOAD_TYPE),
                fmtp: OPUS_FMTP.into(),
            }],
        }))
    }

    async fn create_transport(
        &self,
        request: Request<pb::CreateTransportRequest>,
    ) -> Result<Response<pb::CreateTransportResponse>, Status> {
        let req = request.into_inner();
        id(&req.channel_id, "invalid channel id")?;
        id(&req.session_id, "invalid session id")?;
        let direction = match req.direction() {
            pb::Direction::Send => Direction::Send,
            pb::Direction::Recv => Direction::Recv,
            pb::Direction::Unspecified => {
                return Err(Status::invalid_argument("direction is required"));
            }
        };
        let created = self
            .node
            .create_transport(&req.session_id, &req.channel_id, direction)
            .await?;
        Ok(Response::new(pb::CreateTransportResponse {
            transport_id: created.transport_id,
            offer: Some(pb::SessionDescription {
                r#type: "offer".into(),
                sdp: created.offer,
            }),
        }))
    }

    async fn restart_ice(
        &self,
        request: Request<pb::RestartIceRequest>,
    ) -> Result<Response<pb::RestartIceResponse>, Status> {
        let req = request.into_inner();
        id(&req.transport_id, "invalid transport id")?;
        id(&req.session_id, "invalid session id")?;
        let offer = self
            .node
            .restart_ice(&req.transport_id, &req.session_id)
            .await?;
        Ok(Response::new(pb::RestartIceResponse {
            offer: Some(pb::SessionDescription {
                r#type: "offer".into(),
                sdp: offer,
            }),
        }))
    }

    async fn connect_transport(
        &self,
        request: Request<pb::ConnectTransportRequest>,
    ) -> Result<Response<pb::ConnectTransportResponse>, Status> {
        let req = request.into_inner();
        id(&req.transport_id, "invalid transport id")?;
        id(&req.session_id, "invalid session id")?;
        match req.payload {
            Some(pb::connect_transport_request::Payload::Answer(answer)) => {
                if answer.r#type != "answer"
                    || answer.sdp.is_empty()
                    || answer.sdp.len() > MAX_SDP_BYTES
                {
                    return Err(Status::invalid_argument("invalid answer"));
                }
                self.node
                    .apply_answer(&req.transport_id, &req.session_id, answer.sdp)
                    .await?;
            }
            Some(pb::connect_transport_request::Payload::Candidate(c)) => {
                if c.candidate.len() > MAX_CANDIDATE_BYTES || c.sdp_mid.len() > 64 {
                    return Err(Status::invalid_argument("invalid candidate"));
                }
                let candidate = Candidate {
                    candidate: c.candidate,
                    sdp_mid: (!c.sdp_mid.is_empty()).then_some(c.sdp_mid),
                    sdp_mline_index: u16::try_from(c.sdp_mline_index).ok(),
                };
                self.node
                    .add_candidate(&req.transport_id, &req.session_id, candidate)
                    .await?;
            }
            None => return Err(Status::invalid_argument("answer or candidate is required")),
        }
        Ok(Response::new(pb::ConnectTransportResponse {}))
    }

    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        let req = request.into_inner();
        id(&req.transport_id, "invalid transport id")?;
        id(&req.session_id, "invalid session id")?;
        id(&req.channel_id, "invalid channel id")?;
        let producer_id = self
            .node
            .produce(&req.transport_id, &req.session_id, &req.channel_id)
            .await?;
        Ok(Response::new(pb::ProduceResponse { producer_id }))
    }

    async fn consume(
        &self,
        request: Request<pb::ConsumeRequest>,
    ) -> Result<Response<pb::ConsumeResponse>, Status> {
        let req = request.into_inner();
        id(&req.transport_id, "invalid transport id")?;
        id(&req.session_id, "invalid session id")?;
        id(&req.channel_id, "invalid channel id")?;
        let (consumer_id, ssrc) = self
            .node
            .consume(&req.transport_id, &req.session_id, &req.channel_id)
            .await?;
        Ok(Response::new(pb::ConsumeResponse { consumer_id, ssrc }))
    }

    async fn set_floor(
        &self,
        request: Request<pb::SetFloorRequest>,
    ) -> Result<Response<pb::SetFloorResponse>, Status> {
        let req = request.into_inner();
        id(&req.channel_id, "invalid channel id")?;
        if req.epoch == 0 {
            return Err(Status::invalid_argument("epoch is required"));
        }
        if !crate::node::plausible_epoch(req.epoch, crate::node::wall_ms()) {
            tracing::warn!(channel = %req.channel_id, epoch = req.epoch, "floor epoch refused: far ahead of the epoch clock");
            return Err(Status::invalid_argument(
                "epoch is implausibly far ahead of the epoch clock",
            ));
        }
        let producer = if req.producer_id.is_empty() {
            None
        } else {
            id(&req.producer_id, "invalid producer id")?;
            Some(req.producer_id)
        };
        let applied = self
            .node
            .set_floor(
                &req.channel_id,
                producer,
                req.epoch,
                crate::node::floor_end(req.lease_ms, req.expires_at_ms),
                false,
            )
            .await;
        Ok(Response::new(pb::SetFloorResponse {
            applied: applied.applied,
            current_epoch: applied.current_epoch,
        }))
    }

    async fn close_transport(
        &self,
        request: Request<pb::CloseTransportRequest>,
    ) -> Result<Response<pb::CloseTransportResponse>, Status> {
        let req = request.into_inner();
        id(&req.transport_id, "invalid transport id")?;
        id(&req.session_id, "invalid session id")?;
        self.node
            .close_transport(&req.transport_id, &req.session_id)
            .await?;
        Ok(Response::new(pb::CloseTransportResponse {}))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let req = request.into_inner();
        id(&req.session_id, "invalid session id")?;
        let transports_closed = self.node.close_session(&req.session_id).await;
        Ok(Response::new(pb::CloseSessionResponse {
            transports_closed,
        }))
    }

    async fn list_session_transports(
        &self,
        request: Request<pb::ListSessionTransportsRequest>,
    ) -> Result<Response<pb::ListSessionTransportsResponse>, Status> {
        let req = request.into_inner();
        id(&req.session_id, "invalid session id")?;
        let transports = self
            .node
            .session_transports(&req.session_id)
            .into_iter()
            .map(|t| pb::SessionTransport {
                transport_id: t.transport_id,
                channel_id: t.channel,
                direction: match t.direction {
                    Direction::Send => pb::Direction::Send,
                    Direction::Recv => pb::Direction::Recv,
                }
                .into(),
                producer_id: t.producer,
                consumer_id: t.consumer,
                ssrc: t.ssrc,
            })
            .collect();
        Ok(Response::new(pb::ListSessionTransportsResponse {
            transports,
        }))
    }

    async fn get_node_stats(
        &self,
        request: Request<pb::GetNodeStatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        let stats = self.node.stats(request.into_inner().reset_latency).await;
        let quantile = |q: f64| {
            stats.pool.forward_latency.as_ref().map_or(0, |h| {
                u32::try_from(h.value_at_quantile(q)).unwrap_or(u32::MAX)
            })
        };
        let router = stats.pool.router;
        Ok(Response::new(pb::NodeStats {
            node_id: self.node.settings().node_id.clone(),
            channels: stats.pool.channels,
            transports: stats.transports,
            producers: stats.pool.producers,
            consumers: stats.pool.consumers,
            packets_forwarded: router.forwarded,
            packets_dropped: router.dropped_not_floor
                + router.dropped_slow_listener
                + stats.pool.send_dropped,
            draining: self.node.is_draining(),
            forward_latency_p50_us: quantile(0.5),
            forward_latency_p99_us: quantile(0.99),
            forward_latency_max_us: quantile(1.0),
            datagrams_refused: self.node.demux().drops().iter().map(|(_, n)| n).sum(),
            ice_tcp_connections: u32::try_from(self.node.demux().tcp_connections())
                .unwrap_or(u32::MAX),
        }))
    }
}
