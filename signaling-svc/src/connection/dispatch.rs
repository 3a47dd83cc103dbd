//! A text frame in, one reply out: rate limits, the request table, and what a reply sets off
//! (floor metrics, the `ptt-denied` push, the hub's hold on the floor fan-out).

use std::time::Instant;

use tracing::Instrument;

use super::{Conn, Result};
use crate::access::{DISPATCH_PRIORITY, Role};
use crate::hub::FloorRequest;
use crate::outbox::Outgoing;
use crate::protocol::push::PttDenied;
use crate::protocol::reply::{FloorAnswer, Pong};
use crate::protocol::{self, Frame, Push, Reply, Request};

impl Conn {
    /// Handles one text frame; false when the connection must close (flood).
    pub(super) async fn on_text(&mut self, text: &str) -> bool {
        let parsed = protocol::parse(text);
        if let Err(refused) = self.limits.admit() {
            self.send(Frame::error(parsed.id, refused)).await;
            return !self.limits.flooding();
        }
        let request = match parsed.request {
            Ok(r) => r,
            Err(e) => {
                self.send(Frame::error(parsed.id, e)).await;
                return true;
            }
        };
        self.app.metrics.request(request.name());
        let pressed = Instant::now();
        let kind = request.reply_type();
        let floor_request = request
            .floor_channel()
            .map(|c| FloorRequest::start(&self.app.hub, c, &self.session));
        let denied_in = match &request {
            Request::PttStart(r) => Some(r.channel_id.clone()),
            _ => None,
        };
        let span = tracing::info_span!(
            "ws request",
            otel.name = request.name(),
            otel.kind = "server",
            conn = self.id
        );
        match self.handle(request).instrument(span).await {
            Ok(reply) => {
                let denied = self.count_floor_answer(&reply, pressed);
                self.send(Frame::reply(kind, parsed.id, reply)).await;
                // A denied ptt-start also gets the ptt-denied push.
                if let (Some(channel_id), Some((speaker, retry_after_ms))) = (denied_in, denied) {
                    let push = PttDenied {
                        channel_id,
                        speaker,
                        retry_after_ms,
                    };
                    self.send(Push::PttDenied(push)).await;
                }
            }
            Err(e) => {
                self.app.metrics.error(e.code.as_str());
                self.send(Frame::error(parsed.id, e)).await;
            }
        }
        if let Some(request) = floor_request {
            // Behind the reply; if the writer is gone, dropping it here ends the request.
            self.out.push(Outgoing::Written(Box::new(request)));
        }
        true
    }

    /// Counts a press's answer; for a plain denial, who holds the floor and when to retry.
    fn count_floor_answer(
        &self,
        reply: &Reply,
        pressed: Instant,
    ) -> Option<(Option<protocol::User>, i64)> {
        let metrics = &self.app.metrics;
        match reply {
            Reply::Floor(FloorAnswer::Granted(_)) => {
                metrics.floor_grants.inc();
                metrics
                    .press_to_grant
                    .observe(pressed.elapsed().as_secs_f64());
                None
            }
            Reply::Floor(FloorAnswer::Queued(_)) => {
                metrics.floor_denials.inc();
                None
            }
            Reply::Floor(FloorAnswer::Denied(d)) => {
                metrics.floor_denials.inc();
                Some((d.speaker.clone(), d.retry_after_ms))
            }
            _ => None,
        }
    }

    /// The request table: each request handed to the concern that owns it.
    async fn handle(&mut self, request: Request) -> Result<Reply> {
        Ok(match request {
            Request::Ping(_) => Pong {
                server_time: self.app.clock.now_ms(),
            }
            .into(),
            Request::RefreshToken(r) => self.refresh_token(r).await?.into(),
            Request::ListChannels(_) => self.list_channels().await?.into(),
            Request::GetIceServers(_) => self.ice_servers()?.into(),
            Request::JoinChannel(r) => self.join(r.channel_id).await?.into(),
            Request::LeaveChannel(r) => self.leave_request(&r.channel_id).await?.into(),
            Request::GetRouterCapabilities(r) => self.router_capabilities(r).await?.into(),
            Request::CreateTransport(r) => self.create_transport(r).await?.into(),
            Request::ConnectTransport(r) => self.connect_transport(r).await?.into(),
            Request::RestartIce(r) => self.restart_ice(&r.transport_id).await?.into(),
            Request::Produce(r) => self.produce(r).await?.into(),
            Request::Consume(r) => self.consume(r).await?.into(),
            Request::PttStart(r) => {
                let priority = r.priority.unwrap_or(0);
                self.press(&r.channel_id, Role::Talk, priority)
                    .await?
                    .into()
            }
            Request::PriorityPttStart(r) => {
                let (channel, least) = (&r.channel_id, Role::Dispatch);
                self.press(channel, least, DISPATCH_PRIORITY).await?.into()
            }
            Request::PttStop(r) | Request::PriorityPttStop(r) => {
                self.release(&r.channel_id).await?.into()
            }
            Request::EmergencyBroadcastStart(r) => self.emergency_start(r).await?.into(),
            Request::EmergencyBroadcastStop(r) => self.emergency_stop(&r.event_id).await?.into(),
            Request::SyncCreate(r) => self.sync_create(r).await?.into(),
            Request::SyncGet(r) => self.sync_get(&r.session_id).await?.into(),
            Request::SyncDelete(r) => self.sync_delete(r).await?.into(),
            Request::SyncStart(r) => self.sync_start(r).await?.into(),
            Request::SyncSwitch(r) => self.sync_switch(r).await?.into(),
            Request::SyncPause(r) => self.sync_pause(r).await?.into(),
            Request::SyncResume(r) => self.sync_resume(r).await?.into(),
            Request::SyncComplete(r) => self.sync_complete(r).await?.into(),
            Request::SyncCancel(r) => self.sync_cancel(r).await?.into(),
        })
    }
}
