//! The proxy service: Pingora phases for the LLM routes.
//!
//! Everything happens in `request_filter`, which answers every request
//! itself and returns `Ok(true)`: intake (route, size cap, JSON), the request
//! chain, the provider call (re-originated, see `upstream`), the response
//! chain, and the reply. `logging`, which Pingora runs once on every path,
//! hands the audit record to the writer.

use crate::audit::{AuditLog, RequestRecord, UpstreamRecord, Verdict};
use crate::config::Config;
use crate::config::GuardOutput;
use crate::dialect::{self, Dialect, Endpoint, Forward, StreamFacts};
use crate::metrics;
use crate::pipeline::Filters;
use crate::upstream::{Exchange, Upstream, UpstreamError};
use async_trait::async_trait;
use bytes::Bytes;
use filters::model_registry::ModelGate;
use filters::rate_limit::{RateLimiter, Reservation};
use filters::{
    ErrorCode, FilterKind, Rejection, RequestView, ResponseChain, ResponseContext, Route, SseEvent,
    SseFramer,
};
use futures_util::FutureExt;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Status recorded when the client left before a response was written
/// (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// Most characters of a reply sent to the output guard in one call.
const OUTPUT_PIECE: usize = 8_000;
/// Characters of already judged text sent again with the next piece, so
/// harm cut across a piece or window boundary is still seen whole.
const OUTPUT_OVERLAP: usize = 200;

pub struct Gateway {
    cfg: Arc<Config>,
    chain: Arc<filters::Chain>,
    responses: ResponseChain,
    limiter: Option<Arc<RateLimiter>>,
    gate: Arc<ModelGate>,
    upstream: Upstream,
    audit: AuditLog,
    lifecycle: Arc<Lifecycle>,
    /// Judges replies when `guard.output` is on.
    guard: Option<Arc<filters::guard::filter::GuardFilter>>,
}

