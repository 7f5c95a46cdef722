//! Rate limits and token budgets.
//!
//! One algorithm, GCRA, decides both: requests per minute with a burst, and
//! tokens per minute (a minute's worth of burst). Each decision is one
//! atomic `apply` on a [`LimitStore`]: all charges of a request (subject,
//! tenant, per-model keys; requests and tokens) are admitted together or
//! none is, so concurrent requests cannot overspend. The in-process
//! [`MemoryStore`] and the gateway's Redis store (a Lua script with the same
//! arithmetic) implement it.
//!
//! Why not the `governor` crate for the in-process case: token budgets must
//! be refunded or topped up when the real usage is known, several keys must
//! be charged atomically, and the shared Redis store must make exactly the
//! same decisions; one small GCRA serves all three.
//!
//! Token budgets reserve an estimate before forwarding and settle with the
//! provider's `usage` afterwards: the difference is charged or refunded.
//! The estimate is the prompt (every string a message carries, tool-call
//! arguments included, plus the declared `tools`/`functions` schemas, at
//! `chars_per_token`; each image, audio or file part at `media_tokens`)
//! plus the completion (`max_completion_tokens`, `max_tokens` or
//! `default_max_tokens`) for every choice asked for (`n`, or `best_of` when
//! larger). All arithmetic saturates at [`MAX_ESTIMATE`]. A stream that
//! ends without `usage` (the client left, the provider broke off) is
//! settled with the prompt estimate plus what was generated, counted in
//! characters. Time is in milliseconds from the injected [`Clock`].

use crate::chain::{Decision, Fact, FilterError, FilterKind, RequestFilter, Verdict};
use crate::clock::Clock;
use crate::error::{ErrorCode, Rejection};
use crate::prompt::Prompt;
use crate::request::RequestView;
use crate::sharded::{Sharded, SHARDS};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// `policies/rate-limits.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPolicy {
    /// Tried in order: a subject gets the first tier one of its roles is
    /// listed in, else `default_tier`.
    pub tiers: Vec<Tier>,
    pub default_tier: String,
    /// Limits every tenant has as a whole, whatever its members' tiers.
    #[serde(default)]
    pub tenant: Option<TenantLimit>,
    #[serde(default)]
    pub estimate: Estimate,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub requests_per_minute: u64,
    /// Requests that may come at once; default: one minute's worth.
    #[serde(default)]
    pub burst: Option<u64>,
    /// Token budget per minute (prompt + completion); none: no budget.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Count each model separately.
    #[serde(default)]
    pub per_model: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimit {
    pub requests_per_minute: u64,
    #[serde(default)]
    pub burst: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Estimate {
    /// Completion tokens assumed when a request sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// Prompt characters per token for the estimate.
    pub chars_per_token: u64,
    /// Tokens assumed for each image, audio or file part of a prompt.
    pub media_tokens: u64,
}

impl Default for Estimate {
    fn default() -> Self {
        Self {
            default_max_tokens: 1024,
            chars_per_token: 4,
            media_tokens: 765,
        }
    }
}

/// The largest estimate: far above any real budget, and exact as an `f64`
/// (the GCRA arithmetic, in process and in Redis, is in doubles).
pub const MAX_ESTIMATE: u64 = 1 << 50;

impl LimitsPolicy {
    /// Every problem, each as `key: message`.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for (i, t) in self.tiers.iter().enumerate() {
            if !ids.insert(t.id.as_str()) {
                errors.push(format!("tiers[{i}].id: duplicate tier '{}'", t.id));
            }
            if t.requests_per_minute == 0 {
                errors.push(format!(
                    "tiers[{i}].requests_per_minute: must be at least 1"
                ));
            }
            if t.burst == Some(0) {
                errors.push(format!("tiers[{i}].burst: must be at least 1"));
            }
            if t.tokens_per_minute == Some(0) {
                errors.push(format!(
                    "tiers[{i}].tokens_per_minute: must be at least 1 (or left out)"
                ));
            }
        }
        if !ids.contains(self.default_tier.as_str()) {
            errors.push(format!("default_tier: no tier '{}'", self.default_tier));
        }
        if let Some(t) = &self.tenant {
            if t.requests_per_minute == 0 || t.burst == Some(0) || t.tokens_per_minute == Some(0) {
                errors.push("tenant: limits must be at least 1".into());
            }
        }
        if self.estimate.chars_per_token == 0 {
            errors.push("estimate.chars_per_token: must be at least 1".into());
        }
        errors
    }

    fn tier_for(&self, roles: &[String]) -> Option<&Tier> {
        self.tiers
            .iter()
            .find(|t| t.roles.iter().any(|r| roles.contains(r)))
            .or_else(|| self.tiers.iter().find(|t| t.id == self.default_tier))
    }
}

