//! The model registry: which models exist, which may serve traffic, and
//! who is frozen. The model (entries, lifecycle, freezes) and the two
//! filters that enforce it: [`FreezeFilter`] and [`ModelGate`].
//!
//! Lifecycle: `registered → approved ⇄ frozen`, and `retired` from any
//! state, final. Only `approved` models serve traffic. Every transition is
//! kept in the entry's history with its actor and time.
//!
//! Filters read an immutable snapshot through [`RegistryView`]; the
//! gateway's stores (a file, or Redis) keep it current. When the snapshot
//! cannot be trusted (Redis gone), both filters fail with
//! `registry_unavailable`, and `on_error: deny` (the default) refuses:
//! nothing is forwarded on a registry that cannot be read.

use crate::chain::{Decision, Fact, FilterError, FilterKind, RequestFilter, Verdict};
use crate::error::{ErrorCode, Rejection};
use crate::request::{Principal, RequestView};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Registered,
    Approved,
    Frozen,
    Retired,
}

/// How risky a model is to use; roles are allowed up to a tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskTier {
    Low,
    #[default]
    Medium,
    High,
}

/// A lifecycle step an admin can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Approve,
    Freeze,
    Unfreeze,
    Retire,
}

impl Lifecycle {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "approve" => Some(Self::Approve),
            "freeze" => Some(Self::Freeze),
            "unfreeze" => Some(Self::Unfreeze),
            "retire" => Some(Self::Retire),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: Option<ModelStatus>,
    pub to: ModelStatus,
    pub actor: String,
    pub at: String,
}

/// One model, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The id clients send as `model`.
    pub id: String,
    pub provider: String,
    /// The name sent to the provider (a pinned version, say).
    pub upstream_model: String,
    pub version: Option<String>,
    pub risk_tier: RiskTier,
    pub status: ModelStatus,
    pub approved_by: Option<String>,
    pub approved_at: Option<String>,
    pub history: Vec<Transition>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("no model '{0}'")]
    NotFound(String),
    #[error("model '{0}' is already registered")]
    Exists(String),
    #[error("model '{id}' is {from:?}: {action:?} is not allowed")]
    IllegalTransition {
        id: String,
        from: ModelStatus,
        action: Lifecycle,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ModelEntry {
    /// A newly registered model.
    pub fn register(
        id: &str,
        provider: &str,
        upstream_model: Option<&str>,
        version: Option<&str>,
        risk_tier: RiskTier,
        actor: &str,
        at: &str,
    ) -> Result<Self, RegistryError> {
        if id.is_empty() || provider.is_empty() {
            return Err(RegistryError::Invalid(
                "id and provider are required".into(),
            ));
        }
        Ok(Self {
            id: id.to_string(),
            provider: provider.to_string(),
            upstream_model: upstream_model.unwrap_or(id).to_string(),
            version: version.map(str::to_string),
            risk_tier,
            status: ModelStatus::Registered,
            approved_by: None,
            approved_at: None,
            history: vec![Transition {
                from: None,
                to: ModelStatus::Registered,
                actor: actor.to_string(),
                at: at.to_string(),
            }],
        })
    }

    /// Take a lifecycle step, or refuse an illegal one.
    pub fn apply(&mut self, action: Lifecycle, actor: &str, at: &str) -> Result<(), RegistryError> {
        use ModelStatus::*;
        let to = match (self.status, action) {
            (Registered, Lifecycle::Approve) => Approved,
            (Approved, Lifecycle::Freeze) => Frozen,
            (Frozen, Lifecycle::Unfreeze) => Approved,
            (Registered | Approved | Frozen, Lifecycle::Retire) => Retired,
            (from, action) => {
                return Err(RegistryError::IllegalTransition {
                    id: self.id.clone(),
                    from,
                    action,
                })
            }
        };
        if action == Lifecycle::Approve {
            self.approved_by = Some(actor.to_string());
            self.approved_at = Some(at.to_string());
        }
        self.history.push(Transition {
            from: Some(self.status),
            to,
            actor: actor.to_string(),
            at: at.to_string(),
        });
        self.status = to;
        Ok(())
    }
}

/// A model to register, as the admin API and the seed file give it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewModel {
    pub id: String,
    pub provider: String,
    /// Defaults to `id`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub risk_tier: RiskTier,
}

