//! Anthropic's Messages API: `POST /v1/messages`.
//!
//! A request is a `system` prompt (a string or text blocks), `messages` of
//! `user` and `assistant` turns whose content is a string or blocks
//! (`text`, `image`, `document`, `tool_use` in assistant turns,
//! `tool_result` in user turns), `tools` declared by `name`, and a
//! required `max_tokens`. The filters read it as: the system prompt as
//! system messages, each turn as a message with its text blocks, each
//! `tool_use` (or server or MCP tool use) block as a replayed call, each
//! `tool_result` block as a tool message answering its `tool_use_id`, a
//! plain-text `document` as the caller's text and a `search_result` as a
//! tool's. What the filters cannot read is refused at intake: server
//! tools, MCP servers, code-execution containers, and content blocks of
//! any other kind (`readable`).
//!
//! A reply is a message whose `content` is blocks (`text`, `thinking` with
//! a `signature`, `redacted_thinking`, `tool_use`; a server or MCP tool
//! use, which a compliant provider never sends for a request the gateway
//! let through, is judged like `tool_use`, and any block of a kind the
//! stages cannot read is not released), with `usage` of
//! `input_tokens` and `output_tokens`. A stream is `message_start` (input
//! usage), `ping`s, per block `content_block_start`, deltas
//! (`text_delta`, `thinking_delta`, `signature_delta`, `input_json_delta`)
//! and `content_block_stop`, then `message_delta` (stop reason, output
//! usage) and `message_stop`, which ends it. Errors are
//! `{"type": "error", "error": {"type", "message"}}`; in a stream, an
//! `error` event.

use super::{Bridge, Bridged, Dialect, Forward, StreamBridge, StreamFacts};
use crate::intake::{parse_body, CallBody, Shape};
use crate::json::items;
use crate::prompt::{Call, Message, Prompt, Role, Tool};
use crate::{ErrorCode, Rejection, Route, SseEvent};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

pub struct AnthropicMessages;

/// The dialect.
pub const MESSAGES: AnthropicMessages = AnthropicMessages;

/// `POST /v1/messages/count_tokens`: a Messages request without
/// `max_tokens`, answered with `{"input_tokens": N}`. Screened like a
/// request (identity, limits, registry, tools, the injection screen);
/// nothing is generated, so the guard has nothing to judge and a budget
/// is charged nothing.
pub struct AnthropicCountTokens;

pub const COUNT_TOKENS: AnthropicCountTokens = AnthropicCountTokens;

impl Dialect for AnthropicCountTokens {
    fn route(&self) -> Route {
        Route::CountTokens
    }

    fn provider_api(&self) -> super::ProviderApi {
        super::ProviderApi::Anthropic
    }

    fn upstream_path(&self) -> &'static str {
        "/messages/count_tokens"
    }

    fn parse(&self, body: &[u8], shape: &Shape) -> Result<CallBody, Rejection> {
        let call = parse_body(Route::CountTokens, body, shape)?;
        readable(&call.json)?;
        Ok(call)
    }

    fn prompt<'a>(&self, request: &'a Value) -> Prompt<'a> {
        Prompt {
            generates: false,
            max_tokens: None,
            ..prompt(request)
        }
    }

    fn needs_usage_request(&self, _: &Value) -> bool {
        false
    }

    fn forward(&self, request: &mut Value, f: &Forward<'_>) {
        MESSAGES.forward(request, f)
    }

    fn choices(&self, _: &Value) -> u64 {
        1
    }

    /// Counting uses no tokens.
    fn reply_usage(&self, _: &Value) -> Option<Value> {
        Some(json!({"input_tokens": 0, "output_tokens": 0}))
    }

    fn total_tokens(&self, usage: &Value) -> Option<u64> {
        MESSAGES.total_tokens(usage)
    }

    fn token_counts(&self, usage: &Value) -> Option<(u64, u64)> {
        MESSAGES.token_counts(usage)
    }

    fn note_event(&self, event: &SseEvent, facts: &mut StreamFacts) -> Result<(), String> {
        MESSAGES.note_event(event, facts)
    }

    fn is_usage_only(&self, _: &SseEvent) -> bool {
        false
    }

    fn is_closing(&self, event: &SseEvent) -> bool {
        MESSAGES.is_closing(event)
    }

    fn reply_texts(&self, _: &Value) -> Vec<(u64, String)> {
        Vec::new()
    }

    fn withhold(&self, _: &mut Value) {}

    fn withheld_end(&self, model: Option<&str>, n: u64) -> Vec<SseEvent> {
        MESSAGES.withheld_end(model, n)
    }

    fn error_body(&self, rejection: &Rejection) -> Vec<u8> {
        MESSAGES.error_body(rejection)
    }

    fn error_event(&self, rejection: &Rejection) -> SseEvent {
        MESSAGES.error_event(rejection)
    }

    fn passed_headers(&self) -> &'static [&'static str] {
        MESSAGES.passed_headers()
    }
}

impl Dialect for AnthropicMessages {
    fn route(&self) -> Route {
        Route::Messages
    }

    fn provider_api(&self) -> super::ProviderApi {
        super::ProviderApi::Anthropic
    }

