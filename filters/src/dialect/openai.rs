//! What OpenAI's formats share: the error shape, usage, the fields of a
//! reply that carry generated text, the stream's end marker, and the
//! model list. [`OpenAi`] is the [`Dialect`] of all three; each format's
//! module gives its own values of it.

use super::{Dialect, Forward, Replayed, StreamFacts};
use crate::approval::Approval;
use crate::intake::{parse_body, CallBody, Shape};
use crate::json::items;
use crate::prompt::{Call, Input, Message, Prompt, Role, Tool};
use crate::{Rejection, Route, SseEvent};
use serde_json::{json, Value};
use std::borrow::Cow;

/// One of OpenAI's formats.
pub struct OpenAi {
    pub route: Route,
    /// The path below the provider's base URL.
    pub path: &'static str,
    /// Whether its stream may carry a usage-only chunk at the end
    /// (`stream_options.include_usage`).
    pub stream_usage: bool,
    /// Whether its replies carry generated text (embeddings: vectors).
    pub generates: bool,
    /// `object` and `id` of the chunk that ends a cut stream, and one
    /// choice of it.
    pub cut_chunk: (&'static str, &'static str),
    pub cut_choice: fn(u64) -> Value,
    /// Approved calls as a reply (Chat Completions only: the only one of
    /// the three with tool calls).
    pub replay: Option<fn(&Approval, &Value) -> Replayed>,
}

impl Dialect for OpenAi {
    fn route(&self) -> Route {
        self.route
    }

    fn upstream_path(&self) -> &'static str {
        self.path
    }

    fn parse(&self, body: &[u8], shape: &Shape) -> Result<CallBody, Rejection> {
        parse_body(self.route, body, shape)
    }

    fn prompt<'a>(&self, request: &'a Value) -> Prompt<'a> {
        prompt(self.route, self.generates, request)
    }

    fn needs_usage_request(&self, request: &Value) -> bool {
        self.stream_usage && !asks_usage(request)
    }

    fn forward(&self, request: &mut Value, f: &Forward<'_>) {
        forward(request, f)
    }

    fn choices(&self, request: &Value) -> u64 {
        request.get("n").and_then(Value::as_u64).unwrap_or(1)
    }

    fn reply_usage(&self, reply: &Value) -> Option<Value> {
        reply.get("usage").filter(|u| !u.is_null()).cloned()
    }

    fn total_tokens(&self, usage: &Value) -> Option<u64> {
        usage.get("total_tokens").and_then(Value::as_u64)
    }

    fn token_counts(&self, usage: &Value) -> Option<(u64, u64)> {
        let part = |k: &str| usage.get(k).and_then(Value::as_u64);
        // Embeddings report no completion tokens.
        Some((
            part("prompt_tokens")?,
            part("completion_tokens").unwrap_or(0),
        ))
    }

    fn note_event(&self, event: &SseEvent, facts: &mut StreamFacts) -> Result<(), String> {
        note_event(event, facts)
    }

    fn is_usage_only(&self, event: &SseEvent) -> bool {
        is_usage_only(event)
    }

    fn is_closing(&self, event: &SseEvent) -> bool {
        is_closing(event)
    }

    fn reply_texts(&self, reply: &Value) -> Vec<(u64, String)> {
        if self.generates {
            reply_texts(reply)
        } else {
            Vec::new()
        }
    }

    fn withhold(&self, reply: &mut Value) {
        withhold(reply)
    }

    fn withheld_end(&self, model: Option<&str>, choices: u64) -> Vec<SseEvent> {
        let created = crate::clock::Clock::now_secs(&crate::clock::SystemClock);
        // Every one of the request's `n` choices (at most 128) ends.
        let all: Vec<Value> = (0..choices.clamp(1, 128)).map(self.cut_choice).collect();
        let (object, id) = self.cut_chunk;
        let chunk =
            json!({"id": id, "object": object, "created": created, "model": model, "choices": all});
        vec![SseEvent::from_json(chunk), SseEvent::data("[DONE]")]
    }

    fn error_body(&self, rejection: &Rejection) -> Vec<u8> {
        error_body(rejection)
    }

    fn error_event(&self, rejection: &Rejection) -> SseEvent {
        SseEvent::from_json(error_json(rejection))
    }

    fn replay(&self, approval: &Approval, request: &Value) -> Option<Replayed> {
        self.replay.map(|r| r(approval, request))
    }

    fn holds_calls(&self) -> bool {
        self.replay.is_some()
    }
}

