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
    placement
        .node
        .map(|n| n.grpc_addr)
        .ok_or(err(Code::Unavailable, "no media node"))
}

/// A client of the media node at `node`.
pub(super) fn media(app: &AppState, node: &str) -> Result<MediaClient> {
    app.media(node)
        .ok_or(err(Code::Unavailable, "media node unreachable"))
}

/// Tells `node` who may talk in `channel` (an empty producer: nobody) from `epoch` on, until
/// `expires_at_ms`. A node that did not apply it (it has seen a later epoch for the channel:
/// this decision is stale, or state-svc's epochs went backwards) is an error: a client must
/// not be told `granted` when nobody would hear it.
pub(super) async fn set_floor(
    app: &AppState,
    node: &str,
    channel: &str,
    producer: String,
    epoch: u64,
    expires_at_ms: i64,
) -> Result<()> {
    let reply = media(app, node)?
        .set_floor(mpb::SetFloorRequest {
            channel_id: channel.to_owned(),
            producer_id: producer,
            epoch,
            expires_at_ms,
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
