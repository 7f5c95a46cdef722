//! The admin listener: the admin API (JWT with an admin role to change
//! things, an auditor role to read), `/healthz`, `/readyz` and `/metrics`.
//!
//! Every `/admin/*` call writes its own audit record (who, what, before,
//! after) into the same hash chain as the requests. The routes are listed
//! once, in [`ROUTES`]; `docs/admin-api.yaml` documents them and a test
//! fails when one is missing there.

use crate::audit::{AuditLog, Verdict};
use crate::config::AdminSection;
use crate::dialect::openai::error_body;
use crate::http_server::{self, full, ResponseBody};
use crate::metrics;
use crate::proxy::pipeline;
use crate::registry::{RegistryStore, UpdateError};
use async_trait::async_trait;
use filters::injection::Detector;
use filters::jwt_auth::JwtAuth;
use filters::model_registry::{FreezeTarget, Lifecycle, ModelEntry, NewModel, RegistryError};
use filters::rate_limit::RateLimiter;
use filters::redact::Redactor;
use filters::shared::Shared;
use filters::tool_authz::ToolPolicy;
use filters::{Chain, ErrorCode, Principal, Rejection, RequestView, Route};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Every route of the admin listener, `{name}` for a path segment.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/admin/models"),
    ("POST", "/admin/models"),
    ("GET", "/admin/models/{id}"),
    ("POST", "/admin/models/{id}/{action}"),
    ("POST", "/admin/subjects/{sub}/{action}"),
    ("POST", "/admin/tenants/{tenant}/{action}"),
    ("POST", "/admin/simulate"),
    ("POST", "/admin/reload"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// Match a path against [`ROUTES`]: the pattern and its parameters.
pub fn route(method: &str, path: &str) -> Result<(&'static str, Vec<String>), u16> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut path_known = false;
    for (m, pattern) in ROUTES {
        let pat: Vec<&str> = pattern.split('/').collect();
        if pat.len() != parts.len() {
            continue;
        }
        let mut params = Vec::new();
        let fits = pat.iter().zip(&parts).all(|(p, s)| {
            if p.starts_with('{') {
                params.push(s.to_string());
                !s.is_empty()
            } else {
                p == s
            }
        });
        if fits {
            path_known = true;
            if *m == method {
                return Ok((pattern, params));
            }
        }
    }
    Err(if path_known { 405 } else { 404 })
}

/// What the admin API works with.
pub struct AdminApi {
    pub jwt: Option<Arc<JwtAuth>>,
    pub registry: Arc<dyn RegistryStore>,
    pub chain: Arc<Chain>,
    pub limiter: Option<Arc<RateLimiter>>,
    pub rate_limit_policy: Option<PathBuf>,
    pub redactor: Option<(Arc<Shared<Redactor>>, PathBuf)>,
    pub tools: Option<(Arc<Shared<ToolPolicy>>, PathBuf)>,
    pub injection: Option<(Arc<Shared<Detector>>, PathBuf)>,
    pub guard: Option<(Arc<Shared<filters::guard::GuardPolicy>>, PathBuf)>,
    pub guard_breaker: Option<Arc<filters::guard::breaker::Breaker>>,
    pub providers: BTreeSet<String>,
    pub roles: AdminSection,
    pub audit: AuditLog,
    /// Draining after SIGTERM: `/readyz` says 503.
    pub lifecycle: Arc<crate::proxy::Lifecycle>,
}

pub struct AdminService {
    pub listen: SocketAddr,
    /// The proxy listener; ready means it accepts connections.
    pub proxy: SocketAddr,
    pub api: Arc<AdminApi>,
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let listener = match tokio::net::TcpListener::bind(self.listen).await {
            Ok(l) => l,
            Err(e) => {
                log::error!("admin listener {}: {e}", self.listen);
                return;
            }
        };
        // SIGHUP re-reads the policies, like POST /admin/reload.
        let api = self.api.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                match api.reload() {
                    Ok(what) => log::info!("SIGHUP: reloaded {what}"),
                    Err(e) => log::error!("SIGHUP: reload failed: {e}"),
                }
            }
        });
        let proxy = loopback(self.proxy);
        let api = self.api.clone();
        let handler = move |req: Request<hyper::body::Incoming>| {
            let api = api.clone();
            async move { handle(req, proxy, &api).await }
        };
        let header_timeout = Duration::from_secs(self.api.roles.header_read_timeout_secs);
        http_server::serve(listener, handler, header_timeout, async move {
            let _ = shutdown.changed().await;
        })
        .await;
    }
}

/// A wildcard listen address is reached through loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

