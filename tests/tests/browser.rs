//! The browser client in headless Chromium against the whole stack (separate processes): two
//! pages sign in with the development token endpoint and join a channel; one holds the space
//! bar and talks with Chromium's fake microphone, the other hears it (inbound RTP packets and
//! audio energy rise) and shows who is speaking. Screenshots of both pages are saved under
//! `target/e2e-artifacts/`. With `TALKGROUP_E2E_URL` set, the pages open that URL (a stack
//! started by `scripts/dev`, say) instead of a stack of their own.
//!
//! Another test has the gateway terminate TLS itself: Chromium trusts only the stack's test CA
//! (installed in its NSS database), loads the page over `https://` and talks over `wss://`.
//!
//! A second test runs Chromium in a network namespace whose nftables rules drop all UDP: the
//! pages reach the media node over ICE/TCP only, and still talk and hear.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;
use talkgroup_e2e::browser::{Browser, Launch, Page, artifact_dir};
use talkgroup_e2e::netns::{self, Netns};
use talkgroup_e2e::{Stack, Topology};

const WAIT: Duration = Duration::from_secs(20);

async fn sign_in_and_join(page: &Page, name: &str, channel: &str) {
    page.wait_for(
        "document.readyState === 'complete' && !!window.talkgroup",
        WAIT,
    )
    .await
    .unwrap();
    page.eval(&format!(
        "document.getElementById('name').value = {name:?};
         document.getElementById('signin-form').requestSubmit(); true"
    ))
    .await
    .unwrap();
    // The channel list comes from list-channels once the socket is open.
    let selector = format!("#channel-list button[data-channel={channel:?}]");
    page.wait_for(&format!("!!document.querySelector({selector:?})"), WAIT)
        .await
        .unwrap();
    page.eval(&format!(
        "document.querySelector({selector:?}).click(); true"
    ))
    .await
    .unwrap();
    page.wait_for(
        "document.getElementById('media').dataset.state === 'ready'",
        WAIT,
    )
    .await
    .unwrap();
}

async fn inbound(page: &Page) -> (f64, f64) {
    let v = page.eval("window.talkgroup.inboundAudio()").await.unwrap();
    (
        v["packetsReceived"].as_f64().unwrap_or(0.0),
        v["totalAudioEnergy"].as_f64().unwrap_or(0.0),
    )
}

/// False (and the test skips) only where skipping was asked for; otherwise a missing
/// Chromium fails the test: scripts/test installs it.
fn have_chromium() -> bool {
    if talkgroup_e2e::browser::chromium_path().is_some() {
        return true;
    }
    assert!(
        std::env::var("TALKGROUP_ALLOW_NO_BROWSER").is_ok(),
        "Chromium is not installed (apt-get install chromium), and \
         TALKGROUP_ALLOW_NO_BROWSER is not set"
    );
    false
}

/// Ana holds the space bar and talks; Ben's page receives her audio (packets and energy rise:
/// Chromium's fake microphone beeps).
async fn ana_talks_and_ben_hears(ana: &Page, ben: &Page) {
    let (quiet_packets, _) = inbound(ben).await;
    ana.key(true, " ", "Space", 32).await.unwrap();
    ana.wait_for(
        "document.getElementById('ptt').dataset.state === 'talking'",
        WAIT,
    )
    .await
    .unwrap();
    ben.wait_for(
        "document.getElementById('speaker').textContent === 'Ana is talking'",
        WAIT,
    )
    .await
    .unwrap();
    let script = format!(
        "window.talkgroup.inboundAudio().then(s => s && s.packetsReceived > {} + 50 && s.totalAudioEnergy > 0)",
        quiet_packets
    );
    ben.wait_for(&script, WAIT).await.unwrap();
    let (packets, energy) = inbound(ben).await;
    assert!(packets > quiet_packets + 50.0, "{packets} packets");
    assert!(energy > 0.0, "no audio energy");
}

/// Chromium in `ns`, with two pages (Ana and Ben) signed in to `stack`'s gateway and joined
/// to `ops`.
async fn pages_in(
    ns: &Netns,
    stack: &Stack,
    trust_ca: Option<std::path::PathBuf>,
) -> (Browser, Page, Page) {
    let origin = format!("http://{}", stack.gateway(0));
    let launch = Launch {
        netns: Some((ns.name.clone(), ns.ns_ip)),
        secure_origins: vec![origin.clone()],
        trust_ca,
    };
    let browser = tokio::task::spawn_blocking(move || Browser::launch_with(&launch))
        .await
        .unwrap()
        .unwrap();
    let cdp = browser.connect().await.unwrap();
    let ana = cdp.new_page(&format!("{origin}/")).await.unwrap();
    let ben = cdp.new_page(&format!("{origin}/")).await.unwrap();
    sign_in_and_join(&ana, "Ana", "ops").await;
    sign_in_and_join(&ben, "Ben", "ops").await;
    (browser, ana, ben)
}

