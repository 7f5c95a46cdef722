//! Tool calls in responses: removed (or refused) when the caller may not
//! use the tool or the arguments break its constraints. Calls are
//! `tool_calls` entries (`function` and `custom`) and the legacy
//! `function_call`, in every choice. In a stream, the events that carry a
//! choice's calls are held until the choice finishes, so no byte of a
//! refused call's name or arguments reaches the client; an event that
//! carries several choices is split, one event per held choice.
//!
//! A call to an `approval_required` tool is held for a person to approve
//! (`crate::approval`) when the context says so: taken out like a refused
//! one, put in the request's holding, and the notice names the approval.
//! When the reply is an approved call handed out, such calls pass.

use super::{call_parts, OnCalled, ToolPolicy, ToolVerdict};
use crate::approval::{self, Approvals, HeldCall, Holding};
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

/// What becomes of one call.
enum Outcome<'h> {
    Pass,
    Hold(&'h Arc<Holding>),
    Refuse(ToolVerdict),
}

fn outcome<'h>(
    policy: &ToolPolicy,
    principal: Option<&Principal>,
    approvals: Approvals<'h>,
    name: &str,
    args: &str,
) -> Outcome<'h> {
    match (judge(policy, principal, name, args), approvals) {
        (ToolVerdict::Allowed, _) | (ToolVerdict::NeedsApproval, Approvals::Redeem) => {
            Outcome::Pass
        }
        (ToolVerdict::NeedsApproval, Approvals::Hold(h)) => Outcome::Hold(h),
        (v, _) => Outcome::Refuse(v),
    }
}

/// The text a choice carries in place of removed and held calls. It names
/// no refused tool (which ones were refused is in the audit record); held
/// calls are named, with the approval to ask for.
fn notice(removed: &[String], held: &[String], approvals: Approvals<'_>) -> String {
    let id = match approvals {
        Approvals::Hold(h) => Some(h.id()),
        _ => None,
    };
    approval::notice(removed, held, id)
}

