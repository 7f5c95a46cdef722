//! Request-side redaction (opt-in per tenant): what the caller sends is
//! redacted before it reaches the provider. Chat: the `content` of `user`,
//! `tool` and legacy `function` messages (strings and content parts).
//! Completions: every `prompt`. Embeddings: every `input`. A prompt or an
//! input given as token ids cannot be read, so it is refused (400) for a
//! tenant whose requests are redacted.

use super::Redactor;
use crate::chain::{Annotation, Decision, Fact, FilterError, FilterKind, RequestFilter, Verdict};
use crate::error::{ErrorCode, Rejection};
use crate::prompt::Role;
use crate::request::RequestView;
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

    /// A completions prompt or suffix, an embeddings input: a string or
    /// an array of strings. Token ids are refused: they cannot be
    /// screened.
    fn redact_input(
        r: &Redactor,
        value: &mut Value,
        field: &str,
        counts: &mut BTreeMap<String, usize>,
    ) -> Result<(), Rejection> {
        let token_ids = || {
            Rejection::about_input(
                ErrorCode::InvalidRequest,
                format!("`{field}` must be text: token ids cannot be screened for secrets."),
            )
        };
        match value {
            Value::String(s) => Self::redact(r, s, counts),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::String(s) => Self::redact(r, s, counts),
                        _ => return Err(token_ids()),
                    }
                }
            }
            Value::Null => {}
            _ => return Err(token_ids()),
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
        // What the caller and its tools wrote; the model's own earlier
        // turns and the system prompt are the caller's business.
        for m in &request.prompt.messages {
            if !matches!(m.role, Role::User | Role::Tool) {
                continue;
            }
            if let Some(content) = body.pointer_mut(&m.at) {
                Self::redact_texts(&r, content, &mut counts);
            }
        }
        let mut texts = Ok(());
        for input in &request.prompt.inputs {
            if let Some(value) = body.pointer_mut(&input.at) {
                texts = Self::redact_input(&r, value, input.field, &mut counts);
                if texts.is_err() {
                    break;
                }
            }
        }
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
