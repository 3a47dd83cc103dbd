//! state-svc's Prometheus metrics. Served on `--metrics-listen` as `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use talkgroup_common::metrics::Exposition;

use crate::hub::Hub;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Counters the API and the membership task update.
#[derive(Debug, Default)]
pub struct StateMetrics {
    pub floor_grants: Counter,
    pub floor_denials: Counter,
    pub floor_preemptions: Counter,
    pub floor_queued: Counter,
    pub emergencies: Counter,
    pub membership_updates: Family<Outcome, Counter>,
    watch_streams: Gauge,
    /// gRPC calls and connections refused by mutual TLS or the policy.
    pub refusals: talkgroup_common::authz::Refusals,
}

impl StateMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn membership_update(&self, outcome: &'static str) {
        self.membership_updates
            .get_or_create(&Outcome { outcome })
            .inc();
    }

    /// The registry and the refresh of its live gauges.
    pub fn exposition(self: &Arc<Self>, hub: Arc<Hub>) -> Exposition {
        let mut r = Registry::default();
        self.refusals.register(&mut r);
        r.register(
            "ptt_floor_grants",
            "Floor grants, pre-emptions and emergency takes included",
            self.floor_grants.clone(),
        );
        r.register(
            "ptt_floor_denials",
            "Floor requests denied because someone else held the floor",
            self.floor_denials.clone(),
        );
        r.register(
            "ptt_floor_preemptions",
            "Grants that interrupted a lower-priority holder",
            self.floor_preemptions.clone(),
        );
        r.register(
            "ptt_floor_queued",
            "Floor requests queued on channels with a queue",
            self.floor_queued.clone(),
        );
        r.register(
            "ptt_emergencies",
            "Emergency broadcasts started",
            self.emergencies.clone(),
        );
        r.register(
            "ptt_membership_updates",
            "Control-plane membership updates by outcome (applied, unchanged, refused)",
            self.membership_updates.clone(),
        );
        r.register(
            "ptt_store_errors",
            "State store calls that failed because the store was unreachable or too slow",
            crate::error::STORE_ERRORS.clone(),
        );
        r.register(
            "ptt_audit_backlog_entries",
            "Audit stream entries not yet copied to PostgreSQL, as of the audit writer's last look",
            crate::audit::AUDIT_BACKLOG.clone(),
        );
        r.register(
            "ptt_watch_streams",
            "Open Watch streams (gateways and media nodes following channels)",
            self.watch_streams.clone(),
        );
        let me = Arc::clone(self);
        Exposition::new(r, move || {
            me.watch_streams
                .set(i64::try_from(hub.subscriber_count()).unwrap_or(i64::MAX));
        })
    }
}
