//! Prometheus metrics, served as text on the admin listener's `/metrics`.

use crate::audit::{RequestRecord, Verdict};
use filters::dialect::Dialect;
use filters::{Action, FilterKind};
use prometheus::{
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_vec_with_registry,
    register_int_gauge_with_registry, Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Registry, TextEncoder,
};
use std::sync::LazyLock;
use std::time::Duration;

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

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register_int_counter_vec_with_registry!(name, help, labels, REGISTRY).expect("static metric")
}

// What each request came to, counted from its audit record when it closes
// ([`observe`]). Every label has a bounded set of values: models only once
// the registry resolved them, tools only when the tool policy lists them,
// rules from the redaction policy, tenants from verified tokens.

pub static MODEL_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_model_requests_total",
        "Requests for a model the registry resolved, by route, model and decision.",
        &["route", "model", "decision"],
    )
});

pub static MODEL_REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    latency_histogram(
        "portcullis_model_request_duration_seconds",
        "Whole request time at the gateway for a model the registry resolved, by model.",
        "model",
    )
});

pub static GATEWAY_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    latency_histogram(
        "portcullis_gateway_overhead_seconds",
        "Time a request spent in the gateway once its body was read, outside the provider call (from sending until the reply's last byte), by route: filters, the guard model and Redis calls included; a stream's per-event work is inside the provider time. Only requests that reached a provider.",
        "route",
    )
});

pub static REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_refusals_total",
        "Requests refused or failed, by the filter (or stage: intake, upstream, approval, gateway) and the error code.",
        &["filter", "code"],
    )
});

pub static FILTER_ACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_filter_actions_total",
        "Each filter's verdicts, by filter and action (allow, annotate, deny, error).",
        &["filter", "action"],
    )
});

pub static REDACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_redactions_total",
        "Values redacted, by filter (redact: replies, request_redaction: requests) and rule.",
        &["filter", "rule"],
    )
});

pub static TOOL_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_tool_calls_total",
        "The model's tool calls by tool (`other` for tools the policy does not list) and decision: allowed (passed on), denied (removed or refused), held (for approval). In monitor mode, denied calls were passed on.",
        &["tool", "decision"],
    )
});

pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_tokens_total",
        "Tokens the provider reported, by tenant, model and kind (input, output).",
        &["tenant", "model", "kind"],
    )
});

pub static UPSTREAM_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_upstream_errors_total",
        "Provider calls that failed, by provider and kind: timeout, status_5xx, error (a connection, a broken reply, or a provider refusal not passed on, such as a 401 for a bad provider key), status_4xx (the provider's refusal of the request, passed on to the client).",
        &["provider", "kind"],
    )
});

pub static MODELS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec_with_registry!(
        "portcullis_models",
        "Models in the registry by status (registered, approved, frozen, retired), as of the scrape.",
        &["status"],
        REGISTRY
    )
    .expect("static metric")
});

pub static FROZEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec_with_registry!(
        "portcullis_frozen",
        "Frozen subjects and tenants, as of the scrape.",
        &["kind"],
        REGISTRY
    )
    .expect("static metric")
});

pub static TRACE_SPANS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "portcullis_trace_spans_total",
        "Trace spans by result: exported (the collector took them), failed (it did not answer 2xx), dropped (the queue was full).",
        &["result"],
    )
});

/// What the proxy knows of a finished request beside its record.
#[derive(Default)]
pub struct Observed {
    /// The gateway's own time ([`GATEWAY_SECONDS`]), when it reached a
    /// provider.
    pub overhead: Option<Duration>,
    /// The filter or stage that refused or failed it (also for 5xx, which
    /// the record's `blocked_by` leaves out).
    pub stage: Option<String>,
    /// The registry resolved its model (before any refusal).
    pub model_resolved: bool,
}

/// How a provider call failed, for `portcullis_upstream_errors_total`:
/// `timeout`; `status_5xx` or `error` (a connection, a broken reply, or a
/// provider refusal the gateway did not pass on, such as a 401 for a bad
/// provider key) when the gateway answered `upstream_error`;
/// `status_4xx` for the provider's own refusal of the request, passed on.
/// A request refused for another reason (a filter, the guard) is none.
pub fn upstream_failure(rec: &RequestRecord) -> Option<&'static str> {
    use filters::ErrorCode;
    let u = rec.upstream.as_ref()?;
    match (rec.reason_code, u.status) {
        (Some(ErrorCode::UpstreamTimeout), _) => Some("timeout"),
        (Some(ErrorCode::UpstreamError), Some(500..=599)) => Some("status_5xx"),
        (Some(ErrorCode::UpstreamError), _) => Some("error"),
        (_, Some(st @ 400..=499)) if rec.status == st => Some("status_4xx"),
        _ => None,
    }
}