fn text(status: u16, body: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    proxy: SocketAddr,
    api: &AdminApi,
) -> Response<ResponseBody> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    match route(&method, &path) {
        Ok(("/healthz", _)) => text(200, "ok\n"),
        Ok(("/readyz", _)) => {
            let probe = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(proxy),
            )
            .await;
            let registry = api.registry.snapshot().is_ok();
            match probe {
                _ if api.lifecycle.draining() => text(503, "shutting down\n"),
                Ok(Ok(_)) if !registry => text(503, "model registry not loaded\n"),
                // Not ready while requests would be refused for want of an
                // audit trail (`on_error: deny`); with `allow` the failure
                // shows in `portcullis_audit_sink_failing` only, so that a
                // shared sink's outage does not take every instance out.
                Ok(Ok(_)) => match api.audit.admit() {
                    Ok(()) => text(200, "ready\n"),
                    Err(why) => {
                        let mut r = Response::new(full(format!("audit sink failing: {why}\n")));
                        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        r
                    }
                },
                _ => text(503, "proxy listener not accepting connections\n"),
            }
        }
        Ok(("/metrics", _)) => {
            if let Some(b) = &api.guard_breaker {
                use filters::guard::breaker::State;
                metrics::GUARD_BREAKER.set(match b.state() {
                    State::Closed => 0,
                    State::HalfOpen => 1,
                    State::Open => 2,
                });
            }
            let mut r = Response::new(full(metrics::render()));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        Ok((pattern, raw)) => api.call(req, pattern, raw).await,
        Err(404) => error(&Rejection::about_input(
            ErrorCode::UnknownRoute,
            format!("No route {method} {path}."),
        )),
        Err(_) => error(&Rejection::about_input(
            ErrorCode::MethodNotAllowed,
            format!("{path} does not accept {method}."),
        )),
    }
}