/// One GCRA charge: `cost` units against `key`, whose limit emits one unit
/// every `emission_ms` with room for `burst` units at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub key: String,
    /// Units; negative refunds.
    pub cost: f64,
    pub emission_ms: f64,
    pub burst: f64,
    /// Apply even when over the limit (settling real usage).
    pub force: bool,
}

/// A key's state after a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitState {
    pub allowed: bool,
    /// Units that could still be spent now.
    pub remaining: u64,
    /// Until the key is back to its full burst.
    pub reset_ms: f64,
    /// Until this charge would be admitted (0 when allowed).
    pub retry_after_ms: f64,
}

/// GCRA for one key: the new theoretical arrival time to store, and the state.
/// This exact arithmetic is mirrored by the gateway's Redis script.
pub fn gcra(stored_tat: Option<f64>, now: f64, charge: &Charge) -> (f64, LimitState) {
    let e = charge.emission_ms;
    let tat = stored_tat.unwrap_or(now).max(now);
    let new_tat = (tat + charge.cost * e).max(now);
    let allow_at = new_tat - charge.burst * e;
    if allow_at > now && !charge.force {
        let remaining = ((now - (tat - charge.burst * e)) / e).floor().max(0.0) as u64;
        return (
            tat,
            LimitState {
                allowed: false,
                remaining,
                reset_ms: tat - now,
                retry_after_ms: allow_at - now,
            },
        );
    }
    let remaining = ((now - allow_at) / e).floor().max(0.0) as u64;
    (
        new_tat,
        LimitState {
            allowed: true,
            remaining,
            reset_ms: new_tat - now,
            retry_after_ms: 0.0,
        },
    )
}

/// Where GCRA state lives.
#[async_trait]
pub trait LimitStore: Send + Sync {
    /// Apply every charge atomically: if one is refused, none is stored;
    /// with `commit` false (a simulation) nothing is stored at all.
    /// Returns one state per charge, in order.
    async fn apply(
        &self,
        charges: &[Charge],
        now_ms: f64,
        commit: bool,
    ) -> Result<Vec<LimitState>, String>;
}

/// GCRA state in this process, sharded so that callers with different
/// keys do not wait for each other.
#[derive(Default)]
pub struct MemoryStore {
    tats: Sharded<String, f64>,
}

/// Past this many keys in a shard, idle ones (back to full burst) are
/// dropped, at most each time the shard doubles.
const MEMORY_STORE_SWEEP: usize = 100_000 / SHARDS;

#[async_trait]
impl LimitStore for MemoryStore {
    async fn apply(
        &self,
        charges: &[Charge],
        now_ms: f64,
        commit: bool,
    ) -> Result<Vec<LimitState>, String> {
        // Every shard the charges touch, locked in order: all charges are
        // decided and stored as one.
        let shard_of: Vec<usize> = charges.iter().map(|c| self.tats.shard_of(&c.key)).collect();
        let mut guards = self.tats.lock_many(shard_of.clone());
        let slot = |shard: usize| {
            guards
                .iter()
                .position(|(s, _)| *s == shard)
                .expect("every charge's shard is locked")
        };
        let slots: Vec<usize> = shard_of.iter().map(|s| slot(*s)).collect();
        let decided: Vec<(f64, LimitState)> = charges
            .iter()
            .zip(&slots)
            .map(|(c, &i)| gcra(guards[i].1.map.get(&c.key).copied(), now_ms, c))
            .collect();
        if commit && decided.iter().all(|(_, s)| s.allowed) {
            for ((c, (tat, _)), &i) in charges.iter().zip(&decided).zip(&slots) {
                guards[i].1.map.insert(c.key.clone(), *tat);
            }
        }
        for (_, shard) in &mut guards {
            shard.sweep_if_grown(MEMORY_STORE_SWEEP, |m| m.retain(|_, tat| *tat > now_ms));
        }
        Ok(decided.into_iter().map(|(_, s)| s).collect())
    }
}

