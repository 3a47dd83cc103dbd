//! Forwarding capacity of one media node: one channel, one speaker at 50 packets/s, N listeners.
//!
//! Run with `cargo bench -p media-svc --bench forwarding`. It starts a release-built media-svc
//! process and connects real WebRTC peers over loopback from this process: one speaker (the
//! `webrtc` crate) and up to 2000 listeners (sans-IO `rtc` peers on one thread of their own, see
//! `farm`, so the clients take as little of the two cores from the node as a receiver can).
//! For each N it talks for a few seconds and prints the delivered fraction, the latency the
//! node adds (from a speaker's packet arriving at the node to each copy's send, measured by the
//! node), the end-to-end latency (speaker send to the datagram's arrival at the listener's
//! socket), how many copies the verifying listeners authenticated and decrypted, and the node's
//! CPU per forwarded packet (the node's threads' run time from `/proc/<pid>/task/*/schedstat`,
//! to the nanosecond). `MEDIA_BENCH_LISTENERS=100,500` picks the
//! sizes, `MEDIA_BENCH_SECS` the talking time per size (default 5), `MEDIA_BENCH_VERIFY_EVERY`
//! how many listeners share one verifier (default 10), and `MEDIA_BENCH_TCP=1` connects every
//! listener over ICE/TCP instead of UDP.
//!
//! On loopback, the kernel runs each listener's receive path (down to waking the listener)
//! inside the node's own send call, so the node is billed for its listeners' receiving and its
//! sends wait for it. `MEDIA_BENCH_NETNS=1` (root, `ip`, `tc`, `ethtool`) puts the listeners in
//! a network namespace of their own, as on hosts of their own: the node's copies cross a veth
//! link whose receiving end runs in a kernel thread (threaded NAPI) at the listeners' low
//! priority, so the node's CPU and latency are its own. `MEDIA_BENCH_NODE_BIN` runs another
//! build of media-svc (an earlier commit's, for a comparison in the same run).
//!
//! After each UDP size, a second table gives the kernel's share alone, in the same run: the
//! same datagrams (the node's copy size) to the same listeners, 50 a second each, sent bare in
//! `sendmmsg` batches from one socket with the node's options; the node's CPU per copy less
//! that is the node's own work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod farm;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use testkit::{ServiceProcess, threads_cpu_time};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SETUP_PARALLELISM: usize = 16;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

struct Row {
    listeners: usize,
    delivered: f64,
    /// Copies the node itself dropped (a full send buffer or worker queue, lateness).
    node_dropped: u64,
    verified: u64,
    checked: u64,
    gaps: usize,
    p50_us: u64,
    p99_us: u64,
    node_p50_us: u32,
    node_p99_us: u32,
    node_max_us: u32,
    cpu_us_per_packet: f64,
    net_cpu_us_per_packet: f64,
    idle_cores: f64,
    node_rss_mib: f64,
    /// CPU per datagram of a bare `sendmmsg` of the same datagrams (UDP, see [`bare_send`]).
    floor_us_per_packet: Option<f64>,
}

