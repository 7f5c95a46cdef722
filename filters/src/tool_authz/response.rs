//! Tool calls in responses: removed (or refused) when the caller may not
//! use the tool or the arguments break its constraints. In a stream, a
//! call's events are held until the choice finishes, so no byte of a
//! refused call's name or arguments reaches the client.

use super::{OnCalled, ToolPolicy, ToolVerdict};
use crate::chain::{Annotation, Decision, FilterError, FilterKind};
use crate::error::{ErrorCode, Rejection};
use crate::request::Principal;
use crate::response::{ResponseContext, ResponseStage, StreamStage};
use crate::shared::Shared;
use crate::sse::SseEvent;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct ResponseToolAuthz {
    policy: Arc<Shared<ToolPolicy>>,
}

impl ResponseToolAuthz {
    pub fn new(policy: Arc<Shared<ToolPolicy>>) -> Self {
        Self { policy }
    }
}

/// The text a response carries in place of removed calls. It names no
/// tool: which ones were refused is in the audit record.
fn notice(names: &[String]) -> String {
    match names.len() {
        1 => "[a tool call was blocked by policy]".into(),
        n => format!("[{n} tool calls were blocked by policy]"),
    }
}

fn judge(
    policy: &ToolPolicy,
    principal: Option<&Principal>,
    name: &str,
    args: &str,
) -> ToolVerdict {
    let parsed: Value = serde_json::from_str(args).unwrap_or(Value::Null);
    policy.judge(name, principal, Some(&parsed))
}

fn annotations(called: &[String], refused: &[(String, ToolVerdict)]) -> Vec<Annotation> {
    let mut a = Vec::new();
    if !called.is_empty() {
        a.push(Annotation {
            key: "tools_called",
            value: json!(called),
        });
    }
    if !refused.is_empty() {
        let denied: Vec<&str> = refused
            .iter()
            .filter(|(_, v)| matches!(v, ToolVerdict::Denied(_)))
            .map(|(n, _)| n.as_str())
            .collect();
        let pending: Vec<&str> = refused
            .iter()
            .filter(|(_, v)| *v == ToolVerdict::NeedsApproval)
            .map(|(n, _)| n.as_str())
            .collect();
        a.push(Annotation {
            key: "tools_denied",
            value: json!(denied),
        });
        if !pending.is_empty() {
            a.push(Annotation {
                key: "tools_pending_approval",
                value: json!(pending),
            });
        }
    }
    a
}

fn rejection(name: &str, v: &ToolVerdict) -> Rejection {
    match v {
        ToolVerdict::NeedsApproval => Rejection::new(
            ErrorCode::ToolApprovalRequired,
            format!("model called '{name}', which requires approval (pending)"),
        ),
        ToolVerdict::Denied(why) => {
            Rejection::new(ErrorCode::ToolNotAllowed, format!("model called: {why}"))
        }
        ToolVerdict::Allowed => Rejection::new(ErrorCode::InternalError, "allowed"),
    }
}

impl ResponseStage for ResponseToolAuthz {
    fn kind(&self) -> FilterKind {
        FilterKind::ResponseToolAuthz
    }

    fn on_json(
        &self,
        ctx: &ResponseContext<'_>,
        body: &mut Value,
    ) -> Result<Decision, FilterError> {
        let policy = self.policy.get();
        let mut called = Vec::new();
        let mut refused: Vec<(String, ToolVerdict)> = Vec::new();
        for choice in body["choices"].as_array_mut().into_iter().flatten() {
            let Some(calls) = choice
                .pointer_mut("/message/tool_calls")
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            let mut removed = Vec::new();
            calls.retain(|c| {
                let name = c["function"]["name"].as_str().unwrap_or("").to_string();
                let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                called.push(name.clone());
                match judge(&policy, ctx.principal, &name, args) {
                    ToolVerdict::Allowed => true,
                    v => {
                        removed.push(name.clone());
                        refused.push((name, v));
                        false
                    }
                }
            });
            if !removed.is_empty() && policy.on_called == OnCalled::Deny {
                let (name, v) = &refused[0];
                return Ok(Decision::Deny(rejection(name, v)));
            }
            if !removed.is_empty() && calls.is_empty() {
                let message = &mut choice["message"];
                if let Some(m) = message.as_object_mut() {
                    m.remove("tool_calls");
                }
                message["content"] = Value::String(notice(&removed));
                choice["finish_reason"] = Value::String("stop".into());
            }
        }
        Ok(match annotations(&called, &refused) {
            a if a.is_empty() => Decision::Allow,
            a => Decision::Annotate(a),
        })
    }

    fn stream(&self, ctx: &ResponseContext<'_>) -> Box<dyn StreamStage> {
        Box::new(ToolStream {
            policy: self.policy.get(),
            principal: ctx.principal.cloned(),
            held: BTreeMap::new(),
            calls: BTreeMap::new(),
            called: Vec::new(),
            refused: Vec::new(),
        })
    }
}