/// Per-request state, written only by the gateway.
pub struct Ctx {
    started: Instant,
    body_read: bool,
    /// Headers the filters set for the client's response.
    headers: Vec<(&'static str, String)>,
    /// Token budget reservations to settle after the response.
    reservations: Vec<Reservation>,
    /// The gateway asked for the stream's usage event; the client did not.
    strip_usage: bool,
    /// Characters a streamed reply generated, once the stream ended.
    generated_chars: Option<u64>,
    /// The caller, once the chain identified it.
    principal: Option<filters::Principal>,
    rec: RequestRecord,
    /// The request as parsed, kept when replies are judged.
    request_json: Option<Value>,
    /// Where the record goes, once: from `logging`, or, for a request cut
    /// off before that (the runtime shut down under it), from `Drop`.
    audit: AuditLog,
    logged: bool,
    lifecycle: Arc<Lifecycle>,
    /// The wire format of the request (OpenAI Chat until it is known).
    dialect: &'static dyn Dialect,
}

/// Requests in flight, and whether the process is draining after SIGTERM.
#[derive(Default)]
pub struct Lifecycle {
    in_flight: AtomicUsize,
    draining: AtomicBool,
}

impl Lifecycle {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

impl Ctx {
    /// Settle the record and hand it to the audit writer.
    fn close(&mut self) {
        if std::mem::replace(&mut self.logged, true) {
            return;
        }
        let rec = &mut self.rec;
        if rec.status == 0 || (rec.client_gone && rec.status != 200) {
            rec.status = CLIENT_CLOSED;
        }
        let elapsed = self.started.elapsed();
        rec.duration_ms = elapsed.as_secs_f64() * 1e3;
        let route = rec.route.map(Route::as_str).unwrap_or("other");
        let decision = match rec.decision {
            Verdict::Allowed => "allowed",
            Verdict::Blocked => "blocked",
            Verdict::Error => "error",
        };
        metrics::REQUESTS
            .with_label_values(&[route, &rec.status.to_string(), decision])
            .inc();
        metrics::REQUEST_SECONDS
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        self.audit.send(rec);
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if !self.logged {
            self.rec.decision = Verdict::Error;
            self.rec.reason = Some(format!(
                "cut off before it finished (the gateway shut down){}",
                self.rec
                    .reason
                    .as_deref()
                    .map(|r| format!("; earlier: {r}"))
                    .unwrap_or_default()
            ));
            self.close();
        }
        self.lifecycle.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gateway {
    pub fn new(
        cfg: Arc<Config>,
        filters: Filters,
        upstream: Upstream,
        audit: AuditLog,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Self {
            lifecycle,
            cfg,
            chain: filters.chain,
            responses: filters.responses,
            limiter: filters.limiter,
            gate: filters.gate,
            guard: filters.guard,
            upstream,
            audit,
        }
    }

    /// Run the request chain and apply what it found to the context.
    /// Returns the rejection, if any, with the filter that made it.
    async fn screen(
        &self,
        s: &Session,
        ctx: &mut Ctx,
        route: Route,
        body: &Value,
        model: Option<&str>,
        stream: bool,
    ) -> Screened {
        let view = request_view(s, ctx, route, body, model, stream);
        // In parallel timing the guard runs later, beside the provider call.
        let parallel = self.parallel_guard();
        let report = self
            .chain
            .run_filtered(&view, |k| !(parallel && k == FilterKind::GuardModel))
            .await;
        for o in &report.outcomes {
            metrics::FILTER_SECONDS
                .with_label_values(&[o.filter.as_str()])
                .observe(o.latency_us as f64 / 1e6);
        }
        ctx.rec.filters = report.outcomes;
        let principal = report.principal;
        if let Some(p) = &principal {
            ctx.rec.sub = Some(p.subject.clone());
            ctx.rec.tenant = Some(p.tenant.clone());
            ctx.rec.roles = p.roles.clone();
        }
        ctx.headers = report.headers;
        ctx.reservations = report.reservations;
        ctx.principal = principal.clone();
        Screened {
            rejection: report.rejection.map(|(kind, r)| (kind.as_str(), r)),
            principal,
            upstream: report.upstream,
            strip_tools: report.strip_tools,
            body: report.body,
        }
    }

    /// Run only the authentication filter, before the body is read. The
    /// whole chain runs again once it is (a verified token is then a cache
    /// hit), so mode and `on_error` apply as everywhere else.
    async fn authenticate_early(
        &self,
        s: &Session,
        ctx: &mut Ctx,
        route: Route,
    ) -> Option<(&'static str, Rejection)> {
        let view = request_view(s, ctx, route, &Value::Null, None, false);
        let report = self
            .chain
            .run_filtered(&view, |k| k == FilterKind::JwtAuth)
            .await;
        let (kind, r) = report.rejection?;
        ctx.rec.filters = report.outcomes;
        ctx.headers = report.headers;
        Some((kind.as_str(), r))
    }

    fn output_mode(&self) -> GuardOutput {
        match (&self.guard, &self.cfg.guard) {
            (Some(_), Some(g)) => g.output,
            _ => GuardOutput::Off,
        }
    }

    /// The guard's verdict on what a model wrote, as the `output_guard`
    /// outcome, and `Some(rejection)` when the reply must not be released:
    /// `content_policy` (unsafe) or `guard_unavailable`.
    async fn judge_output(
        &self,
        ctx: &Ctx,
        text: &str,
    ) -> Option<(Option<Rejection>, filters::FilterOutcome)> {
        let (Some(guard), Some(g)) = (&self.guard, &self.cfg.guard) else {
            return None;
        };
        if text.trim().is_empty() {
            return None;
        }
        let started = Instant::now();
        let body = ctx.request_json.as_ref().unwrap_or(&Value::Null);
        let result = guard.judge_reply(body, text, ctx.principal.as_ref()).await;
        let mut outcome = filters::FilterOutcome {
            filter: FilterKind::OutputGuard,
            mode: g.mode,
            action: filters::Action::Allow,
            enforced: false,
            code: None,
            reason: None,
            annotations: Vec::new(),
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        let enforce = g.mode == filters::Mode::Enforce;
        let rejection = match result {
            Ok(v) => {
                outcome.annotations.push(filters::Annotation {
                    key: "guard_categories",
                    value: json!(v.named),
                });
                match (v.action, v.category) {
                    (filters::guard::Action::Block, Some(category)) => {
                        outcome.action = filters::Action::Deny;
                        outcome.code = Some(ErrorCode::ContentPolicy);
                        outcome.reason = Some(format!("reply judged unsafe: {category}"));
                        enforce.then(|| {
                            Rejection::new(ErrorCode::ContentPolicy, format!("reply: {category}"))
                        })
                    }
                    (filters::guard::Action::Flag, _) => {
                        outcome.action = filters::Action::Annotate;
                        None
                    }
                    _ => None,
                }
            }
            Err(e) => {
                outcome.action = filters::Action::Error;
                outcome.code = Some(e.code);
                outcome.reason = Some(e.reason.clone());
                (enforce && g.on_error == filters::OnError::Deny)
                    .then(|| Rejection::new(e.code, e.reason))
            }
        };
        outcome.enforced = rejection.is_some();
        Some((rejection, outcome))
    }

    /// Judge a reply's text in overlapping pieces of at most
    /// [`OUTPUT_PIECE`] characters (so the policy's `max_chars` never cuts
    /// it), the first unsafe or failed piece deciding. Returns the deciding
    /// rejection and the last verdict.
    async fn judge_output_pieces(
        &self,
        ctx: &Ctx,
        text: &str,
    ) -> (Option<Rejection>, Option<filters::FilterOutcome>) {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let byte_at = |i: usize| chars.get(i).map_or(text.len(), |c| c.0);
        let mut last = None;
        let mut start = 0;
        loop {
            let end = (start + OUTPUT_PIECE).min(chars.len());
            if let Some((r, outcome)) = self
                .judge_output(ctx, &text[byte_at(start)..byte_at(end)])
                .await
            {
                last = Some(outcome);
                if r.is_some() {
                    return (r, last);
                }
            }
            if end >= chars.len() {
                return (None, last);
            }
            start = end.saturating_sub(OUTPUT_OVERLAP);
        }
    }

    /// Judge each choice's new text (with the overlap before it), the
    /// first unsafe or failed one deciding; what was judged safe is
    /// dropped but for the overlap.
    async fn judge_unjudged(
        &self,
        ctx: &Ctx,
        unjudged: &mut Unjudged,
    ) -> (Option<Rejection>, Option<filters::FilterOutcome>) {
        unjudged.chars = 0;
        let mut last = None;
        for (text, fresh) in unjudged.choices.values_mut() {
            if !std::mem::take(fresh) {
                continue;
            }
            let (r, outcome) = self.judge_output_pieces(ctx, text).await;
            last = outcome.or(last);
            if r.is_some() {
                return (r, last);
            }
            keep_tail(text, OUTPUT_OVERLAP);
        }
        (None, last)
    }

    /// Characters of a reply judged in one guard call: well inside the
    /// policy's `max_chars`, which would otherwise cut the reply.
    fn output_piece(&self) -> usize {
        let window = self.cfg.guard.as_ref().map_or(400, |g| g.output_window);
        window.clamp(1, OUTPUT_PIECE)
    }

    fn parallel_guard(&self) -> bool {
        self.cfg
            .guard
            .as_ref()
            .is_some_and(|g| g.timing == crate::config::GuardTiming::Parallel)
    }

    /// `GET /v1/models` and `GET /v1/models/{id}`: the models the caller
    /// may use now.
    async fn models(&self, s: &mut Session, ctx: &mut Ctx, id: Option<String>) {
        ctx.rec.route = Some(Route::Models);
        let screened = self
            .screen(s, ctx, Route::Models, &Value::Null, None, false)
            .await;
        if let Some((by, r)) = screened.rejection {
            return self.refuse(s, ctx, by, r).await;
        }
        let usable = match self.gate.usable(screened.principal.as_ref()) {
            Ok(u) => u,
            Err(e) => {
                let r = Rejection::new(ErrorCode::RegistryUnavailable, e);
                return self.refuse(s, ctx, "model_registry", r).await;
            }
        };
        let body = match id {
            None => dialect::openai::model_list(
                usable
                    .iter()
                    .map(|m| dialect::openai::model_object(&m.id, &m.provider)),
            ),
            Some(id) => match usable.iter().find(|m| m.id == id) {
                Some(m) => dialect::openai::model_object(&m.id, &m.provider),
                None => {
                    return self
                        .refuse(s, ctx, "model_registry", no_such_model(&id))
                        .await
                }
            },
        };
        self.reply_json(s, ctx, 200, Bytes::from(body.to_string()))
            .await
    }

    async fn handle(&self, s: &mut Session, ctx: &mut Ctx) {
        crate::connections::headers_done(s.stream());
        let header = s.req_header();
        ctx.rec.client_request_id =
            client_request_id(header.headers.get("x-request-id").map(|v| v.as_bytes()));
        ctx.rec.method = header.method.to_string();
        ctx.rec.path = header.uri.path().to_string();
        ctx.rec.client_ip = s
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        // Tests of the unwind path need a request that panics; only a debug
        // build with this variable set has one.
        #[cfg(debug_assertions)]
        if std::env::var_os("PORTCULLIS_TEST_PANIC").is_some()
            && header.headers.contains_key("x-portcullis-test-panic")
        {
            panic!("test panic requested");
        }
        s.set_write_timeout(Some(Duration::from_secs(
            self.cfg.limits.client_write_timeout_secs.max(1),
        )));
        if let Err(r) = headers_fit(s, &self.cfg.limits) {
            return self.refuse(s, ctx, "intake", r).await;
        }
        if let Err(why) = self.audit.admit() {
            let r = Rejection::new(ErrorCode::AuditUnavailable, why);
            return self.refuse(s, ctx, "audit", r).await;
        }
        match dialect::resolve(&ctx.rec.method, &ctx.rec.path) {
            Err(r) => self.refuse(s, ctx, "intake", r).await,
            Ok(Endpoint::ListModels) => self.models(s, ctx, None).await,
            Ok(Endpoint::GetModel(id)) => self.models(s, ctx, Some(id)).await,
            Ok(Endpoint::Call(d)) => self.call(s, ctx, d).await,
        }
    }

    async fn call(&self, s: &mut Session, ctx: &mut Ctx, d: &'static dyn Dialect) {
        let route = d.route();
        ctx.dialect = d;
        ctx.rec.route = Some(route);
        let content_type = s
            .req_header()
            .headers
            .get("content-type")
            .map(|v| v.as_bytes());
        if let Err(r) = filters::intake::check_content_type(content_type) {
            return self.refuse(s, ctx, "intake", r).await;
        }
        let max = self.cfg.limits.max_body_bytes;
        if content_length(s).is_some_and(|len| len > max) {
            return self.refuse(s, ctx, "intake", too_large(max)).await;
        }
        // Who is asking is settled from the headers alone: a client without
        // a valid token gets no `100 Continue` and no byte of its body read.
        let enforcing_auth = self
            .cfg
            .auth
            .as_ref()
            .is_some_and(|a| a.mode == filters::Mode::Enforce);
        if enforcing_auth {
            if let Some((by, r)) = self.authenticate_early(s, ctx, route).await {
                return self.refuse(s, ctx, by, r).await;
            }
        }
        if expects_continue(s) {
            // Without this a client that waits for 100 stalls until its own
            // timeout before it sends the body.
            let _ = s.write_continue_response().await;
        }
        let limit = Duration::from_secs(self.cfg.limits.client_body_timeout_secs);
        let body = match tokio::time::timeout(limit, read_body(s, max)).await {
            Err(_) => {
                let r = Rejection::new(
                    ErrorCode::RequestTimeout,
                    "client did not send its body in time",
                );
                return self.refuse(s, ctx, "intake", r).await;
            }
            Ok(Err(BodyError::TooLarge)) => {
                return self.refuse(s, ctx, "intake", too_large(max)).await
            }
            Ok(Err(BodyError::Client(e))) => {
                ctx.rec.client_gone = true;
                ctx.rec.decision = Verdict::Error;
                ctx.rec.reason = Some(format!("reading the request body: {e}"));
                return;
            }
            Ok(Ok(body)) => body,
        };
        ctx.body_read = true;
        ctx.rec.request_bytes = body.len();
        ctx.rec.prompt_sha256 = Some(hex::encode(Sha256::digest(&body)));
        let parsed = match d.parse(&body, &self.cfg.limits.shape()) {
            Ok(p) => p,
            Err(r) => return self.refuse(s, ctx, "intake", r).await,
        };
        ctx.rec.model = Some(parsed.model.clone());
        ctx.rec.stream = parsed.stream;
        if self.cfg.audit.record_content {
            ctx.rec.content = Some(json!({"request": parsed.json}));
        }
        let screened = self
            .screen(
                s,
                ctx,
                route,
                &parsed.json,
                Some(&parsed.model),
                parsed.stream,
            )
            .await;
        if let Some((by, r)) = screened.rejection {
            return self.refuse(s, ctx, by, r).await;
        }
        // The registry gate says where the model is served.
        // The registry routes; when it could not be read and fails open
        // (`registry.on_error: allow`), the config's `models:` table does.
        let registry_failed_open =
            ctx.rec.filters.iter().any(|o| {
                o.filter == FilterKind::ModelRegistry && o.action == filters::Action::Error
            });
        let upstream = screened.upstream.or_else(|| {
            registry_failed_open
                .then(|| self.cfg.models.get(&parsed.model))
                .flatten()
                // Not above the registry's default risk tier: no role's
                // grant can be read while the registry cannot.
                .filter(|m| m.risk_tier <= self.cfg.registry.default_max_risk)
                .map(|m| (m.provider.clone(), m.upstream_model.clone()))
        });
        let Some((provider, upstream_model)) = upstream else {
            return self
                .refuse(s, ctx, "model_registry", no_such_model(&parsed.model))
                .await;
        };
        ctx.rec.upstream_model = Some(upstream_model.clone());

        // A token budget is settled from the stream's final usage event:
        // ask for it when the client did not, and keep it from the client.
        ctx.strip_usage =
            parsed.stream && !ctx.reservations.is_empty() && d.needs_usage_request(&parsed.json);
        if self.output_mode() != GuardOutput::Off {
            ctx.request_json = Some(parsed.json.clone());
        }
        // The guard, in parallel timing, reads the request as it came.
        let guard_body = if self.parallel_guard() {
            parsed.json.clone()
        } else {
            Value::Null
        };
        let parsed_model = parsed.model.clone();
        let forward = Forward {
            model: &upstream_model,
            ask_usage: ctx.strip_usage,
            strip_tools: &screened.strip_tools,
        };
        let out_body = match screened.body {
            None if !d.needs_rewrite(&parsed, &forward) => body,
            rewritten => {
                let mut json = rewritten.unwrap_or(parsed.json);
                d.forward(&mut json, &forward);
                Bytes::from(json.to_string())
            }
        };
        let mut upstream = UpstreamRecord {
            provider: provider.clone(),
            ..Default::default()
        };
        let sent = Instant::now();
        let request_id = ctx.rec.request_id.clone();
        let principal = ctx.principal.clone();
        let parallel = self.parallel_guard();
        let (guard_report, result) = {
            let post = self.upstream.post(
                &provider,
                d.upstream_path(),
                &request_id,
                out_body,
                parsed.stream,
            );
            if parallel {
                // The provider call starts at once; the guard runs beside
                // it. Nothing is relayed before both are done, and an
                // unsafe verdict drops the provider call (its connection
                // is closed).
                let view = RequestView {
                    request_id: &request_id,
                    authorization: None,
                    principal: principal.as_ref(),
                    dry_run: false,
                    route,
                    body: &guard_body,
                    model: Some(&parsed_model),
                    stream: parsed.stream,
                    client_ip: None,
                };
                let guard = self
                    .chain
                    .run_filtered(&view, |k| k == FilterKind::GuardModel);
                tokio::pin!(post);
                tokio::pin!(guard);
                tokio::select! {
                    report = &mut guard => {
                        if report.rejection.is_some() {
                            (Some(report), None)
                        } else {
                            (Some(report), Some(post.as_mut().await))
                        }
                    }
                    result = &mut post => (Some(guard.as_mut().await), Some(result)),
                }
            } else {
                (None, Some(post.await))
            }
        };
        if let Some(mut report) = guard_report {
            for o in &mut report.outcomes {
                metrics::FILTER_SECONDS
                    .with_label_values(&[o.filter.as_str()])
                    .observe(o.latency_us as f64 / 1e6);
                for a in &mut o.annotations {
                    if a.key == "guard_timing" {
                        a.value = json!("parallel");
                    }
                }
            }
            ctx.rec.filters.extend(report.outcomes);
            if let Some((kind, r)) = report.rejection {
                upstream.error = Some("cancelled: the guard judged the request unsafe".into());
                ctx.rec.upstream = Some(upstream);
                if let Some(Ok(exchange)) = result {
                    exchange.finish().await;
                }
                self.refuse(s, ctx, kind.as_str(), r).await;
                // The provider may have generated already: the budget
                // keeps what was reserved.
                return self.settle(ctx, None).await;
            }
        }
        let Some(result) = result else {
            // Only an unsafe verdict leaves the call unmade (above).
            return self.internal_error(s, ctx).await;
        };
        let latency = sent.elapsed();
        upstream.latency_ms = Some(latency.as_secs_f64() * 1e3);
        metrics::UPSTREAM_SECONDS
            .with_label_values(&[&provider])
            .observe(latency.as_secs_f64());
        let exchange = match result {
            Ok(ex) => ex,
            Err(e) => {
                upstream.error = Some(e.to_string());
                ctx.rec.upstream = Some(upstream);
                self.upstream_failed(s, ctx, &e).await;
                return self.settle(ctx, Some(0)).await;
            }
        };
        upstream.status = Some(exchange.status());
        ctx.rec.upstream = Some(upstream);
        let is_sse = (200..300).contains(&exchange.status())
            && exchange
                .header_str("content-type")
                .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if is_sse {
            self.relay_stream(s, ctx, exchange).await
        } else {
            self.relay_json(s, ctx, exchange).await
        }
        // Whatever was not settled on the way (error paths).
        let used = total_tokens(ctx);
        self.settle(ctx, used).await;
    }

    async fn settle(&self, ctx: &mut Ctx, used: Option<u64>) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        for r in std::mem::take(&mut ctx.reservations) {
            if let Err(e) = limiter.settle(&r, used).await {
                log::warn!("{}: token budget not settled: {e}", ctx.rec.request_id);
            }
        }
    }

    async fn relay_json(&self, s: &mut Session, ctx: &mut Ctx, mut ex: Exchange<'_>) {
        let d = ctx.dialect;
        let status = ex.status();
        if passes_through(status) {
            keep_retry_headers(&ex, &mut ctx.headers);
        }
        let body = ex.body(self.cfg.limits.max_response_bytes).await;
        ex.finish().await;
        let body = match body {
            Ok(b) => b,
            Err(e) => return self.upstream_failed(s, ctx, &e).await,
        };
        if !(200..300).contains(&status) {
            if passes_through(status) {
                // The provider refused the request itself (a bad parameter,
                // its own rate limit): the client gets the provider's answer,
                // with when to retry.
                return self.reply_json(s, ctx, status, body).await;
            }
            let e = UpstreamError::Failed(format!("provider answered {status}"));
            return self.upstream_failed(s, ctx, &e).await;
        }
        let Ok(mut json) = serde_json::from_slice::<Value>(&body) else {
            let e = UpstreamError::Failed("provider answered with a body that is not JSON".into());
            return self.upstream_failed(s, ctx, &e).await;
        };
        ctx.rec.usage = d.reply_usage(&json);
        let body = if self.responses.is_empty() {
            body
        } else {
            let rctx = ResponseContext {
                request_id: &ctx.rec.request_id,
                route: d.route(),
                model: ctx.rec.model.as_deref(),
                principal: ctx.principal.as_ref(),
            };
            let (outcomes, rejection) = self.responses.on_json(&rctx, &mut json);
            ctx.rec.filters.extend(outcomes);
            if let Some((kind, r)) = rejection {
                return self.refuse(s, ctx, kind.as_str(), r).await;
            }
            Bytes::from(json.to_string())
        };
        let body = if self.output_mode() != GuardOutput::Off {
            let mut unjudged = Unjudged::default();
            unjudged.push(d, &json);
            let (rejection, last) = self.judge_unjudged(ctx, &mut unjudged).await;
            ctx.rec.filters.extend(last);
            match rejection {
                Some(r) if r.code == ErrorCode::ContentPolicy => {
                    // As hosted providers end a filtered reply: 200, the
                    // content withheld, `finish_reason: content_filter`.
                    d.withhold(&mut json);
                    ctx.rec.reason_code = Some(ErrorCode::ContentPolicy);
                    ctx.rec.reason = Some(r.reason);
                    Bytes::from(json.to_string())
                }
                Some(r) => return self.refuse(s, ctx, "output_guard", r).await,
                None => body,
            }
        } else {
            body
        };
        if self.cfg.audit.record_content {
            if let Some(Value::Object(c)) = ctx.rec.content.as_mut() {
                c.insert(
                    "response".into(),
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                );
            }
        }
        self.reply_json(s, ctx, status, body).await
    }

    /// Relay an SSE response event by event through the response stages.
    async fn relay_stream(&self, s: &mut Session, ctx: &mut Ctx, mut ex: Exchange<'_>) {
        let d = ctx.dialect;
        let mut header = match response_header(200, ctx) {
            Ok(h) => h,
            Err(_) => return self.internal_error(s, ctx).await,
        };
        let _ = header.insert_header("content-type", "text/event-stream");
        let _ = header.insert_header("cache-control", "no-cache");
        if !s.is_http2() {
            let _ = header.insert_header("transfer-encoding", "chunked");
        }
        ctx.rec.status = 200;
        if s.write_response_header(Box::new(header), false)
            .await
            .is_err()
        {
            ctx.rec.client_gone = true;
            return ex.finish().await;
        }
        let rctx = ResponseContext {
            request_id: &ctx.rec.request_id,
            route: d.route(),
            model: ctx.rec.model.as_deref(),
            principal: ctx.principal.as_ref(),
        };
        let mut stages = self.responses.stream(&rctx);
        // The output guard: what the model wrote and is not judged yet
        // (after the overlap kept from the last window), how much of it, the events held back (all of them in `held`
        // mode; the closing ones in `sampled`), the last verdict, and
        // whether the reply was cut.
        let output = self.output_mode();
        let window = self.output_piece();
        let mut unjudged = Unjudged::default();
        let mut held: Vec<SseEvent> = Vec::new();
        let mut last_outcome: Option<filters::FilterOutcome> = None;
        let mut filtered = false;
        let mut framer = SseFramer::new();
        let mut wire = Vec::with_capacity(4096);
        let mut seen = StreamFacts::default();
        let mut failure: Option<Rejection> = None;
        let broken = |why: String| Rejection::new(ErrorCode::UpstreamError, why);
        'read: loop {
            let chunk = match ex.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(upstream_rejection(&e));
                    break;
                }
            };
            let events = match framer.push(&chunk) {
                Ok(ev) => ev,
                Err(e) => {
                    failure = Some(broken(format!("broken SSE from provider: {e}")));
                    break;
                }
            };
            wire.clear();
            for event in events {
                if let Err(why) = d.note_event(&event, &mut seen) {
                    // Fail closed: nothing unscreened reaches the client.
                    failure = Some(broken(why));
                    break 'read;
                }
                if ctx.strip_usage && d.is_usage_only(&event) {
                    continue;
                }
                for out in stages.push(event) {
                    route_event(d, output, out, &mut unjudged, &mut held, &mut wire);
                }
            }
            if let Some((_, r)) = stages.stopped() {
                failure = Some(r.clone());
                break;
            }
            if output != GuardOutput::Off && unjudged.chars >= window {
                let (r, outcome) = self.judge_unjudged(ctx, &mut unjudged).await;
                last_outcome = outcome.or(last_outcome);
                match r {
                    Some(r) if r.code == ErrorCode::ContentPolicy => {
                        filtered = true;
                        break;
                    }
                    Some(r) => {
                        failure = Some(r);
                        break;
                    }
                    None => {}
                }
                if output == GuardOutput::Held {
                    for e in held.drain(..) {
                        e.write_to(&mut wire);
                    }
                }
            }
            if !wire.is_empty()
                && s.write_response_body(Some(Bytes::copy_from_slice(&wire)), false)
                    .await
                    .is_err()
            {
                // The client left: stop reading, close the provider connection.
                ctx.rec.client_gone = true;
                break;
            }
            ctx.rec.response_bytes += wire.len();
        }
        wire.clear();
        if !ctx.rec.client_gone && failure.is_none() && !filtered {
            match framer.finish() {
                Ok(Some(event)) => match d.note_event(&event, &mut seen) {
                    Ok(()) => {
                        for out in stages.push(event) {
                            route_event(d, output, out, &mut unjudged, &mut held, &mut wire);
                        }
                    }
                    Err(why) => failure = Some(broken(why)),
                },
                Ok(None) => {}
                Err(e) => failure = Some(broken(format!("broken SSE from provider: {e}"))),
            }
            if failure.is_none() {
                for out in stages.finish() {
                    route_event(d, output, out, &mut unjudged, &mut held, &mut wire);
                }
            }
            // The last judgement, before anything held is released.
            if output != GuardOutput::Off && failure.is_none() {
                if unjudged.chars > 0 {
                    let (r, outcome) = self.judge_unjudged(ctx, &mut unjudged).await;
                    last_outcome = outcome.or(last_outcome);
                    match r {
                        Some(r) if r.code == ErrorCode::ContentPolicy => filtered = true,
                        Some(r) => failure = Some(r),
                        None => {}
                    }
                }
                if !filtered && failure.is_none() {
                    for e in held.drain(..) {
                        e.write_to(&mut wire);
                    }
                }
            }
            if let Some((_, r)) = stages.stopped() {
                failure = Some(r.clone());
            } else if failure.is_none() && !seen.done {
                failure = Some(broken("provider stream ended without [DONE]".into()));
            }
        }
        if filtered || (output != GuardOutput::Off && failure.is_some()) {
            // Nothing judged unsafe, or not judged, goes out: what the
            // end of the stream brought is dropped with what was held.
            wire.clear();
            held.clear();
        }
        if filtered {
            // Cut the way hosted providers end a filtered stream: a final
            // event with `finish_reason: content_filter`, then `[DONE]`.
            // In `sampled` mode what came before has been sent.
            let n = ctx.request_json.as_ref().map_or(1, |j| d.choices(j));
            for e in d.withheld_end(ctx.rec.model.as_deref(), n) {
                e.write_to(&mut wire);
            }
            ctx.rec.reason_code = Some(ErrorCode::ContentPolicy);
            ctx.rec.reason = Some("the output guard judged the reply unsafe".into());
        }
        ex.finish().await;
        ctx.rec.usage = seen.usage;
        ctx.generated_chars = Some(seen.generated_chars);
        ctx.rec.filters.extend(stages.outcomes());
        ctx.rec.filters.extend(last_outcome);
        if ctx.rec.client_gone {
            ctx.rec.decision = Verdict::Error;
            ctx.rec.reason = Some("client disconnected mid-stream".into());
            return;
        }
        if let Some(r) = failure {
            // Headers are gone: end the stream with an error event the SDKs
            // raise on, and record why.
            d.error_event(&r).write_to(&mut wire);
            ctx.rec.decision = Verdict::Error;
            ctx.rec.reason_code = Some(r.code);
            ctx.rec.reason = Some(r.reason);
            if let Some(u) = ctx.rec.upstream.as_mut() {
                u.error = ctx.rec.reason.clone();
            }
        }
        ctx.rec.response_bytes += wire.len();
        let used = total_tokens(ctx);
        self.settle(ctx, used).await;
        let last = (!wire.is_empty()).then(|| Bytes::from(wire));
        if s.write_response_body(last, true).await.is_err() {
            ctx.rec.client_gone = true;
        }
    }