async fn run() {
    let sizes: Vec<usize> = std::env::var("MEDIA_BENCH_LISTENERS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 500, 1000, 2000]);
    let secs: u64 = std::env::var("MEDIA_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let frames = usize::try_from(secs * 50).unwrap_or(250);
    let netns = std::env::var("MEDIA_BENCH_NETNS")
        .is_ok_and(|v| v == "1")
        .then(listeners_host);
    let bind_ip = netns
        .as_ref()
        .map_or("127.0.0.1".to_owned(), |ns| ns.host_ip.to_string());
    let bin = std::env::var("MEDIA_BENCH_NODE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_media-svc").to_owned());
    let node = ServiceProcess::start(
        &bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--rtc-bind-ip",
            &bind_ip,
            "--insecure-plaintext",
            "--log-format",
            "json",
            "--capacity",
            "10000",
        ],
        &[(
            "RUST_LOG",
            std::env::var("MEDIA_BENCH_NODE_LOG")
                .as_deref()
                .unwrap_or("warn,media_svc=info"),
        )],
        "media-svc listening",
    )
    .expect("media-svc");
    let pid = node.pid();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = support::Client::new(channel);
    let (speaker, producer) = support::speaker(&mut client, "speaker", "bench").await;
    let frame = support::Tone::new(440.0).frame();

    // One continuous stream from the speaker, as a real client sends: the receiver's SRTP
    // replay protection rejects a sequence number that jumps backwards.
    let (mut seq, mut ts): (u16, u32) = (rand::random(), rand::random());
    let verify_every: usize = std::env::var("MEDIA_BENCH_VERIFY_EVERY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .max(1);
    let tcp = std::env::var("MEDIA_BENCH_TCP").is_ok_and(|v| v == "1");
    let listeners = match &netns {
        Some(ns) => farm::Farm::start(Some(ns.file().unwrap()), ns.ns_ip.into()),
        None => farm::Farm::start(None, std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let mut ears: Vec<std::sync::Arc<farm::Ear>> = Vec::new();
    let mut rows = Vec::new();
    for (round, &n) in sizes.iter().enumerate() {
        let setup = Instant::now();
        while ears.len() < n {
            let batch = (n - ears.len()).min(SETUP_PARALLELISM);
            let start = ears.len();
            let joins = (start..start + batch).map(|i| {
                let mut client = client.clone();
                let listeners = &listeners;
                async move { listener(&mut client, listeners, i, i % verify_every == 0, tcp).await }
            });
            ears.extend(futures::future::join_all(joins).await);
        }
        eprintln!(
            "{n} listeners connected in {:.1} s",
            setup.elapsed().as_secs_f64()
        );
        if std::env::var_os("MEDIA_BENCH_NODE_LOG").is_some() {
            for line in node.logs() {
                eprintln!("node: {line}");
            }
        }
        // What the node spends with everyone connected and nobody talking (ICE keepalives,
        // RTCP reports, timers), so the per-packet figure can be read with and without it.
        let idle_window = Duration::from_secs(2);
        let idle_before = threads_cpu_time(pid).unwrap_or_default();
        tokio::time::sleep(idle_window).await;
        let idle_rate = threads_cpu_time(pid)
            .unwrap_or_default()
            .saturating_sub(idle_before)
            .as_secs_f64()
            / idle_window.as_secs_f64();
        for ear in &ears {
            ear.take();
        }
        let verified_before: u64 = ears.iter().map(|e| e.verified.load(Relaxed)).sum();
        let checked_before: u64 = ears.iter().map(|e| e.checked.load(Relaxed)).sum();
        // A new epoch per round: a new talk spurt, whose first packet carries the marker.
        support::set_floor(&mut client, "bench", Some(&producer), round as u64 + 1).await;
        let before = client
            .get_node_stats(talkgroup_proto::media::v1::GetNodeStatsRequest {
                reset_latency: true,
            })
            .await
            .unwrap()
            .into_inner();
        let cpu_before = threads_cpu_time(pid).unwrap_or_default();
        let talk_started = Instant::now();
        let mut sent_at = Vec::with_capacity(frames);
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..frames {
            ticker.tick().await;
            sent_at.push(Instant::now());
            speaker.send(seq, ts, frame.clone()).await;
            seq = seq.wrapping_add(1);
            ts = ts.wrapping_add(960);
        }
        let expected = n * frames;
        let _ = testkit::wait_until(Duration::from_secs(3), "delivery", || async {
            ears.iter().map(|e| e.count()).sum::<usize>() >= expected
        })
        .await;
        let cpu = threads_cpu_time(pid)
            .unwrap_or_default()
            .saturating_sub(cpu_before);
        let idle_share = idle_rate * talk_started.elapsed().as_secs_f64();
        let after = support::stats(&mut client).await;

        // The verifiers decrypt on the same thread after the count; give them a moment.
        let checked = ears.iter().map(|e| e.checked.load(Relaxed)).sum::<u64>() - checked_before;
        let _ = testkit::wait_until(Duration::from_secs(2), "verification", || async {
            ears.iter().map(|e| e.verified.load(Relaxed)).sum::<u64>() - verified_before >= checked
        })
        .await;
        let verified = ears.iter().map(|e| e.verified.load(Relaxed)).sum::<u64>() - verified_before;
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let mut received = 0usize;
        let mut gaps = 0usize;
        for ear in &ears {
            let got = ear.take();
            received += got.len();
            gaps += got
                .windows(2)
                .filter(|w| w[1].sequence_number != w[0].sequence_number.wrapping_add(1))
                .count();
            let Some(first) = got.first().filter(|p| p.marker) else {
                continue;
            };
            let base = first.timestamp;
            for r in &got {
                let index = (r.timestamp.wrapping_sub(base) / 960) as usize;
                if let Some(sent) = sent_at.get(index) {
                    hist.record(r.at.saturating_duration_since(*sent).as_micros() as u64)
                        .unwrap();
                }
            }
        }
        let forwarded = after
            .packets_forwarded
            .saturating_sub(before.packets_forwarded)
            .max(1);
        rows.push(Row {
            listeners: n,
            delivered: received as f64 / expected as f64,
            node_dropped: after.packets_dropped.saturating_sub(before.packets_dropped),
            verified,
            checked,
            gaps,
            p50_us: hist.value_at_quantile(0.5),
            p99_us: hist.value_at_quantile(0.99),
            node_p50_us: after.forward_latency_p50_us,
            node_p99_us: after.forward_latency_p99_us,
            node_max_us: after.forward_latency_max_us,
            cpu_us_per_packet: cpu.as_secs_f64() * 1e6 / forwarded as f64,
            net_cpu_us_per_packet: (cpu.as_secs_f64() - idle_share).max(0.0) * 1e6
                / forwarded as f64,
            idle_cores: idle_rate,
            node_rss_mib: testkit::process_rss_kib(&pid.to_string()) as f64 / 1024.0,
            floor_us_per_packet: (!tcp).then(|| {
                let to: Vec<std::net::SocketAddr> =
                    ears.iter().filter_map(|e| e.local.get().copied()).collect();
                let from: std::net::IpAddr = bind_ip.parse().unwrap();
                // The node's copy: RTP header, the frame, the AES-GCM tag.
                bare_send(from, &to, 12 + frame.len() + 16, secs)
            }),
        });
    }

    println!();
    println!(
        "one channel, one speaker at 50 packets/s for {secs} s, {} cores, listeners over {}{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if tcp { "ICE/TCP" } else { "UDP" },
        if netns.is_some() {
            ", in a network namespace receiving in its own kernel thread"
        } else {
            " on loopback"
        }
    );
    println!(
        "| listeners | delivered | dropped by the node | decrypted by verifiers | sequence gaps | added by the node p50 | p99 | max | end to end p50 | p99 | node CPU per forwarded packet | same, less idle | node idle CPU | node RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut failed = false;
    for r in &rows {
        failed |= r.verified != r.checked;
        println!(
            "| {} | {:.2}% | {} | {} of {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} µs | {:.2} µs | {:.0}% of a core | {:.0} MiB |",
            r.listeners,
            r.delivered * 100.0,
            r.node_dropped,
            r.verified,
            r.checked,
            r.gaps,
            f64::from(r.node_p50_us) / 1000.0,
            f64::from(r.node_p99_us) / 1000.0,
            f64::from(r.node_max_us) / 1000.0,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.cpu_us_per_packet,
            r.net_cpu_us_per_packet,
            r.idle_cores * 100.0,
            r.node_rss_mib
        );
    }
    if rows.iter().any(|r| r.floor_us_per_packet.is_some()) {
        println!();
        println!(
            "the kernel alone: the same datagrams to the same listeners, 50 a second each, in `sendmmsg` batches of 64 from one plain socket on the node's address"
        );
        println!(
            "| listeners | bare send, CPU per datagram | node CPU per copy, less idle | node over the bare send |"
        );
        println!("|---:|---:|---:|---:|");
        for r in &rows {
            if let Some(floor) = r.floor_us_per_packet {
                println!(
                    "| {} | {floor:.2} µs | {:.2} µs | {:.2} µs |",
                    r.listeners,
                    r.net_cpu_us_per_packet,
                    r.net_cpu_us_per_packet - floor
                );
            }
        }
    }
    drop(listeners);
    speaker.close().await;
    if failed {
        eprintln!("some copies failed SRTP authentication at the verifying listeners");
        std::process::exit(1);
    }
}

/// What the kernel alone takes to send a fan-out: datagrams of `size` bytes (the first byte
/// outside every RFC 7983 class, so the listeners drop them unparsed) to every address of `to`,
/// each 50 times a second for `secs`, in `sendmmsg` batches of 64 from one socket on `from`
/// with the node's socket options (don't fragment, no IP identification). Returns the sending
/// thread's CPU per datagram in µs, sleeps and wake-ups included, as the node's figure has
/// them: the node's CPU per copy less this is what the node itself adds.
fn bare_send(from: std::net::IpAddr, to: &[std::net::SocketAddr], size: usize, secs: u64) -> f64 {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg, sockopt};
    use nix::time::{ClockId, clock_gettime};
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    const BATCH: usize = 64;
    let to: Vec<Option<SockaddrStorage>> =
        to.iter().map(|a| Some(SockaddrStorage::from(*a))).collect();
    eprintln!(
        "sending the same datagrams bare to {} listeners for {secs} s",
        to.len()
    );
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let socket = std::net::UdpSocket::bind((from, 0)).unwrap();
                socket.set_nonblocking(true).unwrap();
                // The node's send buffer: a fan-out's burst must fit in it.
                let buffer = 4usize << 20;
                if nix::sys::socket::setsockopt(&socket, sockopt::SndBufForce, &buffer).is_err() {
                    nix::sys::socket::setsockopt(&socket, sockopt::SndBuf, &buffer).unwrap();
                }
                if from.is_ipv4() {
                    rustix::net::sockopt::set_ip_mtu_discover(
                        &socket,
                        rustix::net::sockopt::Ipv4PathMtuDiscovery::PROBE,
                    )
                    .unwrap();
                }
                let datagram = vec![0xf0u8; size];
                let slices = vec![[IoSlice::new(&datagram)]; BATCH];
                let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
                let cpu =
                    || Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap());
                let ticks = secs * 50;
                let (mut sent, mut lost) = (0u64, 0u64);
                let start = Instant::now();
                let before = cpu();
                for tick in 0..ticks {
                    for addrs in to.chunks(BATCH) {
                        match sendmmsg(
                            socket.as_raw_fd(),
                            &mut headers,
                            &slices[..addrs.len()],
                            addrs,
                            [],
                            MsgFlags::MSG_DONTWAIT,
                        ) {
                            Ok(results) => {
                                let n = results.count() as u64;
                                sent += n;
                                lost += addrs.len() as u64 - n;
                            }
                            Err(_) => lost += addrs.len() as u64,
                        }
                    }
                    let next = start + Duration::from_millis(20 * (tick + 1));
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                let spent = cpu().saturating_sub(before);
                if lost > 0 {
                    eprintln!(
                        "bare send: {lost} of {} datagrams refused (the figure is low)",
                        sent + lost
                    );
                }
                spent.as_secs_f64() * 1e6 / sent.max(1) as f64
            })
            .join()
            .unwrap()
    })
}