    fn upstream_path(&self) -> &'static str {
        "/messages"
    }

    fn parse(&self, body: &[u8], shape: &Shape) -> Result<CallBody, Rejection> {
        let call = parse_body(Route::Messages, body, shape)?;
        readable(&call.json)?;
        Ok(call)
    }

    fn prompt<'a>(&self, request: &'a Value) -> Prompt<'a> {
        prompt(request)
    }

    /// Usage is always in the stream (`message_start`, `message_delta`).
    fn needs_usage_request(&self, _: &Value) -> bool {
        false
    }

    fn forward(&self, request: &mut Value, f: &Forward<'_>) {
        crate::json::set(request, &["model"], Value::String(f.model.into()));
        if !f.strip_tools.is_empty() {
            strip(request, f.strip_tools);
        }
    }

    fn choices(&self, _: &Value) -> u64 {
        1
    }

    fn reply_usage(&self, reply: &Value) -> Option<Value> {
        reply.get("usage").filter(|u| u.is_object()).cloned()
    }

    /// Input (cache writes and reads included) and output tokens.
    fn total_tokens(&self, usage: &Value) -> Option<u64> {
        self.token_counts(usage).map(|(i, o)| i.saturating_add(o))
    }

    fn token_counts(&self, usage: &Value) -> Option<(u64, u64)> {
        let part = |k: &str| usage.get(k).and_then(Value::as_u64);
        let input = part("input_tokens")?
            .saturating_add(part("cache_creation_input_tokens").unwrap_or(0))
            .saturating_add(part("cache_read_input_tokens").unwrap_or(0));
        Some((input, part("output_tokens")?))
    }

    fn note_event(&self, event: &SseEvent, facts: &mut StreamFacts) -> Result<(), String> {
        if !event.has_data() {
            return Ok(());
        }
        let Some(Value::Object(v)) = event.json() else {
            return Err("provider sent an SSE event whose data is not a JSON object".into());
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(u) = v
                    .get("message")
                    .and_then(|m| m.get("usage"))
                    .filter(|u| u.is_object())
                {
                    facts.usage = Some(u.clone());
                }
            }
            Some("message_delta") => {
                // The final output count; the input count stays from the start.
                if let Some(Value::Object(delta)) = v.get("usage") {
                    let mut usage = match facts.usage.take() {
                        Some(Value::Object(u)) => u,
                        _ => serde_json::Map::new(),
                    };
                    for (k, n) in delta {
                        if !n.is_null() {
                            usage.insert(k.clone(), n.clone());
                        }
                    }
                    facts.usage = Some(Value::Object(usage));
                }
            }
            Some("content_block_delta") => {
                facts.generated_chars += delta_text(v.get("delta")).chars().count() as u64;
            }
            Some("message_stop") => facts.done = true,
            Some("error") => {
                return Err("provider ended the stream with an error event".into());
            }
            _ => {}
        }
        Ok(())
    }

    fn is_usage_only(&self, _: &SseEvent) -> bool {
        false
    }

    /// `message_start` and `ping`: no generated text, and the client's
    /// SDK needs the start before anything else.
    fn is_opening(&self, event: &SseEvent) -> bool {
        matches!(event_type(event), Some("message_start" | "ping"))
    }

    /// `message_delta` (the stop reason) and `message_stop`.
    fn is_closing(&self, event: &SseEvent) -> bool {
        matches!(event_type(event), Some("message_delta" | "message_stop"))
    }

    fn reply_texts(&self, reply: &Value) -> Vec<(u64, String)> {
        let mut out = String::new();
        match reply.get("type").and_then(Value::as_str) {
            // A whole message: every block's generated text.
            Some("message") => {
                for b in items(reply, "content") {
                    out.push_str(&block_text(b));
                }
            }
            Some("content_block_start") => out.push_str(&block_text(
                reply.get("content_block").unwrap_or(&Value::Null),
            )),
            Some("content_block_delta") => out.push_str(&delta_text(reply.get("delta"))),
            _ => {}
        }
        vec![(0, out)]
    }

    /// As the API ends a reply it will not give: no content,
    /// `stop_reason: refusal`.
    fn withhold(&self, reply: &mut Value) {
        crate::json::set(reply, &["content"], json!([]));
        crate::json::set(reply, &["stop_reason"], json!("refusal"));
        crate::json::set(reply, &["stop_sequence"], Value::Null);
    }

    fn withheld_end(&self, _: Option<&str>, _: u64) -> Vec<SseEvent> {
        vec![
            named(json!({"type": "message_delta",
                "delta": {"stop_reason": "refusal", "stop_sequence": null},
                "usage": {"output_tokens": 0}})),
            named(json!({"type": "message_stop"})),
        ]
    }

    fn error_body(&self, rejection: &Rejection) -> Vec<u8> {
        error_json(rejection).to_string().into_bytes()
    }

    fn error_event(&self, rejection: &Rejection) -> SseEvent {
        named(error_json(rejection))
    }

    fn bridge(&self) -> Option<&dyn Bridge> {
        Some(self)
    }

    fn passed_headers(&self) -> &'static [&'static str] {
        &["anthropic-version", "anthropic-beta"]
    }
}

/// Content blocks to and from the response stages' shape: block `i` is
/// choice `i`; a `text` block's text is the choice's `content`, a
/// `thinking` block's its `reasoning_content`, a `tool_use` block a tool
/// call whose `arguments` are its `input` as JSON text. Other blocks
/// (`redacted_thinking`, server tools' results) carry nothing the model
/// wrote in the clear and stay as they are. A thinking block's
/// `signature` is kept aside and given back unchanged.
impl Bridge for AnthropicMessages {
    fn reply_in(&self, reply: &Value) -> Value {
        let choices: Vec<Value> = items(reply, "content")
            .enumerate()
            .map(|(i, b)| {
                let message = match b.get("type").and_then(Value::as_str) {
                    Some("text") => json!({"role": "assistant", "content": b.get("text")}),
                    Some("thinking") => {
                        json!({"role": "assistant", "content": null, "reasoning_content": b.get("thinking")})
                    }
                    Some(t) if is_tool_call(t) => json!({"role": "assistant", "content": null,
                        "tool_calls": [{"id": b.get("id"), "type": "function", "function": {
                            "name": b.get("name"),
                            "arguments": b.get("input").map_or_else(|| "{}".into(), Value::to_string)}}]}),
                    _ => json!({"role": "assistant", "content": null}),
                };
                json!({"index": i, "message": message, "finish_reason": "stop"})
            })
            .collect();
        json!({"id": reply.get("id"), "object": "chat.completion", "model": reply.get("model"),
            "choices": choices})
    }

