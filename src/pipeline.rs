//! Builds the filter chains from the configuration: the one place where
//! configured filters become running ones. Their order is not decided here
//! but by `filters::FilterKind`.

use crate::config::Config;
use crate::keys::{self, JwksRefresher};
use crate::redis_limits::RedisLimits;
use filters::jwt_auth::{ClaimPaths, JwtAuth, JwtSettings};
use filters::rate_limit::{LimitStore, LimitsPolicy, MemoryStore, RateLimiter};
use filters::{Chain, Clock, FilterSettings, RequestFilter, ResponseChain, SystemClock};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The running filters, as the gateway holds them.
pub struct Filters {
    pub chain: Chain,
    pub responses: ResponseChain,
    /// Kept to settle token budgets after each response.
    pub limiter: Option<Arc<RateLimiter>>,
}

/// The filters and the background work they need.
pub struct Pipeline {
    pub filters: Filters,
    /// Follows JWKS URLs, when any is configured.
    pub jwks: Option<JwksRefresher>,
}

/// Read and check a rate-limit policy file.
pub fn load_limits(path: &Path) -> Result<LimitsPolicy, Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let policy: LimitsPolicy =
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
            .map_err(|e| vec![format!("{}: {}: {}", path.display(), e.path(), e.inner())])?;
    let errors: Vec<String> = policy
        .validate()
        .into_iter()
        .map(|e| format!("{}: {e}", path.display()))
        .collect();
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(errors)
    }
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
    errors
}

pub fn build(
    cfg: &Config,
    jwks_connector: Arc<pingora::connectors::http::Connector>,
) -> Result<Pipeline, Vec<String>> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut request: Vec<(Box<dyn RequestFilter>, FilterSettings)> = Vec::new();
    let mut jwks = None;
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
        };
        request.push((
            Box::new(JwtAuth::new(settings, keys, clock.clone())),
            FilterSettings {
                mode: auth.mode,
                on_error: auth.on_error,
            },
        ));
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
    Ok(Pipeline {
        filters: Filters {
            chain: Chain::new(request),
            responses: ResponseChain::new(Vec::new()),
            limiter,
        },
        jwks,
    })
}
