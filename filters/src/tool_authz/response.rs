//! Tool calls in responses: removed (or refused) when the caller may not
//! use the tool or the arguments break its constraints. Calls are
//! `tool_calls` entries (`function` and `custom`) and the legacy
//! `function_call`, in every choice. In a stream, the events that carry a
//! choice's calls are held until the choice finishes, so no byte of a
//! refused call's name or arguments reaches the client; an event that
//! carries several choices is split, one event per held choice.

use super::{call_parts, OnCalled, ToolPolicy, ToolVerdict};
use crate::chain::{Annotation, Decision, FilterError, FilterKind};
use crate::error::{ErrorCode, Rejection};
use crate::request::Principal;
use crate::response::{ResponseContext, ResponseStage, StreamStage, MAX_STREAM_HOLD};
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

/// The key of the legacy `function_call` among a choice's calls.
const FUNCTION_CALL: u64 = u64::MAX;

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
        for choice in crate::json::array_mut(body, "choices")
            .into_iter()
            .flatten()
        {
            let Some(message) = choice.get_mut("message").and_then(Value::as_object_mut) else {
                continue;
            };
            let mut removed = Vec::new();
            let mut judge_call = |call: &Value| {
                let (name, args) = call_parts(call);
                called.push(name.clone());
                match judge(&policy, ctx.principal, &name, &args) {
                    ToolVerdict::Allowed => true,
                    v => {
                        removed.push(name.clone());
                        refused.push((name, v));
                        false
                    }
                }
            };
            let mut calls_left = 0;
            if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
                calls.retain(&mut judge_call);
                calls_left = calls.len();
                if calls.is_empty() {
                    message.remove("tool_calls");
                }
            }
            if let Some(call) = message.get("function_call").filter(|c| c.is_object()) {
                if judge_call(call) {
                    calls_left += 1;
                } else {
                    message.remove("function_call");
                }
            }
            if !removed.is_empty() && policy.on_called == OnCalled::Deny {
                let (name, v) = &refused[0];
                return Ok(Decision::Deny(rejection(name, v)));
            }
            if !removed.is_empty() && calls_left == 0 {
                message.insert("content".into(), Value::String(notice(&removed)));
                if let Some(c) = choice.as_object_mut() {
                    c.insert("finish_reason".into(), Value::String("stop".into()));
                }
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
            held_bytes: BTreeMap::new(),
            calls: BTreeMap::new(),
            called: Vec::new(),
            refused: Vec::new(),
        })
    }
}

struct ToolStream {
    policy: Arc<ToolPolicy>,
    principal: Option<Principal>,
    /// Choice index → its held events, each carrying that choice only.
    held: BTreeMap<u64, Vec<Value>>,
    /// Choice index → bytes of the upstream events it holds parts of (an
    /// upper bound of what it holds), kept under [`MAX_STREAM_HOLD`].
    held_bytes: BTreeMap<u64, usize>,
    /// (choice, tool index or [`FUNCTION_CALL`]) → (name, arguments so far).
    calls: BTreeMap<(u64, u64), (String, String)>,
    called: Vec<String>,
    refused: Vec<(String, ToolVerdict)>,
}

/// The index of a choice object (its position when it has none).
fn choice_index(choice: &Value, position: usize) -> u64 {
    choice
        .get("index")
        .and_then(Value::as_u64)
        .unwrap_or(position as u64)
}

fn is_finished(choice: &Value) -> bool {
    choice.get("finish_reason").is_some_and(|f| !f.is_null())
}

/// Whether a choice's delta carries tool calls (new or legacy).
fn carries_calls(choice: &Value) -> bool {
    let Some(delta) = choice.get("delta") else {
        return false;
    };
    delta
        .get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty())
        || delta.get("function_call").is_some_and(Value::is_object)
}

