//! What operators see: Prometheus `/metrics` on every service after real traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use talkgroup_e2e::{Stack, Topology, http_get};
use testkit::media::Tone;
use testkit::wait_until;

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await.expect("metrics reachable");
    assert_eq!(status, 200);
    body
}

/// The value of the first sample named `name` (labels allowed), or `None`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn assert_help(text: &str, name: &str) {
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 10),
        "{name} has no help text:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exposes_metrics_with_help_after_real_traffic() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    ana.join("ops").await;
    ben.join("ops").await;
    let mic = ana.speaker("ops").await;
    let (ear, _) = ben.listener("ops").await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    assert_eq!(ben.ptt_start("ops").await["granted"], false);
    Tone::new(440.0).play(&mic, 25).await;
    wait_until(Duration::from_secs(10), "audio", || async {
        ear.received_count() >= 20
    })
    .await
    .unwrap();
    let reply = ben
        .request("ptt-start", serde_json::json!({"channelId": "nowhere"}))
        .await;
    assert_eq!(reply["error"]["code"], "FORBIDDEN");

    let gateway = scrape(stack.gateway(0)).await;
    for name in [
        "ptt_gateway_requests",
        "ptt_gateway_errors",
        "ptt_floor_grants",
        "ptt_floor_denials",
        "ptt_press_to_grant_seconds",
        "ptt_gateway_connections",
        "ptt_gateway_channels",
    ] {
        assert_help(&gateway, name);
    }
    assert_eq!(sample(&gateway, "ptt_gateway_connections"), Some(2.0));
    assert_eq!(sample(&gateway, "ptt_floor_grants_total"), Some(1.0));
    assert_eq!(sample(&gateway, "ptt_floor_denials_total"), Some(1.0));
    assert_eq!(
        sample(&gateway, "ptt_press_to_grant_seconds_count"),
        Some(1.0)
    );
    assert!(
        gateway.contains(r#"ptt_gateway_errors_total{code="FORBIDDEN"} 1"#),
        "{gateway}"
    );
    assert!(
        gateway.contains(r#"ptt_gateway_requests_total{type="ptt-start"} 3"#),
        "{gateway}"
    );

    let state_addr = stack.state[0].logged_addr("metrics listening").unwrap();
    let state = scrape(state_addr).await;
    for name in [
        "ptt_floor_grants",
        "ptt_floor_denials",
        "ptt_store_errors",
        "ptt_watch_streams",
    ] {
        assert_help(&state, name);
    }
    assert_eq!(sample(&state, "ptt_floor_grants_total"), Some(1.0));
    assert_eq!(sample(&state, "ptt_floor_denials_total"), Some(1.0));
    assert_eq!(sample(&state, "ptt_store_errors_total"), Some(0.0));
    assert!(
        sample(&state, "ptt_watch_streams").unwrap() >= 2.0,
        "{state}"
    );

    let media_addr = stack.media[0].logged_addr("metrics listening").unwrap();
    wait_until(Duration::from_secs(5), "media sampler", || async move {
        sample(
            &scrape(media_addr).await,
            "ptt_media_packets_forwarded_total",
        )
        .is_some_and(|v| v >= 20.0)
    })
    .await
    .unwrap();
    let media = scrape(media_addr).await;
    for name in [
        "ptt_media_channels",
        "ptt_media_peer_connections",
        "ptt_media_load_ratio",
        "ptt_media_packets_forwarded",
        "ptt_media_packets_dropped_not_floor",
    ] {
        assert_help(&media, name);
    }
    assert_eq!(sample(&media, "ptt_media_peer_connections"), Some(2.0));
    assert_eq!(sample(&media, "ptt_media_channels"), Some(1.0));
}