/// `text` with the notice after it (or the notice alone).
fn with_notice(text: Option<&Value>, notice: String) -> Value {
    match text.and_then(Value::as_str) {
        Some(t) if !t.is_empty() => Value::String(format!("{t}\n\n{notice}")),
        _ => Value::String(notice),
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

/// What one reply's calls came to, for the audit record (names only).
#[derive(Default)]
struct Tally {
    called: Vec<String>,
    refused: Vec<String>,
    held: Vec<String>,
}

impl Tally {
    fn annotations(&self, approvals: Approvals<'_>) -> Vec<Annotation> {
        let mut a = Vec::new();
        let mut add = |key, names: &[String]| {
            if !names.is_empty() {
                a.push(Annotation {
                    key,
                    value: json!(names),
                });
            }
        };
        add("tools_called", &self.called);
        add("tools_denied", &self.refused);
        add("tools_held_for_approval", &self.held);
        if let (false, Approvals::Hold(h)) = (self.held.is_empty(), approvals) {
            a.push(Annotation {
                key: "approval_id",
                value: json!(h.id()),
            });
        }
        a
    }
}

fn rejection(name: &str, v: &ToolVerdict) -> Rejection {
    match v {
        ToolVerdict::NeedsApproval => Rejection::new(
            ErrorCode::ToolApprovalRequired,
            format!("model called '{name}', which requires an approval this API cannot hold"),
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
        let mut tally = Tally::default();
        for (position, choice) in crate::json::array_mut(body, "choices")
            .into_iter()
            .flatten()
            .enumerate()
        {
            let index = choice_index(choice, position);
            let Some(message) = choice.get_mut("message").and_then(Value::as_object_mut) else {
                continue;
            };
            let mut removed = Vec::new();
            let mut held = Vec::new();
            let mut first_refusal = None;
            let mut judge_call = |call: &Value, legacy: bool| {
                let (name, args) = call_parts(call);
                tally.called.push(name.clone());
                match outcome(&policy, ctx.principal, ctx.approvals, &name, &args) {
                    Outcome::Pass => return true,
                    Outcome::Hold(h) => {
                        let call = HeldCall {
                            choice: index,
                            call: call.clone(),
                            legacy,
                        };
                        if h.hold(call) {
                            held.push(name);
                        } else {
                            // No id to match its result to, or too large
                            // to put to a person: refused.
                            let v = ToolVerdict::NeedsApproval;
                            first_refusal.get_or_insert_with(|| rejection(&name, &v));
                            removed.push(name);
                        }
                    }
                    Outcome::Refuse(v) => {
                        first_refusal.get_or_insert_with(|| rejection(&name, &v));
                        removed.push(name);
                    }
                }
                false
            };
            let mut calls_left = 0;
            if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
                calls.retain(|c| judge_call(c, false));
                calls_left = calls.len();
                if calls.is_empty() {
                    message.remove("tool_calls");
                }
            }
            if let Some(call) = message.get("function_call").filter(|c| c.is_object()) {
                if judge_call(call, true) {
                    calls_left += 1;
                } else {
                    message.remove("function_call");
                }
            }
            if let (Some(r), OnCalled::Deny) = (first_refusal, policy.on_called) {
                return Ok(Decision::Deny(r));
            }
            if !removed.is_empty() || !held.is_empty() {
                // Log probabilities may be over the calls' tokens.
                if let Some(c) = choice.as_object_mut() {
                    c.remove("logprobs");
                }
            }
            let Some(message) = choice.get_mut("message").and_then(Value::as_object_mut) else {
                continue;
            };
            let text = notice(&removed, &held, ctx.approvals);
            tally.refused.append(&mut removed);
            if calls_left == 0 && !text.is_empty() {
                // The calls were the answer: the notice is what is left
                // of it, after any text the model wrote (held calls), or
                // instead of it (refused ones, as before holds existed).
                let content = if held.is_empty() {
                    Value::String(text)
                } else {
                    with_notice(message.get("content"), text)
                };
                message.insert("content".into(), content);
                if let Some(c) = choice.as_object_mut() {
                    c.insert("finish_reason".into(), Value::String("stop".into()));
                }
            } else if !held.is_empty() {
                let content = with_notice(message.get("content"), text);
                message.insert("content".into(), content);
            }
            tally.held.append(&mut held);
        }
        Ok(match tally.annotations(ctx.approvals) {
            a if a.is_empty() => Decision::Allow,
            a => Decision::Annotate(a),
        })
    }

    fn stream(&self, ctx: &ResponseContext<'_>) -> Box<dyn StreamStage> {
        Box::new(ToolStream {
            policy: self.policy.get(),
            principal: ctx.principal.cloned(),
            holding: match ctx.approvals {
                Approvals::Hold(h) => Some(h.clone()),
                _ => None,
            },
            redeem: matches!(ctx.approvals, Approvals::Redeem),
            held: BTreeMap::new(),
            held_bytes: BTreeMap::new(),
            calls: BTreeMap::new(),
            tally: Tally::default(),
        })
    }
}

struct ToolStream {
    policy: Arc<ToolPolicy>,
    principal: Option<Principal>,
    /// Where calls to `approval_required` tools go ([`Approvals::Hold`]).
    holding: Option<Arc<Holding>>,
    /// The reply is an approved call handed out ([`Approvals::Redeem`]).
    redeem: bool,
    /// Choice index → its held events, each carrying that choice only.
    held: BTreeMap<u64, Vec<Value>>,
    /// Choice index → bytes of the upstream events it holds parts of (an
    /// upper bound of what it holds), kept under [`MAX_STREAM_HOLD`].
    held_bytes: BTreeMap<u64, usize>,
    /// (choice, tool index or [`FUNCTION_CALL`]) → the call so far.
    calls: BTreeMap<(u64, u64), Assembled>,
    tally: Tally,
}

/// A streamed call put together from its fragments.
#[derive(Default)]
struct Assembled {
    id: Option<String>,
    custom: bool,
    name: String,
    args: String,
}

impl Assembled {
    /// The call as a whole reply would carry it.
    fn call(&self, legacy: bool) -> Value {
        if legacy {
            return json!({"name": self.name, "arguments": self.args});
        }
        if self.custom {
            json!({"id": self.id, "type": "custom", "custom": {"name": self.name, "input": self.args}})
        } else {
            json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.args}})
        }
    }
}

