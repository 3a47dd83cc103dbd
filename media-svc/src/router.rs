//! The router of one channel: who may be heard, and one continuous stream per listener.
//!
//! Sans-IO: the router is a plain struct driven by `set_floor` and `on_packet(now)`; it never
//! awaits. Packets from the producer named by the highest floor epoch are forwarded until the
//! floor's expiry; everything else is dropped and counted. Each listener's packet is handed to
//! a non-blocking `deliver` function (the worker sends it on the listener's own socket): a
//! listener that cannot take it loses that packet and never delays the others.
//!
//! Each listener's stream is rewritten so that it is one continuous RTP stream for its whole
//! life, whoever speaks: its own SSRC and payload type, sequence numbers that continue across
//! speaker changes, timestamps advanced by the real time between talk spurts, and the marker
//! bit on the first packet of each spurt. Header extensions are stripped (the listener's
//! transport negotiated none).

use std::collections::HashMap;
use std::time::Instant;

use rtc::rtp;

/// Opus clock rate.
pub const CLOCK_RATE: u32 = 48_000;
/// Smallest timestamp step between talk spurts: one 20 ms Opus frame.
const MIN_SPURT_GAP_SAMPLES: u32 = 960;

/// Who currently may be heard, fenced by epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Floor {
    pub epoch: u64,
    /// `None`: nobody (released or revoked).
    pub producer: Option<String>,
    pub expires_at: Option<Instant>,
}

/// Per-listener rewriting state.
#[derive(Debug)]
pub struct Rewriter {
    ssrc: u32,
    payload_type: u8,
    next_seq: u16,
    last_ts: u32,
    last_at: Option<Instant>,
    source: Option<Source>,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    epoch: u64,
    seq_delta: u16,
    ts_delta: u32,
}

impl Rewriter {
    pub fn new(ssrc: u32, payload_type: u8) -> Self {
        Self {
            ssrc,
            payload_type,
            next_seq: rand::random(),
            last_ts: rand::random(),
            last_at: None,
            source: None,
        }
    }

    /// Rewrites the header of a packet (from the floor holder at `epoch`) for this listener:
    /// only the header, since the payload is the same for every listener.
    pub fn rewrite(&mut self, header: &rtp::header::Header, epoch: u64, now: Instant) -> Rewritten {
        let mut marker = header.marker;
        let source = match self.source {
            Some(s) if s.ssrc == header.ssrc && s.epoch == epoch => s,
            _ => {
                // A new talk spurt: continue the sequence, advance time by the real gap.
                let gap = self.last_at.map_or(MIN_SPURT_GAP_SAMPLES, |at| {
                    let micros = now.saturating_duration_since(at).as_micros();
                    u32::try_from(micros * u128::from(CLOCK_RATE) / 1_000_000).unwrap_or(u32::MAX)
                });
                let out_ts = self.last_ts.wrapping_add(gap.max(MIN_SPURT_GAP_SAMPLES));
                let s = Source {
                    ssrc: header.ssrc,
                    epoch,
                    seq_delta: self.next_seq.wrapping_sub(header.sequence_number),
                    ts_delta: out_ts.wrapping_sub(header.timestamp),
                };
                self.source = Some(s);
                marker = true;
                s
            }
        };
        let seq = header.sequence_number.wrapping_add(source.seq_delta);
        let ts = header.timestamp.wrapping_add(source.ts_delta);
        // Late (reordered) packets keep their place and do not move the counters back.
        if seq.wrapping_sub(self.next_seq) < 0x8000 {
            self.next_seq = seq.wrapping_add(1);
        }
        if ts.wrapping_sub(self.last_ts) < 0x8000_0000 {
            self.last_ts = ts;
        }
        self.last_at = Some(now);
        Rewritten {
            marker,
            payload_type: self.payload_type,
            sequence_number: seq,
            timestamp: ts,
            ssrc: self.ssrc,
        }
    }
}

/// A listener's copy of a packet's header: a plain 12-byte RTP header (no CSRCs, no
/// extensions), small enough to hand to another worker by value with the shared payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

impl Rewritten {
    /// Length of the header on the wire.
    pub const LEN: usize = 12;

    /// The header on the wire (RFC 3550 section 5.1: version 2, no padding, no extension, no
    /// CSRC).
    pub fn marshal(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = 0x80;
        out[1] = (u8::from(self.marker) << 7) | (self.payload_type & 0x7f);
        out[2..4].copy_from_slice(&self.sequence_number.to_be_bytes());
        out[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        out
    }

    /// The same header as the `rtp` crate's type.
    pub fn header(&self) -> rtp::header::Header {
        rtp::header::Header {
            version: 2,
            marker: self.marker,
            payload_type: self.payload_type,
            sequence_number: self.sequence_number,
            timestamp: self.timestamp,
            ssrc: self.ssrc,
            ..Default::default()
        }
    }
}

/// A consumer of the channel's floor stream.
#[derive(Debug)]
pub struct Listener {
    /// The listener's session: it does not hear its own voice.
    pub session: String,
    pub rewriter: Rewriter,
    /// The worker's key of the listener's peer connection.
    pub peer: u64,
}

/// Counters of one router.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Packets handed to listeners' queues (one per listener per packet).
    pub forwarded: u64,
    /// Packets from a producer that does not hold the floor (or after its expiry).
    pub dropped_not_floor: u64,
    /// Packets a listener's full queue refused.
    pub dropped_slow_listener: u64,
}

