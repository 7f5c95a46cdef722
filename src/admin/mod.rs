//! The admin listener: the admin API (JWT with an admin role to change
//! things, an auditor role to read), `/healthz`, `/readyz` and `/metrics`.
//!
//! Every `/admin/*` call writes its own audit record (who, what, before,
//! after) into the same hash chain as the requests. The routes are listed
//! once, in [`ROUTES`]; `docs/admin-api.yaml` documents them and a test
//! fails when one is missing there.

//!
//! [`server`] is the listener (its own connection and body limits, the
//! health and metrics endpoints), [`routes`] the table of routes,
//! [`handlers`] what each does.

mod approvals;
mod handlers;
pub mod routes;
mod server;

pub use routes::{route, ROUTES};
pub use server::{AdminService, MAX_ADMIN_BODY};

use crate::audit::AuditLog;
use crate::config::AdminSection;
use crate::metrics;
use crate::proxy::pipeline;
use crate::stores::registry::RegistryStore;
use filters::injection::Detector;
use filters::jwt_auth::JwtAuth;
use filters::rate_limit::RateLimiter;
use filters::redact::Redactor;
use filters::shared::Shared;
use filters::tool_authz::ToolPolicy;
use filters::Chain;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Held tool calls, when calls are held for approval.
    pub approvals: Option<Arc<dyn filters::approval::ApprovalStore>>,
    pub providers: BTreeSet<String>,
    pub roles: AdminSection,
    pub audit: AuditLog,
    /// Draining after SIGTERM: `/readyz` says 503.
    pub lifecycle: Arc<crate::proxy::Lifecycle>,
}

/// A policy read and checked from its file, not yet in use.
struct Staged<'a, T> {
    into: &'a Shared<T>,
    policy: T,
    path: &'a Path,
}

impl<T> Staged<'_, T> {
    fn swap_in(self, done: &mut Vec<String>) {
        self.into.set(self.policy);
        done.push(self.path.display().to_string());
    }
}

/// Load the policy of a configured slot (none: nothing to load).
fn staged<'a, T>(
    slot: &'a Option<(Arc<Shared<T>>, PathBuf)>,
    load: fn(&Path) -> Result<T, Vec<String>>,
) -> Result<Option<Staged<'a, T>>, String> {
    slot.as_ref()
        .map(|(into, path)| {
            Ok(Staged {
                into,
                policy: load(path).map_err(|e| e.join("; "))?,
                path,
            })
        })
        .transpose()
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
        let redaction = staged(&self.redactor, pipeline::load_redactor)?;
        let tools = staged(&self.tools, pipeline::load_tools)?;
        let injection = staged(&self.injection, pipeline::load_injection)?;
        let guard = staged(&self.guard, pipeline::load_guard_policy)?;
        let mut done = Vec::new();
        if let Some((l, policy, path)) = limits {
            l.set_policy(policy);
            done.push(path.display().to_string());
        }
        if let Some(s) = redaction {
            s.swap_in(&mut done);
        }
        if let Some(s) = tools {
            s.swap_in(&mut done);
        }
        if let Some(s) = injection {
            s.swap_in(&mut done);
        }
        if let Some(s) = guard {
            s.swap_in(&mut done);
        }
        Ok(if done.is_empty() {
            "nothing (no policy files configured)".into()
        } else {
            done.join(", ")
        })
    }
}