/// Tokens reserved for one request, settled by [`RateLimiter::settle`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub estimate: u64,
    /// The prompt's part of the estimate.
    pub prompt: u64,
    /// Characters per token, to count what a stream generated.
    chars_per_token: u64,
    charges: Vec<Charge>,
}

impl Reservation {
    /// Tokens used by an exchange that ended without `usage`: the prompt
    /// estimate plus `generated_chars` of output.
    pub fn used_without_usage(&self, generated_chars: u64) -> u64 {
        self.prompt
            .saturating_add(generated_chars.div_ceil(self.chars_per_token.max(1)))
            .min(MAX_ESTIMATE)
    }
}

/// Tokens to settle a budget with: what the provider reported; 0 when the
/// provider refused or failed (nothing was generated); for a stream that
/// ended without usage (the client left, the provider broke off), the
/// prompt estimate plus what was generated; otherwise unknown (`None`:
/// the reservation is kept).
pub fn tokens_to_settle(
    reported: Option<u64>,
    provider_ok: bool,
    generated_chars: Option<u64>,
    reservation: Option<&Reservation>,
) -> Option<u64> {
    match (reported, generated_chars) {
        (Some(n), _) => Some(n),
        (None, _) if !provider_ok => Some(0),
        (None, Some(chars)) => reservation.map(|r| r.used_without_usage(chars)),
        (None, None) => None,
    }
}

/// The parts of an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimated {
    pub prompt: u64,
    pub completion: u64,
}

impl Estimated {
    pub fn total(self) -> u64 {
        self.prompt
            .saturating_add(self.completion)
            .min(MAX_ESTIMATE)
    }
}

pub struct RateLimiter {
    policy: std::sync::RwLock<Arc<LimitsPolicy>>,
    store: Arc<dyn LimitStore>,
    clock: Arc<dyn Clock>,
}

const MINUTE_MS: f64 = 60_000.0;

fn charge(key: String, cost: f64, per_minute: u64, burst: Option<u64>) -> Charge {
    Charge {
        key,
        cost,
        emission_ms: MINUTE_MS / per_minute as f64,
        burst: burst.unwrap_or(per_minute) as f64,
        force: false,
    }
}

/// `x-ratelimit-reset-*` in OpenAI's duration style.
fn duration(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{}ms", ms.ceil() as u64)
    } else {
        format!("{}s", (ms / 1000.0).ceil() as u64)
    }
}