/// What `set_floor` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorApplied {
    pub applied: bool,
    pub current_epoch: u64,
}

#[derive(Debug, Default)]
pub struct Router {
    floor: Floor,
    /// Producer id -> its session.
    producers: HashMap<String, String>,
    listeners: HashMap<String, Listener>,
    stats: RouterStats,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a floor decision unless a higher epoch was already seen. The same epoch may be
    /// applied again (a renewal moves the expiry).
    pub fn set_floor(&mut self, floor: Floor) -> FloorApplied {
        if floor.epoch < self.floor.epoch {
            return FloorApplied {
                applied: false,
                current_epoch: self.floor.epoch,
            };
        }
        self.floor = floor;
        FloorApplied {
            applied: true,
            current_epoch: self.floor.epoch,
        }
    }

    pub fn floor(&self) -> &Floor {
        &self.floor
    }

    pub fn add_producer(&mut self, producer: String, session: String) {
        self.producers.insert(producer, session);
    }

    pub fn remove_producer(&mut self, producer: &str) {
        self.producers.remove(producer);
    }

    pub fn add_listener(&mut self, consumer: String, listener: Listener) {
        self.listeners.insert(consumer, listener);
    }

    pub fn remove_listener(&mut self, consumer: &str) -> bool {
        self.listeners.remove(consumer).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty() && self.listeners.is_empty()
    }

    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    pub fn stats(&self) -> RouterStats {
        self.stats
    }

    /// Forwards one packet (its `header`) from `producer` if it holds the floor at `now`,
    /// handing each listener's rewritten header to `deliver(peer, header)`, which must not
    /// block and answers whether the copy was taken. The payload is the caller's to share.
    pub fn on_packet(
        &mut self,
        producer: &str,
        header: &rtp::header::Header,
        now: Instant,
        deliver: &mut dyn FnMut(u64, Rewritten) -> bool,
    ) {
        let holds = self.floor.producer.as_deref() == Some(producer)
            && self.floor.expires_at.is_none_or(|at| now < at);
        let Some(speaker_session) = self.producers.get(producer).filter(|_| holds) else {
            self.stats.dropped_not_floor += 1;
            return;
        };
        let epoch = self.floor.epoch;
        for listener in self.listeners.values_mut() {
            if &listener.session == speaker_session {
                continue;
            }
            let out = listener.rewriter.rewrite(header, epoch, now);
            if deliver(listener.peer, out) {
                self.stats.forwarded += 1;
            } else {
                self.stats.dropped_slow_listener += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn packet(ssrc: u32, seq: u16, ts: u32) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 109,
                sequence_number: seq,
                timestamp: ts,
                ssrc,
                extension: true,
                ..Default::default()
            },
            payload: vec![1, 2, 3].into(),
        }
    }

    /// Listener outputs: per peer, what was delivered, up to a capacity.
    #[derive(Default)]
    struct Outputs {
        capacity: HashMap<u64, usize>,
        got: HashMap<u64, Vec<rtp::Packet>>,
    }

    impl Outputs {
        fn send(
            &mut self,
            router: &mut Router,
            producer: &str,
            packet: &rtp::Packet,
            now: Instant,
        ) {
            let mut deliver = |peer: u64, out: Rewritten| {
                let cap = self.capacity.get(&peer).copied().unwrap_or(usize::MAX);
                let got = self.got.entry(peer).or_default();
                if got.len() >= cap {
                    return false;
                }
                got.push(rtp::Packet {
                    header: out.header(),
                    payload: packet.payload.clone(),
                });
                true
            };
            router.on_packet(producer, &packet.header, now, &mut deliver);
        }

        fn take(&mut self, peer: u64) -> Vec<rtp::Packet> {
            self.got.remove(&peer).unwrap_or_default()
        }
    }

    fn listener(session: &str, peer: u64) -> Listener {
        Listener {
            session: session.into(),
            rewriter: Rewriter::new(777, 111),
            peer,
        }
    }

    fn floor(epoch: u64, producer: Option<&str>) -> Floor {
        Floor {
            epoch,
            producer: producer.map(Into::into),
            expires_at: None,
        }
    }

