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

use crate::approval::ApprovalStore;
use crate::chain::{Annotation, Decision, FilterError, FilterKind, RequestFilter, Verdict};
use crate::error::{ErrorCode, Rejection};
use crate::prompt::{Prompt, Role};
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
    /// What redaction does to this tool's call arguments.
    #[serde(default)]
    pub redact_arguments: RedactArguments,
}

/// What redaction does to a tool call's arguments (`redact_arguments:`).
/// Secrets are redacted unless the tool says `none`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedactArguments {
    /// Secrets and personal data, except personal data in an argument
    /// whose value a `regex` or `enum` constraint vets: the policy has
    /// already said which values may go there (`send_email.to` matching
    /// `@example.com`), and rewriting them would break the call.
    #[default]
    All,
    /// Secrets only: personal data is what the tool is for (a CRM lookup).
    Secrets,
    /// Nothing: the arguments reach the client as the model wrote them
    /// (a tool that stores a credential in a vault).
    None,
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
    /// Whether the policy lists `tool` (metrics name only listed tools).
    pub fn lists(&self, tool: &str) -> bool {
        self.tools.contains_key(tool)
    }

    /// How redaction treats `tool`'s call arguments.
    pub fn argument_redaction(&self, tool: &str) -> RedactArguments {
        self.tools
            .get(tool)
            .map_or(RedactArguments::All, |t| t.spec.redact_arguments)
    }

    /// Whether the policy vets `value` at `pointer` of `tool`'s arguments:
    /// a `regex` or `enum` constraint names that pointer, and the value
    /// meets every such constraint there. Checked here again, so a value
    /// the policy would refuse (tool authorization in monitor mode) is
    /// never kept.
    pub fn vets(&self, tool: &str, pointer: &str, value: &Value) -> bool {
        let Some(t) = self.tools.get(tool) else {
            return false;
        };
        let mut any = false;
        for (c, re) in t.spec.constraints.iter().zip(&t.regexes) {
            if c.pointer != pointer || (re.is_none() && c.one_of.is_none()) {
                continue;
            }
            any = true;
            if re
                .as_ref()
                .is_some_and(|re| !re.is_match(&value_text(value)))
                || c.one_of.as_ref().is_some_and(|list| !list.contains(value))
            {
                return false;
            }
        }
        any
    }

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
        // A call that breaks the tool's constraints is refused outright,
        // never put to an approver.
        let granted = match self.access(tool, principal) {
            Access::Deny => return ToolVerdict::Denied(format!("tool '{tool}' not allowed")),
            Access::ApprovalRequired => ToolVerdict::NeedsApproval,
            Access::Allow => ToolVerdict::Allowed,
        };
        let (Some(t), Some(args)) = (self.tools.get(tool), arguments) else {
            return granted;
        };
        for (c, re) in t.spec.constraints.iter().zip(&t.regexes) {
            let v = args.pointer(&c.pointer);
            let broken = |why: &str| {
                ToolVerdict::Denied(format!("tool '{tool}' argument {} {why}", c.pointer))
            };
            let Some(v) = v else {
                return broken("missing");
            };
            let text = value_text(v);
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
        granted
    }
}

/// A constraint's view of a value: a string as it is, anything else as JSON.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The request side: declared tools and `role: tool` messages.
pub struct ToolAuthz {
    policy: std::sync::Arc<crate::shared::Shared<ToolPolicy>>,
    /// Where approvals are kept, when calls are held for them.
    approvals: Option<std::sync::Arc<dyn ApprovalStore>>,
}

impl ToolAuthz {
    pub fn new(policy: std::sync::Arc<crate::shared::Shared<ToolPolicy>>) -> Self {
        Self {
            policy,
            approvals: None,
        }
    }

    /// Hold calls to `approval_required` tools for approval (on the routes
    /// whose replies can be replayed): such tools may be declared, and
    /// their results carried once their call was approved and handed out.
    pub fn with_approvals(mut self, store: std::sync::Arc<dyn ApprovalStore>) -> Self {
        self.approvals = Some(store);
        self
    }
}

/// The name and arguments of one call: a `tool_calls` entry (`function`
/// or `custom`) or a legacy `function_call` object.
pub fn call_parts(call: &Value) -> (String, String) {
    let inner = call
        .get("function")
        .or_else(|| call.get("custom"))
        .unwrap_or(call);
    let name = inner.get("name").and_then(Value::as_str).unwrap_or("");
    let args = inner
        .get("arguments")
        .or_else(|| inner.get("input"))
        .and_then(Value::as_str)
        .unwrap_or("{}");
    (name.to_string(), args.to_string())
}

/// A tool the conversation used: a replayed call, or a result (whose
/// tool is found through the call it answers, else through its own name).
struct Used<'a> {
    tool: String,
    /// The call's id and arguments, when the conversation has the call.
    call: Option<(&'a str, Option<&'a Value>)>,
}

impl Used<'_> {
    fn fingerprint(&self, caller: Option<&Principal>) -> Option<String> {
        let (id, args) = self.call?;
        // Arguments as text: a JSON text as written, or a value.
        let args = match args {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        Some(crate::approval::fingerprint(caller?, id, &self.tool, &args))
    }
}