/// What the filters read of an OpenAI request.
fn prompt(route: Route, generates: bool, body: &Value) -> Prompt<'_> {
    let mut p = Prompt {
        generates,
        ..Prompt::default()
    };
    // Only a chat request has a conversation: `messages` beside a
    // completions prompt is a decoy the provider ignores.
    let messages = match route {
        Route::ChatCompletions => body.get("messages").and_then(Value::as_array),
        _ => None,
    };
    for (i, m) in messages.into_iter().flatten().enumerate() {
        // Roles as providers read them, whatever their case.
        let role = match m
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user")
            .to_ascii_lowercase()
            .as_str()
        {
            "assistant" => Role::Assistant,
            "system" | "developer" => Role::System,
            "tool" | "function" => Role::Tool,
            // `user`, and any role a provider might read as the caller's.
            _ => Role::User,
        };
        let mut message = Message::new(role, m.get("content"), format!("/messages/{i}/content"));
        message.raw = Some(m);
        message.name = m.get("name").and_then(Value::as_str);
        message.answers = m.get("tool_call_id").and_then(Value::as_str);
        for call in items(m, "tool_calls") {
            let inner = call
                .get("function")
                .or_else(|| call.get("custom"))
                .unwrap_or(call);
            message.calls.push(Call {
                id: call.get("id").and_then(Value::as_str),
                name: Cow::Borrowed(inner.get("name").and_then(Value::as_str).unwrap_or("")),
                arguments: inner.get("arguments").or_else(|| inner.get("input")),
            });
        }
        if let Some(call) = m.get("function_call").filter(|c| c.is_object()) {
            message.calls.push(Call {
                id: None,
                name: Cow::Borrowed(call.get("name").and_then(Value::as_str).unwrap_or("")),
                arguments: call.get("arguments"),
            });
        }
        p.messages.push(message);
    }
    let field = |name: &'static str| {
        body.get(name).filter(|v| !v.is_null()).map(|value| Input {
            field: name,
            value,
            at: format!("/{name}"),
        })
    };
    match route {
        Route::Completions => p
            .inputs
            .extend([field("prompt"), field("suffix")].into_iter().flatten()),
        Route::Embeddings => p.inputs.extend(field("input")),
        _ => {}
    }
    for t in items(body, "tools") {
        p.tools.push(Tool {
            name: tool_name(t).map(Cow::Owned),
            declaration: t,
        });
    }
    // A legacy `functions` entry is `{name, parameters}`.
    for f in items(body, "functions") {
        p.tools.push(Tool {
            name: f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .map(Cow::Borrowed),
            declaration: f,
        });
    }
    match body.get("response_format") {
        Some(Value::Array(items)) => p.schemas.extend(items),
        Some(v @ Value::Object(_)) => p.schemas.push(v),
        _ => {}
    }
    if let Some(choice) = body.get("tool_choice").filter(|c| c.is_object()) {
        p.forced.extend(tool_name(choice).map(Cow::Owned));
    }
    if let Some(name) = body.pointer("/function_call/name").and_then(Value::as_str) {
        p.forced.push(Cow::Borrowed(name));
    }
    p.max_tokens = body
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64));
    p.choices = ["n", "best_of"]
        .iter()
        .filter_map(|k| body.get(*k).and_then(Value::as_u64))
        .max()
        .unwrap_or(1)
        .max(1);
    p
}