impl RateLimiter {
    /// `policy` must have passed [`LimitsPolicy::validate`].
    pub fn new(policy: LimitsPolicy, store: Arc<dyn LimitStore>, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy: std::sync::RwLock::new(Arc::new(policy)),
            store,
            clock,
        }
    }

    /// Replace the tiers (`/admin/reload`); `policy` must have passed
    /// [`LimitsPolicy::validate`]. Requests in flight finish on the old one.
    pub fn set_policy(&self, policy: LimitsPolicy) {
        if let Ok(mut p) = self.policy.write() {
            *p = Arc::new(policy);
        }
    }

    fn policy(&self) -> Arc<LimitsPolicy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Tokens a request may use (see the module documentation).
    pub fn estimate(&self, prompt: &Prompt<'_>) -> u64 {
        self.estimate_parts(prompt).total()
    }

    /// The estimate, as prompt and completion.
    pub fn estimate_parts(&self, p: &Prompt<'_>) -> Estimated {
        let policy = self.policy();
        let e = &policy.estimate;
        let mut count = Count::default();
        for m in &p.messages {
            // The message as written when there is one (every field a chat
            // template may render); else what the view has of it.
            if let Some(raw) = m.raw {
                count.value(raw);
                continue;
            }
            if let Some(content) = m.content {
                count.value(content);
            }
            count.text(m.name.unwrap_or(""));
            for call in &m.calls {
                count.text(&call.name);
                if let Some(arguments) = call.arguments {
                    count.value(arguments);
                }
            }
        }
        for input in &p.inputs {
            count.value(input.value);
        }
        for t in &p.tools {
            // The declaration as the provider reads it.
            count.chars = count
                .chars
                .saturating_add(t.declaration.to_string().len() as u64);
        }
        let prompt = count
            .chars
            .div_ceil(e.chars_per_token.max(1))
            .saturating_add(count.media.saturating_mul(e.media_tokens));
        let completion = if p.generates {
            p.max_tokens
                .unwrap_or(e.default_max_tokens)
                .saturating_mul(p.choices.max(1))
        } else {
            0
        };
        Estimated {
            prompt: prompt.min(MAX_ESTIMATE),
            completion: completion.min(MAX_ESTIMATE),
        }
    }

    /// Charge or refund the difference between the reservation and the real
    /// usage. `None` (usage unknown) keeps the reservation as spent.
    pub async fn settle(&self, reservation: &Reservation, used: Option<u64>) -> Result<(), String> {
        let Some(used) = used else {
            return Ok(());
        };
        let diff = used as f64 - reservation.estimate as f64;
        if diff == 0.0 || reservation.charges.is_empty() {
            return Ok(());
        }
        let charges: Vec<Charge> = reservation
            .charges
            .iter()
            .map(|c| Charge {
                cost: diff,
                force: true,
                ..c.clone()
            })
            .collect();
        self.store
            .apply(&charges, self.clock.now_ms() as f64, true)
            .await
            .map(drop)
    }
}

/// What a prompt holds: characters of text, and media parts.
#[derive(Default)]
struct Count {
    chars: u64,
    media: u64,
}

impl Count {
    fn text(&mut self, s: &str) {
        self.chars = self.chars.saturating_add(s.chars().count() as u64);
    }

    /// Every string counts (content, parts' text, names, tool-call
    /// arguments); an image, audio or file part counts as one medium, its
    /// data not as text. Token-id prompts count one character per id.
    fn value(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.chars = self.chars.saturating_add(s.chars().count() as u64),
            Value::Number(_) => self.chars = self.chars.saturating_add(1),
            Value::Array(items) => items.iter().for_each(|i| self.value(i)),
            Value::Object(o) => {
                let media = o.get("type").and_then(Value::as_str).is_some_and(|t| {
                    matches!(
                        t,
                        "image_url" | "input_audio" | "file" | "image" | "document"
                    )
                });
                if media {
                    self.media = self.media.saturating_add(1);
                    return;
                }
                for (k, v) in o {
                    // Structure, not prompt text.
                    if !matches!(k.as_str(), "type" | "role" | "id" | "tool_call_id") {
                        self.value(v);
                    }
                }
            }
            _ => {}
        }
    }
}

