//! Tool-call authorization: which caller may use which tool, with which
//! arguments. Policy in `policies/tools.yaml`; enforced where tools appear:
//! the request's `tools` declarations and `role: tool` messages (the
//! [`ToolAuthz`] request filter), and the model's tool calls in JSON and
//! streamed responses (`tool_authz::response`).
//!
//! Access per role is `allow`, `deny` or `approval_required`; a caller gets
//! the most permissive access any of its roles has (`*` applies to every
//! caller), and a tool the policy does not list gets `unknown_default`.
//! Allowed calls must also meet the tool's argument constraints (JSON
//! pointer → regex, enum, maximum length, numeric range).

use crate::chain::{Annotation, Decision, FilterError, FilterKind, RequestFilter, Verdict};
use crate::error::{ErrorCode, Rejection};
use crate::request::{Principal, RequestView};
use async_trait::async_trait;
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub mod response;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Deny,
    ApprovalRequired,
    Allow,
}

/// What to do with a request that declares a tool the caller may not use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeclared {
    /// 403 `tool_not_allowed`.
    #[default]
    Deny,
    /// Remove the tool from the request and forward the rest.
    Strip,
}

/// What to do with a model's call to a tool the caller may not use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCalled {
    /// Remove the call; the response says so in its text.
    #[default]
    Remove,
    /// Fail the request with 403 `tool_not_allowed`.
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// JSON pointer into the call's arguments, e.g. `/to`.
    pub pointer: String,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default, rename = "enum")]
    pub one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// The function name the model calls.
    pub id: String,
    /// Role (or `*`) → access.
    pub access: BTreeMap<String, Access>,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
}

/// `policies/tools.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolPolicySpec {
    #[serde(default = "deny")]
    pub unknown_default: Access,
    #[serde(default)]
    pub on_declared: OnDeclared,
    #[serde(default)]
    pub on_called: OnCalled,
    pub tools: Vec<ToolSpec>,
}

fn deny() -> Access {
    Access::Deny
}

struct Tool {
    spec: ToolSpec,
    regexes: Vec<Option<Regex>>,
}

/// The compiled policy.
pub struct ToolPolicy {
    unknown_default: Access,
    pub on_declared: OnDeclared,
    pub on_called: OnCalled,
    tools: BTreeMap<String, Tool>,
}

/// The verdict on one tool (and, for calls, its arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolVerdict {
    Allowed,
    Denied(String),
    NeedsApproval,
}

impl ToolPolicy {
    /// Compile; reports every bad regex or duplicate at once.
    pub fn build(spec: ToolPolicySpec) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut tools = BTreeMap::new();
        for t in spec.tools {
            let regexes = t
                .constraints
                .iter()
                .map(|c| {
                    c.regex.as_deref().map(|r| {
                        Regex::new(r)
                            .map_err(|e| format!("tool '{}' constraint {}: {e}", t.id, c.pointer))
                    })
                })
                .map(|r| r.transpose())
                .collect::<Result<Vec<_>, _>>();
            match regexes {
                Ok(regexes) => {
                    if tools.contains_key(&t.id) {
                        errors.push(format!("tool '{}' listed twice", t.id));
                    }
                    tools.insert(t.id.clone(), Tool { spec: t, regexes });
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            unknown_default: spec.unknown_default,
            on_declared: spec.on_declared,
            on_called: spec.on_called,
            tools,
        })
    }

    /// The caller's access to a tool: the most permissive of its roles.
    pub fn access(&self, tool: &str, principal: Option<&Principal>) -> Access {
        let Some(t) = self.tools.get(tool) else {
            return self.unknown_default;
        };
        let roles = principal.map(|p| p.roles.as_slice()).unwrap_or(&[]);
        t.spec
            .access
            .iter()
            .filter(|(role, _)| *role == "*" || roles.contains(role))
            .map(|(_, a)| *a)
            .max()
            .unwrap_or(Access::Deny)
    }

