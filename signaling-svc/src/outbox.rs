//! A socket's outbox: what waits to be written to one client, bounded in bytes.
//!
//! Everything bound for a socket (replies, the hub's pushes, pings, the close frame) goes through
//! one [`Outbox`], written in order by the socket's writer task ([`OutboxReader`]). Nothing that
//! queues into it ever waits: a push that would take the queued bytes past the limit fails the
//! outbox instead, and so does a write that stalls past the write deadline. A failed outbox
//! makes the connection close (4002) and release its session, so a client that stops reading
//! costs at most its limit, and a push (a kick, a revocation) is never silently dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use axum::extract::ws::Message;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// What the writer task is given, in order.
#[derive(Debug)]
pub enum Outgoing {
    Message(Message),
    /// Dropped by the writer once the frames queued before it (a request's reply) are
    /// written: a guard whose drop says so (the hub's `FloorRequest`).
    Written(Box<dyn WrittenGuard>),
}

/// Something dropped once what was queued before it is on the socket.
pub trait WrittenGuard: std::fmt::Debug + Send + Sync {}

impl<T: std::fmt::Debug + Send + Sync> WrittenGuard for T {}

/// What one queued item costs besides its payload (the queue node, the message value).
const ITEM_OVERHEAD: usize = 128;

/// Why an outbox failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A push would have taken the queue past its byte limit.
    Overflow,
    /// A write took longer than the write deadline.
    Stalled,
}

#[derive(Debug)]
struct Shared {
    queued: AtomicUsize,
    limit: usize,
    failed: CancellationToken,
    /// 0 while healthy; then 1 + the [`Failure`] that came first.
    why: AtomicU8,
}

impl Shared {
    fn fail(&self, why: Failure) {
        let code = match why {
            Failure::Overflow => 1,
            Failure::Stalled => 2,
        };
        let _ = self
            .why
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.failed.cancel();
    }
}

/// The queueing side of a socket's outbox; clones share the queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<(Outgoing, usize)>,
    shared: Arc<Shared>,
}

/// The writer's side: items in order, each released once written.
#[derive(Debug)]
pub struct OutboxReader {
    rx: mpsc::UnboundedReceiver<(Outgoing, usize)>,
    shared: Arc<Shared>,
}

/// The bytes an item holds while queued.
fn cost(item: &Outgoing) -> usize {
    ITEM_OVERHEAD
        + match item {
            Outgoing::Message(Message::Text(text)) => text.len(),
            Outgoing::Message(Message::Binary(data)) => data.len(),
            Outgoing::Message(_) | Outgoing::Written(_) => 0,
        }
}

/// A new outbox holding at most `limit` bytes.
pub fn outbox(limit: usize) -> (Outbox, OutboxReader) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        limit,
        failed: CancellationToken::new(),
        why: AtomicU8::new(0),
    });
    (
        Outbox {
            tx,
            shared: Arc::clone(&shared),
        },
        OutboxReader { rx, shared },
    )
}

impl Outbox {
    /// Queues `item` without waiting. False if the outbox has failed, or fails now because
    /// `item` would take it past its limit.
    pub fn push(&self, item: Outgoing) -> bool {
        if self.shared.failed.is_cancelled() {
            return false;
        }
        let cost = cost(&item);
        let before = self.shared.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.shared.limit {
            self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
            self.shared.fail(Failure::Overflow);
            return false;
        }
        if self.tx.send((item, cost)).is_err() {
            self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Queues the close frame, past the limit and after a failure: it is the last item.
    pub fn push_close(&self, close: Message) {
        let _ = self.tx.send((Outgoing::Message(close), 0));
    }

    /// Fails the outbox (for events the connection could not take in time).
    pub fn fail(&self, why: Failure) {
        self.shared.fail(why);
    }

    /// Resolves once the outbox has failed.
    pub fn failed(&self) -> WaitForCancellationFuture<'_> {
        self.shared.failed.cancelled()
    }

    /// Why the outbox failed, if it has.
    pub fn failure(&self) -> Option<Failure> {
        match self.shared.why.load(Ordering::Acquire) {
            1 => Some(Failure::Overflow),
            2 => Some(Failure::Stalled),
            _ => None,
        }
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }
}

impl OutboxReader {
    /// The next item, and a receipt to hand back once it is written.
    pub async fn recv(&mut self) -> Option<(Outgoing, Receipt)> {
        let (item, cost) = self.rx.recv().await?;
        Some((item, Receipt(cost)))
    }

    /// The item is written: its bytes no longer count.
    pub fn written(&self, receipt: Receipt) {
        self.shared.queued.fetch_sub(receipt.0, Ordering::AcqRel);
    }

    /// A write stalled past the deadline.
    pub fn stalled(&self) {
        self.shared.fail(Failure::Stalled);
    }
}

/// The bytes of an item taken from the queue and not yet written.
#[derive(Debug)]
#[must_use]
pub struct Receipt(usize);

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Outgoing {
        Outgoing::Message(Message::Text("x".repeat(len).into()))
    }

    #[tokio::test]
    async fn the_limit_counts_bytes_until_written_and_an_overflow_fails_for_good() {
        let (out, mut reader) = outbox(3 * (ITEM_OVERHEAD + 100));
        assert!(out.push(text(100)));
        assert!(out.push(text(100)));
        assert!(out.push(text(100)));
        assert_eq!(out.queued(), 3 * (ITEM_OVERHEAD + 100));
        let (_, receipt) = reader.recv().await.expect("an item");
        reader.written(receipt);
        assert!(out.push(text(100)), "a written item frees its bytes");
        assert!(out.failure().is_none());
        assert!(!out.push(text(1)), "over the limit");
        assert_eq!(out.failure(), Some(Failure::Overflow));
        let (_, receipt) = reader.recv().await.expect("an item");
        reader.written(receipt);
        assert!(!out.push(text(1)), "a failed outbox takes nothing more");
        reader.stalled();
        assert_eq!(
            out.failure(),
            Some(Failure::Overflow),
            "the first cause stays"
        );
        out.push_close(Message::Close(None));
        tokio::time::timeout(std::time::Duration::from_secs(1), out.failed())
            .await
            .expect("failed resolves");
    }
}
