//! A mock provider speaking OpenAI's APIs and Anthropic's Messages API
//! (`anthropic`): the LLM stand-in for the demo, the tests and the load
//! tests.
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
//! - `{"mock_message": {...}}`: this assistant message, as it is (JSON) or
//!   streamed field by field: `content` (a string or text parts),
//!   `refusal`, `reasoning_content`, `reasoning`, `audio.transcript`,
//!   `function_call.arguments` and each `tool_calls[].function.arguments`
//!   (or `custom.input`) in pieces of `chunk_bytes` characters, every other
//!   field whole;
//! - `{"mock_raw": VALUE}`: a 200 whose JSON body is VALUE;
//! - `{"mock_raw_events": [...]}`: an SSE stream of these events (a string
//!   is sent as the `data:` line as it is, anything else as JSON), then
//!   `[DONE]` (not with `"mock_no_done": true` beside it);
//! - `{"mock_error": STATUS}`: an OpenAI-shaped error with that status (a
//!   429 carries `Retry-After: 7` and `x-ratelimit-*`);
//! - `{"mock_broken_stream": true}`: a stream cut off mid-way (connection
//!   aborted, no `[DONE]`);
//! - `{"mock_not_json": true}`: a 200 whose body is not JSON;
//! - `{"mock_reset": true}`: the connection is closed after the whole
//!   request was read, with no response (a provider that crashed while it
//!   worked on the request).
//!
//! It answers as a guard model too, so the guard protocols are tested end
//! to end: a chat or completions request whose model names a guard
//! (`llama-guard…`, `granite-guardian…`, `shieldgemma…`) is judged, and so
//! is a `POST /v1/moderations`. Text holding `nerve agent` is unsafe (Llama
//! Guard `S9`, moderation `illicit/violent`), `UNSAFE:S<n>` is unsafe with
//! category `S<n>`, `mock_guard_error` gets a 503 and `mock_guard_garbled`
//! an answer in no protocol; anything else is safe. `--latency-ms` delays
//! guard answers like any other.
//!
//! `n` asks for that many identical choices (streamed: all of them in each
//! event); `logprobs: true` adds a token list for `content` and `refusal`,
//! one token per piece (completions: legacy `logprobs` when it is a number).