    fn reply_out(&self, original: &Value, staged: &Value) -> Value {
        let blocks: Vec<&Value> = items(original, "content").collect();
        let choices: BTreeMap<u64, &Value> = items(staged, "choices")
            .filter_map(|c| Some((c.get("index")?.as_u64()?, c.get("message")?)))
            .collect();
        let mut content = Vec::new();
        for (i, block) in blocks.iter().enumerate() {
            let kind = block.get("type").and_then(Value::as_str);
            let Some(m) = choices.get(&(i as u64)) else {
                continue;
            };
            if kind == Some("redacted_thinking") {
                content.push((*block).clone());
                continue;
            }
            if !matches!(kind, Some("text" | "thinking")) && !kind.is_some_and(is_tool_call) {
                // A kind the stages cannot read is not released.
                continue;
            }
            content.extend(blocks_of(m, block));
        }
        let mut out = original.clone();
        let stopped_for_a_tool = out.get("stop_reason").and_then(Value::as_str) == Some("tool_use");
        if stopped_for_a_tool
            && !content
                .iter()
                .any(|b| b.get("type") == Some(&json!("tool_use")))
        {
            // The call the model stopped for was removed.
            crate::json::set(&mut out, &["stop_reason"], json!("end_turn"));
        }
        crate::json::set(&mut out, &["content"], Value::Array(content));
        out
    }

    fn stream(&self) -> Box<dyn StreamBridge> {
        Box::new(StreamState::default())
    }
}

/// The blocks one staged choice gives back: a tool call (when the stages
/// kept it), the thinking (with the original signature), the text (the
/// model's, or the notice of a removed call).
fn blocks_of(m: &Value, original: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(t) = m.get("reasoning_content").and_then(Value::as_str) {
        let mut b = json!({"type": "thinking", "thinking": t});
        if let Some(sig) = original.get("signature") {
            crate::json::set(&mut b, &["signature"], sig.clone());
        }
        out.push(b);
    }
    for call in items(m, "tool_calls") {
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        // The block as the model wrote it (its kind, server), with the
        // input the stages left.
        let mut b = if original
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(is_tool_call)
        {
            original.clone()
        } else {
            json!({"type": "tool_use", "id": call.get("id"), "name": call.pointer("/function/name")})
        };
        crate::json::set(
            &mut b,
            &["input"],
            serde_json::from_str::<Value>(args).unwrap_or_else(|_| json!({})),
        );
        out.push(b);
    }
    // A text block keeps what it had beside its text (citations).
    let text_block = |t: &str| {
        let mut b = if original.get("type").and_then(Value::as_str) == Some("text") {
            original.clone()
        } else {
            json!({"type": "text"})
        };
        crate::json::set(&mut b, &["text"], json!(t));
        b
    };
    match m.get("content") {
        Some(Value::String(t)) => out.push(text_block(t)),
        Some(Value::Array(parts)) => {
            let text: String = crate::prompt::texts_of(Some(&Value::Array(parts.clone()))).concat();
            out.push(text_block(&text));
        }
        _ => {}
    }
    out
}

/// What one stream's translation remembers, per block.
#[derive(Default)]
struct StreamState {
    /// Each staged block's start as the provider sent it.
    starts: BTreeMap<u64, Value>,
    /// Staged blocks not stopped yet.
    open: std::collections::BTreeSet<u64>,
    /// Blocks passed around the stages (`redacted_thinking`), not stopped.
    around: std::collections::BTreeSet<u64>,
    /// Every index a block started at: an index is used once.
    used: std::collections::BTreeSet<u64>,
    /// `message_stop` came: nothing after it goes out.
    ended: bool,
    /// Blocks whose start went to the client, and as what kind.
    started: BTreeMap<u64, &'static str>,
    /// Thinking signatures, given back before the block stops.
    signatures: BTreeMap<u64, Value>,
    /// Tool-use blocks the model opened, and those the client got.
    tool_blocks: usize,
    tool_blocks_out: usize,
}