    async fn upstream_failed(&self, s: &mut Session, ctx: &mut Ctx, e: &UpstreamError) {
        if let Some(u) = ctx.rec.upstream.as_mut() {
            u.error = Some(e.to_string());
        }
        self.refuse(s, ctx, "upstream", upstream_rejection(e)).await
    }

    async fn internal_error(&self, s: &mut Session, ctx: &mut Ctx) {
        let r = Rejection::new(
            ErrorCode::InternalError,
            "could not build a response header",
        );
        self.refuse(s, ctx, "gateway", r).await
    }

    /// Refuse with the OpenAI-shaped error and record why.
    async fn refuse(&self, s: &mut Session, ctx: &mut Ctx, by: &str, r: Rejection) {
        let status = r.code.status();
        if status >= 500 {
            ctx.rec.decision = Verdict::Error;
        } else {
            ctx.rec.decision = Verdict::Blocked;
            ctx.rec.blocked_by = Some(by.to_string());
        }
        ctx.rec.reason_code = Some(r.code);
        ctx.rec.reason = Some(r.reason.clone());
        if !ctx.body_read {
            // Do not drain an unread (possibly huge) body: close instead.
            s.set_keepalive(None);
        }
        let body = ctx.dialect.error_body(&r);
        self.reply_json(s, ctx, status, Bytes::from(body)).await
    }