mod anthropic;

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
    http_server::serve(
        listener,
        handler,
        http_server::HEADER_READ_TIMEOUT,
        shutdown,
    )
    .await
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
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let n = req["n"].as_u64().unwrap_or(1).clamp(1, 16) as usize;
    if let Some(reply) = as_guard(path, &req, &model) {
        return reply;
    }
    match path {
        "/v1/messages" => anthropic::messages(&req, opts, state),
        "/v1/messages/count_tokens" => anthropic::count_tokens(&req),
        "/v1/chat/completions" => {
            let prompt = chat_prompt(&req);
            let prompt_tokens = tokens(&all_message_text(&req));
            let reply = match Trigger::of(&prompt) {
                Trigger::Error(status) => return error(status, "mock error as requested"),
                Trigger::NotJson => {
                    let mut r = Response::new(full("this is not json"));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    return r;
                }
                Trigger::Raw(v) => return json(200, &v),
                // Unwinding the connection's task drops the socket without
                // a response; `resume_unwind` prints no panic message.
                Trigger::Reset => std::panic::resume_unwind(Box::new("mock reset")),
                Trigger::RawEvents(events, done) => {
                    let frames = events
                        .iter()
                        .map(|e| match e {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect();
                    return sse(frames, Ending::Done(done), opts, state);
                }
                other => other,
            };
            let chat = Chat {
                model,
                prompt_tokens,
                n,
                logprobs: req["logprobs"].as_bool().unwrap_or(false),
            };
            if stream {
                let events = chat.stream_events(&reply, opts.chunk_bytes, include_usage);
                let frames = events.iter().map(Value::to_string).collect();
                let ending = match reply {
                    Trigger::Broken(_) => Ending::Cut,
                    _ => Ending::Done(true),
                };
                sse(frames, ending, opts, state)
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
            let legacy_logprobs = req["logprobs"].as_u64();
            if stream {
                let mut events: Vec<Value> = pieces(&prompt, opts.chunk_bytes)
                    .into_iter()
                    .map(|p| json!({"id": id, "object": "text_completion", "created": crate::clock::unix_secs(), "model": model,
                        "choices": [{"text": p, "index": 0, "finish_reason": null, "logprobs": null}]}))
                    .collect();
                events.push(json!({"id": id, "object": "text_completion", "created": crate::clock::unix_secs(), "model": model,
                    "choices": [{"text": "", "index": 0, "finish_reason": "stop", "logprobs": null}]}));
                if include_usage {
                    events.push(json!({"id": id, "object": "text_completion", "created": crate::clock::unix_secs(), "model": model,
                        "choices": [], "usage": usage}));
                }
                if let Some(top) = legacy_logprobs {
                    for e in events.iter_mut() {
                        if let Some(c) = e.pointer_mut("/choices/0").and_then(Value::as_object_mut)
                        {
                            let piece = c
                                .get("text")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string();
                            if !piece.is_empty() {
                                c.insert("logprobs".into(), legacy(&[piece], top));
                            }
                        }
                    }
                }
                sse(
                    events.iter().map(Value::to_string).collect(),
                    Ending::Done(true),
                    opts,
                    state,
                )
            } else {
                let logprobs = match legacy_logprobs {
                    Some(top) => legacy(&pieces(&prompt, opts.chunk_bytes), top),
                    None => Value::Null,
                };
                json(
                    200,
                    &json!({"id": id, "object": "text_completion", "created": crate::clock::unix_secs(), "model": model,
                    "choices": [{"text": prompt, "index": 0, "finish_reason": "stop", "logprobs": logprobs}],
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
    /// Answer with this assistant message.
    Message(Value),
    Error(u16),
    Broken(String),
    NotJson,
    Reset,
    Raw(Value),
    /// Events, and whether `[DONE]` follows them.
    RawEvents(Vec<Value>, bool),
}

impl Trigger {
    fn of(prompt: &str) -> Self {
        let echo =
            || Trigger::Message(json!({"role": "assistant", "content": prompt, "refusal": null}));
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(prompt) else {
            return echo();
        };
        if let Some(call) = obj.get("mock_tool_call") {
            let name = call["name"].as_str().unwrap_or("unnamed");
            let arguments = call
                .get("arguments")
                .map(Value::to_string)
                .unwrap_or_else(|| "{}".into());
            return Trigger::Message(
                json!({"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": "call_mock_0", "type": "function",
                    "function": {"name": name, "arguments": arguments}}]}),
            );
        }
        if let Some(Value::Object(m)) = obj.remove("mock_message") {
            let mut m = m;
            m.entry("role").or_insert_with(|| json!("assistant"));
            return Trigger::Message(Value::Object(m));
        }
        if let Some(v) = obj.remove("mock_raw") {
            return Trigger::Raw(v);
        }
        if let Some(Value::Array(events)) = obj.remove("mock_raw_events") {
            let done = obj.get("mock_no_done").is_none();
            return Trigger::RawEvents(events, done);
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
        if obj.get("mock_reset").is_some() {
            return Trigger::Reset;
        }
        echo()
    }

    fn message(&self) -> Value {
        match self {
            Trigger::Message(m) => m.clone(),
            Trigger::Broken(text) => json!({"role": "assistant", "content": text, "refusal": null}),
            _ => json!({"role": "assistant", "content": ""}),
        }
    }
}

/// Fields whose text streams in pieces.
const PIECEWISE: [&str; 4] = ["content", "refusal", "reasoning_content", "reasoning"];

/// One token entry of a chat `logprobs` list.
fn token(piece: &str) -> Value {
    json!({"token": piece, "logprob": -0.25, "bytes": piece.as_bytes(),
        "top_logprobs": [{"token": piece, "logprob": -0.25, "bytes": piece.as_bytes()}]})
}

/// The legacy completions `logprobs` of these tokens.
fn legacy(pieces: &[String], top: u64) -> Value {
    let mut offset = 0;
    let offsets: Vec<usize> = pieces
        .iter()
        .map(|p| {
            let at = offset;
            offset += p.len();
            at
        })
        .collect();
    json!({"tokens": pieces, "token_logprobs": vec![-0.25; pieces.len()],
        "top_logprobs": pieces.iter().map(|p| if top > 0 { json!({p.as_str(): -0.25}) } else { Value::Null }).collect::<Vec<_>>(),
        "text_offset": offsets})
}

struct Chat {
    model: String,
    prompt_tokens: u64,
    n: usize,
    logprobs: bool,
}

/// A message as a list of stream deltas.
fn deltas(message: &Value, chunk: usize) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let Some(m) = message.as_object() else {
        return out;
    };
    for (key, v) in m {
        match (key.as_str(), v) {
            ("role", _) => {}
            (k, Value::String(text)) if PIECEWISE.contains(&k) => {
                if k == "content" {
                    out.push(json!({"content": ""}));
                }
                out.extend(pieces(text, chunk).into_iter().map(|p| json!({k: p})));
            }
            ("content", Value::Array(parts)) => {
                for part in parts {
                    match part["text"].as_str() {
                        Some(text) => out.extend(
                            pieces(text, chunk)
                                .into_iter()
                                .map(|p| json!({"content": [{"type": "text", "text": p}]})),
                        ),
                        None => out.push(json!({"content": [part]})),
                    }
                }
            }
            ("function_call", f) => {
                out.push(json!({"function_call": {"name": f["name"], "arguments": ""}}));
                let args = f["arguments"].as_str().unwrap_or("");
                out.extend(
                    pieces(args, chunk)
                        .into_iter()
                        .map(|p| json!({"function_call": {"arguments": p}})),
                );
            }
            ("tool_calls", Value::Array(calls)) => {
                for (i, call) in calls.iter().enumerate() {
                    let kind = if call.get("custom").is_some() {
                        "custom"
                    } else {
                        "function"
                    };
                    let field = if kind == "custom" {
                        "input"
                    } else {
                        "arguments"
                    };
                    let inner = &call[kind];
                    out.push(
                        json!({"tool_calls": [{"index": i, "id": call["id"], "type": kind,
                        kind: {"name": inner["name"], field: ""}}]}),
                    );
                    let args = inner[field].as_str().unwrap_or("");
                    out.extend(
                        pieces(args, chunk)
                            .into_iter()
                            .map(|p| json!({"tool_calls": [{"index": i, kind: {field: p}}]})),
                    );
                }
            }
            ("audio", a) => {
                out.push(json!({"audio": {"id": a["id"], "data": a["data"], "expires_at": a["expires_at"]}}));
                let transcript = a["transcript"].as_str().unwrap_or("");
                out.extend(
                    pieces(transcript, chunk)
                        .into_iter()
                        .map(|p| json!({"audio": {"transcript": p}})),
                );
            }
            (_, Value::Null) => {}
            (k, other) => out.push(json!({k: other})),
        }
    }
    match out.first_mut().and_then(Value::as_object_mut) {
        Some(first) => {
            first.insert("role".into(), json!("assistant"));
        }
        None => out.push(json!({"role": "assistant"})),
    }
    out
}

/// Every text a message generates, for its token count.
fn generated_text(message: &Value) -> String {
    let mut out = String::new();
    collect_text(message, &mut out);
    out
}

fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(items) => items.iter().for_each(|i| collect_text(i, out)),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "role" | "type" | "id" | "data"))
            .for_each(|(_, v)| collect_text(v, out)),
        _ => {}
    }
}

fn finish_reason(message: &Value) -> &'static str {
    if message.get("tool_calls").is_some_and(|c| c.is_array()) {
        "tool_calls"
    } else if message.get("function_call").is_some_and(|c| c.is_object()) {
        "function_call"
    } else {
        "stop"
    }
}

impl Chat {
    fn chunk(&self, choices: Value) -> Value {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": crate::clock::unix_secs(),
            "model": self.model, "system_fingerprint": null, "choices": choices})
    }

    /// The choice's `logprobs` for a message or delta: one token per piece
    /// of `content` and `refusal`.
    fn logprobs_of(&self, m: &Value, chunk: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let list = |field: &str| match m[field].as_str() {
            Some(t) if !t.is_empty() => json!(pieces(t, chunk)
                .iter()
                .map(|p| token(p))
                .collect::<Vec<_>>()),
            _ => Value::Null,
        };
        json!({"content": list("content"), "refusal": list("refusal")})
    }

    fn completion(&self, reply: &Trigger) -> Value {
        let message = reply.message();
        let completion_tokens = tokens(&generated_text(&message));
        let logprobs = self.logprobs_of(&message, 4);
        let choices: Vec<Value> = (0..self.n)
            .map(|i| json!({"index": i, "message": message, "finish_reason": finish_reason(&message), "logprobs": logprobs}))
            .collect();
        json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": crate::clock::unix_secs(), "model": self.model,
            "system_fingerprint": null, "choices": choices,
            "usage": usage(self.prompt_tokens, completion_tokens * self.n as u64)})
    }

    fn stream_events(&self, reply: &Trigger, chunk: usize, include_usage: bool) -> Vec<Value> {
        let message = reply.message();
        let completion_tokens = tokens(&generated_text(&message));
        let mut events: Vec<Value> = deltas(&message, chunk)
            .into_iter()
            .map(|delta| {
                let logprobs = self.logprobs_of(&delta, usize::MAX);
                let choices: Vec<Value> = (0..self.n)
                    .map(|i| json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": null}))
                    .collect();
                self.chunk(Value::Array(choices))
            })
            .collect();
        let finish = finish_reason(&message);
        let choices: Vec<Value> = (0..self.n)
            .map(|i| json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}))
            .collect();
        events.push(self.chunk(Value::Array(choices)));
        if include_usage {
            let mut last = self.chunk(json!([]));
            if let Some(o) = last.as_object_mut() {
                o.insert(
                    "usage".into(),
                    usage(self.prompt_tokens, completion_tokens * self.n as u64),
                );
            }
            events.push(last);
        }
        events
    }
}