fn chunk(index: u64, delta: Value, finish: Option<&str>) -> SseEvent {
    SseEvent::from_json(json!({"object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}))
}

impl StreamBridge for StreamState {
    /// Fail closed on a provider that breaks the protocol: a block index
    /// used twice, a delta or stop for a block that is not open, text in
    /// a block the stages do not read, anything after `message_stop` — all
    /// dropped, never passed on.
    fn inbound(&mut self, event: SseEvent) -> Vec<Bridged> {
        if self.ended {
            return Vec::new();
        }
        let Some(v) = event.json() else {
            return vec![Bridged::Around(event)];
        };
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        match v.get("type").and_then(Value::as_str) {
            Some("message_stop") => {
                self.ended = true;
                vec![Bridged::Around(event)]
            }
            Some("content_block_start") => {
                if !self.used.insert(index) {
                    return Vec::new();
                }
                let block = v.get("content_block").cloned().unwrap_or(Value::Null);
                let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
                let staged = match kind {
                    t if is_tool_call(t) => {
                        if t == "tool_use" {
                            self.tool_blocks += 1;
                        }
                        Some(chunk(
                            index,
                            json!({"role": "assistant", "tool_calls": [{"index": 0,
                            "id": block.get("id"), "type": "function",
                            "function": {"name": block.get("name"), "arguments": ""}}]}),
                            None,
                        ))
                    }
                    "text" | "thinking" => None,
                    // Encrypted thinking carries nothing readable: it goes
                    // on as it is, start to stop.
                    "redacted_thinking" => {
                        self.around.insert(index);
                        return vec![Bridged::Around(event)];
                    }
                    // A kind the stages cannot read: never released.
                    _ => return Vec::new(),
                };
                self.starts.insert(index, block);
                self.open.insert(index);
                staged.map(Bridged::Stages).into_iter().collect()
            }
            Some("content_block_delta") if self.open.contains(&index) => {
                let d = v.get("delta").unwrap_or(&Value::Null);
                let text = |k: &str| d.get(k).cloned().unwrap_or(json!(""));
                let delta = match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => json!({"content": text("text")}),
                    Some("thinking_delta") => json!({"reasoning_content": text("thinking")}),
                    Some("input_json_delta") => json!({"tool_calls": [{"index": 0,
                        "function": {"arguments": text("partial_json")}}]}),
                    Some("signature_delta") => {
                        self.signatures.insert(index, text("signature"));
                        return Vec::new();
                    }
                    // A delta the stages cannot read is not released.
                    _ => return Vec::new(),
                };
                vec![Bridged::Stages(chunk(index, delta, None))]
            }
            Some("content_block_delta") => {
                // A delta for an around block passes only if it carries no
                // text; one for a block not open is dropped.
                let kind = v.pointer("/delta/type").and_then(Value::as_str);
                let text = matches!(
                    kind,
                    Some("text_delta" | "thinking_delta" | "input_json_delta")
                );
                if self.around.contains(&index) && !text {
                    vec![Bridged::Around(event)]
                } else {
                    Vec::new()
                }
            }
            Some("content_block_stop") if self.around.remove(&index) => {
                vec![Bridged::Around(event)]
            }
            Some("content_block_stop") if self.open.remove(&index) => {
                let finish = match self
                    .starts
                    .get(&index)
                    .and_then(|b| b.get("type"))
                    .and_then(Value::as_str)
                {
                    Some(t) if is_tool_call(t) => "tool_calls",
                    _ => "stop",
                };
                vec![Bridged::Stages(chunk(index, json!({}), Some(finish)))]
            }
            Some("content_block_stop") => Vec::new(),
            _ => vec![Bridged::Around(event)],
        }
    }

    fn outbound(&mut self, event: SseEvent) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let Some(choices) = event
            .json()
            .and_then(|v| v.get("choices"))
            .and_then(Value::as_array)
        else {
            return out;
        };
        for c in choices {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let d = c.get("delta").unwrap_or(&Value::Null);
            let delta = |out: &mut Vec<SseEvent>, body: Value| {
                out.push(named(
                    json!({"type": "content_block_delta", "index": index, "delta": body}),
                ));
            };
            for call in items(d, "tool_calls") {
                self.start(index, "tool_use", &mut out);
                if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    if !a.is_empty() {
                        delta(
                            &mut out,
                            json!({"type": "input_json_delta", "partial_json": a}),
                        );
                    }
                }
            }
            if let Some(t) = d.get("reasoning_content").and_then(Value::as_str) {
                self.start(index, "thinking", &mut out);
                delta(&mut out, json!({"type": "thinking_delta", "thinking": t}));
            }
            if let Some(t) = d.get("content").and_then(Value::as_str) {
                self.start(index, "text", &mut out);
                if !t.is_empty() {
                    delta(&mut out, json!({"type": "text_delta", "text": t}));
                }
            }
            if c.get("finish_reason").is_some_and(|f| !f.is_null()) {
                // A tool call the stages removed left a notice, or nothing.
                let kind = match self
                    .starts
                    .get(&index)
                    .and_then(|b| b.get("type"))
                    .and_then(Value::as_str)
                {
                    Some("thinking") => "thinking",
                    _ => "text",
                };
                self.start(index, kind, &mut out);
                if let Some(sig) = self.signatures.remove(&index) {
                    delta(
                        &mut out,
                        json!({"type": "signature_delta", "signature": sig}),
                    );
                }
                out.push(named(json!({"type": "content_block_stop", "index": index})));
            }
        }
        out
    }

    fn around(&mut self, mut event: SseEvent) -> SseEvent {
        // The message opens empty: its blocks come through the stages.
        if let Some(v) = event.json_mut() {
            if v.get("type").and_then(Value::as_str) == Some("message_start")
                && v.pointer("/message/content")
                    .is_some_and(|c| c.as_array().is_none_or(|a| !a.is_empty()))
            {
                crate::json::set(v, &["message", "content"], json!([]));
            }
        }
        // The model stopped for a tool call the stages removed: it ended
        // its turn, as far as the client can tell.
        if self.tool_blocks > 0 && self.tool_blocks_out == 0 {
            if let Some(v) = event.json_mut() {
                if v.get("type").and_then(Value::as_str) == Some("message_delta")
                    && v.pointer("/delta/stop_reason").and_then(Value::as_str) == Some("tool_use")
                {
                    crate::json::set(v, &["delta", "stop_reason"], json!("end_turn"));
                }
            }
        }
        event
    }
}

