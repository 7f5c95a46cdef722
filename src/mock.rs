//! An OpenAI-compatible mock provider: the LLM stand-in for the demo, the
//! tests and the load tests.
//!
//! It accepts any model and any key and echoes the last user message back,
//! so a test controls the output through its input. Streams send the reply
//! in events of `chunk_bytes` characters, then a `finish_reason` event, a
//! usage event when `stream_options.include_usage` is set, and `[DONE]`.
//! Token counts are deterministic: one token per four characters, rounded up.
//!
//! A last user message that is one of these JSON objects triggers a
//! behaviour instead of the echo:
//! - `{"mock_tool_call": {"name": N, "arguments": {...}}}`: a tool call
//!   (streamed as the name, then argument fragments);
//! - `{"mock_error": STATUS}`: an OpenAI-shaped error with that status;
//! - `{"mock_broken_stream": true}`: a stream cut off mid-way (connection
//!   aborted, no `[DONE]`);
//! - `{"mock_not_json": true}`: a 200 whose body is not JSON.

use crate::http_server::{self, full, json, ChannelBody, ResponseBody};
use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

#[derive(Debug, Clone, Copy)]
pub struct MockOptions {
    /// Delay before each response's headers.
    pub latency_ms: u64,
    /// Characters of content per streamed event.
    pub chunk_bytes: usize,
    /// Delay between streamed events.
    pub event_delay_ms: u64,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            chunk_bytes: 4,
            event_delay_ms: 0,
        }
    }
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Captured {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the mock has seen and done, for tests.
#[derive(Default)]
pub struct MockState {
    captured: Mutex<Vec<Captured>>,
    /// Streams whose client went away before the end.
    pub streams_aborted: AtomicUsize,
    /// Streams sent to the end.
    pub streams_completed: AtomicUsize,
    gate: Mutex<Option<Arc<Semaphore>>>,
}

impl MockState {
    pub fn requests(&self) -> Vec<Captured> {
        self.captured.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn last_request(&self) -> Option<Captured> {
        self.captured.lock().ok()?.last().cloned()
    }

    /// From now on every stream stops after its first event until
    /// [`MockState::release`].
    pub fn hold_streams(&self) {
        if let Ok(mut g) = self.gate.lock() {
            *g = Some(Arc::new(Semaphore::new(0)));
        }
    }

    /// Let held streams go on, and stop holding new ones.
    pub fn release(&self) {
        if let Ok(mut g) = self.gate.lock() {
            if let Some(sem) = g.take() {
                sem.add_permits(Semaphore::MAX_PERMITS / 2);
            }
        }
    }

    fn gate(&self) -> Option<Arc<Semaphore>> {
        self.gate.lock().ok()?.clone()
    }
}

/// Serve the mock on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    options: MockOptions,
    state: Arc<MockState>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |req: Request<hyper::body::Incoming>| {
        let state = state.clone();
        async move { handle(req, options, state).await }
    };
    http_server::serve(listener, handler, shutdown).await
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    opts: MockOptions,
    state: Arc<MockState>,
) -> Response<ResponseBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(400, &format!("cannot read body: {e}")),
    };
    if let Ok(mut c) = state.captured.lock() {
        c.push(Captured {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });
    }
    if opts.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(opts.latency_ms)).await;
    }
    let path = parts.uri.path();
    if parts.method == hyper::Method::GET && path == "/v1/models" {
        return json(
            200,
            &json!({"object": "list", "data": [
            {"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]}),
        );
    }
    if parts.method != hyper::Method::POST {
        return error(404, "no such route");
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "body is not JSON");
    };
    let model = req["model"].as_str().unwrap_or("mock-model").to_string();
    let stream = req["stream"].as_bool().unwrap_or(false);
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    match path {
        "/v1/chat/completions" => {
            let prompt = chat_prompt(&req);
            let prompt_tokens = tokens(&all_message_text(&req));
            let reply = match Trigger::of(&prompt) {
                Trigger::Error(status) => return error(status, "mock error as requested"),
                Trigger::NotJson => {
                    let mut r = Response::new(full("this is not json"));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        "application/json"
                            .parse()
                            .unwrap_or(hyper::header::HeaderValue::from_static("application/json")),
                    );
                    return r;
                }
                other => other,
            };
            let chat = Chat {
                model,
                prompt_tokens,
            };
            if stream {
                let events = chat.stream_events(&reply, opts.chunk_bytes, include_usage);
                sse(events, matches!(reply, Trigger::Broken(_)), opts, state)
            } else {
                json(200, &chat.completion(&reply))
            }
        }
        "/v1/completions" => {
            let prompt = match &req["prompt"] {
                Value::String(s) => s.clone(),
                Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or("").to_string(),
                _ => String::new(),
            };
            let usage = usage(tokens(&prompt), tokens(&prompt));
            let id = "cmpl-mock";
            if stream {
                let mut events: Vec<Value> = pieces(&prompt, opts.chunk_bytes)
                    .into_iter()
                    .map(|p| json!({"id": id, "object": "text_completion", "created": now(), "model": model,
                        "choices": [{"text": p, "index": 0, "finish_reason": null, "logprobs": null}]}))
                    .collect();
                events.push(json!({"id": id, "object": "text_completion", "created": now(), "model": model,
                    "choices": [{"text": "", "index": 0, "finish_reason": "stop", "logprobs": null}]}));
                if include_usage {
                    events.push(json!({"id": id, "object": "text_completion", "created": now(), "model": model,
                        "choices": [], "usage": usage}));
                }
                sse(events, false, opts, state)
            } else {
                json(
                    200,
                    &json!({"id": id, "object": "text_completion", "created": now(), "model": model,
                    "choices": [{"text": prompt, "index": 0, "finish_reason": "stop", "logprobs": null}],
                    "usage": usage}),
                )
            }
        }
        "/v1/embeddings" => {
            let inputs: Vec<String> = match &req["input"] {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect(),
                _ => return error(400, "input must be a string or an array"),
            };
            let dims = req["dimensions"].as_u64().unwrap_or(8).clamp(1, 4096) as usize;
            let base64 = req["encoding_format"].as_str() == Some("base64");
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    let v = embed(text, dims);
                    let embedding = if base64 {
                        let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                    } else {
                        json!(v)
                    };
                    json!({"object": "embedding", "index": i, "embedding": embedding})
                })
                .collect();
            let p: u64 = inputs.iter().map(|t| tokens(t)).sum();
            json(
                200,
                &json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": p, "total_tokens": p}}),
            )
        }
        _ => error(404, "no such route"),
    }
}

