//! Channels: joining, leaving, listing, and the checks every channel request makes.

use std::collections::HashSet;

use talkgroup_proto::state::v1 as spb;

use super::{Conn, Result};
use crate::access::Role;
use crate::protocol::reply::{ChannelSummary, Channels, Done, Joined};
use crate::protocol::{ClientError, Code, err};

impl Conn {
    /// The configured channels the user may hear, with who is talking and how many are
    /// present, asked of state-svc in parallel.
    pub(super) async fn list_channels(&self) -> Result<Channels> {
        let asks = self
            .app
            .config
            .channels
            .iter()
            .filter(|c| self.grants.role(c) >= Role::Listen)
            .map(|channel| {
                let mut client =
                    spb::channel_service_client::ChannelServiceClient::new(self.app.state.clone());
                async move {
                    client
                        .get_channel_state(spb::GetChannelStateRequest {
                            channel_id: channel.clone(),
                        })
                        .await
                        .map(tonic::Response::into_inner)
                }
            });
        let mut channels = Vec::new();
        for state in futures::future::join_all(asks).await {
            let state = state?;
            let members = state
                .members
                .iter()
                .map(|m| &m.user_id)
                .collect::<HashSet<_>>()
                .len();
            channels.push(ChannelSummary {
                speaker: crate::protocol::speaking(state.holder.as_ref()),
                busy: state.busy,
                member_count: members,
                role: self.grants.role(&state.channel_id),
                channel_id: state.channel_id,
            });
        }
        Ok(Channels { channels })
    }

    pub(super) async fn join(&mut self, channel: String) -> Result<Joined> {
        let role = self.require_role(&channel, Role::Listen)?;
        if !self.joined.contains(&channel)
            && self.joined.len() >= self.app.config.max_channels_per_socket
        {
            return Err(err(Code::LimitExceeded, "too many channels on this socket"));
        }
        const GATEWAY_FULL: ClientError = err(
            Code::LimitExceeded,
            "this gateway follows too many channels",
        );
        if !self.app.hub.has_room_for(&channel) {
            self.app.metrics.refused("gateway-channels");
            return Err(GATEWAY_FULL);
        }
        let state = self
            .app
            .sessions()
            .join_channel(spb::JoinChannelRequest {
                session_id: self.session.clone(),
                channel_id: channel.clone(),
            })
            .await?
            .into_inner();
        if !self.follow(channel.clone()) {
            // The last room went to another socket meanwhile: undo the join.
            let _ = self
                .app
                .sessions()
                .leave_channel(spb::LeaveChannelRequest {
                    session_id: self.session.clone(),
                    channel_id: channel,
                })
                .await;
            self.app.metrics.refused("gateway-channels");
            return Err(GATEWAY_FULL);
        }
        Ok(Joined {
            channel: crate::protocol::channel_state(&state),
            role,
        })
    }

    /// Follows a channel's changes through the hub (joined, or taken by an emergency); false
    /// when the hub has no room for another channel.
    pub(super) fn follow(&mut self, channel: String) -> bool {
        if self.joined.contains(&channel) {
            return true;
        }
        if !self.app.hub.follow(self.id, &channel) {
            return false;
        }
        self.joined.insert(channel);
        true
    }

    pub(super) async fn leave_request(&mut self, channel: &str) -> Result<Done> {
        self.require_joined(channel)?;
        self.leave(channel).await?;
        Ok(Done {})
    }

    /// Leaves a channel: gives up its floor, closes its transports, tells state-svc.
    pub(super) async fn leave(&mut self, channel: &str) -> Result<()> {
        self.floors.leave(channel);
        self.close_transports_in(channel).await;
        self.app.hub.unfollow(self.id, channel);
        self.joined.remove(channel);
        self.app
            .sessions()
            .leave_channel(spb::LeaveChannelRequest {
                session_id: self.session.clone(),
                channel_id: channel.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// The user's role in `channel` must be at least `least`.
    pub(super) fn require_role(&self, channel: &str, least: Role) -> Result<Role> {
        let role = self.grants.role(channel);
        if role >= least {
            return Ok(role);
        }
        Err(match least {
            Role::Listen => err(Code::Forbidden, "no access to this channel"),
            Role::Talk => err(Code::Forbidden, "this user may only listen here"),
            _ => err(Code::Forbidden, "not a dispatcher of this channel"),
        })
    }

    pub(super) fn require_joined(&self, channel: &str) -> Result<()> {
        if self.joined.contains(channel) {
            Ok(())
        } else {
            Err(err(Code::Forbidden, "join the channel first"))
        }
    }
}
