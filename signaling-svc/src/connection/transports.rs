//! The connection's WebRTC transports, producers and consumers, all on its channels' media
//! nodes.

use std::collections::{HashMap, HashSet};

use std::time::Duration;

use talkgroup_proto::media::v1 as mpb;
use talkgroup_proto::state::v1 as spb;

use super::placement::{media, place};
use super::{Conn, Result};
use crate::access::Role;
use crate::protocol::Push;
use crate::protocol::TransportDirection;
use crate::protocol::push::TransportClosed;
use crate::protocol::reply::{
    Capabilities, Codec, Consumer, Done, IceServers, Offer, Producer, Transport as Created,
};
use crate::protocol::{
    ChannelRef, ClientError, Code, ConnectTransport, CreateTransport, Produce, err,
};

/// How long a transport on a draining node keeps working after its channel moved: the
/// client's replacement carries the audio well before.
const DRAINING_LINGER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(super) struct TransportInfo {
    pub(super) channel: String,
    pub(super) node: String,
    pub(super) direction: TransportDirection,
}

/// The connection's transports by id.
#[derive(Debug, Default)]
pub(super) struct Transports(HashMap<String, TransportInfo>);

impl Transports {
    fn get(&self, id: &str) -> Result<TransportInfo> {
        self.0
            .get(id)
            .cloned()
            .ok_or(err(Code::NotFound, "unknown transport"))
    }

    /// The ids of the transports that match.
    fn ids(&self, matches: impl Fn(&TransportInfo) -> bool) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, t)| matches(t))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Serves a transport the session already had (a resumed session's).
    pub(super) fn insert(&mut self, id: String, info: TransportInfo) {
        self.0.insert(id, info);
    }

    /// Forgets every transport: how many there were, and the media nodes they were on.
    pub(super) fn take_nodes(&mut self) -> (usize, HashSet<String>) {
        let held = self.0.len();
        (held, self.0.drain().map(|(_, t)| t.node).collect())
    }
}

impl Conn {
    pub(super) async fn router_capabilities(&self, r: ChannelRef) -> Result<Capabilities> {
        self.require_joined(&r.channel_id)?;
        let node = place(&self.app, &r.channel_id).await?;
        let caps = media(&self.app, &node)?
            .get_router_capabilities(mpb::GetRouterCapabilitiesRequest {
                channel_id: r.channel_id,
            })
            .await?
            .into_inner();
        let codecs = caps
            .codecs
            .into_iter()
            .map(|c| Codec {
                mime_type: c.mime_type,
                clock_rate: c.clock_rate,
                channels: c.channels,
                payload_type: c.payload_type,
                fmtp: c.fmtp,
            })
            .collect();
        Ok(Capabilities { codecs })
    }

    pub(super) async fn create_transport(&mut self, r: CreateTransport) -> Result<Created> {
        self.require_joined(&r.channel_id)?;
        if r.direction == TransportDirection::Send {
            self.require_role(&r.channel_id, Role::Talk)?;
        }
        let node = place(&self.app, &r.channel_id).await?;
        let direction = match r.direction {
            TransportDirection::Send => mpb::Direction::Send,
            TransportDirection::Recv => mpb::Direction::Recv,
        };
        let user = &self.user.user_id;
        if !self
            .app
            .transports
            .take(user, self.app.config.max_transports_per_user)
        {
            self.app.metrics.refused("transports-per-user");
            return Err(err(
                Code::LimitExceeded,
                "too many transports for this user",
            ));
        }
        let created = async {
            let created = media(&self.app, &node)?
                .create_transport(mpb::CreateTransportRequest {
                    channel_id: r.channel_id.clone(),
                    session_id: self.session.clone(),
                    direction: direction.into(),
                })
                .await?;
            Ok::<_, ClientError>(created.into_inner())
        }
        .await;
        let created = match created {
            Ok(created) => created,
            Err(e) => {
                self.app.transports.give_back(user, 1);
                return Err(e);
            }
        };
        let info = TransportInfo {
            channel: r.channel_id,
            node,
            direction: r.direction,
        };
        self.transports.0.insert(created.transport_id.clone(), info);
        let offer = Offer::new(created.offer.map(|o| o.sdp).unwrap_or_default());
        Ok(Created {
            transport_id: created.transport_id,
            offer,
            ice_servers: self.ice_servers()?.ice_servers,
        })
    }

