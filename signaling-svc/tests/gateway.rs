//! The gateway against the real state-svc and media-svc (in-process, on ephemeral ports), driven
//! by a WebSocket client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use talkgroup_common::devcerts::TestPki;
use talkgroup_common::tls::Identity;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use testkit::wait_until;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "a-test-secret-of-enough-length";

fn token(sub: &str, name: &str, exp_offset: i64, secret: &str) -> String {
    testkit::jwt::token(secret, sub, name, &json!({"*": "talk"}), exp_offset)
}

struct Stack {
    gateways: Vec<SocketAddr>,
    /// Each gateway's internal `/metrics` listener.
    metrics: Vec<SocketAddr>,
    /// state-svc's gRPC address.
    state: SocketAddr,
    /// The media node's gRPC address (node id `media-gw-test`).
    media: SocketAddr,
    stop: CancellationToken,
    /// This test's share of the process (see [`Stack::alone`]).
    turn: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

/// Every stack holds a shared turn; a test that measures the whole process (its memory, its
/// connection slots) gives its own up and waits for the process to itself.
static TURNS: std::sync::LazyLock<std::sync::Arc<tokio::sync::RwLock<()>>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(tokio::sync::RwLock::new(())));

impl Stack {
    /// Waits until no other test's stack runs in this process, and keeps others from
    /// starting until the guard is dropped.
    async fn alone(&mut self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.turn = None;
        std::sync::Arc::clone(&TURNS).write_owned().await
    }
}

async fn serve<F: Future<Output = ()> + Send + 'static>(
    f: impl FnOnce(tokio::net::TcpListener) -> F,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(f(listener));
    addr
}

/// The Redis server of this test binary.
fn redis() -> &'static testkit::RedisServer {
    static REDIS: std::sync::OnceLock<testkit::RedisServer> = std::sync::OnceLock::new();
    REDIS.get_or_init(|| testkit::RedisServer::start().expect("start redis-server"))
}

/// state-svc on a real Redis (a key prefix of its own), one media node registered with it, and
/// `gateways` gateways.
async fn stack(gateways: usize, lease_ms: u32, max_talk_ms: u32) -> Stack {
    stack_with(gateways, lease_ms, max_talk_ms, |_| {}).await
}

async fn stack_with(
    gateways: usize,
    lease_ms: u32,
    max_talk_ms: u32,
    configure: impl Fn(&mut signaling_svc::Config),
) -> Stack {
    stack_full(gateways, lease_ms, max_talk_ms, |_| {}, configure).await
}

async fn stack_full(
    gateways: usize,
    lease_ms: u32,
    max_talk_ms: u32,
    configure_state: impl FnOnce(&mut state_svc::Config),
    configure: impl Fn(&mut signaling_svc::Config),
) -> Stack {
    static PREFIX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let turn = Some(std::sync::Arc::clone(&TURNS).read_owned().await);
    let stop = CancellationToken::new();
    // Every gRPC hop is mutual TLS, with certificates from a throwaway CA.
    let pki = TestPki::global();
    let mut state_config = state_svc::Config::for_tests();
    state_config.tls = pki.args(&Identity::State);
    state_config.redis_url = Some(redis().url());
    state_config.key_prefix = format!(
        "gw{}-{}",
        std::process::id(),
        PREFIX.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    state_config.lease_ms = lease_ms;
    state_config.max_talk_ms = max_talk_ms;
    state_config.node_heartbeat_ms = 100;
    configure_state(&mut state_config);
    let s = stop.clone();
    let state =
        serve(move |l| async move { state_svc::run(state_config, l, s).await.unwrap() }).await;
    let mut media_config = media_svc::Config::for_tests();
    media_config.tls = pki.args(&Identity::Media("media-gw-test".into()));
    media_config.state_url = Some(format!("http://{state}"));
    media_config.drain_timeout_ms = 100;
    let s = stop.clone();
    let media =
        serve(move |l| async move { media_svc::run(media_config, l, s).await.unwrap() }).await;
    let mut addrs = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..gateways {
        let mut config = signaling_svc::Config::for_tests(SECRET);
        config.tls = pki.args(&Identity::Gateway);
        config.state_url = format!("http://{state}");
        config.shutdown_grace_ms = 2_000;
        configure(&mut config);
        let s = stop.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        metrics.push(listener.local_addr().unwrap());
        addrs.push(
            serve(move |l| async move {
                signaling_svc::run_with_metrics(config, l, Some(listener), s)
                    .await
                    .unwrap()
            })
            .await,
        );
    }
    // The media node is registered before anyone talks.
    let addr = addrs[0];
    wait_until(Duration::from_secs(5), "a live media node", || async move {
        let body = reqwest_health(addr).await;
        body["mediaNodes"].as_u64().unwrap_or(0) >= 1
    })
    .await
    .unwrap();
    Stack {
        gateways: addrs,
        metrics,
        state,
        media,
        stop,
        turn,
    }
}

/// GET /health with a bare HTTP/1.1 request.
async fn reqwest_health(addr: SocketAddr) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Value::Null;
    };
    let _ = s
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    text.split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null)
}

use testkit::ws::WsClient as Client;

/// A client signed in as `sub` with a 10-minute token.
async fn client(addr: SocketAddr, sub: &str, name: &str) -> Client {
    Client::connect(addr, &token(sub, name, 600, SECRET)).await
}

trait SpeakerChanged {
    /// The next `speaker-changed` push with `reason`.
    async fn speaker_changed(&mut self, reason: &str) -> Value;
}

impl SpeakerChanged for Client {
    async fn speaker_changed(&mut self, reason: &str) -> Value {
        self.push_where("speaker-changed", |d| d["reason"] == reason)
            .await
    }
}

async fn http_status(
    addr: SocketAddr,
    configure: impl FnOnce(&mut tokio_tungstenite::tungstenite::handshake::client::Request),
    path: &str,
) -> Result<Option<String>, u16> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    configure(&mut request);
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => Ok(response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_owned())),
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("unexpected {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_location_works_and_bad_tokens_get_401() {
    let stack = stack(1, 5_000, 60_000).await;
    let gw = stack.gateways[0];
    let good = token("u1", "Ana", 600, SECRET);
    assert!(
        http_status(
            gw,
            |r| {
                r.headers_mut()
                    .insert("authorization", format!("Bearer {good}").parse().unwrap());
            },
            "/ws"
        )
        .await
        .is_ok()
    );
    assert!(
        http_status(gw, |_| {}, &format!("/ws?token={good}"))
            .await
            .is_ok()
    );
    let selected = http_status(
        gw,
        |r| {
            r.headers_mut().insert(
                "sec-websocket-protocol",
                format!("voiceping, {good}").parse().unwrap(),
            );
        },
        "/ws",
    )
    .await;
    assert_eq!(
        selected.unwrap().as_deref(),
        Some("voiceping"),
        "the reply selects voiceping"
    );

    let expired = token("u1", "Ana", -600, SECRET);
    let wrong_key = token("u1", "Ana", 600, "another-secret-of-enough-length");
    let header = r#"{"alg":"none","typ":"JWT"}"#;
    let payload = format!(
        r#"{{"sub":"u1","exp":{}}}"#,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600
    );
    let alg_none = format!("{}.{}.", b64(header), b64(&payload));
    for bad in [
        "",
        "garbage",
        "a.b.c",
        expired.as_str(),
        wrong_key.as_str(),
        alg_none.as_str(),
    ] {
        let result = http_status(
            gw,
            |r| {
                r.headers_mut()
                    .insert("authorization", format!("Bearer {bad}").parse().unwrap());
            },
            "/ws",
        )
        .await;
        assert_eq!(result.unwrap_err(), 401, "token {bad:?}");
    }
    assert_eq!(
        http_status(gw, |_| {}, "/ws").await.unwrap_err(),
        401,
        "no token at all"
    );
    stack.stop.cancel();
}