/// The name a `tools` entry (or a `tool_choice`) gives: `function.name`,
/// `custom.name`, or for a built-in tool its type (`web_search`).
pub fn tool_name(tool: &Value) -> Option<String> {
    let kind = tool
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    let name = match kind {
        "function" => tool.pointer("/function/name").or_else(|| tool.get("name")),
        "custom" => tool.pointer("/custom/name").or_else(|| tool.get("name")),
        other => return Some(other.to_string()),
    };
    name.and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// Remove the named tools from a request's `tools` and `functions`; a list
/// left empty goes, and so does a `tool_choice` / `function_call` that
/// names a removed tool or has nothing left to choose from.
pub fn strip(body: &mut Value, names: &[String]) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    let gone = |n: Option<String>| n.is_some_and(|n| names.contains(&n));
    if let Some(Value::Array(tools)) = obj.get_mut("tools") {
        tools.retain(|t| !gone(tool_name(t)));
        if tools.is_empty() {
            obj.remove("tools");
            obj.remove("tool_choice");
        }
    }
    if let Some(Value::Array(functions)) = obj.get_mut("functions") {
        functions.retain(|f| !gone(f.get("name").and_then(Value::as_str).map(str::to_string)));
        if functions.is_empty() {
            obj.remove("functions");
            obj.remove("function_call");
        }
    }
    if obj
        .get("tool_choice")
        .filter(|c| c.is_object())
        .is_some_and(|c| gone(tool_name(c)))
    {
        obj.remove("tool_choice");
    }
    if gone(
        obj.get("function_call")
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string),
    ) {
        obj.remove("function_call");
    }
}

/// `{"error": {"message", "type", "code", "param"}}`.
pub fn error_body(rejection: &Rejection) -> Vec<u8> {
    error_json(rejection).to_string().into_bytes()
}

fn error_json(rejection: &Rejection) -> Value {
    json!({
        "error": {
            "message": rejection.message,
            "type": rejection.code.error_type(),
            "code": rejection.code.as_str(),
            "param": null,
        }
    })
}

/// `model` set to the provider's name; declared tools the policy
/// removes removed; `stream_options.include_usage`
/// set when the gateway needs the usage. Intake checked that the body is
/// an object and that `stream_options` is an object or null: both writes
/// succeed.
fn forward(request: &mut Value, forward: &Forward<'_>) {
    crate::json::set(request, &["model"], Value::String(forward.model.into()));
    if forward.ask_usage {
        crate::json::set(
            request,
            &["stream_options", "include_usage"],
            Value::Bool(true),
        );
    }
    if !forward.strip_tools.is_empty() {
        strip(request, forward.strip_tools);
    }
}

/// A streamed request asks for the final usage chunk with
/// `stream_options.include_usage`.
fn asks_usage(request: &Value) -> bool {
    request.pointer("/stream_options/include_usage") == Some(&Value::Bool(true))
}

/// `[DONE]` ends the stream; every other event must be a JSON object,
/// whose `usage` and generated characters are noted.
fn note_event(event: &SseEvent, facts: &mut StreamFacts) -> Result<(), String> {
    if !event.has_data() {
        return Ok(());
    }
    if event.is_done() {
        facts.done = true;
        return Ok(());
    }
    let Some(v @ Value::Object(_)) = event.json() else {
        return Err("provider sent an SSE event whose data is not a JSON object".into());
    };
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        facts.usage = Some(u.clone());
    }
    for choice in items(v, "choices") {
        if let Some(t) = choice.get("text") {
            facts.generated_chars += text_chars(t);
        }
        if let Some(d) = choice.get("delta") {
            facts.generated_chars += text_chars(d);
        }
    }
    Ok(())
}

/// Characters of every string in a value (a delta's text, arguments).
fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "role" | "type" | "id" | "index"))
            .map(|(_, v)| text_chars(v))
            .sum(),
        _ => 0,
    }
}

/// The final `choices: []` chunk that only carries `usage`.
fn is_usage_only(event: &SseEvent) -> bool {
    event.json().is_some_and(|v| {
        v.get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && v.get("usage").is_some_and(Value::is_object)
    })
}

/// `[DONE]`, a chunk with a finish reason, or a usage-only chunk (it
/// follows the finish and must stay after it).
fn is_closing(event: &SseEvent) -> bool {
    event.is_done()
        || event
            .json()
            .and_then(|j| j.get("choices"))
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.is_empty()
                    || cs
                        .iter()
                        .any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()))
            })
}

