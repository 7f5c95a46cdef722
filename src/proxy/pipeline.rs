//! Builds the filter chains from the configuration: the one place where
//! configured filters become running ones. Their order is not decided here
//! but by `filters::FilterKind`.

use crate::config::Config;
use crate::stores::approvals::{FileApprovals, RedisApprovals};
use crate::stores::keys::{self, JwksRefresher};
use crate::stores::redis_limits::RedisLimits;
use crate::stores::registry::{FileStore, RedisStore, RegistryStore};
use filters::approval::ApprovalStore;
use filters::guard::breaker::Breaker;
use filters::guard::cache::VerdictCache;
use filters::guard::filter::GuardFilter;
use filters::guard::GuardPolicy;
use filters::injection::{Detector, InjectionFilter};
use filters::jwt_auth::{ClaimPaths, JwtAuth, JwtSettings};
use filters::model_registry::{
    FreezeFilter, Lifecycle, ModelGate, NewModel, RegistryState, RegistryView, RiskPolicy,
};
use filters::rate_limit::{LimitStore, LimitsPolicy, MemoryStore, RateLimiter};
use filters::redact::request::RequestRedaction;
use filters::redact::stage::RedactStage;
use filters::redact::{RedactionPolicy, Redactor};
use filters::shared::Shared;
use filters::tool_authz::response::ResponseToolAuthz;
use filters::tool_authz::{ToolAuthz, ToolPolicy};
use filters::{
    Chain, Clock, FilterSettings, RequestFilter, ResponseChain, ResponseStage, SystemClock,
};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The running filters, as the gateway and the admin API hold them.
pub struct Filters {
    pub chain: Arc<Chain>,
    pub responses: ResponseChain,
    /// Kept to settle token budgets after each response.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Kept to list the models a caller may use.
    pub gate: Arc<ModelGate>,
    /// The registry the admin API changes.
    pub registry: Arc<dyn RegistryStore>,
    /// Verifies admin API callers too.
    pub jwt: Option<Arc<JwtAuth>>,
    /// Replaced by `/admin/reload`.
    pub redactor: Option<Arc<Shared<Redactor>>>,
    /// Replaced by `/admin/reload`.
    pub tools: Option<Arc<Shared<ToolPolicy>>>,
    /// Replaced by `/admin/reload`.
    pub injection: Option<Arc<Shared<Detector>>>,
    /// Replaced by `/admin/reload`.
    pub guard_policy: Option<Arc<Shared<GuardPolicy>>>,
    /// Its state is shown in `/metrics`.
    pub guard_breaker: Option<Arc<Breaker>>,
    /// Judges replies too, when the config asks.
    pub guard: Option<Arc<GuardFilter>>,
    /// Held tool calls, when calls to `approval_required` tools are held.
    pub approvals: Option<Arc<dyn ApprovalStore>>,
}

/// The filters and the background work they need.
pub struct Pipeline {
    pub filters: Filters,
    /// Follows JWKS URLs, when any is configured.
    pub jwks: Option<JwksRefresher>,
    /// Keeps a Redis-backed registry current.
    pub registry_follower: Option<Arc<RedisStore>>,
}

/// `registry.seed_file`: more models for a fresh install.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    models: Vec<NewModel>,
}

