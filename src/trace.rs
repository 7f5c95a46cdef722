//! OpenTelemetry traces over OTLP/HTTP (JSON encoding), when `tracing:`
//! names a collector; nothing is read, timed or allocated for them when it
//! does not.
//!
//! Each request is one trace: a server span for the request (a child of the
//! client's span when it sent a W3C `traceparent`), a child per filter that
//! ran, and a client span for the provider call, whose id goes to the
//! provider in the `traceparent` the gateway sends. Spans are sent by one
//! background task in batches; when the collector is slow or down they
//! queue up to `max_queue` and are then dropped and counted, never delaying
//! a request.
//!
//! Filter spans are laid end to end from when the request chain started
//! (the filters run one after another; each span is its filter's measured
//! time). The response stages of a stream run event by event: their span
//! is the time each spent, from when the provider's reply began, with
//! `portcullis.busy_time: true`.
//!
//! With tracing off, a well-formed `traceparent` (and `tracestate`) from
//! the client is passed to the provider as it came: the gateway is then
//! invisible in the trace, not a break in it.

use crate::audit::RequestRecord;
use crate::config::TracingSection;
use crate::metrics;
use filters::dialect::Dialect;
use filters::FilterKind;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// A W3C trace context: `00-<trace id>-<parent span id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The trace flags as sent (bit 0: sampled; other bits kept).
    pub flags: u8,
}

