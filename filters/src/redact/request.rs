//! Request-side redaction (opt-in per tenant): what the caller sends is
//! redacted before it reaches the provider. Chat: the `content` of `user`,
//! `tool` and legacy `function` messages (strings and content parts).
//! Completions: every `prompt`. Embeddings: every `input`. A prompt or an
//! input given as token ids cannot be read, so it is refused (400) for a
//! tenant whose requests are redacted.

use super::Redactor;
use crate::chain::{Annotation, Decision, Fact, FilterError, FilterKind, RequestFilter, Verdict};
use crate::error::{ErrorCode, Rejection};
use crate::request::{RequestView, Route};
use crate::shared::Shared;
use async_trait::async_trait;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct RequestRedaction {
    redactor: Arc<Shared<Redactor>>,
    /// Tenants it applies to; `*` for all.
    tenants: Vec<String>,
}

impl RequestRedaction {
    pub fn new(redactor: Arc<Shared<Redactor>>, tenants: Vec<String>) -> Self {
        Self { redactor, tenants }
    }

    fn applies(&self, tenant: Option<&str>) -> bool {
        self.tenants
            .iter()
            .any(|t| t == "*" || Some(t.as_str()) == tenant)
    }

    /// A message `content`: a string, or parts (strings or objects with
    /// `text`).
    fn redact_texts(r: &Redactor, content: &mut Value, counts: &mut BTreeMap<String, usize>) {
        match content {
            Value::String(s) => Self::redact(r, s, counts),
            Value::Array(parts) => {
                for p in parts {
                    match p {
                        Value::String(s) => Self::redact(r, s, counts),
                        Value::Object(o) => {
                            if let Some(Value::String(s)) = o.get_mut("text") {
                                Self::redact(r, s, counts);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }

    /// `prompt` / `input`: a string or an array of strings. Token ids are
    /// refused: they cannot be screened.
    fn redact_inputs(
        r: &Redactor,
        body: &mut Value,
        field: &str,
        counts: &mut BTreeMap<String, usize>,
    ) -> Result<(), Rejection> {
        let token_ids = || {
            Rejection::about_input(
                ErrorCode::InvalidRequest,
                format!("`{field}` must be text: token ids cannot be screened for secrets."),
            )
        };
        match body.get_mut(field) {
            Some(Value::String(s)) => Self::redact(r, s, counts),
            Some(Value::Array(items)) => {
                for item in items {
                    match item {
                        Value::String(s) => Self::redact(r, s, counts),
                        _ => return Err(token_ids()),
                    }
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => return Err(token_ids()),
        }
        Ok(())
    }

    fn redact(r: &Redactor, s: &mut String, counts: &mut BTreeMap<String, usize>) {
        let (out, c) = r.redact(s);
        if c.is_empty() {
            return;
        }
        *s = out;
        for (k, v) in c {
            *counts.entry(k).or_insert(0) += v;
        }
    }
}

#[async_trait]
impl RequestFilter for RequestRedaction {
    fn kind(&self) -> FilterKind {
        FilterKind::RequestRedaction
    }

    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError> {
        let tenant = request.principal.map(|p| p.tenant.as_str());
        if !self.applies(tenant) {
            return Ok(Decision::Allow.into());
        }
        let r = self.redactor.get().for_tenant(tenant);
        let mut body = request.body.clone();
        let mut counts = BTreeMap::new();
        let texts = match request.route {
            Route::ChatCompletions => {
                for m in crate::json::array_mut(&mut body, "messages")
                    .into_iter()
                    .flatten()
                {
                    let role = m.get("role").and_then(Value::as_str);
                    if !matches!(role, Some("user" | "tool" | "function")) {
                        continue;
                    }
                    if let Some(content) = m.get_mut("content") {
                        Self::redact_texts(&r, content, &mut counts);
                    }
                }
                Ok(())
            }
            Route::Completions => Self::redact_inputs(&r, &mut body, "prompt", &mut counts),
            Route::Embeddings => Self::redact_inputs(&r, &mut body, "input", &mut counts),
            Route::Models => Ok(()),
        };
        if let Err(rejection) = texts {
            return Ok(Decision::Deny(rejection).into());
        }
        if counts.is_empty() {
            return Ok(Decision::Allow.into());
        }
        Ok(Verdict::from(Decision::Annotate(vec![Annotation {
            key: "redactions",
            value: json!(counts),
        }]))
        .with(Fact::Body(body)))
    }
}