impl StreamState {
    /// The block's start, the first time the client gets any of it: as
    /// the provider began it, or (a removed tool call's notice) as text.
    fn start(&mut self, index: u64, kind: &'static str, out: &mut Vec<SseEvent>) {
        if self.started.contains_key(&index) {
            return;
        }
        self.started.insert(index, kind);
        let block = match (kind, self.starts.get(&index)) {
            ("tool_use", Some(b)) => {
                if b.get("type").and_then(Value::as_str) == Some("tool_use") {
                    self.tool_blocks_out += 1;
                }
                let mut b = b.clone();
                crate::json::set(&mut b, &["input"], json!({}));
                b
            }
            ("thinking", Some(b)) if b.get("type").and_then(Value::as_str) == Some("thinking") => {
                let mut b = b.clone();
                crate::json::set(&mut b, &["thinking"], json!(""));
                b
            }
            ("thinking", _) => json!({"type": "thinking", "thinking": "", "signature": ""}),
            _ => json!({"type": "text", "text": ""}),
        };
        out.push(named(
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
    }
}

/// An event named by its data's `type`, as the API sends them.
fn named(data: Value) -> SseEvent {
    let name = data.get("type").and_then(Value::as_str).map(str::to_string);
    let mut e = SseEvent::from_json(data);
    e.event = name;
    e
}

fn event_type(event: &SseEvent) -> Option<&str> {
    event
        .json()
        .and_then(|v| v.get("type"))
        .and_then(Value::as_str)
        .or(event.event.as_deref())
}

/// `{"type": "error", "error": {"type", "message"}}`, the type from the
/// status, as the SDKs map it to their exception classes.
fn error_json(rejection: &Rejection) -> Value {
    json!({"type": "error", "error": {
        "type": error_type(rejection.code),
        "message": rejection.message,
    }})
}

/// The API's error type for one of the gateway's codes.
pub fn error_type(code: ErrorCode) -> &'static str {
    match code.status() {
        400 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 | 405 => "not_found_error",
        413 | 431 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// The text a block generated: `text`, `thinking`, a `tool_use`'s input.
fn block_text(b: &Value) -> String {
    match b.get("type").and_then(Value::as_str) {
        Some("text") => b.get("text").and_then(Value::as_str).unwrap_or("").into(),
        Some("thinking") => b
            .get("thinking")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        Some("tool_use") => b
            .get("input")
            .filter(|i| i.as_object().is_none_or(|o| !o.is_empty()))
            .map(Value::to_string)
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// The text a stream delta carries.
fn delta_text(delta: Option<&Value>) -> String {
    let Some(d) = delta else {
        return String::new();
    };
    let field = match d.get("type").and_then(Value::as_str) {
        Some("text_delta") => "text",
        Some("thinking_delta") => "thinking",
        Some("input_json_delta") => "partial_json",
        _ => return String::new(),
    };
    d.get(field).and_then(Value::as_str).unwrap_or("").into()
}

/// What the filters read of a Messages request.
fn prompt(body: &Value) -> Prompt<'_> {
    let mut p = Prompt {
        generates: true,
        choices: 1,
        max_tokens: body.get("max_tokens").and_then(Value::as_u64),
        ..Prompt::default()
    };
    if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
        p.messages
            .push(Message::new(Role::System, Some(system), "/system".into()));
    }
    for (i, m) in items(body, "messages").enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("assistant") => Role::Assistant,
            // `user`, and any other role the API might read as the caller's.
            _ => Role::User,
        };
        let content = m.get("content");
        let mut message = Message::new(role, content, format!("/messages/{i}/content"));
        message.raw = Some(m);
        let mut parts = Vec::new();
        for (j, block) in content
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("/messages/{i}/content/{j}");
            match block.get("type").and_then(Value::as_str) {
                Some(t) if is_tool_call(t) => message.calls.push(Call {
                    id: block.get("id").and_then(Value::as_str),
                    name: Cow::Borrowed(block.get("name").and_then(Value::as_str).unwrap_or("")),
                    arguments: block.get("input"),
                }),
                // A tool's result, text from elsewhere: a message of its
                // own, and so is each document in it.
                Some("tool_result") => {
                    let mut result =
                        Message::new(Role::Tool, block.get("content"), format!("{at}/content"));
                    result.answers = block.get("tool_use_id").and_then(Value::as_str);
                    result.raw = Some(&PART_OF_A_TURN);
                    parts.push(result);
                    for (k, inner) in items(block, "content").enumerate() {
                        parts.extend(document(inner, format!("{at}/content/{k}"), Role::Tool));
                    }
                }
                _ => {
                    parts.extend(context(block, &at, role));
                    parts.extend(document(block, at, role));
                }
            }
        }
        p.messages.push(message);
        p.messages.extend(parts);
    }
    for t in items(body, "tools") {
        p.tools.push(Tool {
            name: tool_name(t).map(Cow::Borrowed),
            declaration: t,
        });
    }
    if let Some(choice) = body.get("tool_choice").filter(|c| c.is_object()) {
        if choice.get("type").and_then(Value::as_str) == Some("tool") {
            p.forced.extend(
                choice
                    .get("name")
                    .and_then(Value::as_str)
                    .map(Cow::Borrowed),
            );
        }
    }
    p
}

/// Content blocks the filters read (or that carry no text: images).
const READ_BLOCKS: [&str; 8] = [
    "text",
    "image",
    "document",
    "search_result",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
];

/// What the gateway refuses to forward because it cannot screen it:
/// tools the provider runs itself (server tools, MCP servers, code
/// execution containers), whose calls and results the model does not
/// write in blocks the filters read, and content blocks of any other
/// kind. Fail closed: a new kind of block is refused until it is read.
fn readable(body: &Value) -> Result<(), Rejection> {
    let refuse = |what: String| {
        Err(Rejection::about_input(
            ErrorCode::InvalidRequest,
            format!("{what} cannot be screened by this gateway and is not forwarded."),
        ))
    };
    for field in ["mcp_servers", "container"] {
        if body.get(field).is_some_and(|v| !v.is_null()) {
            return refuse(format!("`{field}`"));
        }
    }
    for t in items(body, "tools") {
        match t.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(kind) => return refuse(format!("A server tool (`{kind}`)")),
        }
    }
    for m in items(body, "messages") {
        for b in items(m, "content") {
            // A tool result's own blocks are read too.
            let inner = match b.get("type").and_then(Value::as_str) {
                Some("tool_result") => items(b, "content"),
                _ => items(&Value::Null, ""),
            };
            for b in std::iter::once(b).chain(inner) {
                match b.get("type").and_then(Value::as_str) {
                    Some(kind) if READ_BLOCKS.contains(&kind) => {}
                    Some(kind) => return refuse(format!("A `{kind}` block")),
                    None => return refuse("A content block without a type".into()),
                }
            }
        }
    }
    Ok(())
}

/// Where an extracted text is counted by the token estimate: with the
/// turn it is part of, not again.
static PART_OF_A_TURN: Value = Value::Null;

/// Blocks the model is given as calls it made: its own tools', the API's
/// server tools' and MCP tools'.
fn is_tool_call(kind: &str) -> bool {
    matches!(kind, "tool_use" | "server_tool_use" | "mcp_tool_use")
}

/// The text of a `document` (plain-text or content source; the caller's)
/// or a `search_result` block (text from elsewhere, read as a tool's), as
/// a message of its own at `at`.
fn document(block: &Value, at: String, role: Role) -> Option<Message<'_>> {
    let (role, content, at) = match block.get("type").and_then(Value::as_str)? {
        "document" => {
            let source = block.get("source")?;
            match source.get("type").and_then(Value::as_str)? {
                "text" => (role, source.get("data"), format!("{at}/source/data")),
                "content" => (role, source.get("content"), format!("{at}/source/content")),
                _ => return None,
            }
        }
        "search_result" => (Role::Tool, block.get("content"), format!("{at}/content")),
        _ => return None,
    };
    let mut m = Message::new(role, content, at);
    m.name = block.get("title").and_then(Value::as_str);
    m.raw = Some(&PART_OF_A_TURN);
    Some(m)
}

/// A document's `context` (text the caller gives about it), as a message.
fn context<'a>(block: &'a Value, at: &str, role: Role) -> Option<Message<'a>> {
    let c = block.get("context").filter(|c| c.is_string())?;
    let mut m = Message::new(role, Some(c), format!("{at}/context"));
    m.raw = Some(&PART_OF_A_TURN);
    Some(m)
}

/// A declared tool's name: `name` (client tools and the versioned
/// built-in ones, `{"type": "web_search_20250305", "name": "web_search"}`).
fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

