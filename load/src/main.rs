//! ptt-load: drives a running Talkgroup stack over the real protocol and measures what
//! push-to-talk users feel: connect and join times, press-to-grant, access time (press to the
//! first audio at a listener), mouth-to-ear through the media node, denials, double grants
//! (must be 0) and packet loss, with the servers' own figures read from `/metrics`.
//!
//! N clients are spread over C channels (and, within a channel, over every gateway given, so
//! floor contention crosses gateways). In the first `--audio-channels` channels the first
//! member listens over WebRTC and two talkers send real Opus; elsewhere talk is signalling
//! only. Each channel runs its press pattern until the duration or the press budget is spent:
//!
//! - `random`: a random talker presses, talks, releases; pauses of 50-300 ms.
//! - `contention`: `--contenders` members press at once; exactly one may be granted.
//! - `long`: long transmissions (10 s by default, past the 5 s lease) that must survive renewal.
//!
//! In every pattern another member presses in the middle of each transmission: a grant there
//! is a double grant. Against `scripts/dev`'s stack: `ptt-load --clients 200 --channels 20`;
//! a separate-process stack of the end-to-end crate: `ptt-load --spawn 2,2,2 ...` (after
//! `cargo build --release --bins`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{Value, json};
use talkgroup_e2e::{Client, Stack, Topology, http_get};
use talkgroup_wire::reply::FloorAnswer;
use talkgroup_wire::request::{ChannelRef, PttStart};
use talkgroup_wire::{ErrorBody, Reply, Request};
use testkit::media::{Peer, Tone};
use testkit::ws::WsClient;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Random,
    Contention,
    Long,
}

/// Load and latency tool for a running Talkgroup stack.
#[derive(Debug, Parser)]
#[command(name = "ptt-load", version, about)]
struct Args {
    /// Gateways (host:port) to spread clients over.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    gateway: Vec<SocketAddr>,
    /// HS256 secret the gateways check tokens with (default: scripts/dev's development secret).
    #[arg(
        long,
        env = "PTT_LOAD_JWT_SECRET",
        hide_env_values = true,
        default_value = "talkgroup-development-secret"
    )]
    jwt_secret: String,
    /// Start a stack of separate release processes instead: STATE,MEDIA,GATEWAYS (for example
    /// 2,2,2), as the end-to-end crate does. Needs `cargo build --release --bins` first.
    #[arg(long)]
    spawn: Option<String>,
    /// Clients (WebSocket connections).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Channels the clients are spread over.
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// How long the press phase runs.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Stop after this many presses in all.
    #[arg(long, default_value_t = 1_000_000)]
    max_presses: usize,
    #[arg(long, value_enum, default_value = "random")]
    pattern: Pattern,
    /// Channels with real WebRTC audio (a listener and two talkers each).
    #[arg(long, default_value_t = 5)]
    audio_channels: usize,
    /// 20 ms frames per transmission (default 10, or 500 for `long`).
    #[arg(long)]
    talk_frames: Option<usize>,
    /// Members pressing at once in the `contention` pattern.
    #[arg(long, default_value_t = 3)]
    contenders: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Prometheus endpoints (host:port, `/metrics` is read) to report server figures from;
    /// with --spawn, every service's.
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<SocketAddr>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Microsecond histograms and counters, shared by every channel task.
struct Stats {
    connect: Histogram<u64>,
    join: Histogram<u64>,
    press_to_grant: Histogram<u64>,
    access: Histogram<u64>,
    mouth_to_ear: Histogram<u64>,
    grants: u64,
    denials: u64,
    double_grants: u64,
    errors: u64,
    frames_sent: u64,
    frames_received: u64,
    failed_clients: u64,
}

impl Stats {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        Self {
            connect: h(),
            join: h(),
            press_to_grant: h(),
            access: h(),
            mouth_to_ear: h(),
            grants: 0,
            denials: 0,
            double_grants: 0,
            errors: 0,
            frames_sent: 0,
            frames_received: 0,
            failed_clients: 0,
        }
    }
}

type Shared = Arc<Mutex<Stats>>;