/// Send `events` as SSE, then `[DONE]`; with `broken`, abort the
/// connection half-way instead.
/// How a mock stream ends.
#[derive(Clone, Copy)]
enum Ending {
    /// Cleanly, with or without `[DONE]`.
    Done(bool),
    /// Cut off half-way (the connection aborted).
    Cut,
}

fn sse(
    events: Vec<String>,
    ending: Ending,
    opts: MockOptions,
    state: Arc<MockState>,
) -> Response<ResponseBody> {
    let cut = matches!(ending, Ending::Cut);
    let mut frames: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(format!("data: {e}\n\n")))
        .collect();
    if !matches!(ending, Ending::Done(false)) {
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    sse_frames(frames, cut, opts, state)
}

/// Send whole SSE frames, paced by `opts` and the hold gate; `cut` aborts
/// the connection half-way instead of ending the stream.
pub(super) fn sse_frames(
    frames: Vec<Bytes>,
    cut: bool,
    opts: MockOptions,
    state: Arc<MockState>,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let cut_at = cut.then_some(frames.len().saturating_sub(1) / 2);
    tokio::spawn(async move {
        let gate = state.gate();
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
    let mut r = json(
        status,
        &json!({"error": {"message": message, "type": "mock_error", "code": "mock_error", "param": null}}),
    );
    if status == 429 {
        for (name, value) in [
            ("retry-after", "7"),
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "7s"),
        ] {
            r.headers_mut()
                .insert(name, hyper::header::HeaderValue::from_static(value));
        }
    }
    r
}

/// The text of the last user message (string or content parts).
/// What the mock guard finds in a text: `None` when safe, else the Llama
/// Guard category; `Err` for the error and garbled triggers.
fn guard_finding(text: &str) -> Result<Option<String>, u16> {
    if text.contains("mock_guard_error") {
        return Err(503);
    }
    if text.contains("mock_guard_garbled") {
        return Err(0);
    }
    if let Some(i) = text.find("UNSAFE:S") {
        let digits: String = text[i + 8..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return Ok(Some(format!("S{digits}")));
    }
    Ok(text.contains("nerve agent").then(|| "S9".to_string()))
}

/// The mock's answer when the request is for a guard.
fn as_guard(path: &str, req: &Value, model: &str) -> Option<Response<ResponseBody>> {
    let model = model.to_ascii_lowercase();
    if path == "/v1/moderations" {
        let input = match &req["input"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let finding = match guard_finding(&input) {
            Err(503) => return Some(error(503, "mock guard error as requested")),
            Err(_) => return Some(json(200, &json!({"unexpected": true}))),
            Ok(f) => f,
        };
        let violent = finding.is_some();
        let score = if violent { 0.97 } else { 0.01 };
        return Some(json(
            200,
            &json!({"id": "modr-mock", "model": model, "results": [{
            "flagged": violent,
            "categories": {"illicit/violent": violent, "violence": false, "hate": false, "self-harm": false},
            "category_scores": {"illicit/violent": score, "violence": 0.02, "hate": 0.01, "self-harm": 0.0}}]}),
        ));
    }
    let yes_no = model.contains("granite-guardian") || model.contains("shieldgemma");
    if !(model.contains("llama-guard") || yes_no) {
        return None;
    }
    let text = match path {
        "/v1/chat/completions" => req["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter(|m| m["role"] != "system")
                    .map(|m| content_text(&m["content"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
        "/v1/completions" => {
            // A prompt built by the gateway: judge only the conversation.
            let p = req["prompt"].as_str().unwrap_or("");
            let start = p.find("<BEGIN CONVERSATION>").unwrap_or(0);
            let end = p.find("<END CONVERSATION>").unwrap_or(p.len());
            p[start..end.max(start)].to_string()
        }
        _ => return None,
    };
    let answer = match guard_finding(&text) {
        Err(503) => return Some(error(503, "mock guard error as requested")),
        Err(_) => "I would rather not say.".to_string(),
        Ok(None) if yes_no => "No".into(),
        Ok(Some(_)) if yes_no => "Yes".into(),
        Ok(None) => "safe".into(),
        Ok(Some(category)) => format!("unsafe\n{category}"),
    };
    let usage = usage(tokens(&text), 2);
    Some(json(
        200,
        &if path == "/v1/completions" {
            json!({"id": "cmpl-guard", "object": "text_completion", "created": crate::clock::unix_secs(), "model": model,
                "choices": [{"index": 0, "text": answer, "finish_reason": "stop", "logprobs": null}], "usage": usage})
        } else {
            json!({"id": "chatcmpl-guard", "object": "chat.completion", "created": crate::clock::unix_secs(), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": usage})
        },
    ))
}

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
        assert!(matches!(Trigger::of("hi"), Trigger::Message(m) if m["content"] == "hi"));
        assert!(matches!(
            Trigger::of(r#"{"mock_error": 503}"#),
            Trigger::Error(503)
        ));
        assert!(matches!(
            Trigger::of(r#"{"mock_tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}"#),
            Trigger::Message(m) if m["tool_calls"][0]["function"]["name"] == "get_weather"
                && m["tool_calls"][0]["function"]["arguments"] == r#"{"city":"Oslo"}"#
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