impl ToolStream {
    /// Add a choice's call fragments to the calls being assembled.
    fn collect(&mut self, index: u64, choice: &Value) {
        let Some(delta) = choice.get("delta") else {
            return;
        };
        let fragments = delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| {
                (
                    t.get("index").and_then(Value::as_u64).unwrap_or(i as u64),
                    t,
                )
            })
            .chain(
                delta
                    .get("function_call")
                    .filter(|f| f.is_object())
                    .map(|f| (FUNCTION_CALL, f)),
            );
        for (key, fragment) in fragments {
            let inner = fragment
                .get("function")
                .or_else(|| fragment.get("custom"))
                .unwrap_or(fragment);
            let entry = self.calls.entry((index, key)).or_default();
            if let Some(name) = inner.get("name").and_then(Value::as_str) {
                entry.0.push_str(name);
            }
            if let Some(args) = inner
                .get("arguments")
                .or_else(|| inner.get("input"))
                .and_then(Value::as_str)
            {
                entry.1.push_str(args);
            }
        }
    }

    /// Judge every call of a finished choice; release what may pass.
    fn settle(
        &mut self,
        choice: u64,
        finish: Option<Value>,
        out: &mut Vec<SseEvent>,
    ) -> Result<(), FilterError> {
        let events = self.held.remove(&choice).unwrap_or_default();
        self.held_bytes.remove(&choice);
        let mut refused_here = Vec::new();
        let keys: Vec<(u64, u64)> = self
            .calls
            .range((choice, 0)..=(choice, u64::MAX))
            .map(|(k, _)| *k)
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
        let refused_keys: Vec<u64> = refused_here.iter().map(|(i, _)| *i).collect();
        let mut kept_any = false;
        for mut ev in events {
            let mut empty = false;
            let delta = ev
                .pointer_mut("/choices/0/delta")
                .and_then(Value::as_object_mut);
            if let Some(delta) = delta {
                if let Some(Value::Array(tc)) = delta.get_mut("tool_calls") {
                    let mut position = 0u64;
                    tc.retain(|t| {
                        let key = t.get("index").and_then(Value::as_u64).unwrap_or(position);
                        position += 1;
                        !refused_keys.contains(&key)
                    });
                    if tc.is_empty() {
                        delta.remove("tool_calls");
                    }
                }
                if refused_keys.contains(&FUNCTION_CALL) {
                    delta.remove("function_call");
                }
                let calls = delta.contains_key("tool_calls") || delta.contains_key("function_call");
                kept_any |= calls;
                // An event left with no call and nothing else to say goes.
                empty = !calls
                    && !delta
                        .iter()
                        .any(|(k, v)| k != "role" && !v.is_null() && v != "");
            }
            let finished = ev.pointer("/choices/0").is_some_and(is_finished);
            if !empty || finished {
                out.push(SseEvent::from_json(ev));
            }
        }
        if let Some(mut finish) = finish {
            if !refused_here.is_empty() && !kept_any {
                let names: Vec<String> = refused_here.into_iter().map(|(_, n)| n).collect();
                if let Some(c) = finish
                    .pointer_mut("/choices/0")
                    .and_then(Value::as_object_mut)
                {
                    if let Some(delta) = c.get_mut("delta").and_then(Value::as_object_mut) {
                        delta.insert("content".into(), Value::String(notice(&names)));
                    } else {
                        c.insert("delta".into(), json!({"content": notice(&names)}));
                    }
                    c.insert("finish_reason".into(), Value::String("stop".into()));
                }
            }
            out.push(SseEvent::from_json(finish));
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
        let event_bytes = event.data_len();
        // Most events carry no call and finish none: passed on untouched.
        let touches = event
            .json()
            .and_then(|v| v.get("choices"))
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().enumerate().any(|(position, c)| {
                    carries_calls(c)
                        || (is_finished(c) && self.held.contains_key(&choice_index(c, position)))
                })
            });
        if !touches {
            out.push(event);
            return Ok(());
        }
        let Some(mut v) = event.json().cloned() else {
            out.push(event);
            return Ok(());
        };
        let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) else {
            out.push(event);
            return Ok(());
        };
        // Each choice of the event is charged its share of the event.
        let event_bytes = event_bytes / choices.len().max(1);
        // Take out every choice that carries calls or finishes a held one;
        // the rest of the event goes on as it came.
        let mut taken = Vec::new();
        let mut position = 0;
        choices.retain(|c| {
            let index = choice_index(c, position);
            position += 1;
            let take = carries_calls(c) || (is_finished(c) && self.held.contains_key(&index));
            if take {
                taken.push((index, c.clone()));
            }
            !take
        });
        let any_taken = !taken.is_empty();
        let passthrough =
            !choices.is_empty() || !any_taken || v.get("usage").is_some_and(|u| !u.is_null());
        let single = |choice: Value| {
            let mut one = v.clone();
            if let Some(o) = one.as_object_mut() {
                o.insert("choices".into(), Value::Array(vec![choice]));
                o.remove("usage");
            }
            one
        };
        let mut settled = Vec::new();
        for (index, choice) in taken {
            let finished = is_finished(&choice);
            if carries_calls(&choice) {
                self.collect(index, &choice);
                self.held.entry(index).or_default().push(single(choice));
                *self.held_bytes.entry(index).or_default() += event_bytes;
                if finished {
                    settled.push((index, None));
                }
            } else {
                settled.push((index, Some(single(choice))));
            }
        }
        if passthrough {
            out.push(if any_taken {
                SseEvent::from_json(v)
            } else {
                event
            });
        }
        for (index, finish) in settled {
            self.settle(index, finish, out)?;
        }
        let held: usize = self.held_bytes.values().sum();
        if held > MAX_STREAM_HOLD {
            // A call is judged whole or not at all: never released in part.
            return Err(FilterError::limit(
                ErrorCode::UnscreenableOutput,
                format!(
                    "tool calls still being streamed: {held} bytes held, over the cap of {MAX_STREAM_HOLD}"
                ),
            ));
        }
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