    /// TURN relays with credentials for this user: none without relays; refused to a user
    /// with no role in any channel (credentials are a way through the network, not a right).
    pub(super) fn ice_servers(&self) -> Result<IceServers> {
        let Some(turn) = &self.app.turn else {
            return Ok(IceServers {
                ice_servers: Vec::new(),
                expires_at: None,
            });
        };
        if !self.grants.any_role() {
            return Err(err(Code::Forbidden, "no role in any channel"));
        }
        let now_s = u64::try_from(self.app.clock.now_ms() / 1000).unwrap_or(0);
        let (server, expires_at) = turn.credentials(&self.user.user_id, now_s, self.token_exp_s);
        Ok(IceServers {
            ice_servers: vec![server],
            expires_at: Some(expires_at),
        })
    }

    pub(super) async fn connect_transport(&self, r: ConnectTransport) -> Result<Done> {
        let info = self.transports.get(&r.transport_id)?;
        let payload = match (r.answer, r.candidate) {
            (Some(answer), None) if answer.kind == "answer" => {
                mpb::connect_transport_request::Payload::Answer(mpb::SessionDescription {
                    r#type: answer.kind,
                    sdp: answer.sdp,
                })
            }
            (None, Some(c)) => {
                mpb::connect_transport_request::Payload::Candidate(mpb::IceCandidate {
                    candidate: c.candidate,
                    sdp_mid: c.sdp_mid.unwrap_or_default(),
                    sdp_mline_index: c.sdp_m_line_index.unwrap_or(0),
                })
            }
            _ => return Err(err(Code::BadRequest, "send an answer or a candidate")),
        };
        media(&self.app, &info.node)?
            .connect_transport(mpb::ConnectTransportRequest {
                transport_id: r.transport_id,
                session_id: self.session.clone(),
                payload: Some(payload),
            })
            .await?;
        Ok(Done {})
    }

    /// Restarts a transport's ICE at its media node (after a network change): a fresh offer
    /// for the same transport, answered with `connect-transport`; DTLS, SRTP, the stream's
    /// SSRC and the floor stay. The relays come with it, credentials renewed.
    pub(super) async fn restart_ice(&self, transport_id: &str) -> Result<Created> {
        let info = self.transports.get(transport_id)?;
        let restarted = media(&self.app, &info.node)?
            .restart_ice(mpb::RestartIceRequest {
                transport_id: transport_id.to_owned(),
                session_id: self.session.clone(),
            })
            .await?
            .into_inner();
        Ok(Created {
            transport_id: transport_id.to_owned(),
            offer: Offer::new(restarted.offer.map(|o| o.sdp).unwrap_or_default()),
            ice_servers: self.ice_servers()?.ice_servers,
        })
    }

    pub(super) async fn produce(&mut self, r: Produce) -> Result<Producer> {
        if r.kind != "audio" {
            return Err(err(Code::BadRequest, "only audio can be produced"));
        }
        let info = self.transports.get(&r.transport_id)?;
        if info.channel != r.channel_id || info.direction != TransportDirection::Send {
            return Err(err(
                Code::BadRequest,
                "not a send transport of this channel",
            ));
        }
        self.require_role(&r.channel_id, Role::Talk)?;
        let producer_id = media(&self.app, &info.node)?
            .produce(mpb::ProduceRequest {
                transport_id: r.transport_id,
                session_id: self.session.clone(),
                channel_id: r.channel_id.clone(),
            })
            .await?
            .into_inner()
            .producer_id;
        self.floors
            .produced(&r.channel_id, producer_id.clone(), info.node)
            .await?;
        Ok(Producer { producer_id })
    }

