//! The guard as a request filter: what to send is chosen by the policy,
//! asked of the guard through a [`GuardClient`] (the gateway's HTTP
//! calls), behind a circuit breaker and a verdict cache. A guard that
//! cannot answer (timeout, refused, unreadable) is a [`FilterError`]
//! with code `guard_unavailable`, so the filter's `on_error` decides:
//! `deny` (503) or `allow`. An unsafe verdict is 400 `content_policy`
//! naming the category; a flag passes and is recorded.

use super::breaker::{Breaker, Permit};
use super::cache::{key, VerdictCache};
use super::protocol::{self, ContentShape, Judgement, LlamaGuardPrompt};
use super::{turns, Action, GuardPolicy, Turn};
use crate::chain::{Annotation, Decision, Fact, FilterError, FilterKind, RequestFilter, Verdict};
use crate::error::{ErrorCode, Rejection};
use crate::request::RequestView;
use crate::shared::Shared;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Why a guard call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No answer: timeout, connection, a 5xx. Counts toward the breaker.
    Unavailable(String),
    /// The call was not made: too many in flight.
    Overloaded(String),
    /// The guard answered, refusing what it was sent (a 4xx).
    Rejected(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(m) | Self::Overloaded(m) | Self::Rejected(m) => f.write_str(m),
        }
    }
}

/// The gateway's side: POST `body` to `path` under the guard's provider
/// and return the parsed JSON reply (the timeout is the client's).
#[async_trait]
pub trait GuardClient: Send + Sync {
    async fn post(&self, path: &str, body: Value) -> Result<Value, CallError>;
}

/// Which protocol a guard speaks.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "protocol", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Protocol {
    LlamaGuard {
        #[serde(default)]
        prompt: LlamaGuardPrompt,
        #[serde(default)]
        content: ContentShape,
    },
    OpenaiModeration {
        /// Category → score at or above which it counts; categories not
        /// listed count when the service flags them.
        #[serde(default)]
        thresholds: BTreeMap<String, f64>,
    },
    YesNo {
        /// One call per risk; `Yes` to any is that risk.
        risks: Vec<String>,
    },
}

/// One guard as configured.
#[derive(Debug, Clone, Deserialize)]
pub struct GuardSpec {
    pub model: String,
    #[serde(flatten)]
    pub protocol: Protocol,
}

/// The request filter.
pub struct GuardFilter {
    spec: GuardSpec,
    policy: Arc<Shared<GuardPolicy>>,
    client: Arc<dyn GuardClient>,
    breaker: Arc<Breaker>,
    cache: Arc<VerdictCache>,
}

impl GuardFilter {
    pub fn new(
        spec: GuardSpec,
        policy: Arc<Shared<GuardPolicy>>,
        client: Arc<dyn GuardClient>,
        breaker: Arc<Breaker>,
        cache: Arc<VerdictCache>,
    ) -> Self {
        Self {
            spec,
            policy,
            client,
            breaker,
            cache,
        }
    }

    /// The calls this guard needs for these turns: `(path, body, risk)`.
    fn requests(&self, turns: &[Turn], policy: &GuardPolicy) -> Vec<(&'static str, Value, String)> {
        let model = &self.spec.model;
        match &self.spec.protocol {
            Protocol::LlamaGuard { prompt, content } => {
                let (path, body) = protocol::llama_guard_request(
                    model,
                    *prompt,
                    *content,
                    turns,
                    &policy.category_list(),
                );
                vec![(path, body, String::new())]
            }
            Protocol::OpenaiModeration { .. } => {
                let text: Vec<&str> = turns.iter().map(|t| t.text.as_str()).collect();
                let (path, body) = protocol::moderation_request(model, &text.join("\n"));
                vec![(path, body, String::new())]
            }
            Protocol::YesNo { risks } => risks
                .iter()
                .map(|risk| {
                    let (path, body) = protocol::yes_no_request(model, risk, turns);
                    (path, body, risk.clone())
                })
                .collect(),
        }
    }

    fn read(&self, reply: &Value, risk: &str) -> Result<Judgement, protocol::Unreadable> {
        match &self.spec.protocol {
            Protocol::LlamaGuard { .. } => {
                protocol::parse_llama_guard(protocol::completion_text(reply)?)
            }
            Protocol::OpenaiModeration { thresholds } => {
                protocol::parse_moderation(reply, thresholds)
            }
            Protocol::YesNo { .. } => {
                protocol::parse_yes_no(protocol::completion_text(reply)?, risk)
            }
        }
    }

    /// One call, through the cache (per tenant: one tenant cannot learn
    /// from a cache hit what another sent) and the breaker.
    async fn judge(
        &self,
        tenant: &str,
        path: &str,
        body: Value,
        risk: &str,
    ) -> Result<(Judgement, bool), String> {
        let k = key(&self.spec.model, tenant, path, &body);
        if let Some(j) = self.cache.get(&k) {
            return Ok((j, true));
        }
        if self.breaker.permit() == Permit::Refused {
            return Err("the guard's circuit breaker is open".into());
        }
        // Only a guard that does not answer counts toward the breaker: a
        // caller can make a guard refuse or ramble, or fill the cap, but
        // must not be able to open the breaker for everyone.
        match self.client.post(path, body).await {
            Ok(reply) => {
                self.breaker.success();
                let j = self.read(&reply, risk).map_err(|e| e.to_string())?;
                self.cache.put(k, j.clone());
                Ok((j, false))
            }
            Err(CallError::Unavailable(e)) => {
                self.breaker.failure();
                Err(e)
            }
            Err(CallError::Rejected(e)) => {
                self.breaker.success();
                Err(e)
            }
            Err(CallError::Overloaded(e)) => {
                self.breaker.release();
                Err(e)
            }
        }
    }
}