struct ToolStream {
    policy: Arc<ToolPolicy>,
    principal: Option<Principal>,
    /// Choice index → its held events (each carrying tool-call deltas).
    held: BTreeMap<u64, Vec<Value>>,
    /// (choice, tool index) → (name, arguments so far).
    calls: BTreeMap<(u64, u64), (String, String)>,
    called: Vec<String>,
    refused: Vec<(String, ToolVerdict)>,
}

impl ToolStream {
    /// Judge every call of a finished choice; release what may pass.
    fn settle(
        &mut self,
        choice: u64,
        finish: Option<Value>,
        out: &mut Vec<SseEvent>,
    ) -> Result<(), FilterError> {
        let events = self.held.remove(&choice).unwrap_or_default();
        let mut refused_here = Vec::new();
        let keys: Vec<(u64, u64)> = self
            .calls
            .keys()
            .filter(|(c, _)| *c == choice)
            .copied()
            .collect();
        for key in &keys {
            if let Some((name, args)) = self.calls.remove(key) {
                self.called.push(name.clone());
                let v = judge(&self.policy, self.principal.as_ref(), &name, &args);
                if v != ToolVerdict::Allowed {
                    if self.policy.on_called == OnCalled::Deny {
                        let r = rejection(&name, &v);
                        return Err(FilterError::new(r.code, r.reason));
                    }
                    refused_here.push((key.1, name.clone()));
                    self.refused.push((name, v));
                }
            }
        }
        let refused_indexes: Vec<u64> = refused_here.iter().map(|(i, _)| *i).collect();
        let mut kept_any = false;
        for mut ev in events {
            let mut empty = false;
            if let Some(c) = ev["choices"].as_array_mut().and_then(|cs| {
                cs.iter_mut()
                    .find(|c| c["index"].as_u64().unwrap_or(0) == choice)
            }) {
                if let Some(tc) = c
                    .pointer_mut("/delta/tool_calls")
                    .and_then(Value::as_array_mut)
                {
                    tc.retain(|t| !refused_indexes.contains(&t["index"].as_u64().unwrap_or(0)));
                    empty = tc.is_empty();
                    kept_any |= !empty;
                }
            }
            if !empty {
                out.push(SseEvent::data(ev.to_string()));
            }
        }
        if let Some(mut finish) = finish {
            if !refused_here.is_empty() && !kept_any {
                let names: Vec<String> = refused_here.into_iter().map(|(_, n)| n).collect();
                if let Some(c) = finish["choices"].as_array_mut().and_then(|cs| {
                    cs.iter_mut()
                        .find(|c| c["index"].as_u64().unwrap_or(0) == choice)
                }) {
                    c["delta"]["content"] = Value::String(notice(&names));
                    c["finish_reason"] = Value::String("stop".into());
                }
            }
            out.push(SseEvent::data(finish.to_string()));
        }
        Ok(())
    }
}

impl StreamStage for ToolStream {
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<SseEvent>) -> Result<(), FilterError> {
        if event.is_done() {
            for choice in self.held.keys().copied().collect::<Vec<_>>() {
                self.settle(choice, None, out)?;
            }
            out.push(event);
            return Ok(());
        }
        let Some(v) = event.json() else {
            out.push(event);
            return Ok(());
        };
        let Some(choices) = v["choices"].as_array() else {
            out.push(event);
            return Ok(());
        };
        // Events of one choice: tool-call deltas are held; the finish
        // event settles the choice.
        let Some(c) = choices.first() else {
            out.push(event);
            return Ok(());
        };
        let index = c["index"].as_u64().unwrap_or(0);
        if let Some(tc) = c.pointer("/delta/tool_calls").and_then(Value::as_array) {
            for t in tc {
                let key = (index, t["index"].as_u64().unwrap_or(0));
                let entry = self.calls.entry(key).or_default();
                if let Some(name) = t["function"]["name"].as_str() {
                    entry.0.push_str(name);
                }
                if let Some(args) = t["function"]["arguments"].as_str() {
                    entry.1.push_str(args);
                }
            }
            let finished = !c["finish_reason"].is_null();
            self.held.entry(index).or_default().push(v.clone());
            if finished {
                self.settle(index, None, out)?;
            }
            return Ok(());
        }
        if !c["finish_reason"].is_null() && self.held.contains_key(&index) {
            return self.settle(index, Some(v), out);
        }
        out.push(event);
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), FilterError> {
        for choice in self.held.keys().copied().collect::<Vec<_>>() {
            self.settle(choice, None, out)?;
        }
        Ok(())
    }

    fn report(&self) -> Vec<Annotation> {
        annotations(&self.called, &self.refused)
    }
}
