//! Emergency broadcasts: a dispatcher takes the floor of every channel of an event, busy ones
//! included, until they stop it or their connection ends.

use talkgroup_proto::state::v1 as spb;

use super::{Conn, Result};
use crate::access::{ADMIN_EMERGENCY_PRIORITY, EMERGENCY_PRIORITY, Role};
use crate::protocol::reply::{ChannelEpoch, EmergencyChannel, EmergencyStarted, EmergencyStopped};
use crate::protocol::{Code, EMERGENCY_CONFIRM, EmergencyStart, err};

impl Conn {
    /// The event's channels, each of which the user must dispatch in; whether the user is an
    /// admin in all of them.
    async fn dispatch_event(&self, event_id: &str) -> Result<bool> {
        let event = self
            .app
            .access()
            .get_event(spb::GetEventRequest {
                event_id: event_id.to_owned(),
            })
            .await?
            .into_inner();
        let roles: Vec<Role> = event
            .channel_ids
            .iter()
            .map(|c| self.grants.role(c))
            .collect();
        if roles.iter().any(|r| *r < Role::Dispatch) {
            return Err(err(Code::Forbidden, "not a dispatcher of this event"));
        }
        Ok(roles.iter().all(|r| *r == Role::Admin))
    }

    pub(super) async fn emergency_start(&mut self, r: EmergencyStart) -> Result<EmergencyStarted> {
        if r.confirm != EMERGENCY_CONFIRM {
            return Err(err(
                Code::BadRequest,
                "confirm the emergency broadcast with \"EMERGENCY\"",
            ));
        }
        self.limits.press()?;
        let event_id = r.event_id;
        let admin = self.dispatch_event(&event_id).await?;
        let priority = if admin {
            ADMIN_EMERGENCY_PRIORITY
        } else {
            EMERGENCY_PRIORITY
        };
        let started = self
            .app
            .access()
            .start_emergency(spb::StartEmergencyRequest {
                event_id: event_id.clone(),
                session_id: self.session.clone(),
                priority,
            })
            .await?
            .into_inner();
        self.emergencies.insert(event_id.clone());
        let mut channels = Vec::new();
        for ch in started.channels {
            let Some(holder) = ch.holder else {
                channels.push(EmergencyChannel {
                    channel_id: ch.channel_id,
                    granted: false,
                    epoch: None,
                    expires_at: None,
                });
                continue;
            };
            if !self.follow(ch.channel_id.clone()) {
                // The broadcast still holds the channel (the renewals keep it); only this
                // socket's pushes of it are missing.
                tracing::warn!(conn = self.id, channel = %ch.channel_id, "gateway follows too many channels; no pushes of this one");
            }
            // The media node first, as for any grant; a channel whose node cannot be told
            // still belongs to the broadcast (the renewal tells it again).
            self.floors
                .take_up(&ch.channel_id, &holder, started.server_time_ms)
                .await;
            channels.push(EmergencyChannel {
                channel_id: ch.channel_id,
                granted: true,
                epoch: Some(holder.epoch),
                expires_at: Some(holder.expires_at_ms),
            });
        }
        tracing::info!(
            conn = self.id,
            event_id,
            channels = channels.len(),
            "emergency broadcast started"
        );
        Ok(EmergencyStarted { event_id, channels })
    }

    pub(super) async fn emergency_stop(&mut self, event_id: &str) -> Result<EmergencyStopped> {
        let admin = self.dispatch_event(event_id).await?;
        // An admin may end anyone's broadcast; a dispatcher only their own.
        let force = admin && !self.emergencies.contains(event_id);
        let stopped = self
            .app
            .access()
            .stop_emergency(spb::StopEmergencyRequest {
                event_id: event_id.to_owned(),
                session_id: self.session.clone(),
                force,
            })
            .await?
            .into_inner();
        self.emergencies.remove(event_id);
        let mut channels = Vec::new();
        for ch in stopped.channels {
            self.floors.stop_holding(&ch.channel_id);
            self.floors.cut_media(&ch.channel_id, ch.epoch).await;
            channels.push(ChannelEpoch {
                channel_id: ch.channel_id,
                epoch: ch.epoch,
            });
        }
        tracing::info!(conn = self.id, event_id, "emergency broadcast stopped");
        Ok(EmergencyStopped {
            event_id: event_id.to_owned(),
            channels,
        })
    }
}