    /// Judge a tool, and its arguments when given (a call).
    pub fn judge(
        &self,
        tool: &str,
        principal: Option<&Principal>,
        arguments: Option<&Value>,
    ) -> ToolVerdict {
        match self.access(tool, principal) {
            Access::Deny => return ToolVerdict::Denied(format!("tool '{tool}' not allowed")),
            Access::ApprovalRequired => return ToolVerdict::NeedsApproval,
            Access::Allow => {}
        }
        let (Some(t), Some(args)) = (self.tools.get(tool), arguments) else {
            return ToolVerdict::Allowed;
        };
        for (c, re) in t.spec.constraints.iter().zip(&t.regexes) {
            let v = args.pointer(&c.pointer);
            let broken = |why: &str| {
                ToolVerdict::Denied(format!("tool '{tool}' argument {} {why}", c.pointer))
            };
            let Some(v) = v else {
                return broken("missing");
            };
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let Some(re) = re {
                if !re.is_match(&text) {
                    return broken("does not match the allowed pattern");
                }
            }
            if c.one_of.as_ref().is_some_and(|list| !list.contains(v)) {
                return broken("is not one of the allowed values");
            }
            if c.max_length.is_some_and(|m| text.chars().count() > m) {
                return broken("is too long");
            }
            if c.min.is_some() || c.max.is_some() {
                let Some(n) = v.as_f64() else {
                    return broken("is not a number");
                };
                if c.min.is_some_and(|m| n < m) || c.max.is_some_and(|m| n > m) {
                    return broken("is out of range");
                }
            }
        }
        ToolVerdict::Allowed
    }
}

/// The request side: declared tools and `role: tool` messages.
pub struct ToolAuthz {
    policy: std::sync::Arc<crate::shared::Shared<ToolPolicy>>,
}

impl ToolAuthz {
    pub fn new(policy: std::sync::Arc<crate::shared::Shared<ToolPolicy>>) -> Self {
        Self { policy }
    }
}

/// The tool names a request declares.
pub fn declared(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Names of the tools whose results `role: tool` messages carry, found
/// through the assistant messages' tool calls.
fn tool_results(body: &Value) -> Vec<String> {
    let messages = body["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut names = BTreeMap::new();
    for m in messages {
        for call in m["tool_calls"].as_array().into_iter().flatten() {
            if let (Some(id), Some(name)) = (call["id"].as_str(), call["function"]["name"].as_str())
            {
                names.insert(id.to_string(), name.to_string());
            }
        }
    }
    messages
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            m["tool_call_id"]
                .as_str()
                .and_then(|id| names.get(id).cloned())
                .or_else(|| m["name"].as_str().map(str::to_string))
                .unwrap_or_else(|| "<unknown tool>".into())
        })
        .collect()
}

fn refusal(verdict: &ToolVerdict, tool: &str) -> Rejection {
    match verdict {
        ToolVerdict::NeedsApproval => Rejection::new(
            ErrorCode::ToolApprovalRequired,
            format!("tool '{tool}' requires approval (pending)"),
        ),
        ToolVerdict::Denied(why) => Rejection::new(ErrorCode::ToolNotAllowed, why.clone()),
        ToolVerdict::Allowed => Rejection::new(ErrorCode::InternalError, "allowed"),
    }
}

#[async_trait]
impl RequestFilter for ToolAuthz {
    fn kind(&self) -> FilterKind {
        FilterKind::ToolAuthz
    }

    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError> {
        let p = request.principal;
        let policy = self.policy.get();
        // A result of a tool the caller may not use: always refused.
        for tool in tool_results(request.body) {
            let v = policy.judge(&tool, p, None);
            if v != ToolVerdict::Allowed {
                let mut r = refusal(&v, &tool);
                r.reason = format!("tool result message: {}", r.reason);
                return Ok(Decision::Deny(r).into());
            }
        }
        let mut stripped = Vec::new();
        for tool in declared(request.body) {
            let v = policy.judge(&tool, p, None);
            if v == ToolVerdict::Allowed {
                continue;
            }
            if policy.on_declared == OnDeclared::Strip && matches!(v, ToolVerdict::Denied(_)) {
                stripped.push(tool);
                continue;
            }
            return Ok(Decision::Deny(refusal(&v, &tool)).into());
        }
        if stripped.is_empty() {
            return Ok(Decision::Allow.into());
        }
        Ok(Verdict::from(Decision::Annotate(vec![Annotation {
            key: "tools_stripped",
            value: json!(stripped),
        }]))
        .with(crate::chain::Fact::StripTools(stripped)))
    }
}

#[cfg(test)]
mod tests;
