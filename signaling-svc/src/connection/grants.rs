//! Roles after the connection opened: a grant change leaves channels the user may no longer
//! hear, gives up floors and send transports where they may no longer talk, and tells the
//! client.

use talkgroup_proto::state::v1 as spb;

use super::Conn;
use crate::access::Role;
use crate::protocol::Push;
use crate::protocol::push::PermissionUpdate;

impl Conn {
    /// Applies stored grants; enforces them if they changed anything.
    pub(super) async fn apply_grants(&mut self, stored: &spb::UserGrants) {
        if self.grants.apply(stored) {
            self.enforce_grants().await;
        }
    }

    /// Applies the user's current grants to this connection and tells the client.
    pub(super) async fn enforce_grants(&mut self) {
        let revoked: Vec<String> = self
            .joined
            .iter()
            .filter(|c| self.grants.role(c) < Role::Listen)
            .cloned()
            .collect();
        for channel in &revoked {
            if let Err(e) = self.leave(channel).await {
                tracing::warn!(%channel, error = %e, "leaving a revoked channel failed");
            }
        }
        for channel in self.floors.held_channels() {
            if self.grants.role(&channel) < Role::Talk {
                let _ = self.floors.release(&channel).await;
            }
        }
        self.close_muted_senders().await;
        if !revoked.is_empty() {
            tracing::info!(conn = self.id, revoked = revoked.len(), "channels revoked");
        }
        let update =
            PermissionUpdate::new(self.grants.named(), self.grants.default_role(), revoked);
        self.app.metrics.permission_updates.inc();
        self.send(Push::PermissionUpdate(update)).await;
    }
}