impl TraceParent {
    /// Parse a `traceparent` header. Version `00` exactly as specified;
    /// a later version is read by its first four fields (as the spec
    /// asks). All-zero ids and anything malformed are `None`.
    pub fn parse(header: &str) -> Option<Self> {
        let h = header.trim();
        let mut parts = h.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex_lower = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex_lower(version, 2) || version == "ff" || !hex_lower(flags, 2) {
            return None;
        }
        if version == "00" && (parts.next().is_some() || h.len() != 55) {
            return None;
        }
        if !hex_lower(trace, 32) || !hex_lower(span, 16) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

/// Random ids without a system call each: a per-thread SplitMix64 seeded
/// once from the OS. Trace and span ids need to be unique and unguessable
/// enough to sample by, not secret.
fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(u64::from_le_bytes(
            uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or([7; 8]),
        ));
    }
    STATE.with(|s| {
        let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    loop {
        for chunk in out.chunks_mut(8) {
            let r = random_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        if out != [0u8; N] {
            return out;
        }
    }
}

/// One request's trace, made when the request arrives.
pub struct RequestTrace {
    pub trace_id: [u8; 16],
    /// The request's own span.
    span_id: [u8; 8],
    /// The client's span, when it sent one.
    parent: Option<[u8; 8]>,
    /// The provider call's span, sent to the provider as its parent.
    pub provider_span: [u8; 8],
    /// The flags sent on (bit 0: sampled).
    flags: u8,
    sampled: bool,
    started: Instant,
    started_unix: SystemTime,
    /// When the request chain started, and the provider's reply began.
    pub chain_started: Option<Instant>,
    pub reply_started: Option<Instant>,
    /// A client's `tracestate`, passed on.
    pub tracestate: Option<String>,
}

impl RequestTrace {
    /// The `traceparent` for the provider call.
    pub fn provider_header(&self) -> String {
        TraceParent {
            trace_id: self.trace_id,
            span_id: self.provider_span,
            flags: self.flags,
        }
        .header()
    }

    fn unix_ns(&self, at: Instant) -> u128 {
        let since = self.started_unix + at.saturating_duration_since(self.started);
        since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    }
}

/// A `tracestate` fit to pass on: short visible ASCII, at most 32 list
/// members (the spec's limit), each `key=value`.
pub fn valid_tracestate(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes().all(|b| (0x20..0x7f).contains(&b))
        && s.split(',').count() <= 32
        && s.split(',').map(str::trim).all(|m| {
            m.is_empty()
                || m.split_once('=')
                    .is_some_and(|(k, v)| !k.is_empty() && !v.is_empty())
        })
}

/// Sends the spans of sampled requests to the collector.
pub struct Tracer {
    /// One item per request: all its spans, so a full queue drops whole
    /// traces, never parts of one.
    queue: mpsc::Sender<Vec<Span>>,
    sample_ratio: f64,
    /// The collector's task, taken by the server to run it.
    exporter: std::sync::Mutex<Option<Exporter>>,
}

pub struct Exporter {
    rx: mpsc::Receiver<Vec<Span>>,
    endpoint: String,
    headers: Vec<(String, String)>,
    timeout: Duration,
    batch: usize,
    service: String,
    instance: String,
}

impl Tracer {
    pub fn new(cfg: &TracingSection, instance: String) -> Result<Self, String> {
        let endpoint = cfg
            .otlp_endpoint
            .clone()
            .ok_or("tracing: no otlp_endpoint")?;
        let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
        Ok(Self {
            queue: tx,
            sample_ratio: cfg.sample_ratio,
            exporter: std::sync::Mutex::new(Some(Exporter {
                rx,
                endpoint,
                headers: cfg.headers.clone().into_iter().collect(),
                timeout: Duration::from_millis(cfg.timeout_ms),
                batch: cfg.batch.max(1),
                service: cfg.service_name.clone(),
                instance,
            })),
        })
    }

    /// The exporter's task (once).
    pub fn take_exporter(&self) -> Option<Exporter> {
        self.exporter.lock().ok()?.take()
    }

    /// Start a request's trace from the client's headers (`tracestate`
    /// headers as one list, as the spec asks).
    pub fn start(&self, traceparent: Option<&str>, tracestate: &[&str]) -> RequestTrace {
        let parent = traceparent.and_then(TraceParent::parse);
        let trace_id = parent.map_or_else(random_bytes::<16>, |p| p.trace_id);
        let sampled = match parent {
            Some(p) => p.sampled(),
            // As OpenTelemetry's TraceIdRatioBased sampler: the trace id's
            // low 56 bits (random) against the ratio.
            None => {
                let mut low = [0u8; 8];
                low[1..].copy_from_slice(&trace_id[9..]);
                (u64::from_be_bytes(low) as f64) < self.sample_ratio * (1u64 << 56) as f64
            }
        };
        let state = tracestate.join(",");
        RequestTrace {
            trace_id,
            span_id: random_bytes::<8>(),
            parent: parent.map(|p| p.span_id),
            provider_span: random_bytes::<8>(),
            flags: parent.map_or(0, |p| p.flags & !1) | u8::from(sampled),
            sampled,
            started: Instant::now(),
            started_unix: SystemTime::now(),
            chain_started: None,
            reply_started: None,
            tracestate: parent.map(|_| state).filter(|s| valid_tracestate(s)),
        }
    }

    /// The request is over: queue its spans (when sampled).
    pub fn finish(
        &self,
        t: &RequestTrace,
        rec: &RequestRecord,
        dialect: &dyn Dialect,
        provider_call: Option<(Instant, Instant)>,
    ) {
        if !t.sampled {
            return;
        }
        let spans = spans(t, rec, dialect, provider_call, Instant::now());
        let n = spans.len() as u64;
        if self.queue.try_send(spans).is_err() {
            metrics::TRACE_SPANS
                .with_label_values(&["dropped"])
                .inc_by(n);
        }
    }
}

/// The longest attribute value sent (OpenTelemetry's attribute length
/// limit): a client's long model name or path never fills the queue.
const MAX_ATTR_CHARS: usize = 256;

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_ATTR_CHARS) {
        None => s.to_string(),
        Some((at, _)) => format!("{}…", &s[..at]),
    }
}

/// An attribute's value.
#[derive(Debug, Clone)]
pub enum Attr {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Self::Str(cut(s))
    }
}

impl From<String> for Attr {
    fn from(s: String) -> Self {
        Self::Str(cut(&s))
    }
}

