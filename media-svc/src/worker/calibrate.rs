//! The node's capacity from its CPU, not its ports: at start the node measures what one
//! forwarded copy costs on this machine (an Opus-sized RTP packet SRTP-protected with the
//! profile browsers pick, AES-128-GCM, and sent in `sendmmsg` batches from a shared-port socket,
//! the path every copy takes, to [`LISTENERS`] listeners each with its own SRTP context and
//! address, so caches and routing are exercised as by a real fan-out) and how many cores it
//! has, and advertises as many transports as those cores can feed at 50 packets a second each
//! with headroom left.
//!
//! The measured core (sealing and sending, with the sinks' receive path on loopback) is not
//! all of a copy: routing and rewriting it, handing it between workers and the event loop
//! around it cost more. The forwarding benchmark on loopback put the whole path at under
//! [`PATH_FACTOR`] times this core on the same machine (5.4-5.8 µs a copy against 2.5-3.5 µs
//! measured here, 2026-12-06; with the listeners on a host of their own the node's whole copy
//! is 3.2-3.4 µs, docs/benchmarks.md), so the cost is scaled by it, which errs on the safe
//! side. The core is measured three times and the median taken, since one pass can land on a
//! busy moment.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use rtc::srtp::protection_profile::ProtectionProfile;

use super::net::{self, BATCH, Batch};
use crate::engine::listener::SrtpSender;
use crate::engine::{EngineError, Rewritten};

/// Share of each core the node plans to fill with forwarding; the rest absorbs bursts, new
/// connections and control traffic.
pub const UTILISATION: f64 = 0.6;
/// Packets a second a listener receives while its channel talks (20 ms Opus frames).
const PACKETS_PER_SECOND: f64 = 50.0;
/// Batches sent per measuring pass (each of [`BATCH`] copies).
const ROUNDS: usize = 32;
/// Measuring passes; the median is taken.
const PASSES: usize = 3;
/// A whole forwarded copy over the measured encrypt-and-send core (see the module doc).
pub const PATH_FACTOR: f64 = 2.0;
/// Distinct listeners (SRTP contexts and sockets) the measured copies go to in turn.
const LISTENERS: usize = 256;
/// Advertised capacity stays within these bounds whatever the measurement says.
pub const MIN_CAPACITY: u32 = 100;
pub const MAX_CAPACITY: u32 = 100_000;

/// What the node measured and what it advertises.
#[derive(Debug, Clone, Copy)]
pub struct Calibration {
    /// CPU per whole forwarded copy on this machine: the measured core times
    /// [`PATH_FACTOR`].
    pub copy_cost: Duration,
    /// The measured encrypt-and-send core of a copy (median of the passes).
    pub core_cost: Duration,
    pub cores: usize,
    /// Transports the node accepts.
    pub capacity: u32,
}

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

fn setup<E: std::fmt::Display>(e: E) -> EngineError {
    EngineError::Setup(format!("calibration: {e}"))
}

/// Transports `cores` can feed when one whole copy costs `copy_cost`.
pub fn capacity_for(cores: usize, copy_cost: Duration) -> u32 {
    let per_listener = copy_cost.as_secs_f64() * PACKETS_PER_SECOND;
    if per_listener <= 0.0 {
        return MAX_CAPACITY;
    }
    let listeners = cores as f64 * UTILISATION / per_listener;
    (listeners as u32).clamp(MIN_CAPACITY, MAX_CAPACITY)
}

/// Measures one copy's cost on this thread and derives the capacity of `cores` workers.
pub fn measure(cores: usize) -> Result<Calibration, EngineError> {
    let mut passes = (0..PASSES)
        .map(|_| measure_core())
        .collect::<Result<Vec<_>, _>>()?;
    passes.sort();
    let core_cost = passes[PASSES / 2];
    let copy_cost = core_cost.mul_f64(PATH_FACTOR);
    Ok(Calibration {
        copy_cost,
        core_cost,
        cores,
        capacity: capacity_for(cores, copy_cost),
    })
}

/// One pass: the CPU of encrypting and sending one copy, on this thread.
fn measure_core() -> Result<Duration, EngineError> {
    let crypto = rtc::crypto::default_provider().map_err(setup)?;
    let mut listeners: Vec<(SrtpSender, UdpSocket, SocketAddr)> = Vec::with_capacity(LISTENERS);
    for _ in 0..LISTENERS {
        let key: [u8; 16] = rand::random();
        let salt: [u8; 12] = rand::random();
        let srtp = SrtpSender::new(
            ProtectionProfile::AeadAes128Gcm,
            &key,
            &salt,
            crypto.crypto(),
        )?;
        let sink = UdpSocket::bind("127.0.0.1:0").map_err(setup)?;
        sink.set_nonblocking(true).map_err(setup)?;
        let to = sink.local_addr().map_err(setup)?;
        listeners.push((srtp, sink, to));
    }
    let (sockets, _) = net::bind_shared("127.0.0.1:0".parse().map_err(setup)?, 1)?;
    let socket = sockets
        .into_iter()
        .next()
        .ok_or_else(|| setup("no socket"))?;
    let mut batch = Batch::new();
    let payload = [0x5au8; 80];
    let mut header = Rewritten {
        marker: false,
        payload_type: 111,
        sequence_number: 0,
        timestamp: 0,
        ssrc: rand::random(),
    };
    let mut drain = [0u8; 2048];
    let mut spent = Duration::ZERO;
    let mut copies = 0u32;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let before = thread_cpu();
        for i in 0..BATCH {
            let copy = round * BATCH + i;
            let (srtp, _, to) = &mut listeners[copy % LISTENERS];
            header.sequence_number = (copy / LISTENERS) as u16;
            let len = srtp
                .seal(&header, &payload, batch.space())
                .ok_or_else(|| setup("a copy could not be sealed"))?;
            batch.commit(len, *to);
        }
        let lost = batch.flush(&socket);
        spent += thread_cpu().saturating_sub(before);
        copies += u32::try_from(BATCH - lost).unwrap_or(0);
        // Not measured: emptying the sinks so the next batches find room.
        for (_, sink, _) in &listeners {
            while sink.recv(&mut drain).is_ok() {}
        }
    }
    if copies == 0 {
        return Err(setup("no copy could be sent"));
    }
    let core = spent / copies;
    tracing::debug!(?core, copies, took = ?started.elapsed(), "calibration pass");
    Ok(core)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn capacity_grows_with_cores_and_shrinks_with_the_copy_cost() {
        let five = Duration::from_micros(5);
        // 5 µs a copy, 50 copies a second: 250 µs of a core per listener; 60% of a core
        // feeds 2400 of them.
        assert_eq!(capacity_for(1, five), 2400);
        assert_eq!(capacity_for(4, five), 9600);
        assert_eq!(capacity_for(4, Duration::from_micros(10)), 4800);
        assert_eq!(capacity_for(1, Duration::from_millis(10)), MIN_CAPACITY);
        assert_eq!(capacity_for(64, Duration::from_nanos(10)), MAX_CAPACITY);
    }

    #[test]
    fn a_real_measurement_gives_a_plausible_cost() {
        let c = measure(2).unwrap();
        assert!(
            c.core_cost > Duration::from_nanos(100) && c.core_cost < Duration::from_millis(1),
            "{c:?}"
        );
        assert_eq!(c.copy_cost, c.core_cost.mul_f64(PATH_FACTOR));
        assert_eq!(c.capacity, capacity_for(2, c.copy_cost));
    }
}