impl NewModel {
    /// The registered entry, `actor` and `at` in its history.
    pub fn register(&self, actor: &str, at: &str) -> Result<ModelEntry, RegistryError> {
        ModelEntry::register(
            &self.id,
            &self.provider,
            self.upstream_model.as_deref(),
            self.version.as_deref(),
            self.risk_tier,
            actor,
            at,
        )
    }
}

/// Who froze a subject or tenant, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeRecord {
    pub actor: String,
    pub at: String,
}

/// Everything the registry holds. `revision` grows with every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryState {
    pub revision: u64,
    pub models: BTreeMap<String, ModelEntry>,
    pub frozen_subjects: BTreeMap<String, FreezeRecord>,
    pub frozen_tenants: BTreeMap<String, FreezeRecord>,
}

/// What a freeze applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeTarget {
    Subject,
    Tenant,
}

impl RegistryState {
    pub fn register(&mut self, entry: ModelEntry) -> Result<(), RegistryError> {
        if self.models.contains_key(&entry.id) {
            return Err(RegistryError::Exists(entry.id));
        }
        self.models.insert(entry.id.clone(), entry);
        self.revision += 1;
        Ok(())
    }

    /// Apply a lifecycle step; returns the entry before and after.
    pub fn transition(
        &mut self,
        id: &str,
        action: Lifecycle,
        actor: &str,
        at: &str,
    ) -> Result<(ModelEntry, ModelEntry), RegistryError> {
        let entry = self
            .models
            .get_mut(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        let before = entry.clone();
        entry.apply(action, actor, at)?;
        let after = entry.clone();
        self.revision += 1;
        Ok((before, after))
    }

    /// Freeze or unfreeze; returns whether anything changed.
    pub fn set_frozen(
        &mut self,
        target: FreezeTarget,
        name: &str,
        frozen: bool,
        actor: &str,
        at: &str,
    ) -> bool {
        let map = match target {
            FreezeTarget::Subject => &mut self.frozen_subjects,
            FreezeTarget::Tenant => &mut self.frozen_tenants,
        };
        let changed = if frozen {
            map.insert(
                name.to_string(),
                FreezeRecord {
                    actor: actor.to_string(),
                    at: at.to_string(),
                },
            )
            .is_none()
        } else {
            map.remove(name).is_some()
        };
        if changed {
            self.revision += 1;
        }
        changed
    }
}

/// Where filters read the registry: a current, immutable snapshot, or why
/// there is none.
pub trait RegistryView: Send + Sync {
    fn snapshot(&self) -> Result<Arc<RegistryState>, String>;
}

/// Which risk tiers a role may use: the highest tier among the caller's
/// roles, else the default.
#[derive(Debug, Clone, Default)]
pub struct RiskPolicy {
    pub default_max: RiskTier,
    pub by_role: HashMap<String, RiskTier>,
}

impl RiskPolicy {
    pub fn max_for(&self, principal: Option<&Principal>) -> RiskTier {
        principal
            .into_iter()
            .flat_map(|p| p.roles.iter())
            .filter_map(|r| self.by_role.get(r).copied())
            .max()
            .unwrap_or(self.default_max)
            .max(self.default_max)
    }
}

fn unavailable(e: String) -> FilterError {
    FilterError::new(ErrorCode::RegistryUnavailable, e)
}

/// Refuses frozen subjects and tenants.
pub struct FreezeFilter {
    registry: Arc<dyn RegistryView>,
}

impl FreezeFilter {
    pub fn new(registry: Arc<dyn RegistryView>) -> Self {
        Self { registry }
    }
}

#[async_trait]
impl RequestFilter for FreezeFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Freeze
    }

    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError> {
        let state = self.registry.snapshot().map_err(unavailable)?;
        let Some(p) = request.principal else {
            return Ok(Decision::Allow.into());
        };
        Ok(match frozen(&state, p) {
            Some(r) => Decision::Deny(r),
            None => Decision::Allow,
        }
        .into())
    }
}