#[async_trait]
impl RequestFilter for RateLimiter {
    fn kind(&self) -> FilterKind {
        FilterKind::RateLimit
    }

    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError> {
        let (subject, tenant, roles) = match request.principal {
            Some(p) => (
                format!("sub:{}/{}", p.tenant, p.subject),
                Some(p.tenant.as_str()),
                p.roles.as_slice(),
            ),
            None => (
                format!(
                    "ip:{}",
                    request
                        .client_ip
                        .map(|ip| ip.to_string())
                        .unwrap_or_default()
                ),
                None,
                &[][..],
            ),
        };
        let policy = self.policy();
        let Some(tier) = policy.tier_for(roles) else {
            return Err(FilterError::new(
                ErrorCode::LimiterUnavailable,
                "no tier applies",
            ));
        };
        let scope = match (tier.per_model, request.model) {
            (true, Some(m)) => format!("{subject}/model:{m}"),
            _ => subject,
        };
        let mut charges = vec![charge(
            format!("req:{scope}"),
            1.0,
            tier.requests_per_minute,
            tier.burst,
        )];
        let tenant_limit = tenant.zip(policy.tenant.as_ref());
        if let Some((t, limit)) = tenant_limit {
            charges.push(charge(
                format!("req:tenant:{t}"),
                1.0,
                limit.requests_per_minute,
                limit.burst,
            ));
        }
        let requests = charges.len();
        let parts = self.estimate_parts(request.prompt);
        let estimate = parts.total();
        if let Some(tpm) = tier.tokens_per_minute {
            charges.push(charge(format!("tok:{scope}"), estimate as f64, tpm, None));
        }
        if let Some((t, Some(tpm))) = tenant_limit.map(|(t, l)| (t, l.tokens_per_minute)) {
            charges.push(charge(
                format!("tok:tenant:{t}"),
                estimate as f64,
                tpm,
                None,
            ));
        }
        let states = self
            .store
            .apply(&charges, self.clock.now_ms() as f64, !request.dry_run)
            .await
            .map_err(|e| FilterError::new(ErrorCode::LimiterUnavailable, e))?;
        let (req_states, tok_states) = states.split_at(requests.min(states.len()));

        let mut facts = vec![
            Fact::Header(
                "x-ratelimit-limit-requests",
                tier.requests_per_minute.to_string(),
            ),
            Fact::Header(
                "x-ratelimit-remaining-requests",
                min_remaining(req_states).to_string(),
            ),
            Fact::Header(
                "x-ratelimit-reset-requests",
                duration(max_reset(req_states)),
            ),
        ];
        if let Some(tpm) = tier.tokens_per_minute {
            facts.push(Fact::Header("x-ratelimit-limit-tokens", tpm.to_string()));
            facts.push(Fact::Header(
                "x-ratelimit-remaining-tokens",
                min_remaining(tok_states).to_string(),
            ));
            facts.push(Fact::Header(
                "x-ratelimit-reset-tokens",
                duration(max_reset(tok_states)),
            ));
        }
        let denied: Vec<(usize, &LimitState)> = states
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.allowed)
            .collect();
        if let Some(&(first, _)) = denied.first() {
            let wait = denied
                .iter()
                .map(|(_, s)| s.retry_after_ms)
                .fold(0.0, f64::max);
            facts.push(Fact::Header(
                "retry-after",
                ((wait / 1000.0).ceil() as u64).max(1).to_string(),
            ));
            let (code, what) = if first < requests {
                (ErrorCode::RateLimited, "request rate")
            } else {
                (ErrorCode::TokenBudgetExceeded, "token budget")
            };
            let reason = format!(
                "{what} limit of tier '{}' on {} (retry in {} ms, estimate {estimate} tokens)",
                tier.id,
                charges[first].key,
                wait.ceil()
            );
            let mut verdict = Verdict::from(Decision::Deny(Rejection::new(code, reason)));
            verdict.facts = facts;
            return Ok(verdict);
        }
        let token_charges: Vec<Charge> = charges[requests..].to_vec();
        if !token_charges.is_empty() {
            facts.push(Fact::Reservation(Reservation {
                estimate,
                prompt: parts.prompt,
                chars_per_token: policy.estimate.chars_per_token,
                charges: token_charges,
            }));
        }
        let mut verdict = Verdict::from(Decision::Annotate(vec![crate::chain::Annotation {
            key: "tier",
            value: Value::String(tier.id.clone()),
        }]));
        verdict.facts = facts;
        Ok(verdict)
    }
}

fn min_remaining(states: &[LimitState]) -> u64 {
    states.iter().map(|s| s.remaining).min().unwrap_or(0)
}

fn max_reset(states: &[LimitState]) -> f64 {
    states.iter().map(|s| s.reset_ms).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests;
