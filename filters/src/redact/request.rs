//! Request-side redaction (opt-in per tenant): `user` and `tool` messages
//! are redacted before they reach the provider.

use super::Redactor;
use crate::chain::{Annotation, Decision, Fact, FilterError, FilterKind, RequestFilter, Verdict};
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
        if !self.applies(request.principal.map(|p| p.tenant.as_str())) {
            return Ok(Decision::Allow.into());
        }
        let r = self.redactor.get();
        let mut body = request.body.clone();
        let mut counts = BTreeMap::new();
        for m in crate::json::array_mut(&mut body, "messages")
            .into_iter()
            .flatten()
        {
            if !(m["role"] == "user" || m["role"] == "tool") {
                continue;
            }
            match m.get_mut("content") {
                Some(Value::String(s)) => Self::redact(&r, s, &mut counts),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        match p {
                            Value::String(s) => Self::redact(&r, s, &mut counts),
                            Value::Object(o) => {
                                if let Some(Value::String(s)) = o.get_mut("text") {
                                    Self::redact(&r, s, &mut counts);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
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
