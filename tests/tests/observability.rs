//! What operators see: Prometheus `/metrics` on every service after real traffic, and one
//! OpenTelemetry trace following a `ptt-start` from the gateway through state-svc to the media
//! node, received by an OTLP collector running in this test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;

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

    let gateway = scrape(stack.gateways[0].logged_addr("metrics listening").unwrap()).await;
    // The client-facing port does not serve metrics.
    let (status, _) = http_get(stack.gateway(0), "/metrics").await.unwrap();
    assert_eq!(status, 404, "metrics stay on the internal listener");
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
        "ptt_audit_backlog_entries",
    ] {
        assert_help(&state, name);
    }
    // No audit writer in this stack (no PostgreSQL): nothing waits.
    assert_eq!(sample(&state, "ptt_audit_backlog_entries"), Some(0.0));
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

/// One received span: (service, name, trace id, span id, parent span id).
type SpanRow = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);

/// An OTLP/gRPC trace collector that keeps what it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<SpanRow>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((
                        service.clone(),
                        span.name,
                        span.trace_id,
                        span.span_id,
                        span.parent_span_id,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_ptt_start_from_the_gateway_through_state_to_media() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let collector = Collector::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let stack = Stack::start(Topology {
        otlp_endpoint: Some(endpoint),
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    ana.join("ops").await;
    let _mic = ana.speaker("ops").await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);

    // The gateway's span of the request, and the state and media spans in the same trace.
    let spans = Arc::clone(&collector.spans);
    let found = wait_until(Duration::from_secs(15), "the ptt-start trace", || {
        let spans = Arc::clone(&spans);
        async move {
            let spans = spans.lock().unwrap();
            spans
                .iter()
                .filter(|s| s.0 == "signaling-svc" && s.1 == "ptt-start")
                .any(|root| {
                    let child = |service: &str, name: &str| {
                        spans.iter().any(|s| {
                            s.0 == service && s.1 == name && s.2 == root.2 && s.4 == root.3
                        })
                    };
                    child("state-svc", "/ptt.state.v1.FloorService/AcquireFloor")
                        && child("media-svc", "/ptt.media.v1.MediaService/SetFloor")
                })
        }
    })
    .await;
    if found.is_err() {
        let spans = collector.spans.lock().unwrap();
        let names: Vec<_> = spans.iter().map(|s| (&s.0, &s.1)).collect();
        panic!("no single trace across the services; spans received: {names:?}");
    }
}
