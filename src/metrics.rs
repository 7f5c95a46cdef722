//! Prometheus metrics, served as text on the admin listener's `/metrics`.

use prometheus::{
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_with_registry, Encoder, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, Registry, TextEncoder,
};
use std::sync::LazyLock;

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

// Registration fails only for a duplicate or malformed name; the names below
// are fixed and distinct, so these `expect`s cannot fire.
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec_with_registry!(
        "portcullis_requests_total",
        "Requests by route, final status and decision.",
        &["route", "status", "decision"],
        REGISTRY
    )
    .expect("static metric")
});

/// Latency buckets, in seconds, from 50 µs to a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn latency_histogram(name: &str, help: &str, label: &str) -> HistogramVec {
    register_histogram_vec_with_registry!(name, help, &[label], LATENCY_BUCKETS.to_vec(), REGISTRY)
        .expect("static metric")
}

pub static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    latency_histogram(
        "portcullis_request_duration_seconds",
        "Whole request time at the gateway, by route.",
        "route",
    )
});

pub static UPSTREAM_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    latency_histogram(
        "portcullis_upstream_duration_seconds",
        "Time to the provider's response headers, by provider.",
        "provider",
    )
});

pub static FILTER_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    latency_histogram(
        "portcullis_filter_duration_seconds",
        "Time spent in each filter.",
        "filter",
    )
});

pub static AUDIT_QUEUE_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "portcullis_audit_queue_depth",
        "Audit records waiting for the writer.",
        REGISTRY
    )
    .expect("static metric")
});

pub static AUDIT_RECORDS_WRITTEN: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "portcullis_audit_records_written_total",
        "Audit records written.",
        REGISTRY
    )
    .expect("static metric")
});

pub static AUDIT_WRITE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "portcullis_audit_write_errors_total",
        "Failed attempts to write audit records (they are retried).",
        REGISTRY
    )
    .expect("static metric")
});

pub static AUDIT_SINK_FAILING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "portcullis_audit_sink_failing",
        "1 while an audit sink cannot be written (records are held and retried; with on_error: deny new requests get 503 audit_unavailable).",
        REGISTRY
    )
    .expect("static metric")
});

pub static AUDIT_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "portcullis_audit_dropped_total",
        "Audit records dropped because the writer's queue was full (an audit_gap record says how many).",
        REGISTRY
    )
    .expect("static metric")
});

pub static POLICY_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec_with_registry!(
        "portcullis_policy_reloads_total",
        "Policy reloads (SIGHUP or POST /admin/reload) by result: ok, or failed (every old policy kept).",
        &["result"],
        REGISTRY
    )
    .expect("static metric")
});

pub static CONNECTIONS_OPEN: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "portcullis_connections_open",
        "Client connections open on the proxy listener.",
        REGISTRY
    )
    .expect("static metric")
});

pub static CONNECTIONS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "portcullis_connections_refused_total",
        "Client connections closed at once because limits.max_connections were open.",
        REGISTRY
    )
    .expect("static metric")
});

pub static HEADER_TIMEOUTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "portcullis_header_timeouts_total",
        "Connections cut off because a request's headers took longer than limits.header_timeout_secs.",
        REGISTRY
    )
    .expect("static metric")
});

pub static PANICS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter_with_registry!(
        "portcullis_panics_total",
        "Requests whose handling panicked (answered 500 internal_error and audited).",
        REGISTRY
    )
    .expect("static metric")
});

pub static GUARD_BREAKER: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge_with_registry!(
        "portcullis_guard_breaker_state",
        "The guard model's circuit breaker: 0 closed, 1 half-open (a probe is allowed), 2 open (calls are not made).",
        REGISTRY
    )
    .expect("static metric")
});

/// What became of approvals (`filters::approval`), by event.
pub const APPROVAL_EVENTS: [&str; 7] = [
    "held",
    "approved",
    "denied",
    "handed_out",
    "refused",
    "webhook_sent",
    "webhook_failed",
];

pub static APPROVALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec_with_registry!(
        "portcullis_approvals_total",
        "Approvals of held tool calls by event: held (a reply's calls taken out and stored), approved, denied, handed_out (an approved call answered), refused (a repeat refused: pending, denied, expired, used, another request), webhook_sent, webhook_failed.",
        &["event"],
        REGISTRY
    )
    .expect("static metric")
});

/// Make every metric appear in `/metrics` from the start, before it is used.
pub fn init() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_SECONDS);
    LazyLock::force(&UPSTREAM_SECONDS);
    LazyLock::force(&FILTER_SECONDS);
    LazyLock::force(&AUDIT_QUEUE_DEPTH);
    LazyLock::force(&AUDIT_RECORDS_WRITTEN);
    LazyLock::force(&AUDIT_WRITE_ERRORS);
    LazyLock::force(&AUDIT_SINK_FAILING);
    LazyLock::force(&AUDIT_DROPPED);
    LazyLock::force(&PANICS);
    LazyLock::force(&CONNECTIONS_OPEN);
    LazyLock::force(&CONNECTIONS_REFUSED);
    LazyLock::force(&HEADER_TIMEOUTS);
    for result in ["ok", "failed"] {
        POLICY_RELOADS.with_label_values(&[result]);
    }
    LazyLock::force(&GUARD_BREAKER);
    for event in APPROVAL_EVENTS {
        APPROVALS.with_label_values(&[event]);
    }
}

/// The Prometheus text exposition of every metric.
pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut out) {
        log::error!("metrics encoding failed: {e}");
    }
    out
}