    async fn reply_json(&self, s: &mut Session, ctx: &mut Ctx, status: u16, body: Bytes) {
        let Ok(mut header) = response_header(status, ctx) else {
            ctx.rec.status = 500;
            return;
        };
        let _ = header.insert_header("content-type", "application/json");
        let _ = header.insert_header("content-length", body.len().to_string());
        ctx.rec.status = status;
        ctx.rec.response_bytes = body.len();
        let written = async {
            s.write_response_header(Box::new(header), false).await?;
            s.write_response_body(Some(body), true).await
        };
        if written.await.is_err() {
            ctx.rec.client_gone = true;
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            body_read: false,
            headers: Vec::new(),
            reservations: Vec::new(),
            strip_usage: false,
            generated_chars: None,
            principal: None,
            request_json: None,
            audit: self.audit.clone(),
            logged: false,
            dialect: dialect::DEFAULT,
            lifecycle: {
                self.lifecycle.in_flight.fetch_add(1, Ordering::AcqRel);
                self.lifecycle.clone()
            },
            rec: RequestRecord {
                kind: "request",
                ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                request_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            },
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let handled = std::panic::AssertUnwindSafe(self.handle(session, ctx))
            .catch_unwind()
            .await;
        if let Err(panic) = handled {
            // A bug, not a client's fault: answer 500 (or end a stream that
            // already started with an error event) and audit it.
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("{}: request handling panicked: {what}", ctx.rec.request_id);
            metrics::PANICS.inc();
            let r = Rejection::new(ErrorCode::InternalError, format!("panic: {what}"));
            if ctx.rec.status == 0 {
                self.refuse(session, ctx, "gateway", r).await;
            } else {
                let mut wire = Vec::new();
                ctx.dialect.error_event(&r).write_to(&mut wire);
                let _ = session
                    .write_response_body(Some(Bytes::from(wire)), true)
                    .await;
                ctx.rec.reason_code = Some(r.code);
                ctx.rec.reason = Some(r.reason);
            }
            ctx.rec.decision = Verdict::Error;
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut Ctx) -> pingora::Result<Box<HttpPeer>> {
        // Never reached: request_filter answers every request.
        pingora::Error::e_explain(pingora::ErrorType::InternalError, "no proxied routes")
    }

    async fn logging(&self, session: &mut Session, error: Option<&pingora::Error>, ctx: &mut Ctx) {
        crate::connections::request_over(session.stream());
        if let Some(e) = error {
            ctx.rec.decision = Verdict::Error;
            ctx.rec.reason.get_or_insert_with(|| e.to_string());
        }
        ctx.close();
    }
}

/// What the request chain decided, as the gateway needs it.
struct Screened {
    rejection: Option<(&'static str, Rejection)>,
    principal: Option<filters::Principal>,
    upstream: Option<(String, String)>,
    /// Declared tools to remove before forwarding.
    strip_tools: Vec<String>,
    /// A rewritten body to forward (request-side redaction).
    body: Option<Value>,
}

enum BodyError {
    TooLarge,
    Client(Box<pingora::Error>),
}

async fn read_body(s: &mut Session, max: usize) -> Result<Bytes, BodyError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = s.read_request_body().await.map_err(BodyError::Client)? {
        if buf.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn content_length(s: &Session) -> Option<usize> {
    s.req_header()
        .headers
        .get("content-length")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn expects_continue(s: &Session) -> bool {
    s.req_header()
        .headers
        .get("expect")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// What the request chain sees of a request.
fn request_view<'a>(
    s: &'a Session,
    ctx: &'a Ctx,
    route: Route,
    body: &'a Value,
    model: Option<&'a str>,
    stream: bool,
) -> RequestView<'a> {
    RequestView {
        request_id: &ctx.rec.request_id,
        authorization: s
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        principal: None,
        dry_run: false,
        route,
        body,
        model,
        stream,
        client_ip: ctx.rec.client_ip.as_deref().and_then(|ip| ip.parse().ok()),
    }
}

/// A response header with the request id and the filters' headers.
fn response_header(status: u16, ctx: &Ctx) -> pingora::Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(4 + ctx.headers.len()))?;
    h.insert_header("x-request-id", &ctx.rec.request_id)?;
    for (name, value) in &ctx.headers {
        h.insert_header(*name, value)?;
    }
    Ok(h)
}

/// A well-formed incoming `x-request-id`, kept in the record's
/// `client_request_id` (the record's own `request_id` is always new:
/// clients may send any id, the same one twice included).
fn client_request_id(incoming: Option<&[u8]>) -> Option<String> {
    match incoming {
        Some(id)
            if (1..=128).contains(&id.len())
                && id.iter().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
                }) =>
        {
            Some(String::from_utf8_lossy(id).into_owned())
        }
        _ => None,
    }
}

/// The request line and headers within `limits.max_header_count` and
/// `limits.max_header_bytes`.
fn headers_fit(s: &Session, limits: &crate::config::LimitsSection) -> Result<(), Rejection> {
    let h = s.req_header();
    let count = h.headers.len();
    let bytes: usize = h.method.as_str().len()
        + h.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + h.headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if count > limits.max_header_count || bytes > limits.max_header_bytes {
        return Err(Rejection::about_input(
            ErrorCode::HeadersTooLarge,
            format!(
                "The request has {count} headers and {bytes} bytes of request line and headers; at most {} and {} are accepted.",
                limits.max_header_count, limits.max_header_bytes
            ),
        ));
    }
    Ok(())
}

fn too_large(max: usize) -> Rejection {
    Rejection::about_input(
        ErrorCode::RequestTooLarge,
        format!("The request body is larger than the limit of {max} bytes."),
    )
}

fn no_such_model(id: &str) -> Rejection {
    Rejection::about_input(
        ErrorCode::ModelNotFound,
        format!("The model `{id}` does not exist or you do not have access to it."),
    )
}

fn upstream_rejection(e: &UpstreamError) -> Rejection {
    match e {
        UpstreamError::Timeout(m) => Rejection::new(ErrorCode::UpstreamTimeout, m.clone()),
        UpstreamError::Failed(m) => Rejection::new(ErrorCode::UpstreamError, m.clone()),
    }
}

/// Headers of a provider's refusal that tell the client when to retry.
const RETRY_HEADERS: [&str; 8] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
];