/// False (and the test skips) only where skipping was asked for.
fn have_netns() -> bool {
    if netns::available() {
        return true;
    }
    assert!(
        std::env::var("TALKGROUP_ALLOW_NO_NETNS").is_ok(),
        "network namespaces need root, iproute2 and nftables, and \
         TALKGROUP_ALLOW_NO_NETNS is not set"
    );
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_on_a_network_without_udp_talk_and_hear_over_ice_tcp() {
    if !have_chromium() {
        return;
    }
    if !have_netns() {
        return;
    }
    let ns = Netns::create().unwrap();
    ns.block_udp().unwrap();
    let stack = Stack::start(Topology {
        gateway_args: vec!["--dev-tokens".into()],
        bind_ip: ns.host_ip.to_string(),
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let (browser, ana, ben) = pages_in(&ns, &stack, None).await;
    // Ana's send transport and Ben's receive transport both run over ICE/TCP.
    ana_talks_and_ben_hears(&ana, &ben).await;
    let metrics = stack.media[0].logged_addr("metrics listening").unwrap();
    testkit::wait_until(
        WAIT,
        "the media node to count ICE/TCP connections",
        || async move {
            talkgroup_e2e::http_get(metrics, "/metrics")
                .await
                .and_then(|(_, body)| {
                    body.lines()
                        .find_map(|l| l.strip_prefix("ptt_media_ice_tcp_connections "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .is_some_and(|open| open >= 2)
        },
    )
    .await
    .unwrap();
    let dropped = ns.dropped().unwrap();
    assert!(
        dropped > 0,
        "the namespace dropped no UDP: the test proves nothing"
    );
    eprintln!("UDP datagrams dropped in the namespace: {dropped}");
    ana.key(false, " ", "Space", 32).await.unwrap();
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_allowed_only_tcp_to_the_gateway_and_the_relay_talk_and_hear_through_turn() {
    talk_through_the_relay(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_allowed_only_the_relays_tls_port_talk_and_hear_through_turn_over_tls() {
    talk_through_the_relay(true).await;
}

/// Pages in a namespace that may open TCP to the gateway and to the relay (its TLS port with
/// `tls`), nothing else: no UDP, and not the media node's ICE/TCP port. Audio can only go
/// through coturn.
async fn talk_through_the_relay(tls: bool) {
    if !have_chromium() {
        return;
    }
    if !have_netns() {
        return;
    }
    let ns = Netns::create().unwrap();
    // The relay's throwaway certificate comes from a CA the browser is told to trust.
    let relay = talkgroup_e2e::relay::TestRelay::start(ns.host_ip, tls).unwrap();
    let stack = Stack::start(Topology {
        gateway_args: [vec!["--dev-tokens".into()], relay.gateway_args()].concat(),
        bind_ip: ns.host_ip.to_string(),
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    ns.allow_only_tcp_to(&[stack.gateway(0).port(), relay.port()])
        .unwrap();
    let (browser, ana, ben) = pages_in(&ns, &stack, Some(relay.ca.clone())).await;
    ana_talks_and_ben_hears(&ana, &ben).await;
    let dropped = ns.dropped().unwrap();
    assert!(
        dropped > 0,
        "the namespace dropped nothing: the test proves nothing"
    );
    eprintln!("packets dropped in the namespace: {dropped}");
    ana.key(false, " ", "Space", 32).await.unwrap();
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_talk_through_the_stack() {
    if !have_chromium() {
        return;
    }
    // TALKGROUP_E2E_URL points the test at a running stack (such as `scripts/dev`'s) instead.
    let (_stack, url) = match std::env::var("TALKGROUP_E2E_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let stack = Stack::start(Topology {
                gateway_args: vec!["--dev-tokens".into()],
                ..Topology::default()
            })
            .await
            .unwrap();
            stack.ready().await.unwrap();
            let url = format!("http://{}/", stack.gateway(0));
            (Some(stack), url)
        }
    };

    let browser = tokio::task::spawn_blocking(Browser::launch)
        .await
        .unwrap()
        .unwrap();
    let cdp = browser.connect().await.unwrap();
    let ana = cdp.new_page(&url).await.unwrap();
    let ben = cdp.new_page(&url).await.unwrap();
    sign_in_and_join(&ana, "Ana", "ops").await;
    sign_in_and_join(&ben, "Ben", "ops").await;
    // Each sees the other present.
    ana.wait_for(
        "document.querySelectorAll('#members li').length === 2",
        WAIT,
    )
    .await
    .unwrap();

    // Ana holds the space bar: granted, her button shows it, Ben sees her as the speaker and
    // hears her (he heard nothing before: the muted producers are not forwarded).
    ana_talks_and_ben_hears(&ana, &ben).await;

    // Ben's audio connection restarts its ICE, as after a network change: the same transport
    // gets new credentials (restart-ice) and the audio keeps coming.
    let (before, _) = inbound(&ben).await;
    ben.eval("window.talkgroup.restartIce().then(() => true)")
        .await
        .unwrap();
    ben.wait_for(
        "document.getElementById('media').dataset.state === 'ready'",
        WAIT,
    )
    .await
    .unwrap();
    ben.wait_for(
        &format!(
            "window.talkgroup.inboundAudio().then(s => s && s.packetsReceived > {before} + 50)"
        ),
        WAIT,
    )
    .await
    .unwrap();

    // Ben presses while Ana talks: denied, naming Ana.
    ben.key(true, " ", "Space", 32).await.unwrap();
    let denied = ben
        .wait_for("document.getElementById('denied').textContent", WAIT)
        .await
        .unwrap();
    assert_eq!(denied, Value::from("Denied: Ana is talking"));
    ben.key(false, " ", "Space", 32).await.unwrap();

    let dir = artifact_dir();
    ana.screenshot(&dir.join("browser-speaker.png"))
        .await
        .unwrap();
    ben.screenshot(&dir.join("browser-listener.png"))
        .await
        .unwrap();

    // Ana lets go: the floor is free on both pages.
    ana.key(false, " ", "Space", 32).await.unwrap();
    ben.wait_for(
        "document.getElementById('speaker').textContent === 'Nobody is talking'",
        WAIT,
    )
    .await
    .unwrap();
    ana.wait_for(
        "document.getElementById('ptt').dataset.state === 'idle'",
        WAIT,
    )
    .await
    .unwrap();
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_talk_and_hear_over_https_and_wss_with_a_test_ca() {
    if !have_chromium() {
        return;
    }
    let stack = Stack::start(Topology {
        gateway_args: vec!["--dev-tokens".into()],
        https: true,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let url = stack.gateway_url(0);
    assert!(url.starts_with("https://"), "{url}");
    let launch = Launch {
        trust_ca: Some(stack.certs.dir.join("ca.crt")),
        ..Launch::default()
    };
    let browser = tokio::task::spawn_blocking(move || Browser::launch_with(&launch))
        .await
        .unwrap()
        .unwrap();
    let cdp = browser.connect().await.unwrap();
    let ana = cdp.new_page(&url).await.unwrap();
    let ben = cdp.new_page(&url).await.unwrap();
    // A certificate Chromium did not trust would leave an error page without the client.
    sign_in_and_join(&ana, "Ana", "ops").await;
    sign_in_and_join(&ben, "Ben", "ops").await;
    for page in [&ana, &ben] {
        let secure = page
            .eval("location.protocol === 'https:' && window.isSecureContext")
            .await
            .unwrap();
        assert_eq!(secure, Value::from(true));
    }
    ana_talks_and_ben_hears(&ana, &ben).await;
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_hear_again_after_their_media_node_is_killed() {
    if !have_chromium() {
        return;
    }
    let mut stack = Stack::start(Topology {
        media: 2,
        gateway_args: vec!["--dev-tokens".into()],
        state_args: vec!["--node-dead-after-ms".into(), "1500".into()],
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let url = format!("http://{}/", stack.gateway(0));
    let browser = tokio::task::spawn_blocking(Browser::launch)
        .await
        .unwrap()
        .unwrap();
    let cdp = browser.connect().await.unwrap();
    let ana = cdp.new_page(&url).await.unwrap();
    let ben = cdp.new_page(&url).await.unwrap();
    sign_in_and_join(&ana, "Ana", "ops").await;
    sign_in_and_join(&ben, "Ben", "ops").await;
    ana_talks_and_ben_hears(&ana, &ben).await;

    // Ana keeps the space bar down while her channel's node dies: both pages make new
    // transports on the other node and Ben hears her again, with no new press.
    let dead = stack.media_index_of("ops").await.unwrap();
    stack.media[dead].kill();
    for page in [&ana, &ben] {
        page.wait_for(
            "document.getElementById('log').textContent === 'audio moved'",
            WAIT,
        )
        .await
        .unwrap();
    }
    assert_ne!(stack.media_index_of("ops").await.unwrap(), dead);
    ben.wait_for(
        "window.talkgroup.inboundAudio().then(s => s && s.packetsReceived > 50 && s.totalAudioEnergy > 0)",
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(
        ana.eval("document.getElementById('ptt').dataset.state")
            .await
            .unwrap(),
        Value::from("talking")
    );
    ana.key(false, " ", "Space", 32).await.unwrap();
    ben.wait_for(
        "document.getElementById('speaker').textContent === 'Nobody is talking'",
        WAIT,
    )
    .await
    .unwrap();
    drop(browser);
}
