//! Where a channel's media is, and how to reach that node.

use talkgroup_proto::media::v1 as mpb;
use talkgroup_proto::state::v1 as spb;

use super::Result;
use crate::app_state::{AppState, Traced};
use crate::protocol::{Code, err};

pub(super) type MediaClient = mpb::media_service_client::MediaServiceClient<Traced>;

/// The media node hosting `channel`, placing the channel if no node hosts it yet.
pub(super) async fn place(app: &AppState, channel: &str) -> Result<String> {
    let placement = app
        .registry()
        .place_channel(spb::PlaceChannelRequest {
            channel_id: channel.to_owned(),
        })
        .await?
        .into_inner();
    let node = placement
        .node
        .ok_or(err(Code::Unavailable, "no media node"))?;
    app.learn_node(&node);
    Ok(node.grpc_addr)
}

/// A client of the media node at `node`.
pub(super) fn media(app: &AppState, node: &str) -> Result<MediaClient> {
    app.media(node)
        .ok_or(err(Code::Unavailable, "media node unreachable"))
}

/// When a grant ends, as the state store says (its clock) and as a local deadline taken when
/// the store answered: the media node is given the time left, a duration, so no two clocks
/// are compared.
#[derive(Debug, Clone, Copy)]
pub(super) struct FloorEnd {
    /// The store's lease end (its clock), shown to clients; 0: no grant (a cleared floor).
    pub(super) expires_at_ms: i64,
    deadline: tokio::time::Instant,
}

impl FloorEnd {
    /// The end of a lease the store reported at `server_now_ms` (its clock).
    pub(super) fn from_store(expires_at_ms: i64, server_now_ms: i64) -> Self {
        let left = u64::try_from(expires_at_ms.saturating_sub(server_now_ms)).unwrap_or(0);
        Self {
            expires_at_ms,
            deadline: tokio::time::Instant::now() + std::time::Duration::from_millis(left),
        }
    }

    /// No grant: the floor cleared.
    pub(super) fn cleared() -> Self {
        Self {
            expires_at_ms: 0,
            deadline: tokio::time::Instant::now(),
        }
    }

    /// The lease left now, for the media node: at least 1 ms for a grant (0 means none).
    fn lease_ms(&self) -> u32 {
        if self.expires_at_ms == 0 {
            return 0;
        }
        let left = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1)
    }
}

/// Tells `node` who may talk in `channel` (an empty producer: nobody) from `epoch` on, until
/// `end`. A node that did not apply it (it has seen a later epoch for the channel:
/// this decision is stale, or state-svc's epochs went backwards) is an error: a client must
/// not be told `granted` when nobody would hear it.
pub(super) async fn set_floor(
    app: &AppState,
    node: &str,
    channel: &str,
    producer: String,
    epoch: u64,
    end: FloorEnd,
) -> Result<()> {
    let reply = media(app, node)?
        .set_floor(mpb::SetFloorRequest {
            channel_id: channel.to_owned(),
            producer_id: producer,
            epoch,
            expires_at_ms: end.expires_at_ms,
            lease_ms: end.lease_ms(),
        })
        .await?
        .into_inner();
    if !reply.applied {
        tracing::warn!(
            %channel,
            %node,
            epoch,
            node_epoch = reply.current_epoch,
            "media node did not apply the floor: it has a later epoch"
        );
        app.metrics.refused("media-epoch-ahead");
        return Err(err(
            Code::Unavailable,
            "the media node did not take the floor; try again",
        ));
    }
    Ok(())
}