/// The calls a conversation replays and the results it carries.
fn tool_results<'a>(prompt: &'a Prompt<'_>) -> Vec<Used<'a>> {
    let mut calls = BTreeMap::new();
    let mut used = Vec::new();
    for m in &prompt.messages {
        for call in &m.calls {
            if let Some(id) = call.id {
                calls.insert(id, (call.name.as_ref(), call.arguments));
            }
            used.push(Used {
                tool: call.name.to_string(),
                call: call.id.map(|id| (id, call.arguments)),
            });
        }
    }
    for m in prompt.messages.iter().filter(|m| m.role == Role::Tool) {
        let answered = m.answers.and_then(|id| Some((id, calls.get(id)?)));
        used.push(match answered {
            Some((id, (name, args))) => Used {
                tool: name.to_string(),
                call: Some((id, *args)),
            },
            None => Used {
                tool: m.name.unwrap_or("<unknown tool>").to_string(),
                call: None,
            },
        });
    }
    used
}

/// The tool names a request declares. A declaration without a usable
/// name is an error.
pub fn declared(prompt: &Prompt<'_>) -> Result<Vec<String>, Rejection> {
    prompt
        .tools
        .iter()
        .map(|t| t.name.as_deref().map(str::to_string).ok_or_else(unnamed))
        .collect()
}

fn unnamed() -> Rejection {
    Rejection::about_input(
        ErrorCode::InvalidRequest,
        "Every declared tool must have a name.",
    )
}

fn refusal(verdict: &ToolVerdict, tool: &str) -> Rejection {
    match verdict {
        ToolVerdict::NeedsApproval => Rejection::new(
            ErrorCode::ToolApprovalRequired,
            format!(
                "tool '{tool}' requires approval, and calls are not held for one on this route"
            ),
        ),
        ToolVerdict::Denied(why) => Rejection::new(ErrorCode::ToolNotAllowed, why.clone()),
        ToolVerdict::Allowed => Rejection::new(ErrorCode::InternalError, "allowed"),
    }
}

impl ToolAuthz {
    /// Whether the store says a call with this fingerprint was handed out.
    /// A store that cannot answer refuses whatever `on_error` says: this
    /// check failing open would let results of unapproved calls in.
    async fn handed_out(&self, fingerprint: Option<&str>) -> Result<bool, FilterError> {
        let (Some(store), Some(fingerprint)) = (&self.approvals, fingerprint) else {
            return Ok(false);
        };
        store
            .handed_out(fingerprint)
            .await
            .map_err(|e| FilterError::limit(ErrorCode::ApprovalUnavailable, e))
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
        let holds = self.approvals.is_some()
            && p.is_some()
            && crate::dialect::for_route(request.route).is_some_and(|d| d.holds_calls());
        // A result of a tool the caller may not use: always refused. One of
        // a tool that needs approval: only for a call handed out to this
        // caller (the store is asked last, after every local check).
        let mut to_verify = Vec::new();
        for used in tool_results(request.prompt) {
            let v = policy.judge(&used.tool, p, None);
            if v == ToolVerdict::Allowed {
                continue;
            }
            if v == ToolVerdict::NeedsApproval && holds {
                to_verify.push((used.fingerprint(p), used));
                continue;
            }
            let mut r = refusal(&v, &used.tool);
            r.reason = format!("tool result message: {}", r.reason);
            return Ok(Decision::Deny(r).into());
        }
        let declared = match declared(request.prompt) {
            Ok(d) => d,
            Err(r) => return Ok(Decision::Deny(r).into()),
        };
        // A forced tool must be declared: a name forced but not declared
        // is judged too.
        let mut stripped = Vec::new();
        let forced = request
            .prompt
            .forced
            .iter()
            .map(|f| f.to_string())
            .filter(|f| !declared.contains(f))
            .collect::<Vec<_>>();
        for tool in declared.into_iter().chain(forced) {
            let v = policy.judge(&tool, p, None);
            // A tool that needs approval may be offered to the model: its
            // calls are held.
            if v == ToolVerdict::Allowed || (v == ToolVerdict::NeedsApproval && holds) {
                continue;
            }
            if policy.on_declared == OnDeclared::Strip && matches!(v, ToolVerdict::Denied(_)) {
                stripped.push(tool);
                continue;
            }
            return Ok(Decision::Deny(refusal(&v, &tool)).into());
        }
        for (fingerprint, used) in to_verify {
            if !self.handed_out(fingerprint.as_deref()).await? {
                let id = used.call.map(|(id, _)| id);
                let r = Rejection::new(
                    ErrorCode::ToolApprovalRequired,
                    format!(
                        "tool result message: tool '{}' call {} was not approved and handed out to this caller with these arguments",
                        used.tool,
                        id.map_or_else(|| "(not in the conversation)".into(), crate::error::untrusted)
                    ),
                );
                return Ok(Decision::Deny(r).into());
            }
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