/// The registry a fresh install starts with: the config's `models:` and
/// the seed file's, approved when `registry.approve_seed` says so.
pub fn seed(cfg: &Config) -> Result<RegistryState, Vec<String>> {
    let mut models: Vec<NewModel> = cfg
        .models
        .iter()
        .map(|(id, m)| NewModel {
            id: id.clone(),
            provider: m.provider.clone(),
            upstream_model: Some(m.upstream_model.clone()),
            version: m.version.clone(),
            risk_tier: m.risk_tier,
        })
        .collect();
    let mut errors = Vec::new();
    if let Some(path) = &cfg.registry.seed_file {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_yaml::from_str::<SeedFile>(&t).map_err(|e| e.to_string()))
        {
            Ok(file) => models.extend(file.models),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut state = RegistryState::default();
    for m in models {
        if !cfg.providers.contains_key(&m.provider) {
            errors.push(format!(
                "seed model '{}': no provider named '{}'",
                m.id, m.provider
            ));
            continue;
        }
        let entry = m.register("seed", &at);
        match entry.and_then(|e| state.register(e)) {
            Ok(()) if cfg.registry.approve_seed => {
                if let Err(e) = state.transition(&m.id, Lifecycle::Approve, "seed", &at) {
                    errors.push(e.to_string());
                }
            }
            Ok(()) => {}
            Err(e) => errors.push(format!("seed: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(state)
    } else {
        Err(errors)
    }
}

/// The registry store, and the Redis store again when it needs following.
type OpenedRegistry = (Arc<dyn RegistryStore>, Option<Arc<RedisStore>>);

/// Open the registry store: Redis with `state.redis_url`, else a file
/// under `state_dir`.
fn open_registry(cfg: &Config) -> Result<OpenedRegistry, Vec<String>> {
    let seed = seed(cfg)?;
    match &cfg.state.redis_url {
        Some(url) => {
            let timeout = Duration::from_millis(cfg.state.redis_timeout_ms.unwrap_or(500));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| vec![e.to_string()])?;
            let store = runtime
                .block_on(RedisStore::open(url, timeout, seed))
                .map_err(|e| vec![format!("registry: {e}")])?;
            Ok((store.clone(), Some(store)))
        }
        None => {
            let store =
                FileStore::open(&cfg.state_dir.join("registry.json"), seed).map_err(|e| vec![e])?;
            Ok((Arc::new(store), None))
        }
    }
}

/// Open the approval store: Redis with `state.redis_url`, else a folder
/// under `state_dir`.
fn open_approvals(cfg: &Config) -> Result<Arc<dyn ApprovalStore>, Vec<String>> {
    let retention = Duration::from_secs(cfg.approvals.retention_secs);
    Ok(match &cfg.state.redis_url {
        Some(url) => {
            let timeout = Duration::from_millis(cfg.state.redis_timeout_ms.unwrap_or(500));
            Arc::new(RedisApprovals::new(url, timeout, retention).map_err(|e| vec![e])?)
        }
        None => Arc::new(
            FileApprovals::open(&cfg.state_dir.join("approvals"), retention)
                .map_err(|e| vec![e])?,
        ),
    })
}

/// Read a policy file (YAML, unknown keys refused) and build it; every
/// error is prefixed with the file.
fn load_policy<S: serde::de::DeserializeOwned, T>(
    path: &Path,
    build: impl FnOnce(S) -> Result<T, Vec<String>>,
) -> Result<T, Vec<String>> {
    let at = |m: String| format!("{}: {m}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| vec![at(e.to_string())])?;
    let spec: S = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
        .map_err(|e| vec![at(format!("{}: {}", e.path(), e.inner()))])?;
    build(spec).map_err(|errors| errors.into_iter().map(at).collect())
}

/// Read and check a rate-limit policy file.
pub fn load_limits(path: &Path) -> Result<LimitsPolicy, Vec<String>> {
    load_policy(path, |p: LimitsPolicy| match p.validate() {
        errors if errors.is_empty() => Ok(p),
        errors => Err(errors),
    })
}

/// Read and compile a redaction policy.
pub fn load_redactor(path: &Path) -> Result<Redactor, Vec<String>> {
    load_policy(path, |p: RedactionPolicy| Redactor::build(&p))
}

/// Read and compile the prompt-injection screen.
pub fn load_injection(path: &Path) -> Result<Detector, Vec<String>> {
    load_policy(path, Detector::build)
}

/// Read and check a guard policy.
pub fn load_guard_policy(path: &Path) -> Result<GuardPolicy, Vec<String>> {
    load_policy(path, |p: GuardPolicy| match p.check() {
        errors if errors.is_empty() => Ok(p),
        errors => Err(errors),
    })
}

/// Read and compile a tool policy.
pub fn load_tools(path: &Path) -> Result<ToolPolicy, Vec<String>> {
    load_policy(path, ToolPolicy::build)
}

/// Everything that can only be checked by loading the files a config
/// names (keys, policies), for `check-config` and start-up alike.
pub fn check(cfg: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(auth) = &cfg.auth {
        if let Err(e) = keys::load(auth) {
            errors.extend(e);
        }
    }
    if let Some(rl) = &cfg.rate_limit {
        if let Err(e) = load_limits(&rl.policy) {
            errors.extend(e);
        }
    }
    if let Err(e) = seed(cfg) {
        errors.extend(e);
    }
    if let Some(r) = &cfg.redaction {
        if let Err(e) = load_redactor(&r.policy) {
            errors.extend(e);
        }
    }
    if let Some(t) = &cfg.tools {
        if let Err(e) = load_tools(&t.policy) {
            errors.extend(e);
        }
    }
    if let Some(i) = &cfg.injection {
        if let Err(e) = load_injection(&i.policy) {
            errors.extend(e);
        }
    }
    if let Some(g) = &cfg.guard {
        if let Err(e) = load_guard_policy(&g.policy) {
            errors.extend(e);
        }
    }
    errors
}

pub fn build(
    cfg: &Config,
    jwks_connector: Arc<pingora::connectors::http::Connector>,
    guard_upstream: Arc<crate::upstream::Upstream>,
) -> Result<Pipeline, Vec<String>> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut request: Vec<(Box<dyn RequestFilter>, FilterSettings)> = Vec::new();
    let mut jwks = None;
    let mut jwt = None;
    if let Some(auth) = &cfg.auth {
        let (keys, urls) = keys::load(auth)?;
        if !urls.is_empty() {
            jwks = Some(JwksRefresher {
                keys: keys.clone(),
                urls,
                connector: jwks_connector,
            });
        }
        let settings = JwtSettings {
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
            leeway_secs: auth.leeway_secs,
            claims: ClaimPaths {
                subject: auth.claims.subject.clone(),
                tenant: auth.claims.tenant.clone(),
                roles: auth.claims.roles.clone(),
            },
            default_tenant: auth.default_tenant.clone(),
            cache_size: auth.cache_size,
            failures_per_minute_per_ip: auth.failures_per_minute_per_ip,
        };
        let filter = Arc::new(JwtAuth::new(settings, keys, clock.clone()));
        request.push((
            Box::new(filter.clone()),
            FilterSettings {
                mode: auth.mode,
                on_error: auth.on_error,
            },
        ));
        jwt = Some(filter);
    } else {
        log::warn!(
            "no `auth` section in {}: requests are NOT authenticated",
            cfg.source.display()
        );
    }
    let mut limiter = None;
    if let Some(rl) = &cfg.rate_limit {
        let policy = load_limits(&rl.policy)?;
        let store: Arc<dyn LimitStore> = match &cfg.state.redis_url {
            Some(url) => Arc::new(
                RedisLimits::new(
                    url,
                    Duration::from_millis(cfg.state.redis_timeout_ms.unwrap_or(500)),
                )
                .map_err(|e| vec![e])?,
            ),
            None => Arc::new(MemoryStore::default()),
        };
        let l = Arc::new(RateLimiter::new(policy, store, clock.clone()));
        request.push((
            Box::new(l.clone()),
            FilterSettings {
                mode: rl.mode,
                on_error: rl.on_error,
            },
        ));
        limiter = Some(l);
    }
    let (registry, registry_follower) = open_registry(cfg)?;
    let view: Arc<dyn RegistryView> = registry.clone();
    let registry_settings = FilterSettings {
        mode: cfg.registry.mode,
        on_error: cfg.registry.on_error,
    };
    let risk = RiskPolicy {
        default_max: cfg.registry.default_max_risk,
        by_role: cfg.registry.max_risk_by_role.clone().into_iter().collect(),
    };
    let gate = Arc::new(ModelGate::new(view.clone(), risk));
    request.push((Box::new(FreezeFilter::new(view)), registry_settings));
    request.push((Box::new(gate.clone()), registry_settings));
    let mut response: Vec<(Box<dyn ResponseStage>, FilterSettings)> = Vec::new();
    let mut tools = None;
    let mut approvals = None;
    if let Some(t) = &cfg.tools {
        let policy = Shared::new(load_tools(&t.policy)?);
        tools = Some(policy.clone());
        let settings = FilterSettings {
            mode: t.mode,
            on_error: t.on_error,
        };
        let mut request_side = ToolAuthz::new(policy.clone());
        // Calls are held for a person only where the tool stage enforces:
        // in monitor mode the client gets them anyway.
        if cfg.approvals.enabled && t.mode == filters::Mode::Enforce {
            let store = open_approvals(cfg)?;
            request_side = request_side.with_approvals(store.clone());
            approvals = Some(store);
        }
        request.push((Box::new(request_side), settings));
        response.push((Box::new(ResponseToolAuthz::new(policy)), settings));
    }
    let mut injection = None;
    if let Some(i) = &cfg.injection {
        let detector = Shared::new(load_injection(&i.policy)?);
        injection = Some(detector.clone());
        request.push((
            Box::new(InjectionFilter::new(detector)),
            FilterSettings {
                mode: i.mode,
                on_error: i.on_error,
            },
        ));
    }
    let mut guard_policy = None;
    let mut guard_breaker = None;
    let mut guard_filter = None;
    if let Some(g) = &cfg.guard {
        let policy = Shared::new(load_guard_policy(&g.policy)?);
        guard_policy = Some(policy.clone());
        let client = Arc::new(crate::upstream::guard::UpstreamGuard::new(
            guard_upstream,
            g.provider.clone(),
            Duration::from_millis(g.timeout_ms),
            g.max_concurrency,
        ));
        let breaker = Arc::new(Breaker::new(g.breaker, clock.clone()));
        guard_breaker = Some(breaker.clone());
        let filter = GuardFilter::new(
            g.spec(),
            policy,
            client,
            breaker,
            Arc::new(VerdictCache::new(
                g.cache.capacity,
                g.cache.ttl_secs.saturating_mul(1000),
                clock.clone(),
            )),
        );
        let filter = Arc::new(filter);
        guard_filter = Some(filter.clone());
        if g.input {
            request.push((
                Box::new(filter),
                FilterSettings {
                    mode: g.mode,
                    on_error: g.on_error,
                },
            ));
        }
    }
    let mut shared_redactor = None;
    if let Some(r) = &cfg.redaction {
        let redactor = Shared::new(load_redactor(&r.policy)?);
        shared_redactor = Some(redactor.clone());
        let settings = FilterSettings {
            mode: r.mode,
            on_error: r.on_error,
        };
        if !r.request_tenants.is_empty() {
            let filter = RequestRedaction::new(redactor.clone(), r.request_tenants.clone());
            request.push((Box::new(filter), settings));
        }
        let mut stage = RedactStage::new(redactor);
        if let Some(t) = &tools {
            stage = stage.with_tools(t.clone());
        }
        response.push((Box::new(stage), settings));
    }
    Ok(Pipeline {
        filters: Filters {
            chain: Arc::new(Chain::new(request)),
            responses: ResponseChain::new(response),
            limiter,
            gate,
            registry,
            jwt,
            redactor: shared_redactor,
            tools,
            injection,
            guard_policy,
            guard_breaker,
            guard: guard_filter,
            approvals,
        },
        jwks,
        registry_follower,
    })
}
