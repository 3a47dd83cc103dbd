//! The in-memory store: the sweep, the listener and the health ping.

use super::*;
use crate::store::Housekeeping;

impl Housekeeping for MemoryStore {
    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let mut inner = self.lock();
        let now = self.now_ms();
        let mut report = SweepReport::default();
        let expired: Vec<SessionId> = inner
            .sessions
            .values()
            .filter(|s| !rules::session_live(s, now))
            .map(|s| s.session_id.clone())
            .collect();
        for sid in expired {
            self.remove_locked(&mut inner, &sid);
            report.sessions_expired += 1;
        }
        let due: Vec<ChannelId> = inner
            .channels
            .iter()
            .filter(|(_, c)| c.floor.as_ref().is_some_and(|h| rules::lapsed(h, now)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let step = self.step(&id);
            if let Some(ch) = inner.channels.get_mut(&id) {
                step.live_holder(ch);
                report.floors_expired += 1;
            }
        }
        report.channels_moved = self.move_off_nodes(&mut inner, now);
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

impl MemoryStore {
    /// Moves the channels of dead and draining nodes to live ones, as the Redis store does.
    fn move_off_nodes(&self, inner: &mut Inner, now: i64) -> u32 {
        let mut nodes: Vec<MediaNode> = inner
            .nodes
            .values()
            .map(|n| self.node_view(inner, n, now))
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        for gone in nodes_to_forget(&nodes, now, self.settings.node_forget_after_ms) {
            inner.nodes.remove(&gone);
            inner.node_channels.remove(&gone);
        }
        let emptied: Vec<(NodeId, MoveReason)> = nodes_to_empty(&nodes)
            .into_iter()
            .map(|(n, r)| (n.node_id.clone(), r))
            .collect();
        let mut moved = 0;
        for (from, reason) in emptied {
            let channels: Vec<ChannelId> = inner
                .node_channels
                .remove(&from)
                .unwrap_or_default()
                .into_iter()
                .collect();
            for ch in channels {
                let Some(to) = choose_node(&nodes).cloned() else {
                    inner
                        .node_channels
                        .entry(from.clone())
                        .or_default()
                        .insert(ch);
                    continue;
                };
                inner.channels.entry(ch.clone()).or_default().media = Some(to.node_id.clone());
                inner
                    .node_channels
                    .entry(to.node_id.clone())
                    .or_default()
                    .insert(ch.clone());
                if let Some(n) = nodes.iter_mut().find(|n| n.node_id == to.node_id) {
                    n.channels += 1;
                }
                self.hub.publish(Event::Moved(ChannelMoved {
                    channel_id: ch,
                    node_id: to.node_id,
                    grpc_addr: to.grpc_addr,
                    previous: from.clone(),
                    reason,
                    at_ms: now,
                }));
                moved += 1;
            }
        }
        moved
    }
}