/// The guard's verdict on a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyVerdict {
    pub action: Action,
    /// The category that decided, described (`S9: Indiscriminate Weapons`).
    pub category: Option<String>,
    pub named: Vec<String>,
}

impl GuardFilter {
    /// Judge what a model wrote (`reply`) after the request `body`: the
    /// request's turns, then the reply as the assistant's turn (the one
    /// guards judge). Moderation endpoints judge the reply alone.
    pub async fn judge_reply(
        &self,
        prompt: &crate::prompt::Prompt<'_>,
        reply: &str,
        principal: Option<&crate::request::Principal>,
    ) -> Result<ReplyVerdict, FilterError> {
        let policy = self.policy.get();
        let mut turns = match &self.spec.protocol {
            Protocol::OpenaiModeration { .. } => Vec::new(),
            _ => turns(prompt, policy.send, policy.max_chars)
                .map(|(t, _)| t)
                .unwrap_or_default(),
        };
        // The reply keeps its end when it is long.
        let chars: Vec<char> = reply.chars().collect();
        let keep = policy.max_chars.min(chars.len());
        turns.push(Turn {
            role: super::Role::Assistant,
            text: chars[chars.len() - keep..].iter().collect(),
        });
        let tenant = principal.map_or("", |p| p.tenant.as_str());
        let mut named = Vec::new();
        for (path, body, risk) in self.requests(&turns, &policy) {
            let (j, _) = self.judge(tenant, path, body, &risk).await.map_err(|e| {
                FilterError::new(
                    ErrorCode::GuardUnavailable,
                    format!("guard {} on the reply: {e}", self.spec.model),
                )
            })?;
            if let Judgement::Unsafe(categories) = j {
                if categories.is_empty() {
                    named.push("unspecified".into());
                }
                named.extend(categories);
            }
        }
        let (action, deciding) = policy.action(&named, principal);
        Ok(ReplyVerdict {
            action,
            category: deciding.map(|c| policy.describe(&c)),
            named,
        })
    }
}

#[async_trait]
impl RequestFilter for GuardFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::GuardModel
    }

    async fn check(&self, view: &RequestView<'_>) -> Result<Verdict, FilterError> {
        if !view.prompt.generates {
            // Embeddings: nothing is generated to judge.
            return Ok(Decision::Allow.into());
        }
        if view.dry_run {
            // A simulation spends nothing: no guard call, no breaker count.
            return Ok(Decision::Annotate(vec![Annotation {
                key: "guard_verdict",
                value: json!("not judged in a simulation"),
            }])
            .into());
        }
        let tenant = view.principal.map_or("", |p| p.tenant.as_str());
        let policy = self.policy.get();
        let (turns, cut) = match turns(view.prompt, policy.send, policy.max_chars) {
            Ok(t) => t,
            Err(super::Unjudgeable(why)) => {
                return Ok(
                    Decision::Deny(Rejection::about_input(ErrorCode::InvalidRequest, why)).into(),
                )
            }
        };
        if turns.is_empty() {
            // No text at all (an empty conversation): nothing to judge.
            return Ok(Decision::Allow.into());
        }
        let started = Instant::now();
        let mut named: Vec<String> = Vec::new();
        let mut cache_hits = 0;
        let calls = self.requests(&turns, &policy);
        let n = calls.len();
        for (path, body, risk) in calls {
            let (j, hit) = self.judge(tenant, path, body, &risk).await.map_err(|e| {
                FilterError::new(
                    ErrorCode::GuardUnavailable,
                    format!("guard {}: {e}", self.spec.model),
                )
            })?;
            cache_hits += usize::from(hit);
            if let Judgement::Unsafe(categories) = j {
                // A guard that says unsafe and names nothing: the policy's
                // unknown category decides.
                if categories.is_empty() {
                    named.push("unspecified".into());
                }
                named.extend(categories);
            }
        }
        let (action, deciding) = policy.action(&named, view.principal);
        let verdict = if named.is_empty() { "safe" } else { "unsafe" };
        let notes = vec![
            Annotation {
                key: "guard_verdict",
                value: json!(verdict),
            },
            Annotation {
                key: "guard_categories",
                value: json!(named),
            },
            Annotation {
                key: "guard_latency_us",
                value: json!(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
            },
            Annotation {
                key: "guard_cache_hit",
                value: json!(cache_hits == n),
            },
            Annotation {
                key: "guard_breaker",
                value: json!(self.breaker.state().as_str()),
            },
            Annotation {
                key: "guard_timing",
                value: json!("sequential"),
            },
            Annotation {
                key: "guard_input_cut",
                value: json!(cut),
            },
        ];
        match (action, deciding) {
            (Action::Block, Some(code)) => {
                let described = policy.describe(&code);
                let mut v = Verdict::from(Decision::Deny(Rejection {
                    code: ErrorCode::ContentPolicy,
                    message: Cow::Owned(format!(
                        "The request was refused by the content policy ({described})."
                    )),
                    reason: format!("guard {}: unsafe, {}", self.spec.model, named.join(", ")),
                }));
                for n in notes {
                    v = v.with(Fact::Note(n));
                }
                Ok(v)
            }
            _ => Ok(Decision::Annotate(notes).into()),
        }
    }
}
