//! What the hub hands this connection: floor changes it must act on, grant changes, kicks.

use talkgroup_proto::state::v1 as spb;

use super::{Close, Conn};
use crate::hub::HubEvent;
use crate::protocol::push::{ForceDisconnect, PttInterrupted};
use crate::protocol::{Push, reason};

impl Conn {
    /// Acts on one hub event; the close it calls for, if any.
    pub(super) async fn on_event(&mut self, event: HubEvent) -> Option<Close> {
        match event {
            HubEvent::Floor(push) => {
                let change = &push.change;
                self.floors.follow(change).await;
                if self.interrupted(change) {
                    let interrupted = PttInterrupted {
                        channel_id: change.channel_id.clone(),
                        by: crate::protocol::speaking(change.holder.as_ref()),
                        epoch: change.epoch,
                        reason: reason(change.reason()),
                    };
                    self.send(Push::PttInterrupted(interrupted)).await;
                }
                self.send_text(push.speaker_changed.clone()).await;
            }
            HubEvent::Grants(grants) => self.apply_grants(&grants).await,
            HubEvent::Resync => {
                // Events of the user may have been missed, a kick among them (the grants
                // come again on their own). The session answers for it: a kicked user's
                // sessions are removed.
                if let Some(close) = self.touch_session().await {
                    return Some(close);
                }
            }
            HubEvent::Kicked(reason) => {
                tracing::info!(conn = self.id, "disconnected by an administrator");
                self.send(Push::ForceDisconnect(ForceDisconnect { reason }))
                    .await;
                return Some(Close::Kicked);
            }
            HubEvent::Moved(moved) => self.on_moved(&moved).await,
            HubEvent::Resumed {
                session,
                generation,
            } => {
                if let Some(close) = self.taken_over(&session, generation) {
                    tracing::info!(conn = self.id, "session resumed on another connection");
                    return Some(close);
                }
            }
        }
        None
    }

    /// Whether the change took this session's floor away by pre-emption or emergency.
    fn interrupted(&self, change: &spb::FloorChanged) -> bool {
        change
            .previous
            .as_ref()
            .is_some_and(|p| p.session_id == self.session)
            && matches!(
                change.reason(),
                spb::FloorReason::Preempted | spb::FloorReason::Emergency
            )
    }
}
