//! Continuity over the whole stack, every service its own release process on loopback, with the
//! shipped liveness settings (media nodes heartbeat every 1 s, dead after 3 s):
//!
//! - **node killed**: `kill -9` of the media node hosting a talking channel, to the first audio
//!   packet a listener receives again (state-svc declares the node dead and moves the channel,
//!   the gateway says `transport-closed`, listener and speaker make new transports on the
//!   other node, the speaker talks on under the floor it kept);
//! - **node drained**: SIGTERM of the hosting node (a rolling update): the longest silence at
//!   the listener across the move, counting packets on the old and the new transport;
//! - **resume**: a socket cut without a close, to the `session` push of its resumed socket.
//!
//! A replacement node is started after each node trial, so every trial has somewhere to go.
//!
//! Run: `cargo build --release --bins && cargo bench -p talkgroup-e2e --bench continuity`
//! (`CONTINUITY_TRIALS`, default 20).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use talkgroup_e2e::{Client, Stack, Topology};
use testkit::media::{Peer, Tone};
use tokio::task::JoinHandle;

const CHANNEL: &str = "bench";

/// Sends a 440 Hz tone from a peer every 20 ms until stopped.
struct Player {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Tone>,
}

impl Player {
    fn start(peer: Peer, mut tone: Tone) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(20));
            while !stopped.load(Ordering::Relaxed) {
                ticker.tick().await;
                let frame = tone.frame();
                peer.send(tone.seq, tone.ts, frame).await;
                tone.seq = tone.seq.wrapping_add(1);
                tone.ts = tone.ts.wrapping_add(960);
            }
            tone
        });
        Self { stop, task }
    }

    async fn stop(self) -> Tone {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

async fn wait_received(ear: &Peer, at_least: usize, what: &str) {
    testkit::wait_until(Duration::from_secs(30), what, || async move {
        ear.received_count() >= at_least
    })
    .await
    .unwrap();
}

/// The longest interval without a packet arriving, over both ears' arrivals from `from` until
/// the new ear's 20th packet.
fn longest_silence(old: &Peer, new: &Peer, from: Instant) -> Duration {
    let new_arrivals: Vec<Instant> = new.received().iter().map(|r| r.at).collect();
    let until = new_arrivals[new_arrivals.len().min(20) - 1];
    let mut arrivals: Vec<Instant> = old
        .received()
        .iter()
        .map(|r| r.at)
        .chain(new_arrivals)
        .filter(|at| *at >= from && *at <= until)
        .collect();
    arrivals.push(from);
    arrivals.sort();
    arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

fn row(name: &str, h: &Histogram<u64>) {
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} |",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.95)),
        ms(h.max()),
    );
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()
}

/// Speaker and listener make new transports at once, as two devices would.
async fn move_both(ana: &mut Client, ben: &mut Client) -> (Peer, Peer) {
    let ((ear, _), mic) = tokio::join!(ben.listener(CHANNEL), ana.speaker(CHANNEL));
    (ear, mic)
}

fn main() {
    let trials: usize = std::env::var("CONTINUITY_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut stack = Stack::start(Topology {
            media: 2,
            node_heartbeat_ms: 1_000,
            // Ana holds the floor through every trial: longer than the default talk limit.
            max_talk_ms: 3_600_000,
            ..Topology::default()
        })
        .await
        .expect("stack (build the release binaries first)");
        stack.ready().await.unwrap();
        let gw = stack.gateway(0);
        let mut ana = stack.client(0, "u-ana", "Ana").await;
        let mut ben = stack.client(0, "u-ben", "Ben").await;
        let mut ben_session = ben.session().await;
        ana.join(CHANNEL).await;
        ben.join(CHANNEL).await;
        let mic = ana.speaker(CHANNEL).await;
        let (mut ear, _) = ben.listener(CHANNEL).await;
        assert_eq!(ana.ptt_start(CHANNEL).await["granted"], true);
        let mut player = Player::start(mic, Tone::new(440.0));
        let mut next_node = 2;

        let mut killed = histogram();
        for trial in 0..trials {
            wait_received(&ear, ear.received_count() + 10, "audio before the kill").await;
            let host = stack.media_index_of(CHANNEL).await.unwrap();
            let t0 = Instant::now();
            stack.media[host].kill();
            ben.transport_closed(CHANNEL, "recv").await;
            ana.transport_closed(CHANNEL, "send").await;
            let tone = player.stop().await;
            let (new_ear, new_mic) = move_both(&mut ana, &mut ben).await;
            player = Player::start(new_mic, tone);
            wait_received(&new_ear, 1, "audio after the kill").await;
            let heard = new_ear.received()[0].at - t0;
            killed.record(heard.as_micros() as u64).unwrap();
            eprintln!("kill {trial}: {heard:?}");
            ear = new_ear;
            stack.add_media(next_node).await.unwrap();
            next_node += 1;
        }

        let mut drained = histogram();
        for trial in 0..trials {
            wait_received(&ear, ear.received_count() + 10, "audio before the drain").await;
            let host = stack.media_index_of(CHANNEL).await.unwrap();
            let t0 = Instant::now();
            stack.media[host].signal_term();
            ben.transport_closed(CHANNEL, "recv").await;
            ana.transport_closed(CHANNEL, "send").await;
            // The old transports carry the audio while the new ones are made.
            let (new_ear, new_mic) = move_both(&mut ana, &mut ben).await;
            let tone = player.stop().await;
            player = Player::start(new_mic, tone);
            wait_received(&new_ear, 20, "audio after the drain").await;
            let silence = longest_silence(&ear, &new_ear, t0);
            drained.record(silence.as_micros().max(1) as u64).unwrap();
            eprintln!("drain {trial}: longest silence {silence:?}");
            ear = new_ear;
            stack.media[host]
                .wait_exit(Duration::from_secs(10))
                .unwrap();
            stack.add_media(next_node).await.unwrap();
            next_node += 1;
        }
        let _ = player.stop().await;

        let mut resumed = histogram();
        for _ in 0..trials {
            let token = ben_session["resumeToken"].as_str().unwrap().to_owned();
            ben.into_ws().cut();
            let t0 = Instant::now();
            ben = Client::resume(gw, "u-ben", "Ben", &token).await;
            ben_session = ben.session().await;
            assert_eq!(ben_session["resumed"], true, "{ben_session}");
            resumed.record(t0.elapsed().as_micros() as u64).unwrap();
        }

        println!();
        println!("| trial | n | p50 ms | p95 ms | max ms |");
        println!("|---|---|---|---|---|");
        row("kill -9 of the node → first audio at the listener", &killed);
        row(
            "SIGTERM (drain) of the node → longest silence at the listener",
            &drained,
        );
        row("socket cut → resumed `session` push", &resumed);
    });
}