/// Keep the provider's `Retry-After`, and its `x-ratelimit-*` when the
/// gateway sends none of its own (its own limits are what the caller
/// hits first).
fn keep_retry_headers(ex: &Exchange<'_>, headers: &mut Vec<(&'static str, String)>) {
    let own_limits = headers.iter().any(|(n, _)| n.starts_with("x-ratelimit-"));
    for name in RETRY_HEADERS {
        if name.starts_with("x-ratelimit-") && own_limits {
            continue;
        }
        if let Some(v) = ex.header_str(name) {
            headers.retain(|(n, _)| *n != name);
            headers.push((name, v.to_string()));
        }
    }
}

/// Provider errors about the request itself are passed to the client as
/// they are; errors about the gateway's own credentials (401, 403, 407) and
/// server errors become 502 `upstream_error`.
fn passes_through(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 407)
}

/// Tokens to settle a budget with: the provider's `usage.total_tokens`; 0
/// when the provider refused or failed (nothing was generated); for a
/// stream that ended without usage (the client left, the provider broke
/// off), the prompt estimate plus what was generated; otherwise unknown
/// (keep the reservation).
fn total_tokens(ctx: &Ctx) -> Option<u64> {
    let provider_ok = ctx
        .rec
        .upstream
        .as_ref()
        .and_then(|u| u.status)
        .is_some_and(|st| (200..300).contains(&st));
    let reported = ctx
        .rec
        .usage
        .as_ref()
        .and_then(|u| ctx.dialect.total_tokens(u));
    match (reported, ctx.generated_chars) {
        (Some(n), _) => Some(n),
        (None, _) if !provider_ok => Some(0),
        (None, Some(chars)) => ctx
            .reservations
            .first()
            .map(|r| r.used_without_usage(chars)),
        (None, None) => None,
    }
}