impl ToolStream {
    fn approvals(&self) -> Approvals<'_> {
        match (&self.holding, self.redeem) {
            (Some(h), _) => Approvals::Hold(h),
            (None, true) => Approvals::Redeem,
            (None, false) => Approvals::Off,
        }
    }
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
            let custom = fragment.get("custom").is_some();
            let inner = fragment
                .get("function")
                .or_else(|| fragment.get("custom"))
                .unwrap_or(fragment);
            let entry = self.calls.entry((index, key)).or_default();
            entry.custom |= custom;
            if let Some(id) = fragment.get("id").and_then(Value::as_str) {
                entry.id.get_or_insert_with(|| id.to_string());
            }
            if let Some(name) = inner.get("name").and_then(Value::as_str) {
                entry.name.push_str(name);
            }
            if let Some(args) = inner
                .get("arguments")
                .or_else(|| inner.get("input"))
                .and_then(Value::as_str)
            {
                entry.args.push_str(args);
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
        let mut held_here = Vec::new();
        let keys: Vec<(u64, u64)> = self
            .calls
            .range((choice, 0)..=(choice, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in &keys {
            let Some(call) = self.calls.remove(key) else {
                continue;
            };
            self.tally.called.push(call.name.clone());
            let approvals = self.approvals();
            match outcome(
                &self.policy,
                self.principal.as_ref(),
                approvals,
                &call.name,
                &call.args,
            ) {
                Outcome::Pass => {}
                Outcome::Hold(h)
                    if h.hold(HeldCall {
                        choice,
                        call: call.call(key.1 == FUNCTION_CALL),
                        legacy: key.1 == FUNCTION_CALL,
                    }) =>
                {
                    held_here.push((key.1, call.name));
                }
                Outcome::Hold(_) | Outcome::Refuse(_) => {
                    if self.policy.on_called == OnCalled::Deny {
                        let v = judge(
                            &self.policy,
                            self.principal.as_ref(),
                            &call.name,
                            &call.args,
                        );
                        let r = rejection(&call.name, &v);
                        // Enforced whatever `on_error` says: the rest of
                        // the stream must not pass unjudged.
                        return Err(FilterError::limit(r.code, r.reason));
                    }
                    refused_here.push((key.1, call.name));
                }
            }
        }
        let refused_keys: Vec<u64> = refused_here
            .iter()
            .chain(&held_here)
            .map(|(i, _)| *i)
            .collect();
        // Take the calls out of one event of this choice: whether calls are
        // left in it, and whether nothing else is.
        let strip = |ev: &mut Value| -> (bool, bool) {
            if !refused_keys.is_empty() {
                // Log probabilities may be over the calls' tokens.
                if let Some(c) = ev.pointer_mut("/choices/0").and_then(Value::as_object_mut) {
                    c.remove("logprobs");
                }
            }
            let Some(delta) = ev
                .pointer_mut("/choices/0/delta")
                .and_then(Value::as_object_mut)
            else {
                return (false, false);
            };
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
            let empty = !calls
                && !delta
                    .iter()
                    .any(|(k, v)| k != "role" && !v.is_null() && v != "");
            (calls, empty)
        };
        let mut events = events;
        // The event that finished the choice, when it also carried calls,
        // is among the held ones: it carries the notice.
        let finish = match finish {
            Some(f) => Some(f),
            None if events
                .last()
                .and_then(|e| e.pointer("/choices/0"))
                .is_some_and(is_finished) =>
            {
                events.pop()
            }
            // A stream that ends without finishing the choice still tells
            // the client what was held: an event of its own, shaped like
            // the choice's first.
            None => {
                let template = events.first().cloned().filter(|_| !held_here.is_empty());
                template.and_then(|mut ev| {
                    let c = ev.pointer_mut("/choices/0")?.as_object_mut()?;
                    c.insert("delta".into(), json!({}));
                    c.insert("finish_reason".into(), Value::Null);
                    Some(ev)
                })
            }
        };
        let mut kept_any = false;
        for mut ev in events {
            let (calls, empty) = strip(&mut ev);
            kept_any |= calls;
            // An event left with no call and nothing else to say goes.
            let finished = ev.pointer("/choices/0").is_some_and(is_finished);
            if !empty || finished {
                out.push(SseEvent::from_json(ev));
            }
        }
        let finish = finish.map(|mut f| {
            kept_any |= strip(&mut f).0;
            f
        });
        let removed: Vec<String> = refused_here.into_iter().map(|(_, n)| n).collect();
        let held: Vec<String> = held_here.into_iter().map(|(_, n)| n).collect();
        if let Some(mut finish) = finish {
            // The notice goes in the finishing event: for refused calls
            // when no call is left, for held ones always.
            let text = notice(&removed, &held, self.approvals());
            let replaces = !kept_any && !text.is_empty();
            if replaces || !held.is_empty() {
                if let Some(c) = finish
                    .pointer_mut("/choices/0")
                    .and_then(Value::as_object_mut)
                {
                    if let Some(delta) = c.get_mut("delta").and_then(Value::as_object_mut) {
                        let content = with_notice(delta.get("content"), text);
                        delta.insert("content".into(), content);
                    } else {
                        c.insert("delta".into(), json!({ "content": text }));
                    }
                    if replaces {
                        c.insert("finish_reason".into(), Value::String("stop".into()));
                    }
                }
            }
            out.push(SseEvent::from_json(finish));
        }
        self.tally.refused.extend(removed);
        self.tally.held.extend(held);
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
        self.tally.annotations(self.approvals())
    }
}
