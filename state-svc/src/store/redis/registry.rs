//! The Redis store: the media-node registry and channel placement.

use super::*;
use crate::store::RegistryStore;

impl RegistryStore for RedisStore {
    async fn register_node(&self, node: NodeRegistration) -> Result<(), StoreError> {
        let key = self.keys.media_node(&node.node_id);
        let fields = [
            (fields::node::ADDR, node.grpc_addr),
            (fields::node::IP, node.announced_ip),
            (fields::node::CAPACITY, node.capacity.to_string()),
            (fields::node::LOAD, node.load.to_string()),
            (fields::node::DRAINING, "0".to_owned()),
            (fields::node::LAST_HEARTBEAT, now_ms().to_string()),
        ];
        let mut conn = self.conn().await?;
        self.bounded(conn.hset_multiple::<_, _, _, ()>(&key, &fields))
            .await?;
        self.bounded(conn.sadd::<_, _, ()>(self.keys.media_nodes(), node.node_id.as_str()))
            .await
    }

    async fn heartbeat(&self, node: &NodeId, load: u32) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let mut invocation = scripts::NODE_UPDATE.prepare_invoke();
        invocation
            .key(self.keys.media_node(node))
            .arg(fields::node::LOAD)
            .arg(load)
            .arg(now_ms());
        let draining: Option<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        draining
            .map(|d| d == "1")
            .ok_or(StoreError::NotFound("media node"))
    }

    async fn drain_node(&self, node: &NodeId) -> Result<MediaNode, StoreError> {
        let mut conn = self.conn().await?;
        let mut invocation = scripts::NODE_UPDATE.prepare_invoke();
        invocation
            .key(self.keys.media_node(node))
            .arg(fields::node::DRAINING)
            .arg("1");
        let found: Option<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        found.ok_or(StoreError::NotFound("media node"))?;
        self.read_node(node)
            .await?
            .ok_or(StoreError::NotFound("media node"))
    }

    async fn deregister_node(&self, node: &NodeId) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.bounded(
            redis::pipe()
                .del(self.keys.media_node(node))
                .ignore()
                .del(self.keys.media_node_channels(node))
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await?;
        self.bounded(conn.srem::<_, _, ()>(self.keys.media_nodes(), node.as_str()))
            .await
    }

    async fn list_nodes(&self) -> Result<Vec<MediaNode>, StoreError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = self.bounded(conn.smembers(self.keys.media_nodes())).await?;
        let ids: Vec<NodeId> = ids.iter().filter_map(|i| NodeId::parse(i).ok()).collect();
        let rows: Vec<(HashMap<String, String>, u32)> = if ids.is_empty() {
            Vec::new()
        } else if self.target.is_cluster() {
            // Each node's keys are in its own slot: a pipeline per node, all at once.
            let reads = ids.iter().map(|id| {
                let mut conn = conn.clone();
                async move {
                    self.bounded(
                        redis::pipe()
                            .hgetall(self.keys.media_node(id))
                            .scard(self.keys.media_node_channels(id))
                            .query_async::<(HashMap<String, String>, u32)>(&mut conn),
                    )
                    .await
                }
            });
            futures::future::try_join_all(reads).await?
        } else {
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(self.keys.media_node(id))
                    .scard(self.keys.media_node_channels(id));
            }
            let flat: Vec<redis::Value> = self.bounded(pipe.query_async(&mut conn)).await?;
            flat.chunks(2)
                .map(|pair| {
                    let hash = redis::from_redis_value(pair[0].clone()).unwrap_or_default();
                    let count = redis::from_redis_value(pair[1].clone()).unwrap_or_default();
                    (hash, count)
                })
                .collect()
        };
        let now = now_ms();
        let mut nodes: Vec<MediaNode> = ids
            .into_iter()
            .zip(rows)
            .filter(|(_, (hash, _))| !hash.is_empty())
            .map(|(id, (hash, count))| self.node_from_hash(id, &hash, count, now))
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(nodes)
    }

    async fn place_channel(&self, ch: &ChannelId) -> Result<Placement, StoreError> {
        let media_key = self.keys.channel(ch).media;
        let mut conn = self.conn().await?;
        // A few rounds at most: each round either returns or loses a compare-and-set race to a
        // caller whose answer the next round then accepts.
        for _ in 0..4 {
            let current: Option<String> = self.bounded(conn.get(&media_key)).await?;
            let current_node = current.as_deref().and_then(|c| NodeId::parse(c).ok());
            if let Some(node_id) = &current_node
                && let Some(node) = self.read_node(node_id).await?
                && node.live
            {
                return Ok(Placement {
                    node,
                    placed_now: false,
                });
            }
            let nodes = self.list_nodes().await?;
            let chosen = choose_node(&nodes).ok_or(StoreError::NoMediaNode)?.clone();
            let mut invocation = scripts::PLACE.prepare_invoke();
            invocation
                .key(&media_key)
                .arg(current.as_deref().unwrap_or(""))
                .arg(chosen.node_id.as_str());
            let (_holder, set_now): (String, bool) =
                self.bounded(invocation.invoke_async(&mut conn)).await?;
            if set_now {
                self.bounded(
                    conn.sadd::<_, _, ()>(
                        self.keys.media_node_channels(&chosen.node_id),
                        ch.as_str(),
                    ),
                )
                .await?;
                if let Some(old) = &current_node {
                    self.bounded(
                        conn.srem::<_, _, ()>(self.keys.media_node_channels(old), ch.as_str()),
                    )
                    .await?;
                }
                tracing::info!(channel_id = %ch, node_id = %chosen.node_id, "channel placed");
                let node = self.read_node(&chosen.node_id).await?.unwrap_or(chosen);
                return Ok(Placement {
                    node,
                    placed_now: true,
                });
            }
        }
        Err(StoreError::Unavailable("placement contended".into()))
    }

    async fn placement(&self, ch: &ChannelId) -> Result<Option<MediaNode>, StoreError> {
        let mut conn = self.conn().await?;
        let current: Option<String> = self.bounded(conn.get(self.keys.channel(ch).media)).await?;
        match current.as_deref().and_then(|c| NodeId::parse(c).ok()) {
            Some(node) => self.read_node(&node).await,
            None => Ok(None),
        }
    }
}