fn error(r: &Rejection) -> Response<ResponseBody> {
    let mut resp = Response::new(full(error_body(r)));
    *resp.status_mut() = hyper::StatusCode::from_u16(r.code.status()).unwrap_or_default();
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// One admin action's audit record.
#[derive(Debug, Default, Serialize)]
struct AdminRecord {
    kind: &'static str,
    ts: String,
    request_id: String,
    sub: Option<String>,
    tenant: Option<String>,
    roles: Vec<String>,
    method: String,
    path: String,
    /// e.g. `model.approve`, `subject.freeze`, `simulate`.
    action: String,
    target: Option<String>,
    decision: Verdict,
    status: u16,
    reason_code: Option<ErrorCode>,
    reason: Option<String>,
    before: Option<Value>,
    after: Option<Value>,
    duration_ms: f64,
}

/// What an action did, for the reply and the audit record.
struct Done {
    status: u16,
    body: Value,
    before: Option<Value>,
    after: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateBody {
    principal: SimPrincipal,
    #[serde(default)]
    route: Option<String>,
    body: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimPrincipal {
    sub: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection::about_input(ErrorCode::InvalidRequest, message)
}

fn registry_error(e: UpdateError) -> Rejection {
    match e {
        UpdateError::Registry(RegistryError::NotFound(id)) => Rejection::about_input(
            ErrorCode::ModelNotFound,
            format!("No model `{id}` is registered."),
        ),
        UpdateError::Registry(
            e @ (RegistryError::IllegalTransition { .. } | RegistryError::Exists(_)),
        ) => Rejection::about_input(ErrorCode::InvalidTransition, e.to_string()),
        UpdateError::Registry(RegistryError::Invalid(m)) => bad(m),
        UpdateError::Store(m) => Rejection::new(ErrorCode::RegistryUnavailable, m),
    }
}

impl AdminApi {
    /// Re-read every policy file: all are loaded and checked first, and
    /// only if all are good are they swapped in (a broken file keeps every
    /// old policy). Returns what was reloaded; counted in
    /// `portcullis_policy_reloads_total{result}`.
    pub fn reload(&self) -> Result<String, String> {
        let result = self.reload_policies();
        metrics::POLICY_RELOADS
            .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
            .inc();
        result
    }

    fn reload_policies(&self) -> Result<String, String> {
        let limits = match (&self.limiter, &self.rate_limit_policy) {
            (Some(l), Some(path)) => Some((
                l,
                pipeline::load_limits(path).map_err(|e| e.join("; "))?,
                path,
            )),
            _ => None,
        };
        let redaction = match &self.redactor {
            Some((shared, path)) => Some((
                shared,
                pipeline::load_redactor(path).map_err(|e| e.join("; "))?,
                path,
            )),
            None => None,
        };
        let tools = match &self.tools {
            Some((shared, path)) => Some((
                shared,
                pipeline::load_tools(path).map_err(|e| e.join("; "))?,
                path,
            )),
            None => None,
        };
        let injection = match &self.injection {
            Some((shared, path)) => Some((
                shared,
                pipeline::load_injection(path).map_err(|e| e.join("; "))?,
                path,
            )),
            None => None,
        };
        let guard = match &self.guard {
            Some((shared, path)) => Some((
                shared,
                pipeline::load_guard_policy(path).map_err(|e| e.join("; "))?,
                path,
            )),
            None => None,
        };
        let mut done = Vec::new();
        if let Some((l, policy, path)) = limits {
            l.set_policy(policy);
            done.push(path.display().to_string());
        }
        if let Some((shared, r, path)) = redaction {
            shared.set(r);
            done.push(path.display().to_string());
        }
        if let Some((shared, t, path)) = tools {
            shared.set(t);
            done.push(path.display().to_string());
        }
        if let Some((shared, d, path)) = injection {
            shared.set(d);
            done.push(path.display().to_string());
        }
        if let Some((shared, g, path)) = guard {
            shared.set(g);
            done.push(path.display().to_string());
        }
        Ok(if done.is_empty() {
            "nothing (no policy files configured)".into()
        } else {
            done.join(", ")
        })
    }

    async fn call(
        &self,
        req: Request<hyper::body::Incoming>,
        pattern: &str,
        params: Vec<String>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let mut rec = AdminRecord {
            kind: "admin",
            ts: now(),
            request_id: uuid::Uuid::new_v4().to_string(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            ..Default::default()
        };
        let (parts, body) = req.into_parts();
        let authorization = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let declared_len = parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let result = async {
            // Split first, then decode: `meta-llama%2FLlama-3` is one id.
            let params = params
                .iter()
                .map(|p| http_server::percent_decode(p).filter(|p| !p.is_empty()))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| bad("a path segment is not valid percent-encoded UTF-8"))?;
            // Who is asking is settled from the headers alone, before a
            // byte of the body is read.
            let who = self.authorize(&mut rec, authorization, pattern, &params)?;
            // A change that cannot be audited is not made.
            if rec.method != "GET" {
                self.audit
                    .admit()
                    .map_err(|why| Rejection::new(ErrorCode::AuditUnavailable, why))?;
            }
            let body = read_body(body, declared_len).await?;
            self.act(&mut rec, who, pattern, &params, &body).await
        }
        .await;
        let (status, reply) = match result {
            Ok(done) => {
                rec.before = done.before;
                rec.after = done.after;
                (done.status, done.body.to_string().into_bytes())
            }
            Err(r) => {
                rec.decision = if r.code.status() >= 500 {
                    Verdict::Error
                } else {
                    Verdict::Blocked
                };
                rec.reason_code = Some(r.code);
                rec.reason = Some(r.reason.clone());
                (r.code.status(), error_body(&r))
            }
        };
        rec.status = status;
        rec.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        self.audit.send(&rec);
        let mut resp = Response::new(full(reply));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = hyper::header::HeaderValue::from_str(&rec.request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }

    /// Authenticate and authorize: an admin role to change things, an
    /// auditor role to read, and neither subject nor tenant frozen (frozen
    /// means frozen, for admins too: another admin unfreezes).
    fn authorize(
        &self,
        rec: &mut AdminRecord,
        authorization: Option<&str>,
        pattern: &str,
        params: &[String],
    ) -> Result<Principal, Rejection> {
        let writes = rec.method != "GET";
        rec.action = action_name(pattern, params);
        rec.target = params.first().cloned();
        let Some(jwt) = &self.jwt else {
            return Err(Rejection::new(
                ErrorCode::InvalidToken,
                "the admin API needs `auth` configured",
            ));
        };
        let who = jwt
            .authenticate(authorization)
            .map_err(|(code, reason)| Rejection::new(code, reason))?;
        rec.sub = Some(who.subject.clone());
        rec.tenant = Some(who.tenant.clone());
        rec.roles = who.roles.clone();
        let admin = who.roles.contains(&self.roles.admin_role);
        let auditor = who.roles.contains(&self.roles.auditor_role);
        if !(admin || (auditor && !writes)) {
            let need = if writes { "admin" } else { "admin or auditor" };
            return Err(Rejection::new(
                ErrorCode::Forbidden,
                format!("{need} role required; caller has {:?}", who.roles),
            ));
        }
        let state = self
            .registry
            .snapshot()
            .map_err(|e| Rejection::new(ErrorCode::RegistryUnavailable, e))?;
        if let Some(r) = filters::model_registry::frozen(&state, &who) {
            return Err(r);
        }
        Ok(who)
    }

    /// Do what the route says, for an authorized caller.
    async fn act(
        &self,
        rec: &mut AdminRecord,
        who: Principal,
        pattern: &str,
        params: &[String],
        body: &[u8],
    ) -> Result<Done, Rejection> {
        let writes = rec.method != "GET";
        let actor = who.subject.clone();
        match pattern {
            "/admin/models" if !writes => {
                let state = self
                    .registry
                    .snapshot()
                    .map_err(|e| Rejection::new(ErrorCode::RegistryUnavailable, e))?;
                let models: Vec<&ModelEntry> = state.models.values().collect();
                Ok(read(json!({"object": "list", "data": models})))
            }
            "/admin/models/{id}" => {
                let state = self
                    .registry
                    .snapshot()
                    .map_err(|e| Rejection::new(ErrorCode::RegistryUnavailable, e))?;
                match state.models.get(&params[0]) {
                    Some(m) => Ok(read(json!(m))),
                    None => Err(registry_error(UpdateError::Registry(
                        RegistryError::NotFound(params[0].clone()),
                    ))),
                }
            }
            "/admin/models" => {
                let r: NewModel =
                    serde_json::from_slice(body).map_err(|e| bad(format!("bad model: {e}")))?;
                if !self.providers.contains(&r.provider) {
                    return Err(bad(format!("no provider named `{}`", r.provider)));
                }
                rec.target = Some(r.id.clone());
                let at = now();
                let entry = r
                    .register(&actor, &at)
                    .map_err(|e| registry_error(e.into()))?;
                let change = move |s: &mut filters::model_registry::RegistryState| {
                    s.register(entry.clone())?;
                    Ok(json!(entry))
                };
                let after = self
                    .registry
                    .update(&change)
                    .await
                    .map_err(registry_error)?;
                Ok(Done {
                    status: 201,
                    body: after.clone(),
                    before: None,
                    after: Some(after),
                })
            }
            "/admin/models/{id}/{action}" => {
                let action = Lifecycle::parse(&params[1]).ok_or_else(|| {
                    bad(format!(
                        "unknown action `{}`: approve, freeze, unfreeze or retire",
                        params[1]
                    ))
                })?;
                let id = params[0].clone();
                let at = now();
                let change = move |s: &mut filters::model_registry::RegistryState| {
                    let (before, after) = s.transition(&id, action, &actor, &at)?;
                    Ok(json!({"before": before, "after": after}))
                };
                let v = self
                    .registry
                    .update(&change)
                    .await
                    .map_err(registry_error)?;
                Ok(Done {
                    status: 200,
                    body: v["after"].clone(),
                    before: Some(v["before"].clone()),
                    after: Some(v["after"].clone()),
                })
            }
            "/admin/subjects/{sub}/{action}" | "/admin/tenants/{tenant}/{action}" => {
                let target = if pattern.starts_with("/admin/subjects") {
                    FreezeTarget::Subject
                } else {
                    FreezeTarget::Tenant
                };
                let frozen = match params[1].as_str() {
                    "freeze" => true,
                    "unfreeze" => false,
                    other => {
                        return Err(bad(format!("unknown action `{other}`: freeze or unfreeze")))
                    }
                };
                let name = params[0].clone();
                let own = match target {
                    FreezeTarget::Subject => who.subject == name,
                    FreezeTarget::Tenant => who.tenant == name,
                };
                if frozen && own {
                    // A frozen admin can do nothing, unfreezing included:
                    // freezing oneself would lock the caller out.
                    return Err(Rejection::about_input(
                        ErrorCode::InvalidTransition,
                        "An admin cannot freeze itself or its own tenant; another admin can.",
                    ));
                }
                let at = now();
                let change = move |s: &mut filters::model_registry::RegistryState| {
                    let changed = s.set_frozen(target, &name, frozen, &actor, &at);
                    Ok(json!({"name": name, "frozen": frozen, "changed": changed}))
                };
                let v = self
                    .registry
                    .update(&change)
                    .await
                    .map_err(registry_error)?;
                let was = v["changed"]
                    .as_bool()
                    .map(|c| if c { !frozen } else { frozen });
                Ok(Done {
                    status: 200,
                    body: v,
                    before: was.map(|f| json!({"frozen": f})),
                    after: Some(json!({"frozen": frozen})),
                })
            }
            "/admin/simulate" => self.simulate(body).await.map(read),
            "/admin/reload" => {
                let what = self
                    .reload()
                    .map_err(|e| bad(format!("reload failed, nothing changed: {e}")))?;
                Ok(read(json!({"reloaded": what})))
            }
            _ => Err(Rejection::new(
                ErrorCode::InternalError,
                format!("unhandled route {pattern}"),
            )),
        }
    }

    /// Run a request through the request chain for a given caller without
    /// forwarding it or spending any limit.
    async fn simulate(&self, body: &[u8]) -> Result<Value, Rejection> {
        let sim: SimulateBody =
            serde_json::from_slice(body).map_err(|e| bad(format!("bad simulation: {e}")))?;
        let route = match sim.route.as_deref().unwrap_or("chat/completions") {
            "chat/completions" => Route::ChatCompletions,
            "completions" => Route::Completions,
            "embeddings" => Route::Embeddings,
            other => return Err(bad(format!("unknown route `{other}`"))),
        };
        let principal = Principal {
            subject: sim.principal.sub,
            tenant: sim.principal.tenant.unwrap_or_else(|| "default".into()),
            roles: sim.principal.roles,
        };
        let model = sim.body["model"].as_str();
        let view = RequestView {
            request_id: "simulation",
            authorization: None,
            principal: Some(&principal),
            dry_run: true,
            route,
            body: &sim.body,
            model,
            stream: sim.body["stream"].as_bool().unwrap_or(false),
            client_ip: None,
        };
        let report = self.chain.run(&view).await;
        let (decision, by, code) = match &report.rejection {
            Some((kind, r)) => ("blocked", Some(kind.as_str()), Some(r.code)),
            None => ("allowed", None, None),
        };
        Ok(json!({
            "decision": decision,
            "blocked_by": by,
            "reason_code": code,
            "filters": report.outcomes,
            "upstream": report.upstream.map(|(p, m)| json!({"provider": p, "upstream_model": m})),
        }))
    }
}

/// The largest admin request body.
pub const MAX_ADMIN_BODY: usize = 1 << 20;
/// How long an admin client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Read an admin request body: at most [`MAX_ADMIN_BODY`] bytes (a larger
/// declared length is refused unread), within [`BODY_TIMEOUT`].
async fn read_body(
    body: hyper::body::Incoming,
    declared_len: Option<u64>,
) -> Result<bytes::Bytes, Rejection> {
    let too_large = || {
        Rejection::about_input(
            ErrorCode::RequestTooLarge,
            format!("The request body is larger than the limit of {MAX_ADMIN_BODY} bytes."),
        )
    };
    if declared_len.is_some_and(|n| n > MAX_ADMIN_BODY as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, MAX_ADMIN_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(Rejection::about_input(
            ErrorCode::RequestTimeout,
            "The request body was not received in time.",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(bad(format!("cannot read the body: {e}"))),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}

fn read(body: Value) -> Done {
    Done {
        status: 200,
        body,
        before: None,
        after: None,
    }
}

fn action_name(pattern: &str, params: &[String]) -> String {
    match pattern {
        "/admin/models/{id}/{action}" => format!("model.{}", params[1]),
        "/admin/subjects/{sub}/{action}" => format!("subject.{}", params[1]),
        "/admin/tenants/{tenant}/{action}" => format!("tenant.{}", params[1]),
        "/admin/models" => "model.register_or_list".into(),
        "/admin/models/{id}" => "model.show".into(),
        "/admin/simulate" => "simulate".into(),
        "/admin/reload" => "reload".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match() {
        assert_eq!(route("GET", "/admin/models"), Ok(("/admin/models", vec![])));
        assert_eq!(
            route("POST", "/admin/models/gpt-4o/approve"),
            Ok((
                "/admin/models/{id}/{action}",
                vec!["gpt-4o".into(), "approve".into()]
            ))
        );
        assert_eq!(route("DELETE", "/admin/models"), Err(405));
        assert_eq!(route("GET", "/admin/nothing"), Err(404));
    }

    /// Every route is in the OpenAPI document, and every documented
    /// operation is a route.
    #[test]
    fn openapi_documents_every_route() {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../docs/admin-api.yaml")).unwrap();
        let paths = doc["paths"].as_mapping().unwrap();
        let mut documented = BTreeSet::new();
        for (path, ops) in paths {
            for (method, _) in ops.as_mapping().unwrap() {
                let m = method.as_str().unwrap().to_ascii_uppercase();
                if ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&m.as_str()) {
                    documented.insert((m, path.as_str().unwrap().to_string()));
                }
            }
        }
        let routes: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        let missing: Vec<_> = routes.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes missing from docs/admin-api.yaml: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    }
}
