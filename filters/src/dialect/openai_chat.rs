//! OpenAI Chat Completions: `POST /v1/chat/completions`.

use super::openai::OpenAi;
use super::Replayed;
use crate::approval::Approval;
use crate::sse::SseEvent;
use crate::Route;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const CHAT: OpenAi = OpenAi {
    route: Route::ChatCompletions,
    path: "/chat/completions",
    stream_usage: true,
    generates: true,
    cut_chunk: ("chat.completion.chunk", "chatcmpl-filtered"),
    cut_choice: |index| json!({"index": index, "delta": {}, "finish_reason": "content_filter"}),
    replay: Some(replay),
};

/// The approved calls as the reply that carries only them: one choice per
/// choice that held calls, each with its calls as the model wrote them and
/// `finish_reason` `tool_calls` (or `function_call` for the legacy field).
/// Usage is zero: no provider was called. A stream is the events a
/// provider sends for it (the role, one event per call, the finish, the
/// usage when the request asked for it, the end marker).
fn replay(approval: &Approval, request: &Value) -> Replayed {
    let created = crate::clock::Clock::now_secs(&crate::clock::SystemClock);
    let id = format!("chatcmpl-{}", approval.id);
    let mut choices: BTreeMap<u64, (Vec<Value>, Option<Value>)> = BTreeMap::new();
    for held in &approval.calls {
        let entry = choices.entry(held.choice).or_default();
        if held.legacy {
            entry.1 = Some(held.call.clone());
        } else {
            entry.0.push(held.call.clone());
        }
    }
    let finish = |calls: &[Value]| {
        if calls.is_empty() {
            "function_call"
        } else {
            "tool_calls"
        }
    };
    let usage = json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let choices: Vec<Value> = choices
            .into_iter()
            .map(|(index, (calls, legacy))| {
                let mut message = json!({"role": "assistant", "content": null});
                if !calls.is_empty() {
                    crate::json::set(&mut message, &["tool_calls"], Value::Array(calls.clone()));
                }
                if let Some(f) = legacy {
                    crate::json::set(&mut message, &["function_call"], f);
                }
                json!({"index": index, "message": message, "logprobs": null,
                       "finish_reason": finish(&calls)})
            })
            .collect();
        return Replayed::Json(json!({
            "id": id, "object": "chat.completion", "created": created,
            "model": approval.model, "choices": choices, "usage": usage,
        }));
    }
    let chunk = |choices: Value| {
        SseEvent::from_json(json!({
            "id": id, "object": "chat.completion.chunk", "created": created,
            "model": approval.model, "choices": choices,
        }))
    };
    let mut events = Vec::new();
    for (index, (calls, legacy)) in &choices {
        events.push(chunk(json!([{"index": index,
            "delta": {"role": "assistant", "content": null}, "finish_reason": null}])));
        for (i, call) in calls.iter().enumerate() {
            let mut part = call.clone();
            crate::json::set(&mut part, &["index"], json!(i));
            events.push(chunk(json!([{"index": index,
                "delta": {"tool_calls": [part]}, "finish_reason": null}])));
        }
        if let Some(f) = legacy {
            events.push(chunk(json!([{"index": index,
                "delta": {"function_call": f}, "finish_reason": null}])));
        }
        events.push(chunk(json!([{"index": index, "delta": {},
            "finish_reason": finish(calls)}])));
    }
    let asks_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if asks_usage {
        let mut last = json!({
            "id": id, "object": "chat.completion.chunk", "created": created,
            "model": approval.model, "choices": [],
        });
        crate::json::set(&mut last, &["usage"], usage);
        events.push(SseEvent::from_json(last));
    }
    events.push(SseEvent::data("[DONE]"));
    Replayed::Events(events)
}