/// Remove the named tools from `tools` (the list goes when empty), and a
/// `tool_choice` that names one of them or has nothing left to choose.
fn strip(body: &mut Value, names: &[String]) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    let gone = |n: Option<&str>| n.is_some_and(|n| names.iter().any(|x| x == n));
    let mut none_left = false;
    if let Some(Value::Array(tools)) = obj.get_mut("tools") {
        tools.retain(|t| !gone(tool_name(t)));
        none_left = tools.is_empty();
    }
    if none_left {
        obj.remove("tools");
    }
    let choice_gone = obj.get("tool_choice").is_some_and(|c| {
        gone(c.get("name").and_then(Value::as_str))
            || (none_left && matches!(c.get("type").and_then(Value::as_str), Some("any" | "tool")))
    });
    if choice_gone {
        obj.remove("tool_choice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(body: &Value) -> Prompt<'_> {
        MESSAGES.prompt(body)
    }

    #[test]
    fn the_filters_read_system_turns_tool_calls_and_results() {
        let body = json!({
            "model": "claude", "max_tokens": 100,
            "system": [{"type": "text", "text": "be brief"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "thanks"}]}]});
        let p = view(&body);
        let roles: Vec<Role> = p.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Tool
            ]
        );
        assert_eq!(p.messages[0].texts(), ["be brief"]);
        assert_eq!(p.messages[2].calls[0].name, "get_weather");
        assert_eq!(p.messages[2].calls[0].id, Some("toolu_1"));
        // The user turn reads its text blocks, not the result inside it.
        assert_eq!(p.messages[3].texts(), ["thanks"]);
        assert_eq!(p.messages[4].answers, Some("toolu_1"));
        assert_eq!(p.messages[4].texts(), ["sunny"]);
        assert_eq!(
            body.pointer(&p.messages[4].at),
            Some(&json!([{"type": "text", "text": "sunny"}]))
        );
        let names: Vec<_> = p.tools.iter().map(|t| t.name.as_deref()).collect();
        assert_eq!(names, [Some("get_weather"), Some("web_search")]);
        assert_eq!(p.forced, ["get_weather"]);
        assert_eq!((p.max_tokens, p.choices, p.generates), (Some(100), 1, true));
    }

    #[test]
    fn documents_and_search_results_are_read() {
        let body = json!({"model": "m", "max_tokens": 9,
            "mcp_servers": [{"type": "url", "url": "https://x/mcp", "name": "crm"}],
            "messages": [{"role": "user", "content": [
                {"type": "document", "title": "memo", "source": {"type": "text", "media_type": "text/plain", "data": "doc text"}},
                {"type": "search_result", "source": "https://x", "title": "hit", "content": [{"type": "text", "text": "found text"}]},
                {"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "inner"}]}}]}]},
                {"role": "assistant", "content": [{"type": "mcp_tool_use", "id": "m1", "name": "lookup", "server_name": "crm", "input": {}}]}]});
        let p = view(&body);
        let read: Vec<(Role, Vec<&str>)> = p.messages.iter().map(|m| (m.role, m.texts())).collect();
        assert!(read.contains(&(Role::User, vec!["doc text"])), "{read:?}");
        assert!(read.contains(&(Role::Tool, vec!["found text"])), "{read:?}");
        assert!(read.contains(&(Role::Tool, vec!["inner"])), "{read:?}");
        for m in &p.messages {
            if let Some(c) = m.content {
                assert_eq!(body.pointer(&m.at), Some(c), "{}", m.at);
            }
        }
        // MCP servers are refused at intake (`readable`), not declared.
        assert!(readable(&body).is_err());
        assert_eq!(p.messages.last().unwrap().calls[0].name, "lookup");
    }

    #[test]
    fn hostile_shapes_read_as_nothing_rather_than_panic() {
        for body in [
            json!(null),
            json!({"messages": "x", "system": 5, "tools": {"a": 1}}),
            json!({"messages": [5, {"content": [7, {"type": "tool_result"}]}]}),
        ] {
            let _ = view(&body);
            let mut b = body.clone();
            strip(&mut b, &["x".into()]);
        }
    }

    #[test]
    fn stripping_removes_the_tool_and_a_choice_that_needs_it() {
        let mut body = json!({"tools": [{"name": "a"}, {"name": "b"}],
            "tool_choice": {"type": "tool", "name": "b"}});
        strip(&mut body, &["b".into()]);
        assert_eq!(body, json!({"tools": [{"name": "a"}]}));
        let mut body = json!({"tools": [{"name": "b"}], "tool_choice": {"type": "any"}});
        strip(&mut body, &["b".into()]);
        assert_eq!(body, json!({}));
        let mut body =
            json!({"tools": [{"name": "a"}, {"name": "b"}], "tool_choice": {"type": "auto"}});
        strip(&mut body, &["b".into()]);
        assert_eq!(
            body,
            json!({"tools": [{"name": "a"}], "tool_choice": {"type": "auto"}})
        );
    }

    #[test]
    fn usage_settles_from_the_start_and_the_delta() {
        let mut facts = StreamFacts::default();
        for data in [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "héllo"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
        ] {
            MESSAGES
                .note_event(&SseEvent::from_json(data), &mut facts)
                .unwrap();
        }
        assert!(!facts.done);
        MESSAGES
            .note_event(&SseEvent::data(r#"{"type":"message_stop"}"#), &mut facts)
            .unwrap();
        assert!(facts.done);
        assert_eq!(facts.generated_chars, 5 + 4);
        let usage = facts.usage.unwrap();
        assert_eq!(MESSAGES.total_tokens(&usage), Some(21));
        assert!(MESSAGES
            .note_event(&SseEvent::data("not json"), &mut StreamFacts::default())
            .is_err());
        let error =
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}});
        assert!(MESSAGES
            .note_event(&SseEvent::from_json(error), &mut StreamFacts::default())
            .is_err());
    }

    #[test]
    fn errors_have_the_anthropic_shape_and_types() {
        let r = Rejection::new(ErrorCode::ModelFrozen, "frozen by admin");
        let v: Value = serde_json::from_slice(&MESSAGES.error_body(&r)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "permission_error");
        assert!(
            !v.to_string().contains("frozen by admin"),
            "the reason is not public"
        );
        let e = MESSAGES.error_event(&r);
        assert_eq!(e.event.as_deref(), Some("error"));
        assert_eq!(e.json(), Some(&v));
        for (code, kind) in [
            (ErrorCode::InvalidToken, "authentication_error"),
            (ErrorCode::RateLimited, "rate_limit_error"),
            (ErrorCode::ModelNotFound, "not_found_error"),
            (ErrorCode::PromptInjection, "invalid_request_error"),
            (ErrorCode::UpstreamError, "api_error"),
        ] {
            assert_eq!(error_type(code), kind, "{code:?}");
        }
    }

    #[test]
    fn reply_texts_cover_every_generated_block() {
        let reply = json!({"type": "message", "content": [
            {"type": "thinking", "thinking": "hmm ", "signature": "sig"},
            {"type": "text", "text": "hi "},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"k": "v"}}]});
        assert_eq!(
            MESSAGES.reply_texts(&reply),
            [(0, "hmm hi {\"k\":\"v\"}".to_string())]
        );
        let mut r = reply.clone();
        MESSAGES.withhold(&mut r);
        assert_eq!(r["content"], json!([]));
        assert_eq!(r["stop_reason"], "refusal");
    }

    /// An Anthropic stream through the real response stages (redaction,
    /// then tool authorization) by way of the bridge, the upstream text
    /// cut into deltas of every size from 1 to 9 characters.
    fn through_stages(blocks: &[Value], cut: usize) -> Vec<Value> {
        use crate::chain::{FilterSettings, Mode, OnError};
        use crate::redact::stage::RedactStage;
        use crate::redact::{RedactionPolicy, Redactor};
        use crate::response::{ResponseChain, ResponseContext, ResponseStage};
        use crate::tool_authz::response::ResponseToolAuthz;
        use crate::tool_authz::{ToolPolicy, ToolPolicySpec};
        let policy: RedactionPolicy =
            serde_yaml::from_str(include_str!("../../../policies/redaction.yaml")).unwrap();
        let tools: ToolPolicySpec =
            serde_yaml::from_str(include_str!("../../../policies/tools.yaml")).unwrap();
        let enforce = FilterSettings {
            mode: Mode::Enforce,
            on_error: OnError::Deny,
        };
        let chain = ResponseChain::new(vec![
            (
                Box::new(RedactStage::new(crate::shared::Shared::new(
                    Redactor::build(&policy).unwrap(),
                ))) as Box<dyn ResponseStage>,
                enforce,
            ),
            (
                Box::new(ResponseToolAuthz::new(crate::shared::Shared::new(
                    ToolPolicy::build(tools).unwrap(),
                ))),
                enforce,
            ),
        ]);
        let user = crate::Principal {
            subject: "s".into(),
            tenant: "t".into(),
            roles: vec!["user".into()],
        };
        let ctx = ResponseContext {
            request_id: "t",
            route: Route::Messages,
            model: None,
            principal: Some(&user),
            approvals: Default::default(),
        };
        let mut stages = chain.stream(&ctx);
        let mut bridge = MESSAGES.stream();
        let mut upstream =
            vec![json!({"type": "message_start", "message": {"usage": {"input_tokens": 3}}})];
        for (i, b) in blocks.iter().enumerate() {
            let mut start = b.clone();
            let (field, delta_type, key) = match b["type"].as_str().unwrap() {
                "text" => ("text", "text_delta", "text"),
                "thinking" => ("thinking", "thinking_delta", "thinking"),
                _ => ("input", "input_json_delta", "partial_json"),
            };
            let text = match b.get(field) {
                Some(Value::String(t)) => t.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            crate::json::set(
                &mut start,
                &[field],
                if field == "input" {
                    json!({})
                } else {
                    json!("")
                },
            );
            if field == "thinking" {
                crate::json::set(&mut start, &["signature"], json!(""));
            }
            upstream
                .push(json!({"type": "content_block_start", "index": i, "content_block": start}));
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(cut) {
                let piece: String = piece.iter().collect();
                upstream.push(json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": delta_type, key: piece}}));
            }
            if let Some(sig) = b.get("signature") {
                upstream.push(json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": "signature_delta", "signature": sig}}));
            }
            upstream.push(json!({"type": "content_block_stop", "index": i}));
        }
        upstream.push(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}));
        upstream.push(json!({"type": "message_stop"}));
        let mut out = Vec::new();
        for e in upstream {
            for item in bridge.inbound(named(e)) {
                match item {
                    Bridged::Stages(e) => {
                        for staged in stages.push(e) {
                            out.extend(bridge.outbound(staged));
                        }
                    }
                    Bridged::Around(e) => out.push(bridge.around(e)),
                }
            }
        }
        for staged in stages.finish() {
            out.extend(bridge.outbound(staged));
        }
        assert!(stages.stopped().is_none());
        out.iter().map(|e| e.json().cloned().unwrap()).collect()
    }

    /// The blocks a client rebuilds from the events, and their order.
    fn rebuilt(events: &[Value]) -> (Vec<Value>, Vec<String>) {
        let mut blocks: Vec<Value> = Vec::new();
        let mut kinds = Vec::new();
        for e in events {
            kinds.push(e["type"].as_str().unwrap().to_string());
            match e["type"].as_str().unwrap() {
                "content_block_start" => blocks.push(e["content_block"].clone()),
                "content_block_delta" => {
                    let b = blocks.last_mut().unwrap();
                    let d = &e["delta"];
                    for (k, f) in [
                        ("text", "text"),
                        ("thinking", "thinking"),
                        ("partial_json", "partial"),
                        ("signature", "signature"),
                    ] {
                        if let Some(t) = d[k].as_str() {
                            let old = b[f].as_str().unwrap_or("").to_string();
                            b[f] = json!(old + t);
                        }
                    }
                }
                _ => {}
            }
        }
        (blocks, kinds)
    }

    #[test]
    fn streams_are_screened_the_same_however_they_are_cut() {
        let secret = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";
        let blocks = [
            json!({"type": "thinking", "thinking": format!("recall {secret} now"), "signature": "sig"}),
            json!({"type": "text", "text": format!("the key is {secret}, keep it safe")}),
            json!({"type": "tool_use", "id": "t1", "name": "delete_records", "input": {"table": "customers"}}),
            json!({"type": "tool_use", "id": "t2", "name": "get_weather", "input": {"city": "Oslo"}}),
        ];
        let whole = rebuilt(&through_stages(&blocks, 1 << 20));
        for cut in 1..10 {
            let events = through_stages(&blocks, cut);
            let wire = serde_json::to_string(&events).unwrap();
            assert!(!wire.contains(&secret[..8]), "cut {cut}: {wire}");
            assert!(
                !wire.contains("customers") && !wire.contains("delete_records"),
                "cut {cut}: {wire}"
            );
            let (blocks, kinds) = rebuilt(&events);
            assert_eq!(blocks, whole.0, "cut {cut}");
            // Each block: one start, its deltas, one stop, in order.
            let structure: Vec<&str> = kinds
                .iter()
                .map(String::as_str)
                .filter(|k| *k != "content_block_delta")
                .collect();
            let whole_structure: Vec<&str> = whole
                .1
                .iter()
                .map(String::as_str)
                .filter(|k| *k != "content_block_delta")
                .collect();
            assert_eq!(structure, whole_structure, "cut {cut}");
        }
        let (b, kinds) = whole;
        assert_eq!(b[0]["thinking"], "recall [REDACTED:github-token] now");
        assert_eq!(b[0]["signature"], "sig");
        assert_eq!(
            b[1]["text"],
            "the key is [REDACTED:github-token], keep it safe"
        );
        assert_eq!(b[2]["type"], "text", "the denied call became the notice");
        assert_eq!(b[2]["text"], "[a tool call was blocked by policy]");
        assert_eq!(b[3]["name"], "get_weather");
        assert_eq!(b[3]["partial"], "{\"city\":\"Oslo\"}");
        // Every block starts before its deltas and stops after them, the
        // message's end comes last, and the stop reason still names a tool
        // call (one was allowed).
        assert_eq!(kinds.first().map(String::as_str), Some("message_start"));
        assert_eq!(&kinds[kinds.len() - 2..], ["message_delta", "message_stop"]);
        let starts = kinds.iter().filter(|k| *k == "content_block_start").count();
        let stops = kinds.iter().filter(|k| *k == "content_block_stop").count();
        assert_eq!((starts, stops), (4, 4));
    }

    #[test]
    fn a_json_reply_keeps_its_blocks_and_loses_its_secrets() {
        let secret = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";
        let reply = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [
                {"type": "thinking", "thinking": format!("recall {secret}"), "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": format!("key {secret}")},
                {"type": "tool_use", "id": "t1", "name": "delete_records", "input": {"table": "x"}}],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 2}});
        let mut staged = MESSAGES.reply_in(&reply);
        // What the stages do: redact every text, remove the denied call.
        let redactor = crate::redact::Redactor::build(
            &serde_yaml::from_str(include_str!("../../../policies/redaction.yaml")).unwrap(),
        )
        .unwrap();
        for c in staged["choices"].as_array_mut().unwrap() {
            for k in ["content", "reasoning_content"] {
                if let Some(t) = c["message"][k].as_str() {
                    let t = redactor.redact(t).0;
                    c["message"][k] = json!(t);
                }
            }
        }
        staged["choices"][3]["message"] = json!({"role": "assistant", "content": "[removed]"});
        let out = MESSAGES.reply_out(&reply, &staged);
        assert!(!out.to_string().contains(&secret[..8]), "{out}");
        let types: Vec<&str> = out["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["thinking", "redacted_thinking", "text", "text"]);
        assert_eq!(out["content"][0]["signature"], "sig");
        assert_eq!(out["content"][1]["data"], "opaque");
        assert_eq!(out["stop_reason"], "end_turn");
        assert_eq!(out["usage"], reply["usage"]);
    }

    #[test]
    fn what_cannot_be_screened_is_refused_at_intake() {
        let ok = json!({"model": "m", "max_tokens": 5, "tools": [{"name": "f", "input_schema": {}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]});
        assert!(readable(&ok).is_ok());
        for bad in [
            json!({"mcp_servers": [{"type": "url", "url": "https://x", "name": "get_weather"}]}),
            json!({"container": "container_abc"}),
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            json!({"messages": [{"role": "assistant", "content": [{"type": "web_fetch_tool_result", "content": {}}]}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [{"type": "bash_code_execution_tool_result"}]}]}]}),
            json!({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}),
        ] {
            let e = readable(&bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
        }
    }

    #[test]
    fn a_stream_that_breaks_the_protocol_releases_nothing_it_should_not() {
        let secret = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";
        let mut b = MESSAGES.stream();
        let mut around = Vec::new();
        let mut staged = 0;
        for e in [
            json!({"type": "message_start", "message": {"content": [{"type": "text", "text": secret}]}}),
            // A delta for a block never started, a stop for one never started.
            json!({"type": "content_block_delta", "index": 7, "delta": {"type": "text_delta", "text": secret}}),
            json!({"type": "content_block_stop", "index": 7}),
            // Encrypted thinking passes, but not text smuggled into it.
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "redacted_thinking", "data": "x"}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": secret}}),
            json!({"type": "content_block_stop", "index": 0}),
            // An index used again; a block kind the stages cannot read.
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "web_fetch_tool_result", "content": secret}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": secret}}),
            // A delta after its block stopped.
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": secret}}),
            json!({"type": "message_stop"}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": secret}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        ] {
            for item in b.inbound(named(e)) {
                match item {
                    Bridged::Around(e) => around.push(b.around(e).to_string()),
                    Bridged::Stages(e) => {
                        staged += 1;
                        assert!(!e.to_string().contains(secret), "{e}");
                    }
                }
            }
        }
        let wire = around.concat();
        assert!(!wire.contains(secret), "{wire}");
        assert_eq!(staged, 1, "only block 2's stop reached the stages");
        assert!(wire.contains("redacted_thinking") && wire.contains("message_stop"));
        assert!(
            !wire.contains("message_delta"),
            "nothing after message_stop"
        );
    }
}