fn stats(shared: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn token(secret: &str, user: &str) -> Result<String> {
    Ok(testkit::jwt::talker(secret, user, user))
}

/// One member of a channel under load.
struct Member {
    client: Client,
    mic: Option<Peer>,
    tone: Tone,
}

struct Channel {
    id: String,
    members: Vec<Member>,
    /// The audio listener (member 0 of an audio channel).
    ear: Option<Peer>,
}

struct Run {
    pattern: Pattern,
    talk_frames: usize,
    contenders: usize,
    deadline: Instant,
    max_presses: usize,
    presses: AtomicUsize,
    stats: Shared,
}

impl Run {
    fn more(&self) -> bool {
        Instant::now() < self.deadline && self.presses.load(Ordering::Relaxed) < self.max_presses
    }
}

/// Whether a press was granted; `None` for an error or a reply that is no press's answer.
fn granted(reply: &Result<Reply, ErrorBody>) -> Option<bool> {
    match reply {
        Ok(Reply::Floor(FloorAnswer::Granted(_))) => Some(true),
        Ok(Reply::Floor(FloorAnswer::Denied(_) | FloorAnswer::Queued(_))) => Some(false),
        _ => None,
    }
}

fn press(channel: &str) -> Request {
    Request::PttStart(PttStart {
        channel_id: channel.to_owned(),
        priority: None,
    })
}

fn stop(channel: &str) -> Request {
    Request::PttStop(ChannelRef {
        channel_id: channel.to_owned(),
    })
}

/// Talks for `frames` frames from `talker` (audio when it has a microphone, silence
/// otherwise) while a bystander presses once in the middle; then releases.
async fn transmit(run: &Run, ch: &mut Channel, talker: usize, pressed: Instant) {
    let frames = run.talk_frames;
    let before = ch.ear.as_ref().map_or(0, Peer::received_count);
    let bystander = (talker + 1) % ch.members.len();
    let mut sent = Vec::with_capacity(frames);
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for i in 0..frames {
        ticker.tick().await;
        let member = &mut ch.members[talker];
        if let Some(mic) = &member.mic {
            let frame = member.tone.frame();
            sent.push(Instant::now());
            mic.send(member.tone.seq, member.tone.ts, frame).await;
            member.tone.seq = member.tone.seq.wrapping_add(1);
            member.tone.ts = member.tone.ts.wrapping_add(960);
        }
        if i == frames / 2 && bystander != talker {
            // Someone else presses while the floor is held: anything but a denial is wrong.
            let probe = ch.members[bystander].client.call(press(&ch.id)).await;
            run.presses.fetch_add(1, Ordering::Relaxed);
            let mut s = stats(&run.stats);
            match granted(&probe) {
                Some(false) => s.denials += 1,
                Some(true) => s.double_grants += 1,
                None => s.errors += 1,
            }
        }
    }
    if let Some(ear) = &ch.ear
        && !sent.is_empty()
    {
        let deadline = Instant::now() + Duration::from_secs(1);
        while ear.received_count() < before + sent.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = ear.received();
        let spurt = &got[before.min(got.len())..];
        let mut s = stats(&run.stats);
        s.frames_sent += sent.len() as u64;
        s.frames_received += spurt.len().min(sent.len()) as u64;
        if let Some(first) = spurt.first() {
            let _ = s.access.record(micros(first.at.duration_since(pressed)));
        }
        for (r, at) in spurt.iter().zip(&sent) {
            let _ = s
                .mouth_to_ear
                .record(micros(r.at.saturating_duration_since(*at)));
        }
    }
    if ch.members[talker].client.call(stop(&ch.id)).await.is_err() {
        stats(&run.stats).errors += 1;
    }
}

/// The members that may press: the two with microphones in an audio channel, else everyone
/// but the listener slot.
fn talkers(ch: &Channel) -> Vec<usize> {
    let with_mic: Vec<usize> = (0..ch.members.len())
        .filter(|&i| ch.members[i].mic.is_some())
        .collect();
    if with_mic.is_empty() {
        (0..ch.members.len()).collect()
    } else {
        with_mic
    }
}

async fn drive(run: Arc<Run>, mut ch: Channel) -> Channel {
    let talkers = talkers(&ch);
    if ch.members.len() < 2 {
        return ch;
    }
    while run.more() {
        let picks: Vec<usize> = {
            let mut rng = rand::rng();
            let wanted = if run.pattern == Pattern::Contention {
                run.contenders.clamp(1, talkers.len())
            } else {
                1
            };
            let mut pool = talkers.clone();
            (0..wanted)
                .map(|_| pool.swap_remove(rng.random_range(0..pool.len())))
                .collect()
        };
        let pressed = Instant::now();
        // Every pick presses at once (requests go out before any reply is read).
        let mut ids = Vec::with_capacity(picks.len());
        for &i in &picks {
            let id = ch.members[i].client.send_request(press(&ch.id)).await;
            ids.push(id);
        }
        run.presses.fetch_add(picks.len(), Ordering::Relaxed);
        let mut winners = Vec::new();
        for (&i, id) in picks.iter().zip(&ids) {
            let reply = ch.members[i].client.answer(id).await;
            let mut s = stats(&run.stats);
            match granted(&reply) {
                Some(true) => {
                    s.grants += 1;
                    let _ = s.press_to_grant.record(micros(pressed.elapsed()));
                    winners.push(i);
                }
                Some(false) => s.denials += 1,
                None => s.errors += 1,
            }
        }
        if winners.len() > 1 {
            stats(&run.stats).double_grants += winners.len() as u64 - 1;
        }
        if let Some(&talker) = winners.first() {
            transmit(&run, &mut ch, talker, pressed).await;
            for &other in &winners[1..] {
                let _ = ch.members[other].client.call(stop(&ch.id)).await;
            }
        }
        let pause = rand::rng().random_range(50..300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    ch
}

fn row(name: &str, h: &Histogram<u64>) -> (String, Value) {
    let ms = |v: u64| v as f64 / 1000.0;
    let (p50, p95, p99, max) = if h.is_empty() {
        (0.0, 0.0, 0.0, 0.0)
    } else {
        (
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.95)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
        )
    };
    (
        format!(
            "| {name} | {} | {p50:.2} | {p95:.2} | {p99:.2} | {max:.2} |",
            h.len()
        ),
        json!({"n": h.len(), "p50Ms": p50, "p95Ms": p95, "p99Ms": p99, "maxMs": max}),
    )
}

/// The samples of interest in one `/metrics` text, summed over label sets.
fn server_figures(text: &str) -> Vec<(String, f64)> {
    const SERIES: [&str; 13] = [
        "ptt_gateway_connections",
        "ptt_floor_grants_total",
        "ptt_floor_denials_total",
        "ptt_press_to_grant_seconds_sum",
        "ptt_press_to_grant_seconds_count",
        "ptt_store_errors_total",
        "ptt_watch_streams",
        "ptt_media_peer_connections",
        "ptt_media_channels",
        "ptt_media_packets_forwarded_total",
        "ptt_media_packets_dropped_not_floor_total",
        "ptt_media_packets_dropped_slow_listener_total",
        "ptt_media_packets_dropped_send_total",
    ];
    let mut out = Vec::new();
    for name in SERIES {
        let values: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if !values.is_empty() {
            out.push((name.to_owned(), values.iter().sum()));
        }
    }
    // The gateway's own press-to-grant quantiles, from its histogram buckets (upper bounds).
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ptt_press_to_grant_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    if let Some(&(_, total)) = buckets.last().filter(|(_, total)| *total > 0.0) {
        for (q, name) in [
            (0.5, "gateway_press_to_grant_p50_le_ms"),
            (0.99, "gateway_press_to_grant_p99_le_ms"),
        ] {
            if let Some(&(le, _)) = buckets.iter().find(|(_, c)| *c >= q * total) {
                out.push((name.to_owned(), le * 1000.0));
            }
        }
    }
    out
}

fn parse_spawn(raw: &str) -> Result<(usize, usize, usize)> {
    let parts: Vec<usize> = raw
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("--spawn wants STATE,MEDIA,GATEWAYS, for example 2,2,2")?;
    match parts.as_slice() {
        [s, m, g] if (1..=8).contains(s) && (1..=8).contains(m) && (1..=8).contains(g) => {
            Ok((*s, *m, *g))
        }
        _ => bail!("--spawn wants three counts from 1 to 8, for example 2,2,2"),
    }
}

#[allow(clippy::too_many_lines)]
async fn main_async(args: Args) -> Result<()> {
    if args.clients < 2 || args.channels == 0 || args.clients < args.channels * 2 {
        bail!("need at least two clients per channel");
    }
    let mut processes: Vec<(String, u32)> = Vec::new();
    let (stack, gateways, secret, mut metrics) = match &args.spawn {
        Some(spec) => {
            let (state, media, gw) = parse_spawn(spec)?;
            eprintln!("starting a stack: {state} state-svc, {media} media-svc, {gw} signaling-svc");
            let stack = Stack::start(Topology {
                state,
                media,
                gateways: gw,
                // Every client connects from this host's loopback address: one source.
                gateway_args: ["--ptt-rate", "1000", "--request-rate", "1000"]
                    .into_iter()
                    .chain(talkgroup_e2e::ONE_HOST_GATEWAY_ARGS)
                    .map(String::from)
                    .collect(),
                ..Topology::default()
            })
            .await
            .context("starting the stack (build the release binaries first)")?;
            stack.ready().await?;
            let gateways: Vec<SocketAddr> = stack.gateways.iter().map(|g| g.addr).collect();
            let mut metrics = Vec::new();
            for (name, group) in [
                ("signaling-svc", &stack.gateways),
                ("state-svc", &stack.state),
                ("media-svc", &stack.media),
            ] {
                for p in group {
                    metrics.extend(p.logged_addr("metrics listening"));
                    processes.push((name.to_owned(), p.pid()));
                }
            }
            if let Some(pid) = stack.redis.pid() {
                processes.push(("redis".to_owned(), pid));
            }
            (
                Some(stack),
                gateways,
                talkgroup_e2e::SECRET.to_owned(),
                metrics,
            )
        }
        None => (
            None,
            args.gateway.clone(),
            args.jwt_secret.clone(),
            Vec::new(),
        ),
    };
    metrics.extend(args.metrics.iter().copied());
    let shared: Shared = Arc::new(Mutex::new(Stats::new()));
    let talk_frames = args.talk_frames.unwrap_or(match args.pattern {
        Pattern::Long => 500,
        _ => 10,
    });

    // Connect and join, a bounded number at a time.
    eprintln!(
        "connecting {} clients to {} channels over {} gateway(s)",
        args.clients,
        args.channels,
        gateways.len()
    );
    let setup_started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut joins = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let channel = format!("load-{}", i % args.channels);
        // Members of one channel land on different gateways.
        let addr = gateways[(i / args.channels) % gateways.len()];
        let user = format!("load-{i}");
        let token = token(&secret, &user)?;
        let gate = Arc::clone(&gate);
        let shared = Arc::clone(&shared);
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let t0 = Instant::now();
            let ws = WsClient::connect(addr, &token).await;
            let connected = t0.elapsed();
            let mut client = Client::from_ws(ws, &user);
            let t1 = Instant::now();
            client.join(&channel).await;
            let joined = t1.elapsed();
            let mut s = stats(&shared);
            let _ = s.connect.record(micros(connected));
            let _ = s.join.record(micros(joined));
            Some((i % args.channels, client))
        }));
    }
    let mut by_channel: Vec<Vec<Client>> = (0..args.channels).map(|_| Vec::new()).collect();
    for join in joins {
        match join.await {
            Ok(Some((ch, client))) => by_channel[ch].push(client),
            _ => stats(&shared).failed_clients += 1,
        }
    }
    eprintln!(
        "connected and joined in {:.1} s; setting up audio in {} channel(s)",
        setup_started.elapsed().as_secs_f64(),
        args.audio_channels.min(args.channels)
    );
    let mut channels = Vec::with_capacity(args.channels);
    for (index, clients) in by_channel.into_iter().enumerate() {
        let id = format!("load-{index}");
        let mut members: Vec<Member> = clients
            .into_iter()
            .map(|client| Member {
                client,
                mic: None,
                tone: Tone::new(440.0),
            })
            .collect();
        let mut ear = None;
        if index < args.audio_channels && members.len() >= 3 {
            ear = Some(members[0].client.listener(&id).await.0);
            for m in &mut members[1..3] {
                m.mic = Some(m.client.speaker(&id).await);
            }
        }
        channels.push(Channel { id, members, ear });
    }

    let before_cpu: Vec<Option<Duration>> = processes
        .iter()
        .map(|(_, pid)| testkit::process_cpu_time(*pid))
        .collect();
    let own_before = testkit::process_cpu_time(std::process::id());
    let run = Arc::new(Run {
        pattern: args.pattern,
        talk_frames,
        contenders: args.contenders,
        deadline: Instant::now() + Duration::from_secs(args.duration_s),
        max_presses: args.max_presses,
        presses: AtomicUsize::new(0),
        stats: Arc::clone(&shared),
    });
    eprintln!(
        "pressing: {:?} pattern, {talk_frames} frames per transmission, for {} s",
        args.pattern, args.duration_s
    );
    let started = Instant::now();
    let progress = {
        let run = Arc::clone(&run);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let (grants, denials, doubles, errors) = {
                    let s = stats(&run.stats);
                    (s.grants, s.denials, s.double_grants, s.errors)
                };
                eprintln!(
                    "  {:>5.1} s  presses {:>7}  grants {grants:>6}  denials {denials:>6}  double grants {doubles}  errors {errors}",
                    started.elapsed().as_secs_f64(),
                    run.presses.load(Ordering::Relaxed)
                );
            }
        })
    };
    let tasks: Vec<_> = channels
        .into_iter()
        .map(|ch| tokio::spawn(drive(Arc::clone(&run), ch)))
        .collect();
    let mut finished = Vec::new();
    for task in tasks {
        match task.await {
            Ok(ch) => finished.push(ch),
            Err(_) => stats(&shared).errors += 1,
        }
    }
    progress.abort();
    let elapsed = started.elapsed();
    let cpu: Vec<(String, f64)> = processes
        .iter()
        .zip(&before_cpu)
        .filter_map(|((name, pid), before)| {
            let after = testkit::process_cpu_time(*pid)?;
            let used = after.saturating_sub((*before)?);
            Some((
                name.clone(),
                used.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
            ))
        })
        .collect();
    let own_cpu = testkit::process_cpu_time(std::process::id())
        .zip(own_before)
        .map(|(a, b)| a.saturating_sub(b).as_secs_f64() / elapsed.as_secs_f64() * 100.0);

    // Server-side figures.
    let mut server = Vec::new();
    for addr in &metrics {
        if let Some((200, text)) = http_get(*addr, "/metrics").await {
            server.push((addr.to_string(), server_figures(&text)));
        }
    }

    // The report, from a snapshot (no lock held past here).
    let s = std::mem::replace(&mut *stats(&shared), Stats::new());
    let presses = run.presses.load(Ordering::Relaxed);
    let loss = if s.frames_sent == 0 {
        0.0
    } else {
        1.0 - s.frames_received as f64 / s.frames_sent as f64
    };
    println!(
        "\nptt-load: {} clients, {} channels, {:?} pattern, {:.1} s of presses\n",
        args.clients,
        args.channels,
        args.pattern,
        elapsed.as_secs_f64()
    );
    println!("| measure | n | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    let mut latencies = serde_json::Map::new();
    for (key, name, h) in [
        ("connect", "connect (WebSocket + token)", &s.connect),
        ("join", "join-channel", &s.join),
        ("pressToGrant", "press → granted", &s.press_to_grant),
        (
            "accessTime",
            "press → first audio at listener (access time)",
            &s.access,
        ),
        (
            "mouthToEar",
            "speaker send → listener receive (mouth-to-ear)",
            &s.mouth_to_ear,
        ),
    ] {
        let (line, value) = row(name, h);
        println!("{line}");
        latencies.insert(key.to_owned(), value);
    }
    println!();
    println!(
        "presses {presses} ({:.0}/s), grants {}, denials {}, double grants {}, errors {}, failed clients {}",
        presses as f64 / elapsed.as_secs_f64(),
        s.grants,
        s.denials,
        s.double_grants,
        s.errors,
        s.failed_clients
    );
    println!(
        "audio: {} frames sent while granted, {} received, loss {:.2}%",
        s.frames_sent,
        s.frames_received,
        loss * 100.0
    );
    if !cpu.is_empty() {
        let own = own_cpu.map_or_else(String::new, |c| format!(", ptt-load {c:.0}%"));
        let list: Vec<String> = cpu.iter().map(|(n, c)| format!("{n} {c:.0}%")).collect();
        println!("CPU (100% = one core): {}{own}", list.join(", "));
    }
    for (addr, figures) in &server {
        let list: Vec<String> = figures.iter().map(|(n, v)| format!("{n}={v}")).collect();
        println!("server {addr}: {}", list.join(" "));
    }
    let report = json!({
        "clients": args.clients,
        "channels": args.channels,
        "pattern": format!("{:?}", args.pattern).to_lowercase(),
        "durationS": elapsed.as_secs_f64(),
        "latency": latencies,
        "presses": presses,
        "grants": s.grants,
        "denials": s.denials,
        "doubleGrants": s.double_grants,
        "errors": s.errors,
        "failedClients": s.failed_clients,
        "audio": {"framesSent": s.frames_sent, "framesReceived": s.frames_received, "loss": loss},
        "cpuPercent": cpu.iter().map(|(n, c)| json!({"process": n, "percent": c})).collect::<Vec<_>>(),
        "loadToolCpuPercent": own_cpu,
        "server": server.iter().map(|(a, f)| json!({"endpoint": a, "figures": f.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>()})).collect::<Vec<_>>(),
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let doubles = s.double_grants;
    for ch in finished {
        for m in ch.members {
            if let Some(mic) = m.mic {
                mic.close().await;
            }
            m.client.close().await;
        }
        if let Some(ear) = ch.ear {
            ear.close().await;
        }
    }
    drop(stack);
    if doubles > 0 {
        bail!("{doubles} double grant(s) observed");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("ptt-load: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ptt-load: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
