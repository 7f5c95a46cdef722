//! What each admin route does, for a caller who may: authentication and
//! the role check first, an audit record for every call.

use super::routes::action_name;
use super::server::read_body;
use super::AdminApi;
use crate::audit::Verdict;
use crate::http_server::{self, full, ResponseBody};
use crate::stores::registry::UpdateError;
use filters::dialect::openai::error_body;
use filters::model_registry::{FreezeTarget, Lifecycle, ModelEntry, NewModel, RegistryError};
use filters::{ErrorCode, Principal, Rejection, RequestView, Route};
use hyper::{Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Instant;

/// One admin action's audit record.
#[derive(Debug, Default, Serialize)]
pub(super) struct AdminRecord {
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
pub(super) struct Done {
    pub(super) status: u16,
    pub(super) body: Value,
    pub(super) before: Option<Value>,
    pub(super) after: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SimulateBody {
    principal: SimPrincipal,
    #[serde(default)]
    route: Option<String>,
    body: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SimPrincipal {
    sub: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

pub(super) fn bad(message: impl Into<String>) -> Rejection {
    Rejection::about_input(ErrorCode::InvalidRequest, message)
}

pub(super) fn registry_error(e: UpdateError) -> Rejection {
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
    pub(super) async fn call(
        &self,
        req: Request<hyper::body::Incoming>,
        pattern: &str,
        params: Vec<String>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let mut rec = AdminRecord {
            kind: "admin",
            ts: crate::clock::timestamp(),
            request_id: uuid::Uuid::new_v4().to_string(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            ..Default::default()
        };
        let query = req.uri().query().unwrap_or("").to_string();
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
            self.act(&mut rec, who, pattern, &params, &query, &body)
                .await
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
    pub(super) fn authorize(
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
        filters::admin_access::check(
            &who.roles,
            &self.roles.admin_role,
            &self.roles.auditor_role,
            writes,
        )?;
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
    pub(super) async fn act(
        &self,
        rec: &mut AdminRecord,
        who: Principal,
        pattern: &str,
        params: &[String],
        query: &str,
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
                let at = crate::clock::timestamp();
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
                let at = crate::clock::timestamp();
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
                let at = crate::clock::timestamp();
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
            "/admin/approvals" => self.list_approvals(query).await.map(read),
            "/admin/approvals/{id}" => self.show_approval(&who, &params[0]).await.map(read),
            "/admin/approvals/{id}/{action}" => self.decide(&who, params, body).await,
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
    pub(super) async fn simulate(&self, body: &[u8]) -> Result<Value, Rejection> {
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
        let prompt = filters::dialect::for_route(route)
            .map_or_else(|| filters::prompt::EMPTY.clone(), |d| d.prompt(&sim.body));
        let view = RequestView {
            request_id: "simulation",
            authorization: None,
            principal: Some(&principal),
            dry_run: true,
            route,
            body: &sim.body,
            prompt: &prompt,
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

pub(super) fn read(body: Value) -> Done {
    Done {
        status: 200,
        body,
        before: None,
        after: None,
    }
}
