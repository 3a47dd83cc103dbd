//! The gateway's Prometheus metrics, served on its HTTP port as `GET /metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use talkgroup_common::metrics::Exposition;

use crate::hub::Hub;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestType {
    pub r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedBecause {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorCode {
    pub code: &'static str,
}

/// Press-to-grant buckets, in seconds: 0.5 ms to 1 s.
const PRESS_TO_GRANT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0,
];

#[derive(Debug)]
pub struct GatewayMetrics {
    pub requests: Family<RequestType, Counter>,
    pub errors: Family<ErrorCode, Counter>,
    pub floor_grants: Counter,
    pub floor_denials: Counter,
    pub floor_preemptions: Counter,
    pub press_to_grant: Histogram,
    pub permission_updates: Counter,
    /// Sockets closed because their client read too slowly (4002).
    slow_clients: Counter,
    /// TCP connections closed at accept, by why.
    refused: Family<RefusedBecause, Counter>,
    /// Re-reads of the JWT key set, by result.
    key_set_reloads: Family<Outcome, Counter>,
    /// Sessions parked and resumed, by result.
    resumes: Family<Outcome, Counter>,
    connections: Gauge,
    channels: Gauge,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            errors: Family::default(),
            floor_grants: Counter::default(),
            floor_denials: Counter::default(),
            floor_preemptions: Counter::default(),
            press_to_grant: Histogram::new(PRESS_TO_GRANT_BUCKETS),
            permission_updates: Counter::default(),
            slow_clients: Counter::default(),
            refused: Family::default(),
            key_set_reloads: Family::default(),
            resumes: Family::default(),
            connections: Gauge::default(),
            channels: Gauge::default(),
        }
    }
}

impl GatewayMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn request(&self, r#type: &'static str) {
        self.requests.get_or_create(&RequestType { r#type }).inc();
    }

    pub fn error(&self, code: &'static str) {
        self.errors.get_or_create(&ErrorCode { code }).inc();
    }

    pub fn slow_client(&self) {
        self.slow_clients.inc();
    }

    /// A connection or socket refused before it was served (`reason`: `max-connections`, ...).
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedBecause { reason }).inc();
    }

    /// A re-read of the JWT key set (`ok` or `failed`).
    pub fn key_set_reload(&self, result: &'static str) {
        self.key_set_reloads
            .get_or_create(&Outcome { result })
            .inc();
    }

    /// A session parked (`parked`), resumed (`resumed`), or a resume refused (`refused`) or
    /// failed on a backend (`failed`).
    pub fn resume(&self, result: &'static str) {
        self.resumes.get_or_create(&Outcome { result }).inc();
    }

    pub fn exposition(self: &Arc<Self>, hub: Arc<Hub>) -> Exposition {
        let mut r = Registry::default();
        r.register(
            "ptt_gateway_requests",
            "Client requests by type",
            self.requests.clone(),
        );
        r.register(
            "ptt_gateway_errors",
            "Error replies to clients by code",
            self.errors.clone(),
        );
        r.register(
            "ptt_floor_grants",
            "Floor grants to this gateway's clients",
            self.floor_grants.clone(),
        );
        r.register(
            "ptt_floor_denials",
            "Floor requests of this gateway's clients denied (busy)",
            self.floor_denials.clone(),
        );
        r.register(
            "ptt_floor_preemptions",
            "Grants to this gateway's clients that interrupted a lower-priority holder",
            self.floor_preemptions.clone(),
        );
        r.register(
            "ptt_press_to_grant_seconds",
            "Time from a ptt-start arriving to its granted reply, media node told",
            self.press_to_grant.clone(),
        );
        r.register(
            "ptt_permission_updates",
            "permission-update pushes sent",
            self.permission_updates.clone(),
        );
        r.register(
            "ptt_gateway_slow_clients",
            "Sockets closed because their client read too slowly (4002)",
            self.slow_clients.clone(),
        );
        r.register(
            "ptt_gateway_refused",
            "Connections and sockets refused by a limit, by reason",
            self.refused.clone(),
        );
        r.register(
            "ptt_gateway_key_set_reloads",
            "Re-reads of the JWT key set file after it changed, by result",
            self.key_set_reloads.clone(),
        );
        r.register(
            "ptt_gateway_resumes",
            "Sessions parked after a lost socket, and resumes by result",
            self.resumes.clone(),
        );
        r.register(
            "ptt_gateway_connections",
            "Open client WebSocket connections",
            self.connections.clone(),
        );
        r.register(
            "ptt_gateway_channels",
            "Channels this gateway follows for its clients",
            self.channels.clone(),
        );
        r.register(
            "ptt_gateway_topic_events",
            "Events received from state-svc's event plane, by topic kind (channel, user, sync)",
            hub.received(),
        );
        let me = Arc::clone(self);
        Exposition::new(r, move || {
            me.connections
                .set(i64::try_from(hub.connection_count()).unwrap_or(i64::MAX));
            me.channels
                .set(i64::try_from(hub.channel_count()).unwrap_or(i64::MAX));
        })
    }
}