/// The text of a reply's choices, everything a model generates: content
/// (string or parts), refusal, reasoning, audio transcripts, tool-call and
/// legacy function-call arguments, completions text.
fn reply_texts(reply: &Value) -> Vec<(u64, String)> {
    fn push(out: &mut String, v: &Value) {
        match v {
            // Streamed pieces join as they were cut: no separator.
            Value::String(s) => out.push_str(s),
            Value::Array(parts) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
            }
            _ => {}
        }
    }
    let mut texts = Vec::new();
    for (at, c) in items(reply, "choices").enumerate() {
        let mut out = String::new();
        if let Some(t) = c.get("text") {
            push(&mut out, t);
        }
        for m in [c.get("message"), c.get("delta")].into_iter().flatten() {
            for key in ["content", "refusal", "reasoning_content", "reasoning"] {
                if let Some(v) = m.get(key) {
                    push(&mut out, v);
                }
            }
            if let Some(t) = m.pointer("/audio/transcript") {
                push(&mut out, t);
            }
            if let Some(a) = m.pointer("/function_call/arguments") {
                push(&mut out, a);
            }
            for call in items(m, "tool_calls") {
                for p in ["/function/arguments", "/custom/input"] {
                    if let Some(a) = call.pointer(p) {
                        push(&mut out, a);
                    }
                }
            }
        }
        // Choices are judged apart; a provider's index beyond the
        // request's cap of 128 shares the last one's text.
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(at as u64);
        texts.push((index.min(127), out));
    }
    texts
}

/// A withheld reply: every choice's content, tool calls and text
/// removed, `finish_reason: content_filter`.
fn withhold(reply: &mut Value) {
    for c in reply
        .get_mut("choices")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let Some(c) = c.as_object_mut() else { continue };
        if let Some(m) = c.get_mut("message").and_then(Value::as_object_mut) {
            m.insert("content".into(), Value::Null);
            for generated in [
                "tool_calls",
                "function_call",
                "refusal",
                "reasoning_content",
                "reasoning",
                "audio",
            ] {
                m.remove(generated);
            }
        }
        if c.contains_key("text") {
            c.insert("text".into(), json!(""));
        }
        if c.contains_key("logprobs") {
            c.insert("logprobs".into(), Value::Null);
        }
        c.insert("finish_reason".into(), json!("content_filter"));
    }
}

/// One entry of `GET /v1/models`.
pub fn model_object(id: &str, provider: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": provider})
}

/// `GET /v1/models`.
pub fn model_list(models: impl Iterator<Item = Value>) -> Value {
    json!({"object": "list", "data": models.collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn error_body_has_the_openai_shape() {
        let r = Rejection::new(ErrorCode::RateLimited, "tier trial 5/min");
        let v: Value = serde_json::from_slice(&error_body(&r)).unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(
            v["error"]["message"],
            ErrorCode::RateLimited.public_message()
        );
        assert!(v["error"]["param"].is_null());
        assert!(
            !v.to_string().contains("tier trial"),
            "reason is not public"
        );
        assert_eq!(
            super::super::DEFAULT.error_event(&r).json(),
            Some(&v),
            "the stream's error event carries the same body"
        );
    }

    #[test]
    fn strip_covers_functions_and_forced_choices() {
        let mut body = json!({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "custom", "custom": {"name": "b"}}],
            "tool_choice": {"type": "custom", "custom": {"name": "b"}},
            "functions": [{"name": "b"}], "function_call": {"name": "b"}});
        strip(&mut body, &["b".to_string()]);
        assert_eq!(
            body,
            json!({"tools": [{"type": "function", "function": {"name": "a"}}]})
        );
    }

    #[test]
    fn roles_in_any_case_and_no_decoy_conversation_beside_a_prompt() {
        use crate::dialect::Dialect as _;
        use crate::prompt::Role;
        let body = json!({"messages": [{"role": "Tool", "tool_call_id": "c", "content": "x"},
            {"role": "DEVELOPER", "content": "y"}, {"role": "Assistant", "content": "z"}]});
        let p = super::super::openai_chat::CHAT.prompt(&body);
        let roles: Vec<Role> = p.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::Tool, Role::System, Role::Assistant]);
        let decoy = json!({"prompt": "the real prompt", "messages": [{"role": "user", "content": "hello"}]});
        let p = super::super::openai_completions::COMPLETIONS.prompt(&decoy);
        assert!(p.messages.is_empty());
        assert_eq!(p.inputs[0].value, "the real prompt");
    }
}