/// The listeners' host: a network namespace whose receive path runs in kernel threads of its
/// own, in the listeners' idle scheduling class (they stand for other machines).
fn listeners_host() -> testkit::netns::Netns {
    let ns = testkit::netns::Netns::create().expect("network namespace (needs root and ip)");
    let threads = ns
        .receive_in_own_thread()
        .expect("threaded receive in the namespace (needs ethtool and tc)");
    for tid in threads {
        if !farm::make_idle(&tid.to_string()) {
            eprintln!("note: could not lower the namespace's receive thread {tid}");
        }
    }
    ns
}

/// A listener on the farm: a recv transport, the farm peer's answer, a consumer, connected.
async fn listener(
    client: &mut support::Client,
    farm: &farm::Farm,
    i: usize,
    verifier: bool,
    tcp: bool,
) -> std::sync::Arc<farm::Ear> {
    use talkgroup_proto::media::v1 as pb;
    let session = format!("l{i}");
    let created = client
        .create_transport(pb::CreateTransportRequest {
            channel_id: "bench".into(),
            session_id: session.clone(),
            direction: pb::Direction::Recv.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (ear, sdp) = farm
        .answer(&created.offer.unwrap().sdp, verifier, tcp)
        .await;
    support::connect(client, &created.transport_id, &session, sdp).await;
    client
        .consume(pb::ConsumeRequest {
            transport_id: created.transport_id,
            session_id: session,
            channel_id: "bench".into(),
        })
        .await
        .unwrap();
    testkit::wait_until(Duration::from_secs(10), "listener connected", || async {
        ear.connected.load(Acquire)
    })
    .await
    .expect("listener connected");
    ear
}