/// The text of a reply the output guard has not judged yet, per choice,
/// each after the overlap kept from its last window (so a stream's
/// judged text is dropped and memory does not grow with the reply).
#[derive(Default)]
struct Unjudged {
    /// Per choice index: the text, and whether any of it is new.
    choices: std::collections::BTreeMap<u64, (String, bool)>,
    /// New characters since the last judgement, all choices together.
    chars: usize,
}

impl Unjudged {
    fn push(&mut self, d: &dyn Dialect, json: &Value) {
        for (index, t) in d.reply_texts(json) {
            if t.is_empty() {
                continue;
            }
            self.chars += t.chars().count();
            let (text, fresh) = self.choices.entry(index).or_default();
            text.push_str(&t);
            *fresh = true;
        }
    }
}

/// Keep only the last `n` characters of `text`: a stream's judged text
/// is dropped once judged, but for an overlap sent again with the next
/// window, so the output guard's memory does not grow with the reply.
fn keep_tail(text: &mut String, n: usize) {
    let len = text.chars().count();
    if len > n {
        let cut = text.char_indices().nth(len - n).map_or(text.len(), |c| c.0);
        text.drain(..cut);
    }
}

/// Where an event goes under the output guard: held (all of them in
/// `held` mode; closing events in `sampled` mode, so a stream can still be
/// cut after its last judgement) or written; its text is counted.
fn route_event(
    d: &dyn Dialect,
    output: GuardOutput,
    event: SseEvent,
    unjudged: &mut Unjudged,
    held: &mut Vec<SseEvent>,
    wire: &mut Vec<u8>,
) {
    if output == GuardOutput::Off {
        event.write_to(wire);
        return;
    }
    if let Some(j) = event.json() {
        unjudged.push(d, j);
    }
    if output == GuardOutput::Held || d.is_closing(&event) {
        held.push(event);
    } else {
        event.write_to(wire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_ids() {
        assert_eq!(
            client_request_id(Some(b"abc-123_x.y:z")).as_deref(),
            Some("abc-123_x.y:z")
        );
        for bad in [&b""[..], b"has space", b"\xff", &[b'a'; 129]] {
            assert_eq!(
                client_request_id(Some(bad)),
                None,
                "{bad:?} must be dropped"
            );
        }
    }

    #[test]
    fn pass_through_rule() {
        assert!(passes_through(400));
        assert!(passes_through(429));
        assert!(!passes_through(401));
        assert!(!passes_through(403));
        assert!(!passes_through(500));
    }

    #[test]
    fn judged_stream_text_keeps_only_the_overlap() {
        let mut t = "ab€dé".to_string();
        keep_tail(&mut t, 3);
        assert_eq!(t, "€dé");
        keep_tail(&mut t, 10);
        assert_eq!(t, "€dé");
        keep_tail(&mut t, 0);
        assert_eq!(t, "");
    }
}