fn b64(s: &str) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_join_floor_contention_and_disconnect() {
    let stack = stack(1, 5_000, 60_000).await;
    let gw = stack.gateways[0];
    let mut a = client(gw, "u-ana", "Ana").await;
    let mut b = client(gw, "u-bo", "Bo").await;

    let pong = a.request("ping", json!({})).await;
    assert_eq!(pong["type"], "pong");
    assert!(pong["data"]["serverTime"].as_i64().unwrap() > 0);

    // Hostile on purpose: not a request the protocol defines.
    let bad = a.request_raw("fly", json!({})).await;
    assert_eq!(bad["error"]["code"], "BAD_REQUEST");
    let not_joined = a.request("ptt-start", json!({"channelId": "ops"})).await;
    assert_eq!(not_joined["error"]["code"], "FORBIDDEN");

    a.request("join-channel", json!({"channelId": "ops"})).await;
    let joined = b.request("join-channel", json!({"channelId": "ops"})).await;
    let names: Vec<&str> = joined["data"]["channel"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Ana", "Bo"]);
    // Ana sees Bo arrive (a `members-changed`, or a `channel-state` if the gateway was still
    // subscribing the channel when Bo joined).
    assert_eq!(a.members_until("ops", |m| m.len() == 2).await.len(), 2);

    let granted = a.request("ptt-start", json!({"channelId": "ops"})).await;
    assert_eq!(granted["data"]["granted"], true, "{granted}");
    assert!(granted["data"]["epoch"].as_u64().unwrap() > 0);
    assert_eq!(granted["data"]["maxTalkMs"], 60_000);
    assert_eq!(
        b.speaker_changed("granted").await["data"]["speaker"]["userName"],
        "Ana"
    );

    let denied = b.request("ptt-start", json!({"channelId": "ops"})).await;
    assert_eq!(denied["data"]["granted"], false);
    assert_eq!(denied["data"]["speaker"]["userName"], "Ana");
    assert_eq!(
        b.push("ptt-denied").await["data"]["speaker"]["userId"],
        "u-ana"
    );

    // Bo's stop must not release Ana's floor (the original VoicePing's bug).
    b.request("ptt-stop", json!({"channelId": "ops"})).await;
    let again = b.request("ptt-start", json!({"channelId": "ops"})).await;
    assert_eq!(again["data"]["granted"], false, "Ana still holds the floor");

    // Ana closes her socket: the floor is freed and everyone hears why. (A socket lost without
    // a close waits for its resume instead: tests/tests/resume.rs.)
    a.ws.close(None).await.unwrap();
    let freed = b.speaker_changed("disconnected").await;
    assert!(freed["data"]["speaker"].is_null());
    let now_bo = b.request("ptt-start", json!({"channelId": "ops"})).await;
    assert_eq!(now_bo["data"]["granted"], true);
    stack.stop.cancel();
}

/// The requester reads its `ptt-start`/`ptt-stop` reply before the `speaker-changed` its
/// request caused (the order protocol.md promises), and every member hears every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requester_reads_its_reply_before_its_speaker_changed() {
    let stack = stack_with(1, 5_000, 60_000, |c| {
        c.ptt_rate = 1_000;
        c.request_rate = 1_000;
    })
    .await;
    let gw = stack.gateways[0];
    let mut a = client(gw, "u-ana", "Ana").await;
    a.request("join-channel", json!({"channelId": "order"}))
        .await;
    let mut others = Vec::new();
    for i in 0..20 {
        let mut c = client(gw, &format!("u-{i}"), "Listener").await;
        c.request("join-channel", json!({"channelId": "order"}))
            .await;
        others.push(c);
    }
    for round in 0..30 {
        for kind in ["ptt-start", "ptt-stop"] {
            let id = a.send(kind, json!({"channelId": "order"})).await;
            let first = loop {
                let frame = a.next_frame().await;
                if frame["type"] != "channel-state" && frame["type"] != "members-changed" {
                    break frame;
                }
            };
            assert_eq!(first["id"], id.as_str(), "round {round}, {kind}: {first}");
            let reason = if kind == "ptt-start" {
                "granted"
            } else {
                "released"
            };
            assert_eq!(a.speaker_changed(reason).await["type"], "speaker-changed");
        }
    }
    // The members heard every change.
    for c in &mut others {
        for _ in 0..30 {
            c.speaker_changed("granted").await;
            c.speaker_changed("released").await;
        }
    }
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_long_transmission_alive_only_up_to_max_talk_time() {
    // Scaled down: a 300 ms lease and 1.5 s of maximum talk time.
    let stack = stack(1, 300, 1_500).await;
    let gw = stack.gateways[0];
    let mut a = client(gw, "u-ana", "Ana").await;
    a.request("join-channel", json!({"channelId": "ops"})).await;
    let started = std::time::Instant::now();
    assert_eq!(
        a.request("ptt-start", json!({"channelId": "ops"})).await["data"]["granted"],
        true
    );
    let revoked = a.speaker_changed("max-talk-time").await;
    let held = started.elapsed();
    assert!(revoked["data"]["speaker"].is_null());
    assert!(
        held >= Duration::from_millis(1_400),
        "renewed past five leases ({held:?})"
    );
    assert!(
        held < Duration::from_millis(3_000),
        "revoked at max talk time ({held:?})"
    );
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaker_changes_reach_clients_on_every_gateway() {
    let stack = stack(2, 5_000, 60_000).await;
    let mut on_one = client(stack.gateways[0], "u-ana", "Ana").await;
    let mut on_two = client(stack.gateways[1], "u-bo", "Bo").await;
    on_one
        .request("join-channel", json!({"channelId": "ops"}))
        .await;
    on_two
        .request("join-channel", json!({"channelId": "ops"}))
        .await;
    assert_eq!(
        on_two
            .request("ptt-start", json!({"channelId": "ops"}))
            .await["data"]["granted"],
        true
    );
    let seen = on_one.speaker_changed("granted").await;
    assert_eq!(seen["data"]["speaker"]["userName"], "Bo");
    on_two
        .request("ptt-stop", json!({"channelId": "ops"}))
        .await;
    assert!(on_one.speaker_changed("released").await["data"]["speaker"].is_null());
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_transports_and_graceful_shutdown() {
    let stack = stack(2, 5_000, 60_000).await;
    let mut a = client(stack.gateways[0], "u-ana", "Ana").await;
    let mut watcher = client(stack.gateways[1], "u-cy", "Cy").await;

    // An oversized frame is refused, and the connection stays open.
    let big = json!({"type": "ping", "id": "big", "data": {"pad": "x".repeat(70 * 1024)}});
    a.ws.send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    let too_big = a.push("error").await;
    assert_eq!(too_big["error"]["code"], "BAD_REQUEST");
    assert_eq!(too_big["error"]["message"], "frame too large");
    assert_eq!(a.request("ping", json!({})).await["type"], "pong");

    // Media negotiation goes to the real media node the channel is placed on.
    a.request("join-channel", json!({"channelId": "ops"})).await;
    watcher
        .request("join-channel", json!({"channelId": "ops"}))
        .await;
    let caps = a
        .request("get-router-capabilities", json!({"channelId": "ops"}))
        .await;
    assert_eq!(caps["data"]["codecs"][0]["mimeType"], "audio/opus");
    let send = a
        .request(
            "create-transport",
            json!({"channelId": "ops", "direction": "send"}),
        )
        .await;
    assert!(
        send["data"]["offer"]["sdp"]
            .as_str()
            .unwrap()
            .contains("m=audio"),
        "{send}"
    );
    let consume = a.request("consume", json!({"channelId": "ops"})).await;
    assert_eq!(
        consume["error"]["code"], "BAD_REQUEST",
        "no recv transport yet"
    );
    let unknown = a
        .request(
            "connect-transport",
            json!({"transportId": "nope", "answer": {"type": "answer", "sdp": "v=0"}}),
        )
        .await;
    assert_eq!(unknown["error"]["code"], "NOT_FOUND");

    // Requests beyond the rate limit are refused with RATE_LIMITED.
    let mut limited = 0;
    for _ in 0..60 {
        if a.request("ping", json!({})).await["error"]["code"] == "RATE_LIMITED" {
            limited += 1;
        }
    }
    assert!(limited > 0, "a burst of 60 requests hits the limit");

    // SIGTERM on Ana's gateway: her socket closes with 1001 (her session waits for a resume
    // on another replica).
    tokio::time::sleep(Duration::from_millis(1_100)).await; // let the rate limiter refill (a wait on time itself)
    assert_eq!(
        a.request("ptt-start", json!({"channelId": "ops"})).await["data"]["granted"],
        true
    );
    watcher.speaker_changed("granted").await;
    stack.stop.cancel();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), a.ws.next())
            .await
            .expect("close within 5 s")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.expect("close frame").code), 1001);
}