/// What the last user message asks the mock to do.
enum Trigger {
    Echo(String),
    ToolCall { name: String, arguments: String },
    Error(u16),
    Broken(String),
    NotJson,
}

impl Trigger {
    fn of(prompt: &str) -> Self {
        let echo = || Trigger::Echo(prompt.to_string());
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(prompt) else {
            return echo();
        };
        if let Some(call) = obj.get("mock_tool_call") {
            return Trigger::ToolCall {
                name: call["name"].as_str().unwrap_or("unnamed").to_string(),
                arguments: call
                    .get("arguments")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "{}".into()),
            };
        }
        if let Some(status) = obj.get("mock_error").and_then(Value::as_u64) {
            return Trigger::Error(u16::try_from(status).unwrap_or(500));
        }
        if obj.get("mock_broken_stream").is_some() {
            return Trigger::Broken("this stream will be cut off before it ends".into());
        }
        if obj.get("mock_not_json").is_some() {
            return Trigger::NotJson;
        }
        echo()
    }
}

struct Chat {
    model: String,
    prompt_tokens: u64,
}

impl Chat {
    fn chunk(&self, choices: Value) -> Value {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": now(),
            "model": self.model, "system_fingerprint": null, "choices": choices})
    }

    fn completion(&self, reply: &Trigger) -> Value {
        let (message, finish, completion_tokens) = match reply {
            Trigger::ToolCall { name, arguments } => (
                json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                    {"id": "call_mock_0", "type": "function", "function": {"name": name, "arguments": arguments}}]}),
                "tool_calls",
                tokens(arguments),
            ),
            Trigger::Echo(text) | Trigger::Broken(text) => (
                json!({"role": "assistant", "content": text, "refusal": null}),
                "stop",
                tokens(text),
            ),
            Trigger::Error(_) | Trigger::NotJson => (json!({}), "stop", 0),
        };
        json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": now(), "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
            "usage": usage(self.prompt_tokens, completion_tokens)})
    }

    fn stream_events(&self, reply: &Trigger, chunk: usize, include_usage: bool) -> Vec<Value> {
        let mut events = Vec::new();
        let (finish, completion_tokens) = match reply {
            Trigger::ToolCall { name, arguments } => {
                events.push(self.chunk(
                    json!([{"index": 0, "delta": {"role": "assistant", "content": null,
                    "tool_calls": [{"index": 0, "id": "call_mock_0", "type": "function",
                        "function": {"name": name, "arguments": ""}}]}, "finish_reason": null}]),
                ));
                for piece in pieces(arguments, chunk) {
                    events.push(
                        self.chunk(json!([{"index": 0, "delta": {"tool_calls": [
                        {"index": 0, "function": {"arguments": piece}}]}, "finish_reason": null}])),
                    );
                }
                ("tool_calls", tokens(arguments))
            }
            Trigger::Echo(text) | Trigger::Broken(text) => {
                events.push(self.chunk(
                    json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "finish_reason": null}]),
                ));
                for piece in pieces(text, chunk) {
                    events.push(self.chunk(
                        json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]),
                    ));
                }
                ("stop", tokens(text))
            }
            Trigger::Error(_) | Trigger::NotJson => ("stop", 0),
        };
        events.push(self.chunk(json!([{"index": 0, "delta": {}, "finish_reason": finish}])));
        if include_usage {
            let mut last = self.chunk(json!([]));
            last["usage"] = usage(self.prompt_tokens, completion_tokens);
            events.push(last);
        }
        events
    }
}

