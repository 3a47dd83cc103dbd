//! Floor ordering: a floor change a local request caused waits (at most
//! [`HOLD_BACK_AT_MOST`]) until the request's reply is on the requester's socket, so the
//! requester reads its reply before the members' `speaker-changed` fan-out (hundreds of
//! frames in a large channel) takes the CPU. Later events of the channel queue behind it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::Hub;
use super::registry::{Fanout, FloorPush};

/// Floor changes a local request caused wait at most this long for the request's reply.
pub const HOLD_BACK_AT_MOST: Duration = Duration::from_millis(250);

/// Events of a channel waiting for a requester's reply.
#[derive(Debug)]
struct HeldBack {
    /// The session whose request caused the first of them.
    session: String,
    hold: u64,
    events: Vec<Fanout>,
}

#[derive(Debug, Default)]
pub struct FloorOrder {
    /// Local sessions with a floor request (`ptt-start`, `ptt-stop`) awaiting its reply, by
    /// channel.
    requests: HashMap<String, HashSet<String>>,
    /// Per channel, the events held back until the reply to the request that caused the
    /// first of them has gone out.
    held_back: HashMap<String, HeldBack>,
    /// Numbers the holds, so a hold's time limit never releases a later one.
    holds: u64,
}

impl FloorOrder {
    pub fn started(&mut self, channel: &str, session: &str) {
        self.requests
            .entry(channel.to_owned())
            .or_default()
            .insert(session.to_owned());
    }

    /// The session's request is answered; what it held back, to send now.
    pub fn done(&mut self, channel: &str, session: &str) -> Vec<Fanout> {
        if let Some(sessions) = self.requests.get_mut(channel) {
            sessions.remove(session);
            if sessions.is_empty() {
                self.requests.remove(channel);
            }
        }
        if self
            .held_back
            .get(channel)
            .is_some_and(|h| h.session == session)
        {
            return self.release(channel, None);
        }
        Vec::new()
    }

    /// Takes `event` into the channel's held-back queue if it has one; gives it back if not.
    pub fn queue_behind(&mut self, channel: &str, event: Fanout) -> Option<Fanout> {
        match self.held_back.get_mut(channel) {
            Some(held) => {
                held.events.push(event);
                None
            }
            None => Some(event),
        }
    }

    /// Holds `push` back when a local request in flight caused it; the hold's number then,
    /// for its time limit.
    pub fn hold_if_requested(&mut self, channel: &str, push: &Arc<FloorPush>) -> Option<u64> {
        if self.held_back.contains_key(channel) {
            return None;
        }
        let session = self
            .requests
            .get(channel)?
            .iter()
            .find(|s| push.concerns(s))?
            .clone();
        self.holds += 1;
        let hold = self.holds;
        let held = HeldBack {
            session,
            hold,
            events: vec![Fanout::Floor(Arc::clone(push))],
        };
        self.held_back.insert(channel.to_owned(), held);
        Some(hold)
    }

    /// What `channel` held back, in order, if it is still the hold `only` (any hold if
    /// `None`).
    pub fn release(&mut self, channel: &str, only: Option<u64>) -> Vec<Fanout> {
        if only.is_some_and(|hold| self.held_back.get(channel).is_none_or(|h| h.hold != hold)) {
            return Vec::new();
        }
        self.held_back
            .remove(channel)
            .map(|h| h.events)
            .unwrap_or_default()
    }
}

/// A floor request in flight: the hub holds back the floor change it causes until this is
/// dropped, once the reply is on the socket.
#[derive(Debug)]
pub struct FloorRequest {
    hub: Arc<Hub>,
    channel: String,
    session: String,
}

impl FloorRequest {
    pub fn start(hub: &Arc<Hub>, channel: &str, session: &str) -> Self {
        hub.request_started(channel, session);
        Self {
            hub: Arc::clone(hub),
            channel: channel.to_owned(),
            session: session.to_owned(),
        }
    }
}

impl Drop for FloorRequest {
    fn drop(&mut self) {
        self.hub.request_done(&self.channel, &self.session);
    }
}