/// Count what a finished request came to. `tool_listed` says whether the
/// tool policy names a tool (else it is counted as `other`).
pub fn observe(
    rec: &RequestRecord,
    dialect: &dyn Dialect,
    tool_listed: &dyn Fn(&str) -> bool,
    seen: &Observed,
) {
    let route = rec.route.map(filters::Route::as_str).unwrap_or("other");
    let decision = decision_name(rec.decision);
    // Only a model the registry resolved: a client cannot add label
    // values by sending made-up names.
    let model = seen
        .model_resolved
        .then_some(rec.model.as_deref())
        .flatten();
    if let Some(model) = model {
        MODEL_REQUESTS
            .with_label_values(&[route, model, decision])
            .inc();
        MODEL_REQUEST_SECONDS
            .with_label_values(&[model])
            .observe(rec.duration_ms / 1e3);
    }
    if let Some(o) = seen.overhead {
        GATEWAY_SECONDS
            .with_label_values(&[route])
            .observe(o.as_secs_f64());
    }
    if let Some(code) = rec.reason_code {
        let by = seen
            .stage
            .as_deref()
            .or(rec.blocked_by.as_deref())
            .unwrap_or("gateway");
        REFUSALS.with_label_values(&[by, code.as_str()]).inc();
    }
    let mut tools: std::collections::BTreeMap<&str, [u64; 3]> = Default::default();
    for o in &rec.filters {
        FILTER_ACTIONS
            .with_label_values(&[o.filter.as_str(), action_name(o.action)])
            .inc();
        for a in &o.annotations {
            match (o.filter, a.key) {
                (_, "redactions") => {
                    for (rule, n) in a.value.as_object().into_iter().flatten() {
                        REDACTIONS
                            .with_label_values(&[o.filter.as_str(), rule])
                            .inc_by(n.as_u64().unwrap_or(0));
                    }
                }
                (FilterKind::ResponseToolAuthz, key) => {
                    let slot = match key {
                        "tools_called" => 0,
                        "tools_denied" => 1,
                        "tools_held_for_approval" => 2,
                        _ => continue,
                    };
                    for tool in a.value.as_array().into_iter().flatten() {
                        let name = tool.as_str().unwrap_or("");
                        let tool = if tool_listed(name) { name } else { "other" };
                        tools.entry(tool).or_default()[slot] += 1;
                    }
                }
                _ => {}
            }
        }
    }
    // Every call is one of: allowed, denied, held.
    for (tool, [called, denied, held]) in tools {
        let allowed = called.saturating_sub(denied + held);
        for (decision, n) in [("allowed", allowed), ("denied", denied), ("held", held)] {
            if n > 0 {
                TOOL_CALLS.with_label_values(&[tool, decision]).inc_by(n);
            }
        }
    }
    if let (Some(usage), Some(model)) = (&rec.usage, model) {
        if let Some((input, output)) = dialect.token_counts(usage) {
            // Without authentication there is no tenant: `none`.
            let tenant = rec.tenant.as_deref().unwrap_or("none");
            TOKENS
                .with_label_values(&[tenant, model, "input"])
                .inc_by(input);
            TOKENS
                .with_label_values(&[tenant, model, "output"])
                .inc_by(output);
        }
    }
    if let (Some(u), Some(kind)) = (&rec.upstream, upstream_failure(rec)) {
        UPSTREAM_ERRORS
            .with_label_values(&[&u.provider, kind])
            .inc();
    }
}

/// The registry's state, set when `/metrics` is scraped.
pub fn registry_state(state: &filters::model_registry::RegistryState) {
    use filters::model_registry::ModelStatus;
    for status in [
        ModelStatus::Registered,
        ModelStatus::Approved,
        ModelStatus::Frozen,
        ModelStatus::Retired,
    ] {
        let n = state.models.values().filter(|m| m.status == status).count();
        let name = match status {
            ModelStatus::Registered => "registered",
            ModelStatus::Approved => "approved",
            ModelStatus::Frozen => "frozen",
            ModelStatus::Retired => "retired",
        };
        MODELS.with_label_values(&[name]).set(n as i64);
    }
    FROZEN
        .with_label_values(&["subject"])
        .set(state.frozen_subjects.len() as i64);
    FROZEN
        .with_label_values(&["tenant"])
        .set(state.frozen_tenants.len() as i64);
}

pub fn decision_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "allowed",
        Verdict::Blocked => "blocked",
        Verdict::Error => "error",
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Annotate => "annotate",
        Action::Deny => "deny",
        Action::Error => "error",
    }
}

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
    LazyLock::force(&MODEL_REQUESTS);
    LazyLock::force(&MODEL_REQUEST_SECONDS);
    LazyLock::force(&GATEWAY_SECONDS);
    LazyLock::force(&REFUSALS);
    LazyLock::force(&FILTER_ACTIONS);
    LazyLock::force(&REDACTIONS);
    LazyLock::force(&TOOL_CALLS);
    LazyLock::force(&TOKENS);
    LazyLock::force(&UPSTREAM_ERRORS);
    LazyLock::force(&MODELS);
    LazyLock::force(&FROZEN);
    for result in ["exported", "failed", "dropped"] {
        TRACE_SPANS.with_label_values(&[result]);
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
