//! The in-memory store: the media-node registry and channel placement.

use super::*;
use crate::store::RegistryStore;

impl RegistryStore for MemoryStore {
    async fn register_node(&self, node: NodeRegistration) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let record = MediaNode {
            node_id: node.node_id.clone(),
            grpc_addr: node.grpc_addr,
            announced_ip: node.announced_ip,
            capacity: node.capacity,
            load: node.load,
            channels: 0,
            draining: false,
            last_heartbeat_ms: self.now_ms(),
            live: true,
        };
        inner.nodes.insert(node.node_id, record);
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeId, load: u32) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let record = inner.nodes.get_mut(node).ok_or(not_found("media node"))?;
        record.load = load;
        record.last_heartbeat_ms = self.now_ms();
        Ok(record.draining)
    }

    async fn drain_node(&self, node: &NodeId) -> Result<MediaNode, StoreError> {
        let mut inner = self.lock();
        let record = inner.nodes.get_mut(node).ok_or(not_found("media node"))?;
        record.draining = true;
        let record = record.clone();
        Ok(self.node_view(&inner, &record, self.now_ms()))
    }

    async fn deregister_node(&self, node: &NodeId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.nodes.remove(node);
        inner.node_channels.remove(node);
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<MediaNode>, StoreError> {
        let inner = self.lock();
        let now = self.now_ms();
        let mut nodes: Vec<MediaNode> = inner
            .nodes
            .values()
            .map(|n| self.node_view(&inner, n, now))
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(nodes)
    }

    async fn place_channel(&self, id: &ChannelId) -> Result<Placement, StoreError> {
        let mut inner = self.lock();
        let now = self.now_ms();
        let nodes: Vec<MediaNode> = inner
            .nodes
            .values()
            .map(|n| self.node_view(&inner, n, now))
            .collect();
        let current = inner.channels.get(id).and_then(|c| c.media.clone());
        if let Some(node) = current
            .as_ref()
            .and_then(|c| nodes.iter().find(|n| &n.node_id == c))
            && node.live
        {
            return Ok(Placement {
                node: node.clone(),
                placed_now: false,
            });
        }
        let chosen = choose_node(&nodes).ok_or(StoreError::NoMediaNode)?.clone();
        if let Some(old) = current
            && let Some(set) = inner.node_channels.get_mut(&old)
        {
            set.remove(id);
        }
        inner.channels.entry(id.clone()).or_default().media = Some(chosen.node_id.clone());
        inner
            .node_channels
            .entry(chosen.node_id.clone())
            .or_default()
            .insert(id.clone());
        let node = self.node_view(&inner, &chosen, now);
        Ok(Placement {
            node,
            placed_now: true,
        })
    }

    async fn placement(&self, id: &ChannelId) -> Result<Option<MediaNode>, StoreError> {
        let inner = self.lock();
        let now = self.now_ms();
        Ok(inner
            .channels
            .get(id)
            .and_then(|c| c.media.as_ref())
            .and_then(|n| inner.nodes.get(n))
            .map(|n| self.node_view(&inner, n, now)))
    }
}