/// Send `events` as SSE, then `[DONE]`; with `broken`, abort the
/// connection half-way instead.
fn sse(
    events: Vec<Value>,
    broken: bool,
    opts: MockOptions,
    state: Arc<MockState>,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let cut_at = broken.then_some(events.len() / 2);
    tokio::spawn(async move {
        let gate = state.gate();
        let mut frames: Vec<Bytes> = events
            .iter()
            .map(|e| Bytes::from(format!("data: {e}\n\n")))
            .collect();
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for (i, frame) in frames.into_iter().enumerate() {
            if Some(i) == cut_at {
                let _ = tx
                    .send(Err(std::io::Error::other("mock stream cut off")))
                    .await;
                return;
            }
            if i > 0 {
                if let Some(gate) = &gate {
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                }
                if opts.event_delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(opts.event_delay_ms)).await;
                }
            }
            if tx.send(Ok(frame)).await.is_err() {
                state.streams_aborted.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        drop(tx);
        state.streams_completed.fetch_add(1, Ordering::SeqCst);
    });
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    resp
}

fn error(status: u16, message: &str) -> Response<ResponseBody> {
    json(
        status,
        &json!({"error": {"message": message, "type": "mock_error", "code": "mock_error", "param": null}}),
    )
}

/// The text of the last user message (string or content parts).
fn chat_prompt(req: &Value) -> String {
    req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| content_text(&m["content"]))
        .unwrap_or_default()
}

fn all_message_text(req: &Value) -> String {
    req["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| content_text(&m["content"]))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Split into pieces of `n` characters (never inside a character).
fn pieces(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(n.max(1)).map(|c| c.iter().collect()).collect()
}

fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn embed(text: &str, dims: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dims)
        .map(|i| {
            let h = Sha256::digest(format!("{i}:{text}").as_bytes());
            f32::from(h[0]) / 127.5 - 1.0
        })
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_never_split_characters() {
        assert_eq!(pieces("héllo🦀", 2), ["hé", "ll", "o🦀"]);
        assert_eq!(pieces("", 4), Vec::<String>::new());
    }

    #[test]
    fn triggers() {
        assert!(matches!(Trigger::of("hi"), Trigger::Echo(t) if t == "hi"));
        assert!(matches!(
            Trigger::of(r#"{"mock_error": 503}"#),
            Trigger::Error(503)
        ));
        assert!(matches!(
            Trigger::of(r#"{"mock_tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}"#),
            Trigger::ToolCall { name, arguments } if name == "get_weather" && arguments == r#"{"city":"Oslo"}"#
        ));
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("x", 16);
        assert_eq!(a, embed("x", 16));
        assert_ne!(a, embed("y", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