impl From<u64> for Attr {
    fn from(n: u64) -> Self {
        Self::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<u16> for Attr {
    fn from(n: u16) -> Self {
        Self::Int(n.into())
    }
}

impl From<bool> for Attr {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

const SERVER: u8 = 2;
const CLIENT: u8 = 3;
const INTERNAL: u8 = 1;
/// Unset: OpenTelemetry leaves OK to the application.
const STATUS_UNSET: u8 = 0;
const STATUS_ERROR: u8 = 2;

/// One span as the request path leaves it; the exporter writes it out.
#[derive(Debug)]
pub struct Span {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: String,
    kind: u8,
    start_ns: u128,
    end_ns: u128,
    attributes: Vec<(&'static str, Attr)>,
    error: bool,
}

impl RequestTrace {
    /// A span of this trace: its id and its parent's.
    fn span(
        &self,
        (id, parent): ([u8; 8], Option<[u8; 8]>),
        name: String,
        kind: u8,
        (start, end): (Instant, Instant),
        attributes: Vec<(&'static str, Attr)>,
        error: bool,
    ) -> Span {
        Span {
            trace_id: self.trace_id,
            span_id: id,
            parent,
            name,
            kind,
            start_ns: self.unix_ns(start),
            end_ns: self.unix_ns(end.max(start)),
            attributes,
            error,
        }
    }
}

/// The spans of one request: the request, its filters, the provider call.
fn spans(
    t: &RequestTrace,
    rec: &RequestRecord,
    dialect: &dyn Dialect,
    provider_call: Option<(Instant, Instant)>,
    end: Instant,
) -> Vec<Span> {
    let route = rec.route.map(filters::Route::as_str).unwrap_or("other");
    let mut root_attrs: Vec<(&'static str, Attr)> = vec![
        ("http.request.method", rec.method.as_str().into()),
        ("url.path", rec.path.as_str().into()),
        ("http.response.status_code", rec.status.into()),
        ("portcullis.request_id", rec.request_id.as_str().into()),
        ("portcullis.route", route.into()),
        (
            "portcullis.decision",
            metrics::decision_name(rec.decision).into(),
        ),
    ];
    let optional = [
        ("portcullis.model", rec.model.as_deref()),
        ("portcullis.tenant", rec.tenant.as_deref()),
        ("portcullis.blocked_by", rec.blocked_by.as_deref()),
        (
            "portcullis.reason_code",
            rec.reason_code.map(|c| c.as_str()),
        ),
        (
            "portcullis.approval_id",
            rec.approval.as_ref().map(|a| a.id.as_str()),
        ),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            root_attrs.push((k, v.into()));
        }
    }
    let mut out = Vec::with_capacity(rec.filters.len() + 2);
    out.push(t.span(
        (t.span_id, t.parent),
        format!("{} /v1/{route}", rec.method),
        SERVER,
        (t.started, end),
        root_attrs,
        rec.decision == crate::audit::Verdict::Error,
    ));
    // Request filters end to end from the chain's start. A JSON reply's
    // stages run once its body is read; a stream's from its first byte.
    let mut request_at = t.chain_started.unwrap_or(t.started);
    let reply_began = if rec.stream {
        t.reply_started
    } else {
        provider_call.map(|(_, done)| done)
    };
    let mut reply_at = reply_began.unwrap_or(request_at);
    for o in &rec.filters {
        let response_side = o.filter >= FilterKind::ResponseToolAuthz;
        let at = if response_side {
            &mut reply_at
        } else {
            &mut request_at
        };
        let start = *at;
        let finish = start + Duration::from_micros(o.latency_us);
        *at = finish;
        let mut attrs: Vec<(&'static str, Attr)> = vec![
            ("portcullis.filter", o.filter.as_str().into()),
            ("portcullis.filter.action", action_name(o.action).into()),
            (
                "portcullis.filter.mode",
                match o.mode {
                    filters::Mode::Enforce => "enforce",
                    filters::Mode::Monitor => "monitor",
                }
                .into(),
            ),
        ];
        if let Some(code) = o.code {
            attrs.push(("portcullis.filter.code", code.as_str().into()));
        }
        if response_side && rec.stream {
            attrs.push(("portcullis.busy_time", true.into()));
        }
        out.push(t.span(
            (random_bytes::<8>(), Some(t.span_id)),
            format!("filter {}", o.filter.as_str()),
            INTERNAL,
            (start, finish),
            attrs,
            o.action == filters::Action::Error,
        ));
    }
    if let (Some(call), Some(u)) = (provider_call, &rec.upstream) {
        let mut attrs: Vec<(&'static str, Attr)> =
            vec![("portcullis.provider", u.provider.as_str().into())];
        if let Some(m) = &rec.upstream_model {
            attrs.push(("gen_ai.request.model", m.as_str().into()));
        }
        if let Some(st) = u.status {
            attrs.push(("http.response.status_code", st.into()));
        }
        if let Some((input, output)) = rec.usage.as_ref().and_then(|u| dialect.token_counts(u)) {
            attrs.push(("gen_ai.usage.input_tokens", input.into()));
            attrs.push(("gen_ai.usage.output_tokens", output.into()));
        }
        out.push(t.span(
            (t.provider_span, Some(t.span_id)),
            format!("provider {}", u.provider),
            CLIENT,
            call,
            attrs,
            metrics::upstream_failure(rec).is_some(),
        ));
    }
    out
}

fn action_name(a: filters::Action) -> &'static str {
    match a {
        filters::Action::Allow => "allow",
        filters::Action::Annotate => "annotate",
        filters::Action::Deny => "deny",
        filters::Action::Error => "error",
    }
}

/// OTLP/JSON: ids in hex, 64-bit integers as strings, enums as numbers.
mod otlp {
    use super::{Attr, Span, STATUS_ERROR, STATUS_UNSET};
    use serde::Serialize;

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Export<'a> {
        pub resource_spans: [ResourceSpans<'a>; 1],
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ResourceSpans<'a> {
        pub resource: Resource<'a>,
        pub scope_spans: [ScopeSpans<'a>; 1],
    }

    #[derive(Serialize)]
    pub struct Resource<'a> {
        pub attributes: Vec<KeyValue<'a>>,
    }

    #[derive(Serialize)]
    pub struct ScopeSpans<'a> {
        pub scope: Scope,
        pub spans: Vec<OtlpSpan<'a>>,
    }

    #[derive(Serialize)]
    pub struct Scope {
        pub name: &'static str,
        pub version: &'static str,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct OtlpSpan<'a> {
        trace_id: String,
        span_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        parent_span_id: Option<String>,
        name: &'a str,
        kind: u8,
        start_time_unix_nano: String,
        end_time_unix_nano: String,
        attributes: Vec<KeyValue<'a>>,
        status: Status,
    }

    #[derive(Serialize)]
    struct Status {
        code: u8,
    }

    #[derive(Serialize)]
    pub struct KeyValue<'a> {
        key: &'a str,
        value: AnyValue<'a>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    enum AnyValue<'a> {
        #[serde(rename = "stringValue")]
        Str(&'a str),
        #[serde(rename = "intValue")]
        Int(String),
        #[serde(rename = "boolValue")]
        Bool(bool),
    }

    pub fn key_value<'a>(key: &'a str, value: &'a Attr) -> KeyValue<'a> {
        KeyValue {
            key,
            value: match value {
                Attr::Str(s) => AnyValue::Str(s),
                Attr::Int(n) => AnyValue::Int(n.to_string()),
                Attr::Bool(b) => AnyValue::Bool(*b),
            },
        }
    }

    pub fn span(s: &Span) -> OtlpSpan<'_> {
        OtlpSpan {
            trace_id: hex::encode(s.trace_id),
            span_id: hex::encode(s.span_id),
            parent_span_id: s.parent.map(hex::encode),
            name: &s.name,
            kind: s.kind,
            start_time_unix_nano: s.start_ns.to_string(),
            end_time_unix_nano: s.end_ns.to_string(),
            attributes: s.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
            status: Status {
                code: if s.error { STATUS_ERROR } else { STATUS_UNSET },
            },
        }
    }
}

impl Exporter {
    /// Send queued spans in batches until shutdown, then what is queued.
    pub async fn run(mut self, mut shutdown: pingora::server::ShutdownWatch) {
        let client = match reqwest::Client::builder().timeout(self.timeout).build() {
            Ok(c) => c,
            Err(e) => {
                log::error!("tracing: no HTTP client: {e}");
                return;
            }
        };
        let resource: Vec<(&'static str, Attr)> = vec![
            ("service.name", self.service.as_str().into()),
            ("service.instance.id", self.instance.as_str().into()),
            ("service.version", env!("CARGO_PKG_VERSION").into()),
        ];
        let mut last_warning: Option<Instant> = None;
        let mut stopping = false;
        loop {
            let mut batch: Vec<Span> = Vec::new();
            if stopping {
                // What is queued goes out once; nothing waits for more.
                while batch.len() < self.batch {
                    match self.rx.try_recv() {
                        Ok(spans) => batch.extend(spans),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    return;
                }
            } else {
                tokio::select! {
                    first = self.rx.recv() => match first {
                        Some(spans) => batch.extend(spans),
                        None => return,
                    },
                    _ = shutdown.changed() => {
                        stopping = true;
                        continue;
                    }
                }
                // Gather what else is queued (up to a batch), waiting a
                // moment for more so a busy gateway sends fewer posts.
                let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
                while batch.len() < self.batch {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(spans)) => batch.extend(spans),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let n = batch.len() as u64;
            let export = otlp::Export {
                resource_spans: [otlp::ResourceSpans {
                    resource: otlp::Resource {
                        attributes: resource
                            .iter()
                            .map(|(k, v)| otlp::key_value(k, v))
                            .collect(),
                    },
                    scope_spans: [otlp::ScopeSpans {
                        scope: otlp::Scope {
                            name: "portcullis",
                            version: env!("CARGO_PKG_VERSION"),
                        },
                        spans: batch.iter().map(otlp::span).collect(),
                    }],
                }],
            };
            let body = match serde_json::to_vec(&export) {
                Ok(b) => b,
                Err(e) => {
                    log::error!("tracing: spans not encoded: {e}");
                    continue;
                }
            };
            let mut req = client
                .post(&self.endpoint)
                .header("content-type", "application/json")
                .body(body);
            for (k, v) in &self.headers {
                req = req.header(k, v);
            }
            let failure = match req.send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("collector answered {}", r.status())),
                Err(e) => Some(e.to_string()),
            };
            let result = if failure.is_some() {
                "failed"
            } else {
                "exported"
            };
            metrics::TRACE_SPANS.with_label_values(&[result]).inc_by(n);
            // One warning a minute while the collector fails, not one a batch.
            if let Some(why) = failure {
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    log::warn!("tracing: spans not exported ({why}); counted in portcullis_trace_spans_total");
                    last_warning = Some(Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_as_the_spec_says() {
        let p =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex::encode(p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        assert_eq!(
            p.header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        // Other flags are kept (level 2's random flag).
        let random =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03").unwrap();
        assert_eq!(
            random.header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"
        );
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled());
        // A later version: its first four fields, more may follow.
        assert!(TraceParent::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        )
        .is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    fn tracer(ratio: f64) -> Tracer {
        let cfg = TracingSection {
            otlp_endpoint: Some("http://127.0.0.1:9/v1/traces".into()),
            sample_ratio: ratio,
            ..Default::default()
        };
        Tracer::new(&cfg, "test".into()).unwrap()
    }

    #[test]
    fn sampling_follows_the_parent_else_the_ratio_of_trace_ids() {
        let t = tracer(0.01);
        let n = 20_000;
        let sampled = (0..n).filter(|_| t.start(None, &[]).sampled).count();
        // 1% of 20,000 is 200; five standard deviations either way.
        assert!((130..=270).contains(&sampled), "{sampled}");
        assert_eq!(
            (0..1000)
                .filter(|_| tracer(0.0).start(None, &[]).sampled)
                .count(),
            0
        );
        assert_eq!(
            (0..1000)
                .filter(|_| tracer(1.0).start(None, &[]).sampled)
                .count(),
            1000
        );
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let quiet = tracer(1.0).start(Some(parent), &["a=1", "b=2"]);
        assert!(!quiet.sampled);
        assert_eq!(quiet.tracestate.as_deref(), Some("a=1,b=2"));
        assert!(quiet.provider_header().ends_with("-00"));
        let loud = tracer(0.0).start(Some(&parent.replace("-00", "-01")), &[]);
        assert!(loud.sampled && loud.tracestate.is_none());
    }

    #[test]
    fn tracestate_is_passed_only_when_well_formed() {
        assert!(valid_tracestate("vendor=abc,other=x"));
        for bad in ["", "novalue", "a=1,=2", &"a=1,".repeat(40), "a=\u{7f}"] {
            assert!(!valid_tracestate(bad), "{bad}");
        }
        assert_eq!(cut(&"m".repeat(300)).chars().count(), 257);
    }
}