/// Why a caller may do nothing at all, if its subject or tenant is frozen:
/// for the proxy and the admin API alike.
pub fn frozen(state: &RegistryState, p: &Principal) -> Option<Rejection> {
    if let Some(f) = state.frozen_subjects.get(&p.subject) {
        let reason = format!("subject '{}' frozen by {} at {}", p.subject, f.actor, f.at);
        return Some(Rejection::new(ErrorCode::SubjectFrozen, reason));
    }
    let f = state.frozen_tenants.get(&p.tenant)?;
    let reason = format!("tenant '{}' frozen by {} at {}", p.tenant, f.actor, f.at);
    Some(Rejection::new(ErrorCode::TenantFrozen, reason))
}

/// Only approved models, within the caller's risk allowance, are served;
/// it also says where the model is served (provider, upstream name).
pub struct ModelGate {
    registry: Arc<dyn RegistryView>,
    risk: RiskPolicy,
}

impl ModelGate {
    pub fn new(registry: Arc<dyn RegistryView>, risk: RiskPolicy) -> Self {
        Self { registry, risk }
    }

    /// The models a caller may use now (for `GET /v1/models`).
    pub fn usable(&self, principal: Option<&Principal>) -> Result<Vec<ModelEntry>, String> {
        let state = self.registry.snapshot()?;
        let max = self.risk.max_for(principal);
        Ok(state
            .models
            .values()
            .filter(|m| m.status == ModelStatus::Approved && m.risk_tier <= max)
            .cloned()
            .collect())
    }
}

#[async_trait]
impl RequestFilter for ModelGate {
    fn kind(&self) -> FilterKind {
        FilterKind::ModelRegistry
    }

    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError> {
        let state = self.registry.snapshot().map_err(unavailable)?;
        let Some(id) = request.model else {
            return Ok(Decision::Allow.into());
        };
        let Some(entry) = state.models.get(id) else {
            return Ok(Decision::Deny(no_such_model(id)).into());
        };
        let route = Fact::Upstream {
            provider: entry.provider.clone(),
            upstream_model: entry.upstream_model.clone(),
        };
        let refusal = match entry.status {
            ModelStatus::Approved => None,
            ModelStatus::Frozen => {
                Some((ErrorCode::ModelFrozen, format!("model '{id}' is frozen")))
            }
            status => Some((
                ErrorCode::ModelNotApproved,
                format!("model '{id}' is {status:?}"),
            )),
        };
        let max = self.risk.max_for(request.principal);
        let refusal = refusal.or_else(|| {
            (entry.risk_tier > max).then(|| {
                (
                    ErrorCode::Forbidden,
                    format!(
                        "model '{id}' is {:?} risk; the caller's roles allow up to {max:?}",
                        entry.risk_tier
                    ),
                )
            })
        });
        let decision = match refusal {
            None => Decision::Allow,
            Some((code, reason)) => Decision::Deny(Rejection::new(code, reason)),
        };
        Ok(Verdict::from(decision).with(route))
    }
}

/// The refusal for a model the caller cannot use: unknown and not
/// visible are told apart by no one.
pub fn no_such_model(id: &str) -> Rejection {
    Rejection::about_input(
        ErrorCode::ModelNotFound,
        format!("The model `{id}` does not exist or you do not have access to it."),
    )
}

#[cfg(test)]
mod tests;
