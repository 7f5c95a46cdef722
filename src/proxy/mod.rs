//! The proxy service: Pingora phases for the LLM routes.
//!
//! Everything happens in `request_filter`, which answers every request
//! itself and returns `Ok(true)`: intake ([`intake`]: headers, size cap,
//! body), the route and its wire format ([`routes`], `filters::dialect`), the request
//! chain, the provider call (re-originated, see `crate::upstream`), the
//! response chain and the output guard ([`relay`], [`output_guard`]), and
//! the reply. `logging`, which Pingora runs once on every path, hands the
//! audit record to the writer. [`connections`] caps connections before
//! Pingora reads a byte; [`pipeline`] builds the filters from the config.

mod approvals;
pub mod connections;
mod intake;
mod output_guard;
pub mod pipeline;
mod relay;
mod routes;

use crate::audit::{AuditLog, RequestRecord, UpstreamRecord, Verdict};
use crate::config::Config;
use crate::config::GuardOutput;
use crate::metrics;
use crate::upstream::{Upstream, UpstreamError};
use async_trait::async_trait;
use bytes::Bytes;
use filters::dialect::{self, Dialect, Forward};
use filters::model_registry::ModelGate;
use filters::prompt::{self, Prompt};
use filters::rate_limit::{RateLimiter, Reservation};
use filters::{ErrorCode, FilterKind, Rejection, RequestView, ResponseChain, Route};
use futures_util::FutureExt;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pipeline::Filters;
use routes::Endpoint;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Status recorded when the client left before a response was written
/// (nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

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
    /// Held tool calls, when calls are held for approval.
    approvals: Option<Arc<dyn filters::approval::ApprovalStore>>,
    /// Told of new pending approvals.
    webhook: Option<Arc<approvals::Webhook>>,
    /// The tool policy, to name tools in metrics.
    tools: Option<Arc<filters::shared::Shared<filters::tool_authz::ToolPolicy>>>,
    /// Sends traces, when `tracing:` names a collector.
    tracer: Option<Arc<crate::trace::Tracer>>,
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
    /// A token sent as `x-api-key` (the Anthropic SDKs' header), as the
    /// `Authorization` value it stands for when that header is absent.
    api_key: Option<String>,
    /// Where the reply's calls to `approval_required` tools are held.
    holding: Option<Arc<filters::approval::Holding>>,
    /// The tool policy, to name tools in metrics.
    tools: Option<Arc<filters::shared::Shared<filters::tool_authz::ToolPolicy>>>,
    /// When the provider call was sent, and when its reply's last byte
    /// came: the rest of the request's time is the gateway's.
    upstream_sent: Option<Instant>,
    upstream_done: Option<Instant>,
    /// When the request body was read (the gateway's own time starts).
    body_done: Option<Instant>,
    /// The filter or stage that refused or failed the request.
    stage: Option<String>,
    /// The registry resolved the request's model.
    model_resolved: bool,
    /// This request's trace, when tracing is on.
    trace: Option<crate::trace::RequestTrace>,
    tracer: Option<Arc<crate::trace::Tracer>>,
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
        let decision = metrics::decision_name(rec.decision);
        metrics::REQUESTS
            .with_label_values(&[route, &rec.status.to_string(), decision])
            .inc();
        metrics::REQUEST_SECONDS
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        // The gateway's own time: from the body read to the end, less the
        // wait on the provider.
        let now = Instant::now();
        let overhead = match (self.body_done, self.upstream_sent, self.upstream_done) {
            (Some(body), Some(sent), Some(done)) => Some(
                now.saturating_duration_since(body)
                    .saturating_sub(done.saturating_duration_since(sent)),
            ),
            _ => None,
        };
        let policy = self.tools.as_ref().map(|t| t.get());
        let listed = |tool: &str| policy.as_ref().is_some_and(|p| p.lists(tool));
        let seen = metrics::Observed {
            overhead,
            stage: self.stage.take(),
            model_resolved: self.model_resolved,
        };
        metrics::observe(rec, self.dialect, &listed, &seen);
        if let (Some(tracer), Some(t)) = (&self.tracer, &self.trace) {
            let call = self
                .upstream_sent
                .map(|sent| (sent, self.upstream_done.unwrap_or_else(Instant::now)));
            tracer.finish(t, rec, self.dialect, call);
        }
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
        tracer: Option<Arc<crate::trace::Tracer>>,
    ) -> anyhow::Result<Self> {
        let webhook = match (&filters.approvals, &cfg.approvals.webhook_url) {
            (Some(_), Some(url)) => Some(Arc::new(
                approvals::Webhook::new(
                    url,
                    Duration::from_millis(cfg.approvals.webhook_timeout_ms),
                )
                .map_err(|e| anyhow::anyhow!(e))?,
            )),
            _ => None,
        };
        Ok(Self {
            lifecycle,
            approvals: filters.approvals,
            tools: filters.tools,
            tracer,
            webhook,
            cfg,
            chain: filters.chain,
            responses: filters.responses,
            limiter: filters.limiter,
            gate: filters.gate,
            guard: filters.guard,
            upstream,
            audit,
        })
    }

    /// Run the request chain and apply what it found to the context.
    /// Returns the rejection, if any, with the filter that made it.
    async fn screen(&self, s: &Session, ctx: &mut Ctx, asked: Asked<'_>) -> Screened {
        if let Some(t) = ctx.trace.as_mut() {
            t.chain_started = Some(Instant::now());
        }
        let view = request_view(s, ctx, asked);
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
        let view = request_view(s, ctx, Asked::nothing(route));
        let report = self
            .chain
            .run_filtered(&view, |k| k == FilterKind::JwtAuth)
            .await;
        let (kind, r) = report.rejection?;
        ctx.rec.filters = report.outcomes;
        ctx.headers = report.headers;
        Some((kind.as_str(), r))
    }

    /// `GET /v1/models` and `GET /v1/models/{id}`: the models the caller
    /// may use now.
    async fn models(&self, s: &mut Session, ctx: &mut Ctx, id: Option<String>) {
        ctx.rec.route = Some(Route::Models);
        let screened = self.screen(s, ctx, Asked::nothing(Route::Models)).await;
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
                        .refuse(
                            s,
                            ctx,
                            "model_registry",
                            filters::model_registry::no_such_model(&id),
                        )
                        .await
                }
            },
        };
        self.reply_json(s, ctx, 200, Bytes::from(body.to_string()))
            .await
    }

    async fn handle(&self, s: &mut Session, ctx: &mut Ctx) {
        crate::proxy::connections::headers_done(s.stream());
        let header = s.req_header();
        ctx.rec.client_request_id = filters::intake::client_request_id(
            header.headers.get("x-request-id").map(|v| v.as_bytes()),
        );
        ctx.rec.method = header.method.to_string();
        if let Some(tracer) = &self.tracer {
            let parent = header
                .headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok());
            let states = tracestates(header);
            ctx.trace = Some(tracer.start(parent, &states));
        }
        ctx.api_key = header
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(|k| format!("Bearer {}", k.trim()));
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
        if let Err(r) = intake::headers_fit(s, &self.cfg.limits) {
            return self.refuse(s, ctx, "intake", r).await;
        }
        if let Err(why) = self.audit.admit() {
            let r = Rejection::new(ErrorCode::AuditUnavailable, why);
            return self.refuse(s, ctx, "audit", r).await;
        }
        match routes::resolve(&ctx.rec.method, &ctx.rec.path) {
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
        if intake::content_length(s).is_some_and(|len| len > max) {
            return self
                .refuse(s, ctx, "intake", filters::intake::too_large(max))
                .await;
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
        if intake::expects_continue(s) {
            // Without this a client that waits for 100 stalls until its own
            // timeout before it sends the body.
            let _ = s.write_continue_response().await;
        }
        let limit = Duration::from_secs(self.cfg.limits.client_body_timeout_secs);
        let body = match tokio::time::timeout(limit, intake::read_body(s, max)).await {
            Err(_) => {
                let r = Rejection::new(
                    ErrorCode::RequestTimeout,
                    "client did not send its body in time",
                );
                return self.refuse(s, ctx, "intake", r).await;
            }
            Ok(Err(intake::BodyError::TooLarge)) => {
                return self
                    .refuse(s, ctx, "intake", filters::intake::too_large(max))
                    .await
            }
            Ok(Err(intake::BodyError::Client(e))) => {
                ctx.rec.client_gone = true;
                ctx.rec.decision = Verdict::Error;
                ctx.rec.reason = Some(format!("reading the request body: {e}"));
                return;
            }
            Ok(Ok(body)) => body,
        };
        ctx.body_read = true;
        ctx.body_done = Some(Instant::now());
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
        let prompt = d.prompt(&parsed.json);
        let screened = self
            .screen(
                s,
                ctx,
                Asked {
                    route,
                    body: &parsed.json,
                    prompt: &prompt,
                    model: Some(&parsed.model),
                    stream: parsed.stream,
                },
            )
            .await;
        ctx.model_resolved = screened.upstream.is_some();
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
        ctx.model_resolved |= upstream.is_some();
        let Some((provider, upstream_model)) = upstream else {
            return self
                .refuse(
                    s,
                    ctx,
                    "model_registry",
                    filters::model_registry::no_such_model(&parsed.model),
                )
                .await;
        };
        if let Some(r) = self.speaks(&provider, d, &parsed.model) {
            return self.refuse(s, ctx, "model_registry", r).await;
        }
        ctx.rec.upstream_model = Some(upstream_model.clone());
        let approval = s
            .req_header()
            .headers
            .get(filters::approval::HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string());
        if let Some(id) = approval {
            // Answered from the approved calls: no provider, no tokens.
            self.hand_out(s, ctx, &id, &parsed.json).await;
            return self.settle(ctx, Some(0)).await;
        }
        ctx.holding = self.holding_for(ctx, d);

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
        let guard_prompt = d.prompt(&guard_body);
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
        let mut passed = passed_headers(s, d);
        trace_headers(s, ctx, &mut passed);
        let mut upstream = UpstreamRecord {
            provider: provider.clone(),
            ..Default::default()
        };
        let sent = Instant::now();
        ctx.upstream_sent = Some(sent);
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
                &passed,
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
                    prompt: &guard_prompt,
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
        if let Some(t) = ctx.trace.as_mut() {
            t.reply_started = Some(Instant::now());
        }
        upstream.latency_ms = Some(latency.as_secs_f64() * 1e3);
        metrics::UPSTREAM_SECONDS
            .with_label_values(&[&provider])
            .observe(latency.as_secs_f64());
        let exchange = match result {
            Ok(ex) => ex,
            Err(e) => {
                ctx.upstream_done = Some(Instant::now());
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

    /// A refusal when the provider serving the model does not speak the
    /// request's API (a Messages request for a model on an OpenAI
    /// provider, or the other way round).
    fn speaks(&self, provider: &str, d: &dyn Dialect, model: &str) -> Option<Rejection> {
        let kind = self.cfg.providers.get(provider)?.kind;
        let api = match kind {
            crate::config::ProviderKind::Openai => dialect::ProviderApi::OpenAi,
            crate::config::ProviderKind::Anthropic => dialect::ProviderApi::Anthropic,
        };
        (api != d.provider_api()).then(|| {
            Rejection::about_input(
                ErrorCode::InvalidRequest,
                format!(
                    "The model `{model}` is served by a provider that does not speak this API; call it through the API of its provider."
                ),
            )
        })
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
        ctx.stage = Some(by.to_string());
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
            api_key: None,
            holding: None,
            tools: self.tools.clone(),
            upstream_sent: None,
            upstream_done: None,
            body_done: None,
            stage: None,
            model_resolved: false,
            trace: None,
            tracer: self.tracer.clone(),
            lifecycle: {
                self.lifecycle.in_flight.fetch_add(1, Ordering::AcqRel);
                self.lifecycle.clone()
            },
            rec: RequestRecord {
                kind: "request",
                ts: crate::clock::timestamp(),
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
        crate::proxy::connections::request_over(session.stream());
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

/// The client's headers the dialect passes on, when they are short
/// visible ASCII.
fn passed_headers(s: &Session, d: &dyn Dialect) -> Vec<(&'static str, String)> {
    d.passed_headers()
        .iter()
        .filter_map(|name| {
            let v = s.req_header().headers.get(*name)?;
            let ok = v.len() <= 256 && v.as_bytes().iter().all(|b| (0x20..0x7f).contains(b));
            ok.then(|| (*name, String::from_utf8_lossy(v.as_bytes()).into_owned()))
        })
        .collect()
}

/// The client's `tracestate` headers, in order (the spec makes several
/// one list).
fn tracestates(header: &pingora::http::RequestHeader) -> Vec<&str> {
    header
        .headers
        .get_all("tracestate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

/// The trace context for the provider: the provider call's own span when
/// tracing is on, else the client's well-formed `traceparent` and
/// `tracestate` as they came.
fn trace_headers(s: &Session, ctx: &Ctx, out: &mut Vec<(&'static str, String)>) {
    if let Some(t) = &ctx.trace {
        out.push(("traceparent", t.provider_header()));
        if let Some(state) = &t.tracestate {
            out.push(("tracestate", state.clone()));
        }
        return;
    }
    let header = s.req_header();
    let parent = header
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::trace::TraceParent::parse(v).is_some());
    if let Some(p) = parent {
        out.push(("traceparent", p.trim().to_string()));
        let state = tracestates(header).join(",");
        if crate::trace::valid_tracestate(&state) {
            out.push(("tracestate", state));
        }
    }
}

/// What a request asks, as the request chain reads it.
#[derive(Clone, Copy)]
struct Asked<'a> {
    route: Route,
    body: &'a Value,
    prompt: &'a Prompt<'a>,
    model: Option<&'a str>,
    stream: bool,
}

impl Asked<'static> {
    /// A request without a body (the model list, the headers-only
    /// authentication pass).
    fn nothing(route: Route) -> Self {
        Self {
            route,
            body: &Value::Null,
            prompt: &prompt::EMPTY,
            model: None,
            stream: false,
        }
    }
}

/// What the request chain sees of a request.
fn request_view<'a>(s: &'a Session, ctx: &'a Ctx, asked: Asked<'a>) -> RequestView<'a> {
    RequestView {
        request_id: &ctx.rec.request_id,
        authorization: s
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .or(ctx.api_key.as_deref()),
        principal: None,
        dry_run: false,
        route: asked.route,
        body: asked.body,
        prompt: asked.prompt,
        model: asked.model,
        stream: asked.stream,
        client_ip: ctx.rec.client_ip.as_deref().and_then(|ip| ip.parse().ok()),
    }
}

/// What the response stages know of this exchange.
pub(super) fn stage_context<'a>(
    ctx: &'a Ctx,
    approvals: filters::approval::Approvals<'a>,
) -> filters::ResponseContext<'a> {
    filters::ResponseContext {
        request_id: &ctx.rec.request_id,
        route: ctx.dialect.route(),
        model: ctx.rec.model.as_deref(),
        principal: ctx.principal.as_ref(),
        approvals,
    }
}

/// A response header with the request id and the filters' headers.
pub(super) fn response_header(status: u16, ctx: &Ctx) -> pingora::Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(4 + ctx.headers.len()))?;
    h.insert_header("x-request-id", &ctx.rec.request_id)?;
    // Anthropic's SDKs read the request id from `request-id`.
    h.insert_header("request-id", &ctx.rec.request_id)?;
    for (name, value) in &ctx.headers {
        h.insert_header(*name, value)?;
    }
    Ok(h)
}

pub(super) fn upstream_rejection(e: &UpstreamError) -> Rejection {
    match e {
        UpstreamError::Timeout(m) => Rejection::new(ErrorCode::UpstreamTimeout, m.clone()),
        UpstreamError::Failed(m) => Rejection::new(ErrorCode::UpstreamError, m.clone()),
    }
}

/// Tokens to settle a budget with (`filters::rate_limit::tokens_to_settle`).
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
    filters::rate_limit::tokens_to_settle(
        reported,
        provider_ok,
        ctx.generated_chars,
        ctx.reservations.first(),
    )
}