const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgywAl8Wxhra3Db0Le
j77LpSbTtPu0RB3ubflo8k60Q1ahRANCAARIlnOXQwjtdD8zGOOg0ja2a77ycHee
CyFa2PD42o5zUHVqFgTc4PeNmI+U/nq2JtrhZshhHfBLGiFzK0ZNICaN
-----END PRIVATE KEY-----
";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAESJZzl0MI7XQ/MxjjoNI2tmu+8nB3
ngshWtjw+NqOc1B1ahYE3OD3jZiPlP56tiba4WbIYR3wSxohcytGTSAmjQ==
-----END PUBLIC KEY-----
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_with_a_public_key_and_hs256_refused_then() {
    let dir = std::env::temp_dir().join(format!("tg-es256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = dir.join("pub.pem");
    std::fs::write(&key_path, EC_PUBLIC).unwrap();
    let stack = stack_with(1, 5_000, 60_000, |c| {
        c.jwt_secret = None;
        c.jwt_public_key = Some(key_path.clone());
    })
    .await;
    let gw = stack.gateways[0];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": "u-es", "name": "Es", "exp": now + 600, "grants": {"*": "talk"}});
    let es = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(
        http_status(gw, |_| {}, &format!("/ws?token={es}"))
            .await
            .is_ok()
    );
    // An HS256 token, even one signed with the public key's bytes, is refused.
    let confused = token("u-es", "Es", 600, EC_PUBLIC);
    assert_eq!(
        http_status(gw, |_| {}, &format!("/ws?token={confused}"))
            .await
            .unwrap_err(),
        401
    );
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_documented_errors_and_a_flood_is_closed() {
    let stack = stack(1, 5_000, 60_000).await;
    let gw = stack.gateways[0];
    let mut bystander = client(gw, "u-by", "By").await;
    let mut a = client(gw, "u-ana", "Ana").await;

    for (frame, message) in [
        ("{not json", "invalid JSON"),
        (r#"{"type":"teleport","id":"1"}"#, "unknown message type"),
        (
            r#"{"type":"join-channel","id":"2","data":{}}"#,
            "missing or invalid fields",
        ),
    ] {
        a.ws.send(Message::Text(frame.into())).await.unwrap();
        let error = a.push("error").await;
        assert_eq!(
            (
                error["error"]["code"].as_str(),
                error["error"]["message"].as_str()
            ),
            (Some("BAD_REQUEST"), Some(message)),
            "{frame}"
        );
    }
    a.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        a.push("error").await["error"]["message"],
        "binary frames are not supported"
    );

    // 1000 requests in one burst: the first ones are answered, then RATE_LIMITED, then the
    // socket is closed as a flood (1008).
    for i in 0..1_000 {
        let frame = json!({"type": "ping", "id": format!("f{i}")});
        if a.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (mut pongs, mut limited) = (0, 0);
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), a.ws.next())
            .await
            .expect("frames within 5 s")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "pong" {
                    pongs += 1;
                } else if v["error"]["code"] == "RATE_LIMITED" {
                    limited += 1;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    assert!(
        pongs >= 20 && limited >= 50,
        "{pongs} pongs, {limited} refusals"
    );
    assert_eq!(u16::from(close.expect("close frame").code), 1008);

    // The server is up and the bystander never noticed.
    assert_eq!(bystander.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

/// POST /dev/token with a bare HTTP/1.1 request; returns (status, body).
async fn post_dev_token(addr: SocketAddr, body: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /dev/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_tokens_only_when_enabled() {
    let off = stack(1, 5_000, 60_000).await;
    assert_eq!(
        post_dev_token(off.gateways[0], r#"{"name":"Ana"}"#).await.0,
        404,
        "off by default"
    );
    off.stop.cancel();
    // One stack at a time: a second turn taken while holding one could wait on a test that
    // waits to be alone.
    drop(off);

    let on = stack_with(1, 5_000, 60_000, |c| c.dev_tokens = true).await;
    let gw = on.gateways[0];
    assert_eq!(post_dev_token(gw, r#"{"name":""}"#).await.0, 400);
    let (status, body) = post_dev_token(gw, r#"{"name":"Ana Lee"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body["userId"], "dev-ana-lee");
    let token = body["token"].as_str().unwrap();
    assert!(
        http_status(gw, |_| {}, &format!("/ws?token={token}"))
            .await
            .is_ok(),
        "the token signs in"
    );
    on.stop.cancel();
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn signed(claims: &Value) -> String {
    testkit::jwt::sign(SECRET, claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_ends_with_its_token_unless_the_client_refreshes_it() {
    let stack = stack_with(1, 5_000, 60_000, |c| c.jwt_leeway_s = 0).await;
    let gw = stack.gateways[0];
    let exp = now_s() + 2;
    let short = |sub: &str| signed(&json!({"sub": sub, "exp": exp, "grants": {"*": "talk"}}));
    let mut ending = Client::connect(gw, &short("u-ending")).await;
    let mut kept = Client::connect(gw, &short("u-kept")).await;

    // A refresh must be a valid token of the same user.
    let foreign = kept
        .request(
            "refresh-token",
            json!({"token": token("u-other", "Other", 600, SECRET)}),
        )
        .await;
    assert_eq!(foreign["error"]["code"], "FORBIDDEN");
    let garbage = kept
        .request("refresh-token", json!({"token": "a.b.c"}))
        .await;
    assert_eq!(garbage["error"]["code"], "UNAUTHENTICATED");
    let extra = kept
        .request_raw("refresh-token", json!({"token": "a.b.c", "more": 1}))
        .await;
    assert_eq!(extra["error"]["code"], "BAD_REQUEST");
    let refreshed = kept
        .request(
            "refresh-token",
            json!({"token": token("u-kept", "Kept", 600, SECRET)}),
        )
        .await;
    assert!(refreshed["data"]["expiresAt"].as_i64().unwrap() >= (now_s() + 590) * 1000);

    // The socket that did not refresh is closed at its token's exp (leeway 0), within a second.
    assert_eq!(ending.close_code().await, 4001);
    let late_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - exp * 1000;
    assert!(late_ms < 1_000, "closed {late_ms} ms after exp");

    // The refreshed one lives on past the first token's exp.
    assert!(now_s() >= exp);
    assert_eq!(kept.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

/// A signed token whose `exp` is as far as JSON integers go (2^63 - 1, 2^64 - 1) is a valid
/// token: the socket opens, answers, and takes a refresh with another such token (it used to
/// panic the connection's task once the socket was registered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_exp_is_the_largest_integer_opens_a_working_socket() {
    let stack = stack_with(1, 5_000, 60_000, |_| {}).await;
    let gw = stack.gateways[0];
    let far = |exp: u64| signed(&json!({"sub": "u-far", "exp": exp, "grants": {"*": "talk"}}));
    let mut client = Client::connect(gw, &far(i64::MAX as u64)).await;
    assert_eq!(client.request("ping", json!({})).await["type"], "pong");
    let refreshed = client
        .request("refresh-token", json!({"token": far(u64::MAX)}))
        .await;
    assert_eq!(refreshed["data"]["expiresAt"], i64::MAX, "{refreshed}");
    assert_eq!(client.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_not_yet_valid_or_for_another_audience_are_refused() {
    let stack = stack_with(1, 5_000, 60_000, |c| {
        c.jwt_audience = Some("talkgroup".into());
    })
    .await;
    let gw = stack.gateways[0];
    let now = now_s();
    let bearer = |token: String| {
        move |r: &mut tokio_tungstenite::tungstenite::handshake::client::Request| {
            let value = format!("Bearer {token}").parse().unwrap();
            r.headers_mut().insert("authorization", value);
        }
    };
    for (claims, what) in [
        (
            json!({"sub": "u1", "exp": now + 600, "aud": "talkgroup", "nbf": now + 3_600}),
            "nbf an hour ahead",
        ),
        (
            json!({"sub": "u1", "exp": now + 600, "aud": "elsewhere"}),
            "a foreign audience",
        ),
        (json!({"sub": "u1", "exp": now + 600}), "no audience"),
    ] {
        let refused = http_status(gw, bearer(signed(&claims)), "/ws").await;
        assert_eq!(refused.unwrap_err(), 401, "{what}");
    }
    let good = json!({"sub": "u1", "exp": now + 600, "aud": "talkgroup", "nbf": now - 10});
    assert!(http_status(gw, bearer(signed(&good)), "/ws").await.is_ok());
    stack.stop.cancel();

    // A gateway with no audience configured serves none: a token that names one is for
    // somebody else (RFC 7519 4.1.3); one that names none is fine.
    let open = stack_with(1, 5_000, 60_000, |_| {}).await;
    let gw = open.gateways[0];
    let named = json!({"sub": "u1", "exp": now + 600, "aud": "elsewhere"});
    assert_eq!(
        http_status(gw, bearer(signed(&named)), "/ws")
            .await
            .unwrap_err(),
        401
    );
    let unnamed = json!({"sub": "u1", "exp": now + 600});
    assert!(
        http_status(gw, bearer(signed(&unnamed)), "/ws")
            .await
            .is_ok()
    );
    open.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_oversized_frames_close_with_their_rfc_6455_codes() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let stack = stack(1, 5_000, 60_000).await;
    let gw = stack.gateways[0];
    let mut bad_text = client(gw, "u-utf8", "Utf8").await;
    let frame = Frame::message(vec![0xff, 0xfe, 0x80], OpCode::Data(Data::Text), true);
    bad_text.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(bad_text.close_code().await, 1007);
    let mut big = client(gw, "u-big", "Big").await;
    big.ws
        .send(Message::Text("x".repeat(300 * 1024).into()))
        .await
        .unwrap();
    assert_eq!(big.close_code().await, 1009);
    // Others are unaffected.
    let mut fine = client(gw, "u-fine", "Fine").await;
    assert_eq!(fine.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

/// A WebSocket whose client never reads: a 4 KiB receive buffer, so the server's writes stall
/// soon. Returns the write half; the read half is kept unread until the end of the test.
async fn never_reading(
    addr: SocketAddr,
    sub: &str,
    name: &str,
) -> (
    futures::stream::SplitSink<tokio_tungstenite::WebSocketStream<TcpStream>, Message>,
    futures::stream::SplitStream<tokio_tungstenite::WebSocketStream<TcpStream>>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    let bearer = format!("Bearer {}", token(sub, name, 600, SECRET));
    request
        .headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    ws.split()
}

async fn connections(addr: SocketAddr) -> u64 {
    reqwest_health(addr).await["connections"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_closed_and_memory_stays_bounded() {
    const SLOW: usize = 20;
    const OUTBOX: usize = 64 * 1024;
    let mut stack = stack_with(1, 5_000, 60_000, |c| {
        c.outbox_bytes = OUTBOX;
        c.write_timeout_ms = 1_000;
        c.request_rate = 10_000;
    })
    .await;
    let gw = stack.gateways[0];
    // Two ordinary users in the crowded channel: one talks, the other listens.
    let mut talker = client(gw, "u-talker", "Talker").await;
    let mut listener = client(gw, "u-listener", "Listener").await;
    talker
        .ok("join-channel", json!({"channelId": "crowd"}))
        .await;
    listener
        .ok("join-channel", json!({"channelId": "crowd"}))
        .await;

    // Slow clients with long names join too, so every channel state is several KiB.
    let long = "n".repeat(60);
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let (mut write, read) =
            never_reading(gw, &format!("u-slow-{i}"), &format!("{long}{i}")).await;
        let join = json!({"type": "join-channel", "id": "j", "data": {"channelId": "crowd"}});
        write
            .send(Message::Text(join.to_string().into()))
            .await
            .unwrap();
        slow.push((write, read));
    }
    // Other tests' stacks in this process would move its RSS too.
    let _alone = stack.alone().await;
    let rss_before = testkit::process_rss_kib("self");

    // Each slow client asks for the channel state (about 5 KiB) 400 times: 2 MB each, which a
    // gateway holding every reply would keep.
    let spam = slow.into_iter().map(|(mut write, read)| {
        tokio::spawn(async move {
            let join = json!({"type": "join-channel", "id": "j", "data": {"channelId": "crowd"}});
            for _ in 0..400 {
                if write
                    .send(Message::Text(join.to_string().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            (write, read)
        })
    });
    let spam: Vec<_> = spam.collect();

    // Meanwhile the ordinary users are served as usual.
    let granted = talker
        .request("ptt-start", json!({"channelId": "crowd"}))
        .await;
    assert_eq!(granted["data"]["granted"], true, "{granted}");
    let changed = listener.speaker_changed("granted").await;
    assert_eq!(changed["data"]["speaker"]["userId"], "u-talker");
    talker.ok("ptt-stop", json!({"channelId": "crowd"})).await;

    let mut peak = 0u64;
    wait_until(Duration::from_secs(20), "slow clients closed", || {
        peak = peak.max(testkit::process_rss_kib("self"));
        async move { connections(gw).await == 2 }
    })
    .await
    .unwrap();
    let mut kept = Vec::new();
    for task in spam {
        kept.push(task.await.unwrap());
    }
    // Bounded: the outboxes hold at most 64 KiB each; a gateway keeping every reply would
    // grow by 40 MB.
    let growth_kib = peak.saturating_sub(rss_before);
    eprintln!("RSS growth with {SLOW} clients that never read: {growth_kib} KiB");
    assert!(
        growth_kib < 16 * 1024,
        "RSS grew {growth_kib} KiB with {SLOW} clients that never read"
    );
    assert_eq!(listener.request("ping", json!({})).await["type"], "pong");
    let metrics = http_get(stack.metrics[0], "/metrics").await;
    assert!(
        metrics.contains(&format!("ptt_gateway_slow_clients_total {SLOW}")),
        "{metrics}"
    );
    drop(kept);
    stack.stop.cancel();
}

/// A bare HTTP/1.1 GET; the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Reads until the server closes the connection; how long that took.
async fn closed_after(stream: &mut TcpStream) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("closed within 10 s")
        {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_requests_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let stack = stack_with(1, 5_000, 60_000, |c| c.header_timeout_ms = 500).await;
    let gw = stack.gateways[0];
    let mut silent = TcpStream::connect(gw).await.unwrap();
    let mut half = TcpStream::connect(gw).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // An idle keep-alive connection after one answered request.
    let mut idle = TcpStream::connect(gw).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut member = client(gw, "u-member", "Member").await;
    for stream in [&mut silent, &mut half, &mut idle] {
        let after = closed_after(stream).await;
        assert!(after < Duration::from_secs(3), "closed after {after:?}");
    }
    // WebSockets are not HTTP requests any more: they stay.
    assert_eq!(member.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_global_limit_are_closed_at_accept() {
    let mut stack = stack_with(1, 5_000, 60_000, |c| c.max_connections = 3).await;
    let _alone = stack.alone().await;
    let gw = stack.gateways[0];
    let mut a = client(gw, "u-a", "A").await;
    let b = client(gw, "u-b", "B").await;
    let _c = client(gw, "u-c", "C").await;
    let mut fourth = TcpStream::connect(gw).await.unwrap();
    let after = closed_after(&mut fourth).await;
    assert!(after < Duration::from_secs(1), "closed after {after:?}");
    // The sockets holding the slots are served; one closing frees its slot.
    assert_eq!(a.request("ping", json!({})).await["type"], "pong");
    drop(b);
    wait_until(Duration::from_secs(5), "a freed slot", || async move {
        connections(gw).await == 2
    })
    .await
    .unwrap();
    let mut d = client(gw, "u-d", "D").await;
    assert_eq!(d.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

/// A token signed with the HS256 secret `secret`, naming key `kid`.
fn token_with_kid(sub: &str, kid: &str, secret: &[u8]) -> String {
    let claims = json!({"sub": sub, "exp": now_s() + 600, "grants": {"*": "talk"}});
    let header = jsonwebtoken::Header {
        kid: Some(kid.into()),
        ..Default::default()
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_named_by_kid_rotate_without_dropping_anyone() {
    const FIRST: &[u8] = b"first-rotation-secret-0123456789";
    const SECOND: &[u8] = b"second-rotation-secret-012345678";
    // The EC key of EC_PUBLIC, as a JWK.
    let ec = json!({"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
        "x": "SJZzl0MI7XQ_MxjjoNI2tmu-8nB3ngshWtjw-NqOc1A",
        "y": "dWoWBNzg942Yj5T-erYm2uFmyGEd8EsaIXMrRk0gJo0"});
    let oct = |kid: &str, k: &str| json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": k});
    let first = oct("hs-1", "Zmlyc3Qtcm90YXRpb24tc2VjcmV0LTAxMjM0NTY3ODk");
    let second = oct("hs-2", "c2Vjb25kLXJvdGF0aW9uLXNlY3JldC0wMTIzNDU2Nzg");
    let dir = std::env::temp_dir().join(format!("tg-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(&path, json!({"keys": [first, ec]}).to_string()).unwrap();
    let jwks = path.clone();
    let stack = stack_with(1, 5_000, 60_000, move |c| {
        c.jwt_secret = None;
        c.jwt_jwks = Some(jwks.clone());
        c.jwt_jwks_check_ms = 100;
    })
    .await;
    let gw = stack.gateways[0];
    let at = |token: String| format!("/ws?token={token}");
    let es = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("ec-1".into());
        let claims = json!({"sub": "u-es", "exp": now_s() + 600});
        let key = jsonwebtoken::EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    assert!(
        http_status(gw, |_| {}, &at(es)).await.is_ok(),
        "ES256 by kid"
    );
    for (token, what) in [
        (
            token_with_kid("u1", "hs-2", SECOND),
            "a kid not published yet",
        ),
        (
            token("u1", "One", 600, "first-rotation-secret-0123456789"),
            "no kid",
        ),
        (
            token_with_kid("u1", "ec-1", FIRST),
            "HS256 naming the EC key",
        ),
        (
            token_with_kid("u1", "hs-1", SECOND),
            "the wrong secret for the kid",
        ),
    ] {
        assert_eq!(
            http_status(gw, |_| {}, &at(token)).await.unwrap_err(),
            401,
            "{what}"
        );
    }
    let mut old = Client::connect(gw, &token_with_kid("u-old", "hs-1", FIRST)).await;

    // Rotation: the new key is published, then the old one withdrawn.
    std::fs::write(&path, json!({"keys": [first, second]}).to_string()).unwrap();
    wait_until(Duration::from_secs(5), "the new key", || async {
        http_status(gw, |_| {}, &at(token_with_kid("u2", "hs-2", SECOND)))
            .await
            .is_ok()
    })
    .await
    .unwrap();
    std::fs::write(&path, json!({"keys": [second]}).to_string()).unwrap();
    wait_until(Duration::from_secs(5), "the old key withdrawn", || async {
        http_status(gw, |_| {}, &at(token_with_kid("u3", "hs-1", FIRST)))
            .await
            .is_err()
    })
    .await
    .unwrap();
    // A broken file keeps the keys as they were.
    let failed_reloads = || async {
        let metrics = http_get(stack.metrics[0], "/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"ptt_gateway_key_set_reloads_total{result="failed"} "#))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let failed_before = failed_reloads().await;
    std::fs::write(&path, "{not a key set").unwrap();
    wait_until(
        Duration::from_secs(5),
        "the failed reload counted",
        || async { failed_reloads().await > failed_before },
    )
    .await
    .unwrap();
    assert!(
        http_status(gw, |_| {}, &at(token_with_kid("u4", "hs-2", SECOND)))
            .await
            .is_ok()
    );
    // The socket signed with the withdrawn key stays until its token's exp.
    assert_eq!(old.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_per_user_socket_address_and_channel_get_their_codes() {
    let stack = stack_full(
        1,
        5_000,
        60_000,
        |s| {
            s.max_sessions_per_user = 2;
            s.max_channels_per_user = 3;
            s.max_members_per_channel = 3;
        },
        |c| {
            c.max_channels_per_socket = 2;
            c.max_sockets_per_address = 6;
        },
    )
    .await;
    let gw = stack.gateways[0];
    // A bystander in a channel of its own, watching it: its pushes keep coming throughout.
    let mut by = client(gw, "u-by", "By").await;
    by.ok("join-channel", json!({"channelId": "by-ch"})).await;

    // Sessions per user: the third socket of a user closes with 4003.
    // Each socket's session is created after its upgrade: the first two must hold theirs (a
    // ping is answered only once it does) before the third asks, or any one of the three
    // could be the one refused.
    let mut a1 = client(gw, "u-ana", "Ana").await;
    assert_eq!(a1.request("ping", json!({})).await["type"], "pong");
    let mut a2 = client(gw, "u-ana", "Ana").await;
    assert_eq!(a2.request("ping", json!({})).await["type"], "pong");
    let mut a3 = client(gw, "u-ana", "Ana").await;
    assert_eq!(a3.close_code().await, 4003);
    drop(a3);

    // Channels per socket, then per user across sockets.
    a1.ok("join-channel", json!({"channelId": "c1"})).await;
    a1.ok("join-channel", json!({"channelId": "c2"})).await;
    let refused = a1.request("join-channel", json!({"channelId": "c3"})).await;
    assert_eq!(refused["error"]["code"], "LIMIT_EXCEEDED", "{refused}");
    assert_eq!(
        refused["error"]["message"],
        "too many channels on this socket"
    );
    a2.ok("join-channel", json!({"channelId": "c3"})).await;
    let refused = a2.request("join-channel", json!({"channelId": "c4"})).await;
    assert_eq!(refused["error"]["code"], "LIMIT_EXCEEDED", "{refused}");
    assert_eq!(
        refused["error"]["message"],
        "too many channels for this user"
    );
    a2.ok("join-channel", json!({"channelId": "c3"})).await;

    // Members per channel (3): Ana's socket and two others fill c1; the next is refused.
    let mut bo = client(gw, "u-bo", "Bo").await;
    let mut cai = client(gw, "u-cai", "Cai").await;
    bo.ok("join-channel", json!({"channelId": "c1"})).await;
    cai.ok("join-channel", json!({"channelId": "c1"})).await;
    let full = by.request("join-channel", json!({"channelId": "c1"})).await;
    assert_eq!(full["error"]["code"], "LIMIT_EXCEEDED", "{full}");
    assert_eq!(full["error"]["message"], "the channel is full");

    // Sockets per address: by, a1, a2, bo, cai hold five; the sixth is the last allowed.
    wait_until(
        Duration::from_secs(5),
        "the refused socket gone",
        || async { connections(gw).await == 5 },
    )
    .await
    .unwrap();
    let _sixth = client(gw, "u-dee", "Dee").await;
    let bearer = token("u-eve", "Eve", 600, SECRET);
    let refused = http_status(gw, |_| {}, &format!("/ws?token={bearer}")).await;
    assert_eq!(refused.unwrap_err(), 429);

    // The bystander was served as usual all along.
    let pressed = by.request("ptt-start", json!({"channelId": "by-ch"})).await;
    assert_eq!(pressed["data"]["granted"], true, "{pressed}");
    assert_eq!(by.request("ping", json!({})).await["type"], "pong");
    let metrics = http_get(stack.metrics[0], "/metrics").await;
    for reason in ["sessions-per-user", "sockets-per-address"] {
        assert!(
            metrics.contains(&format!(
                "ptt_gateway_refused_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_past_the_gateways_streams_are_refused_and_others_keep_their_pushes() {
    // Two streams of two channels each: the gateway follows four channels at most.
    let stack = stack_with(1, 5_000, 60_000, |c| {
        c.watch_streams = 2;
        c.watch_channels_per_stream = 2;
        c.max_connections = 1_000;
    })
    .await;
    let gw = stack.gateways[0];
    let mut hog = client(gw, "u-hog", "Hog").await;
    for ch in ["c1", "c2", "c3", "c4"] {
        hog.ok("join-channel", json!({"channelId": ch})).await;
    }
    // A fifth channel is refused, and the shared streams are untouched.
    let mut other = client(gw, "u-other", "Other").await;
    let refused = other
        .request("join-channel", json!({"channelId": "c5"}))
        .await;
    assert_eq!(refused["error"]["code"], "LIMIT_EXCEEDED", "{refused}");
    assert_eq!(
        refused["error"]["message"],
        "this gateway follows too many channels"
    );
    // Channels on both streams still deliver: listeners in c1 and c4 hear the floor changes.
    let mut first = client(gw, "u-first", "First").await;
    let mut last = client(gw, "u-last", "Last").await;
    first.ok("join-channel", json!({"channelId": "c1"})).await;
    last.ok("join-channel", json!({"channelId": "c4"})).await;
    for (ch, listener) in [("c1", &mut first), ("c4", &mut last)] {
        let pressed = hog.request("ptt-start", json!({"channelId": ch})).await;
        assert_eq!(pressed["data"]["granted"], true, "{pressed}");
        let changed = listener.speaker_changed("granted").await;
        assert_eq!(changed["data"]["channelId"], ch);
    }
    // Room comes back when a channel is no longer followed here.
    hog.ok("leave-channel", json!({"channelId": "c2"})).await;
    other.ok("join-channel", json!({"channelId": "c5"})).await;
    let mut fifth = client(gw, "u-fifth", "Fifth").await;
    fifth.ok("join-channel", json!({"channelId": "c5"})).await;
    let pressed = other.request("ptt-start", json!({"channelId": "c5"})).await;
    assert_eq!(pressed["data"]["granted"], true, "{pressed}");
    assert_eq!(
        fifth.speaker_changed("granted").await["data"]["channelId"],
        "c5"
    );
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_whose_session_vanished_is_closed_with_4004() {
    use talkgroup_proto::state::v1 as spb;
    // Sessions live 3 s untouched, so gateways touch them every second.
    let stack = stack_full(1, 5_000, 60_000, |s| s.session_ttl_ms = 3_000, |_| {}).await;
    let gw = stack.gateways[0];
    let mut kept = client(gw, "u-kept", "Kept").await;
    let mut sessions = spb::session_service_client::SessionServiceClient::new(
        TestPki::global().channel(stack.state, &Identity::Gateway, Identity::State),
    );
    // Twice: the second time long after the gateway's watches are up, so the periodic touch
    // is what finds it.
    for user in ["u-gone", "u-gone-later"] {
        let mut gone = client(gw, user, "Gone").await;
        assert_eq!(gone.request("ping", json!({})).await["type"], "pong");
        // The session is removed behind the gateway's back (as a kick whose event it
        // missed, or a store that lost it, would).
        let listed = sessions
            .list_user_sessions(spb::ListUserSessionsRequest {
                user_id: user.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let started = std::time::Instant::now();
        sessions
            .remove_session(spb::RemoveSessionRequest {
                session_id: listed.sessions[0].session_id.clone(),
                generation: None,
            })
            .await
            .unwrap();
        assert_eq!(gone.close_code().await, 4004);
        let after = started.elapsed();
        assert!(
            after < Duration::from_secs(3),
            "closed {after:?} after the removal"
        );
    }
    assert_eq!(kept.request("ping", json!({})).await["type"], "pong");
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_are_capped_per_user_across_sockets() {
    let stack = stack_with(1, 5_000, 60_000, |c| c.max_transports_per_user = 3).await;
    let gw = stack.gateways[0];
    let mut one = client(gw, "u-ana", "Ana").await;
    let mut two = client(gw, "u-ana", "Ana").await;
    let mut other = client(gw, "u-bo", "Bo").await;
    for c in [&mut one, &mut two, &mut other] {
        c.ok("join-channel", json!({"channelId": "ops"})).await;
    }
    let recv = json!({"channelId": "ops", "direction": "recv"});
    one.ok("create-transport", recv.clone()).await;
    one.ok("create-transport", recv.clone()).await;
    two.ok("create-transport", recv.clone()).await;
    let refused = two.request("create-transport", recv.clone()).await;
    assert_eq!(refused["error"]["code"], "LIMIT_EXCEEDED", "{refused}");
    assert_eq!(
        refused["error"]["message"],
        "too many transports for this user"
    );
    // Another user is not affected; a closed socket gives its places back. (A lost one keeps
    // them for its resume's grace period: its transports still exist.)
    other.ok("create-transport", recv.clone()).await;
    one.ws.close(None).await.unwrap();
    wait_until(Duration::from_secs(5), "one socket closed", || async {
        connections(gw).await == 2
    })
    .await
    .unwrap();
    two.ok("create-transport", recv).await;
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_credentials_go_to_users_with_a_role_and_match_the_relay_s_secret() {
    let secret = "a-turn-secret-shared-with-coturn";
    let dir = std::env::temp_dir().join(format!("gateway-turn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("turn-secret");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let urls = vec![
        "turn:127.0.0.1:3478?transport=udp".to_owned(),
        "turns:127.0.0.1:5349?transport=tcp".to_owned(),
    ];
    let configured = urls.clone();
    let stack = stack_with(1, 5_000, 60_000, move |c| {
        c.turn_urls = configured.clone();
        c.turn_secret_file = Some(file.clone());
        c.turn_ttl_s = 600;
    })
    .await;
    let gw = stack.gateways[0];
    let mut ana = client(gw, "u-ana", "Ana").await;
    let before = now_s() as u64;
    let reply = ana.ok("get-ice-servers", json!({})).await;
    let server = &reply["iceServers"][0];
    assert_eq!(server["urls"], json!(urls));
    let username = server["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "u-ana");
    let expiry: u64 = expiry.parse().unwrap();
    assert!(
        (before + 600..=now_s() as u64 + 600).contains(&expiry),
        "{expiry}"
    );
    assert_eq!(reply["expiresAt"], json!(expiry * 1000));
    // The password coturn computes from its static-auth-secret.
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let expected = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(ring::hmac::sign(&key, username.as_bytes()).as_ref())
    };
    assert_eq!(server["credential"], expected.as_str());
    // create-transport carries the same relays.
    ana.ok("join-channel", json!({"channelId": "ops"})).await;
    let created = ana
        .ok(
            "create-transport",
            json!({"channelId": "ops", "direction": "recv"}),
        )
        .await;
    assert_eq!(created["iceServers"][0]["urls"], json!(urls));

    // A user whose token ends in two minutes gets credentials that end with it, not in ten.
    let short_exp = now_s() + 120;
    let short = signed(&json!({"sub": "u-short", "exp": short_exp, "grants": {"*": "listen"}}));
    let mut brief = Client::connect(gw, &short).await;
    let reply = brief.ok("get-ice-servers", json!({})).await;
    assert_eq!(
        reply["iceServers"][0]["username"],
        format!("{short_exp}:u-short")
    );
    assert_eq!(reply["expiresAt"], json!(short_exp * 1000));

    // A user with no role in any channel gets none.
    let nobody = signed(&json!({"sub": "u-none", "exp": now_s() + 600, "grants": {}}));
    let mut none = Client::connect(gw, &nobody).await;
    let refused = none.request("get-ice-servers", json!({})).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    stack.stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_relays_the_ice_server_list_is_empty() {
    let stack = stack(1, 5_000, 60_000).await;
    let mut ana = client(stack.gateways[0], "u-ana", "Ana").await;
    let reply = ana.ok("get-ice-servers", json!({})).await;
    assert_eq!(reply, json!({"iceServers": []}));
    stack.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_the_media_node_refuses_as_stale_is_not_reported_granted() {
    use talkgroup_proto::media::v1 as mpb;
    use talkgroup_proto::state::v1 as spb;
    let stack = stack(1, 5_000, 60_000).await;
    let mut ana = client(stack.gateways[0], "u-ana", "Ana").await;
    ana.request("join-channel", json!({"channelId": "stale"}))
        .await;
    let first = ana
        .request("ptt-start", json!({"channelId": "stale"}))
        .await;
    assert_eq!(first["data"]["granted"], true, "{first}");
    let epoch = first["data"]["epoch"].as_u64().unwrap();
    ana.request("ptt-stop", json!({"channelId": "stale"})).await;
    // The node learns of a decision a second ahead of the epoch clock (as when state-svc's
    // epochs went backwards after a failover): every grant state-svc makes for the next second
    // is older than what the node holds.
    let mut media = mpb::media_service_client::MediaServiceClient::new(TestPki::global().channel(
        stack.media,
        &Identity::Gateway,
        Identity::Media("media-gw-test".into()),
    ));
    let ahead = media
        .set_floor(mpb::SetFloorRequest {
            channel_id: "stale".into(),
            producer_id: String::new(),
            epoch: epoch + 1_000_000,
            expires_at_ms: 0,
            lease_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ahead.applied);
    let refused = ana
        .request("ptt-start", json!({"channelId": "stale"}))
        .await;
    assert_eq!(refused["error"]["code"], "UNAVAILABLE", "{refused}");
    // The stale grant was given back: nobody holds the floor.
    let mut floors = spb::floor_service_client::FloorServiceClient::new(TestPki::global().channel(
        stack.state,
        &Identity::Gateway,
        Identity::State,
    ));
    let floor = floors
        .get_floor(spb::GetFloorRequest {
            channel_id: "stale".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(floor.holder.is_none(), "{floor:?}");
    // Once the epoch clock passes the node's, presses are granted again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = ana
            .request("ptt-start", json!({"channelId": "stale"}))
            .await;
        if reply["data"]["granted"] == true {
            break;
        }
        assert_eq!(reply["error"]["code"], "UNAVAILABLE", "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused after the epoch clock passed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stack.stop.cancel();
}

/// A WebSocket upgrade from a socket bound to `local` (another loopback address is another
/// source), with `forwarded` as `X-Forwarded-For` when given; the socket, or the HTTP status
/// it was refused with.
async fn socket_from(
    gw: SocketAddr,
    local: &str,
    forwarded: Option<&str>,
    sub: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(gw).await.unwrap();
    let bearer = token(sub, sub, 600, SECRET);
    let mut request = format!("ws://{gw}/ws?token={bearer}")
        .into_client_request()
        .unwrap();
    if let Some(forwarded) = forwarded {
        request
            .headers_mut()
            .insert("x-forwarded-for", forwarded.parse().unwrap());
    }
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((socket, _)) => Ok(socket),
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("unexpected {e}"),
    }
}

/// One host opens connections and sends nothing, as keep-alive HTTP would hold them: past
/// its source's budget they are closed at accept, and another source still gets its socket
/// (with one budget for the whole gateway, the host would have taken every slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_s_idle_connections_cannot_lock_out_another() {
    let mut stack = stack_with(1, 5_000, 60_000, |c| {
        c.max_connections = 8;
        c.max_connections_per_address = 4;
        c.max_sockets_per_address = 2;
    })
    .await;
    let _alone = stack.alone().await;
    let gw = stack.gateways[0];
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(gw).await.unwrap());
    }
    for stream in idle.iter_mut().skip(4) {
        let after = closed_after(stream).await;
        assert!(after < Duration::from_secs(1), "closed after {after:?}");
    }
    let mut other = socket_from(gw, "127.0.0.2", None, "u-other")
        .await
        .expect("another source's socket");
    other
        .send(Message::text(
            json!({"type": "ping", "id": "p"}).to_string(),
        ))
        .await
        .unwrap();
    // The session push comes first, then the answer.
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(frame)) = other.next().await {
            if frame.to_text().unwrap_or_default().contains("\"pong\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(answered, Ok(true), "another source's ping answered");
    let metrics = http_get(stack.metrics[0], "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("reason=\"connections-per-address\"") && l.ends_with(" 6")),
        "{metrics}"
    );
    stack.stop.cancel();
}

/// Behind a trusted proxy, 500 staff of a venue share one address: an allowance for its
/// block lets them all in, while an address without one is still capped at
/// `--max-sockets-per-address`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_venue_behind_a_trusted_proxy_holds_500_sockets_and_others_stay_capped() {
    let mut stack = stack_with(1, 5_000, 60_000, |c| {
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        c.source_allowances = vec!["10.0.0.0/8=600".parse().unwrap()];
        c.max_sockets_per_address = 100;
    })
    .await;
    let _alone = stack.alone().await;
    let gw = stack.gateways[0];
    let mut venue = Vec::new();
    for i in 0..500 {
        let socket = socket_from(gw, "127.0.0.1", Some("10.20.30.40"), &format!("u-v{i}"))
            .await
            .unwrap_or_else(|status| panic!("venue socket {i} refused with {status}"));
        venue.push(socket);
    }
    let mut outside = Vec::new();
    for i in 0..100 {
        outside.push(
            socket_from(gw, "127.0.0.1", Some("203.0.113.9"), &format!("u-o{i}"))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        socket_from(gw, "127.0.0.1", Some("203.0.113.9"), "u-o100")
            .await
            .err(),
        Some(429)
    );
    // A client cannot pick its address: only the entry the proxy appended counts.
    assert_eq!(
        socket_from(gw, "127.0.0.1", Some("10.1.1.1, 203.0.113.9"), "u-o101")
            .await
            .err(),
        Some(429)
    );
    stack.stop.cancel();
}

/// A media node's certificate is good for its own node id only: when the registry names node
/// `media-x` at an address where another node (`media-gw-test`) answers, the gateway refuses
/// that node's certificate and the client gets UNAVAILABLE, instead of sending its media to
/// whichever media node answers at the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_dials_a_media_node_only_under_the_node_id_the_registry_names() {
    use talkgroup_proto::state::v1 as spb;
    let stack = stack(1, 5_000, 60_000).await;
    let gw = stack.gateways[0];
    let registry = |node: &str| {
        spb::media_registry_service_client::MediaRegistryServiceClient::new(
            TestPki::global().channel(stack.state, &Identity::Media(node.into()), Identity::State),
        )
    };
    registry("media-x")
        .register_node(spb::RegisterNodeRequest {
            node: Some(spb::MediaNode {
                node_id: "media-x".into(),
                grpc_addr: format!("http://{}", stack.media),
                announced_ip: "127.0.0.1".into(),
                capacity: 100,
                load: 0,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // The real node drains itself, so the next channel goes to "media-x".
    registry("media-gw-test")
        .drain_node(spb::DrainNodeRequest {
            node_id: "media-gw-test".into(),
        })
        .await
        .unwrap();
    let mut a = client(gw, "u-pin", "Pin").await;
    a.ok("join-channel", json!({"channelId": "pinned"})).await;
    let refused = a
        .request(
            "create-transport",
            json!({"channelId": "pinned", "direction": "send"}),
        )
        .await;
    assert_eq!(refused["error"]["code"], "UNAVAILABLE", "{refused}");
    stack.stop.cancel();
}