    pub(super) async fn consume(&self, r: ChannelRef) -> Result<Consumer> {
        self.require_joined(&r.channel_id)?;
        self.require_role(&r.channel_id, Role::Listen)?;
        let (transport_id, info) = self
            .transports
            .0
            .iter()
            .find(|(_, t)| t.channel == r.channel_id && t.direction == TransportDirection::Recv)
            .map(|(id, t)| (id.clone(), t.clone()))
            .ok_or(err(Code::BadRequest, "create a recv transport first"))?;
        let consumed = media(&self.app, &info.node)?
            .consume(mpb::ConsumeRequest {
                transport_id,
                session_id: self.session.clone(),
                channel_id: r.channel_id,
            })
            .await?
            .into_inner();
        Ok(Consumer::audio(consumed.consumer_id, consumed.ssrc))
    }

    /// The channel moved to the node at `moved.node`: its transports elsewhere are forgotten
    /// here and the client told to make new ones. On a draining node they are closed a few
    /// seconds later (audio flows on them until the replacements carry it); on a lost one at
    /// once, in case the node only lost state-svc.
    pub(super) async fn on_moved(&mut self, moved: &spb::ChannelMoved) {
        let Some(node) = &moved.node else {
            return;
        };
        self.app.learn_node(node);
        let channel = moved.channel_id.as_str();
        let draining = moved.reason() == spb::MoveReason::NodeDraining;
        let reason = if draining {
            "node-draining"
        } else {
            "node-lost"
        };
        self.floors.moved(channel, &node.grpc_addr);
        let stale = self
            .transports
            .ids(|t| t.channel == channel && t.node != node.grpc_addr);
        if stale.is_empty() {
            return;
        }
        tracing::info!(conn = self.id, %channel, to = %node.node_id, reason, transports = stale.len(), "channel moved; transports to re-create");
        for id in stale {
            let Some(info) = self.transports.0.remove(&id) else {
                continue;
            };
            self.app.transports.give_back(&self.user.user_id, 1);
            let closed = TransportClosed {
                transport_id: id.clone(),
                channel_id: channel.to_owned(),
                direction: info.direction,
                reason: reason.into(),
            };
            self.send(Push::TransportClosed(closed)).await;
            let (app, session) = (std::sync::Arc::clone(&self.app), self.session.clone());
            let linger = if draining {
                DRAINING_LINGER
            } else {
                Duration::ZERO
            };
            self.app.tracker.spawn(async move {
                tokio::time::sleep(linger).await;
                if let Ok(mut media) = media(&app, &info.node) {
                    let close = media.close_transport(mpb::CloseTransportRequest {
                        transport_id: id,
                        session_id: session,
                    });
                    let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
                }
            });
        }
    }

    /// Closes the connection's transports in `channel`.
    pub(super) async fn close_transports_in(&mut self, channel: &str) {
        for id in self.transports.ids(|t| t.channel == channel) {
            self.close_transport(&id).await;
        }
    }

    /// Closes the send transports of channels where the user may no longer talk.
    pub(super) async fn close_muted_senders(&mut self) {
        let grants = &self.grants;
        let muted = self.transports.ids(|t| {
            t.direction == TransportDirection::Send && grants.role(&t.channel) < Role::Talk
        });
        for id in muted {
            self.close_transport(&id).await;
        }
    }

    async fn close_transport(&mut self, transport_id: &str) {
        let Some(info) = self.transports.0.remove(transport_id) else {
            return;
        };
        self.app.transports.give_back(&self.user.user_id, 1);
        if let Ok(mut media) = media(&self.app, &info.node) {
            let _ = media
                .close_transport(mpb::CloseTransportRequest {
                    transport_id: transport_id.to_owned(),
                    session_id: self.session.clone(),
                })
                .await;
            if info.direction == TransportDirection::Send {
                self.floors.unproduced(&info.channel);
            }
        }
    }
}
