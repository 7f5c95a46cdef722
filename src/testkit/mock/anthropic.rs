//! The mock provider's Anthropic Messages API: `POST /v1/messages` (JSON,
//! and streamed with the real event sequence: `message_start`, `ping`,
//! per content block `content_block_start`, its deltas and
//! `content_block_stop`, then `message_delta` with the stop reason and
//! usage, and `message_stop`) and `POST /v1/messages/count_tokens`.
//!
//! It echoes the last user turn's text. A last user text that is one of
//! these JSON objects triggers a behaviour instead:
//! - `{"mock_tool_call": {"name": N, "arguments": {...}}}`: a `tool_use`
//!   block (streamed as `input_json_delta` pieces), `stop_reason: tool_use`;
//! - `{"mock_message": {"content": [blocks]}}`: these content blocks
//!   (`text`, `thinking` with its `signature`, `tool_use`), streamed piece
//!   by piece;
//! - `{"mock_error": STATUS}`: an Anthropic-shaped error with that status;
//! - `{"mock_broken_stream": true}`: a stream cut off half-way;
//!
//! and `"mock_chunk_bytes": N` beside any of them sets the characters per
//! streamed delta.
//!
//! Errors have Anthropic's shape, `{"type": "error", "error": {"type",
//! "message"}}`; a request without `max_tokens` or `messages` is a 400
//! `invalid_request_error`, as the real API answers.

use super::{content_text, pieces, sse_frames, tokens, MockOptions, MockState};
use crate::http_server::{json, ResponseBody};
use bytes::Bytes;
use hyper::Response;
use serde_json::{json, Value};
use std::sync::Arc;

/// `POST /v1/messages`.
pub(super) fn messages(
    req: &Value,
    opts: MockOptions,
    state: Arc<MockState>,
) -> Response<ResponseBody> {
    if let Err(why) = check(req) {
        return error(400, &why);
    }
    let model = req["model"].as_str().unwrap_or("mock-model").to_string();
    let prompt = last_user_text(req);
    // `mock_chunk_bytes` beside a trigger sets the characters per delta.
    let chunk = serde_json::from_str::<Value>(&prompt)
        .ok()
        .and_then(|v| v.get("mock_chunk_bytes").and_then(Value::as_u64))
        .map_or(opts.chunk_bytes, |n| n.clamp(1, 1 << 16) as usize);
    let (content, broken) = match reply(&prompt) {
        Reply::Content(c) => (c, false),
        Reply::Broken => (
            vec![json!({"type": "text", "text": "this stream will be cut off before it ends"})],
            true,
        ),
        Reply::Error(status) => return error(status, "mock error as requested"),
    };
    let input_tokens = input_tokens(req);
    let output_tokens = tokens(&generated(&content));
    let stop_reason = if content.iter().any(|b| b["type"] == "tool_use") {
        "tool_use"
    } else {
        "end_turn"
    };
    if !req["stream"].as_bool().unwrap_or(false) {
        return json(
            200,
            &json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}),
        );
    }
    let mut events = vec![
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        json!({"type": "ping"}),
    ];
    for (index, block) in content.iter().enumerate() {
        events.extend(block_events(index, block, chunk));
    }
    events.push(json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": output_tokens}}));
    events.push(json!({"type": "message_stop"}));
    let frames = events
        .iter()
        .map(|e| {
            let name = e["type"].as_str().unwrap_or("message");
            Bytes::from(format!("event: {name}\ndata: {e}\n\n"))
        })
        .collect();
    sse_frames(frames, broken, opts, state)
}

/// `POST /v1/messages/count_tokens`.
pub(super) fn count_tokens(req: &Value) -> Response<ResponseBody> {
    if !req["messages"].is_array() {
        return error(400, "messages: Field required");
    }
    json(200, &json!({"input_tokens": input_tokens(req)}))
}

/// What the real API refuses before it generates.
fn check(req: &Value) -> Result<(), String> {
    if !req["max_tokens"].is_u64() {
        return Err("max_tokens: Field required".into());
    }
    match req["messages"].as_array() {
        Some(m) if !m.is_empty() => Ok(()),
        _ => Err("messages: at least one message is required".into()),
    }
}

enum Reply {
    Content(Vec<Value>),
    Broken,
    Error(u16),
}

fn reply(prompt: &str) -> Reply {
    let echo = || Reply::Content(vec![json!({"type": "text", "text": prompt})]);
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(prompt) else {
        return echo();
    };
    if let Some(call) = obj.get("mock_tool_call") {
        return Reply::Content(vec![json!({"type": "tool_use", "id": "toolu_mock_0",
            "name": call["name"].as_str().unwrap_or("unnamed"),
            "input": call.get("arguments").cloned().unwrap_or_else(|| json!({}))})]);
    }
    if let Some(Value::Array(blocks)) = obj.get("mock_message").map(|m| &m["content"]) {
        return Reply::Content(blocks.clone());
    }
    if let Some(status) = obj.get("mock_error").and_then(Value::as_u64) {
        return Reply::Error(u16::try_from(status).unwrap_or(500));
    }
    if obj.contains_key("mock_broken_stream") {
        return Reply::Broken;
    }
    echo()
}