    #[test]
    fn only_the_floor_holder_is_heard_and_the_stream_stays_continuous() {
        let mut router = Router::new();
        let mut out = Outputs::default();
        router.add_producer("pa".into(), "sa".into());
        router.add_producer("pb".into(), "sb".into());
        router.add_listener("c".into(), listener("sc", 3));
        let t0 = Instant::now();

        out.send(&mut router, "pa", &packet(1, 100, 5000), t0);
        assert!(out.take(3).is_empty(), "nobody holds the floor yet");
        assert!(router.set_floor(floor(10, Some("pa"))).applied);
        for i in 0..3u16 {
            out.send(
                &mut router,
                "pa",
                &packet(1, 100 + i, 5000 + 960 * u32::from(i)),
                t0,
            );
            out.send(
                &mut router,
                "pb",
                &packet(2, 7 + i, 90 + 960 * u32::from(i)),
                t0,
            );
        }
        let a = out.take(3);
        assert_eq!(a.len(), 3, "B is not heard while A holds the floor");
        assert!(a[0].header.marker && !a[1].header.marker);
        assert!(
            a.iter().all(|p| p.header.ssrc == 777
                && p.header.payload_type == 111
                && !p.header.extension)
        );

        // The floor moves to B 300 ms later: same SSRC, next sequence number, time advanced.
        router.set_floor(floor(11, Some("pb")));
        let t1 = t0 + Duration::from_millis(300);
        out.send(&mut router, "pa", &packet(1, 103, 7880), t1);
        out.send(&mut router, "pb", &packet(2, 50, 123), t1);
        out.send(&mut router, "pb", &packet(2, 51, 1083), t1);
        let b = out.take(3);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0].header.sequence_number,
            a[2].header.sequence_number.wrapping_add(1)
        );
        assert_eq!(
            b[1].header.sequence_number,
            b[0].header.sequence_number.wrapping_add(1)
        );
        assert!(b[0].header.marker);
        let gap = b[0].header.timestamp.wrapping_sub(a[2].header.timestamp);
        assert_eq!(gap, 300 * 48, "timestamp advanced by the real 300 ms gap");
        assert_eq!(
            b[1].header.timestamp.wrapping_sub(b[0].header.timestamp),
            960
        );
        assert_eq!(router.stats().dropped_not_floor, 5);
    }

    #[test]
    fn stale_epochs_are_refused_and_revoke_cuts_at_once() {
        let mut router = Router::new();
        let mut out = Outputs::default();
        router.add_producer("pa".into(), "sa".into());
        router.add_listener("c".into(), listener("sc", 1));
        router.set_floor(floor(10, Some("pa")));
        assert_eq!(
            router.set_floor(floor(9, None)),
            FloorApplied {
                applied: false,
                current_epoch: 10
            }
        );
        router.set_floor(floor(12, None));
        out.send(&mut router, "pa", &packet(1, 1, 1), Instant::now());
        assert!(out.take(1).is_empty());
        assert!(
            !router.set_floor(floor(11, Some("pa"))).applied,
            "an older grant cannot come back"
        );
    }

    #[test]
    fn expiry_stops_forwarding_and_speakers_do_not_hear_themselves() {
        let mut router = Router::new();
        let mut out = Outputs::default();
        router.add_producer("pa".into(), "sa".into());
        router.add_listener("own".into(), listener("sa", 1));
        router.add_listener("other".into(), listener("sc", 2));
        let t0 = Instant::now();
        router.set_floor(Floor {
            epoch: 1,
            producer: Some("pa".into()),
            expires_at: Some(t0 + Duration::from_millis(100)),
        });
        out.send(&mut router, "pa", &packet(1, 1, 1), t0);
        out.send(
            &mut router,
            "pa",
            &packet(1, 2, 961),
            t0 + Duration::from_millis(100),
        );
        assert!(out.take(1).is_empty());
        assert_eq!(out.take(2).len(), 1, "nothing after expiry");
    }

    #[test]
    fn a_rewritten_header_is_marshalled_as_the_rtp_crate_does() {
        use rtc::shared::marshal::Marshal;
        for (marker, payload_type, sequence_number, timestamp, ssrc) in [
            (false, 111, 0, 0, 0),
            (true, 109, 65535, u32::MAX, 0xdead_beef),
            (true, 0, 1, 960, 1),
        ] {
            let header = Rewritten {
                marker,
                payload_type,
                sequence_number,
                timestamp,
                ssrc,
            };
            let expected = header.header().marshal().unwrap();
            assert_eq!(&header.marshal()[..], &expected[..], "{header:?}");
        }
    }

    #[test]
    fn a_listener_that_cannot_take_packets_drops_only_its_own() {
        let mut router = Router::new();
        let mut out = Outputs::default();
        out.capacity.insert(1, 2);
        router.add_producer("pa".into(), "sa".into());
        router.add_listener("slow".into(), listener("s1", 1));
        router.add_listener("fast".into(), listener("s2", 2));
        router.set_floor(floor(1, Some("pa")));
        let t0 = Instant::now();
        for i in 0..10u16 {
            out.send(&mut router, "pa", &packet(1, i, u32::from(i) * 960), t0);
        }
        assert_eq!(out.take(2).len(), 10);
        assert_eq!(router.stats().dropped_slow_listener, 8);
        assert_eq!(router.stats().forwarded, 12);
    }
}