/// One content block as stream events: its start (with its text fields
/// empty), its deltas in pieces of `chunk` characters, its stop.
fn block_events(index: usize, block: &Value, chunk: usize) -> Vec<Value> {
    let delta = |d: Value| json!({"type": "content_block_delta", "index": index, "delta": d});
    let mut start = block.clone();
    let mut deltas = Vec::new();
    match block["type"].as_str() {
        Some("text") => {
            filters::json::set(&mut start, &["text"], json!(""));
            for p in pieces(block["text"].as_str().unwrap_or(""), chunk) {
                deltas.push(delta(json!({"type": "text_delta", "text": p})));
            }
        }
        Some("thinking") => {
            filters::json::set(&mut start, &["thinking"], json!(""));
            filters::json::set(&mut start, &["signature"], json!(""));
            for p in pieces(block["thinking"].as_str().unwrap_or(""), chunk) {
                deltas.push(delta(json!({"type": "thinking_delta", "thinking": p})));
            }
            if let Some(sig) = block["signature"].as_str() {
                deltas.push(delta(json!({"type": "signature_delta", "signature": sig})));
            }
        }
        Some("tool_use") => {
            filters::json::set(&mut start, &["input"], json!({}));
            let input = block
                .get("input")
                .map_or_else(|| "{}".into(), Value::to_string);
            for p in pieces(&input, chunk) {
                deltas.push(delta(
                    json!({"type": "input_json_delta", "partial_json": p}),
                ));
            }
        }
        _ => {}
    }
    let mut events =
        vec![json!({"type": "content_block_start", "index": index, "content_block": start})];
    events.extend(deltas);
    events.push(json!({"type": "content_block_stop", "index": index}));
    events
}

/// The text of the last user turn (a string, or its text blocks).
fn last_user_text(req: &Value) -> String {
    req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| content_text(&m["content"]))
        .unwrap_or_default()
}

/// One token per four characters of the system prompt, every message's
/// text, tool results and tool inputs.
fn input_tokens(req: &Value) -> u64 {
    let mut text = content_text(&req["system"]);
    for m in req["messages"].as_array().into_iter().flatten() {
        text.push_str(&content_text(&m["content"]));
        for b in m["content"].as_array().into_iter().flatten() {
            text.push_str(&content_text(&b["content"]));
            if let Some(input) = b.get("input") {
                text.push_str(&input.to_string());
            }
        }
    }
    tokens(&text)
}

/// Everything a reply's blocks generated.
fn generated(content: &[Value]) -> String {
    content
        .iter()
        .map(|b| match b["type"].as_str() {
            Some("text") => b["text"].as_str().unwrap_or("").to_string(),
            Some("thinking") => b["thinking"].as_str().unwrap_or("").to_string(),
            Some("tool_use") => b.get("input").map(Value::to_string).unwrap_or_default(),
            _ => String::new(),
        })
        .collect()
}

/// The API's error type for a status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error(status: u16, message: &str) -> Response<ResponseBody> {
    let mut r = json(
        status,
        &json!({"type": "error", "error": {"type": error_type(status), "message": message}}),
    );
    if status == 429 {
        r.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("7"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_streams_as_start_deltas_stop_and_reassembles() {
        let text = json!({"type": "text", "text": "héllo wörld"});
        let events = block_events(2, &text, 3);
        assert_eq!(events[0]["type"], "content_block_start");
        assert_eq!(
            events[0]["content_block"],
            json!({"type": "text", "text": ""})
        );
        assert_eq!(
            events.last().unwrap(),
            &json!({"type": "content_block_stop", "index": 2})
        );
        let joined: String = events[1..events.len() - 1]
            .iter()
            .map(|e| e["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(joined, "héllo wörld");
        let tool = json!({"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1, 2]}});
        let events = block_events(0, &tool, 2);
        assert_eq!(events[0]["content_block"]["input"], json!({}));
        let partial: String = events[1..events.len() - 1]
            .iter()
            .map(|e| e["delta"]["partial_json"].as_str().unwrap())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&partial).unwrap(),
            json!({"a": [1, 2]})
        );
        let thinking = json!({"type": "thinking", "thinking": "hmm", "signature": "sig"});
        let events = block_events(0, &thinking, 8);
        assert_eq!(
            events[2]["delta"],
            json!({"type": "signature_delta", "signature": "sig"})
        );
    }

    #[test]
    fn triggers_and_checks() {
        assert!(matches!(reply("hi"), Reply::Content(c) if c[0]["text"] == "hi"));
        let call = r#"{"mock_tool_call": {"name": "f", "arguments": {"x": 1}}}"#;
        assert!(matches!(reply(call), Reply::Content(c) if c[0]["input"]["x"] == 1));
        assert!(matches!(reply(r#"{"mock_error": 529}"#), Reply::Error(529)));
        assert!(check(&json!({"messages": [{"role": "user", "content": "x"}]})).is_err());
        assert!(check(&json!({"max_tokens": 5, "messages": []})).is_err());
        assert!(
            check(&json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}))
                .is_ok()
        );
        assert_eq!(error_type(403), "permission_error");
    }
}
