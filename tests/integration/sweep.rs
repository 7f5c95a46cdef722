//! Regression tests for the security sweep (issue 8): each test is named
//! after the defect it closes, and drives the gateway binary with the mock
//! provider standing in for the model.

use crate::support::*;
use futures_util::StreamExt;
use portcullis::testkit::mock::MockOptions;
use serde_json::{json, Value};

/// Deterministic characters from `alphabet` (no real secret in the tree).
fn chars(seed: u64, n: usize, alphabet: &str) -> String {
    let a: Vec<char> = alphabet.chars().collect();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            a[(x % a.len() as u64) as usize]
        })
        .collect()
}

const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const BASE64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn github_token() -> String {
    format!("ghp_{}", chars(7, 36, ALNUM))
}

/// A private key block: 6 lines of 64 base64 characters, `+` and `/` in.
fn pem_key() -> (String, Vec<String>) {
    let lines: Vec<String> = (0..6).map(|i| chars(100 + i, 64, BASE64)).collect();
    let block = format!(
        "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----",
        lines.join("\n")
    );
    (block, lines)
}

fn redaction_yaml() -> String {
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/redaction.yaml");
    format!("redaction:\n  policy: {}\n", policy.display())
}

fn tools_yaml(setup: &mut Setup) {
    setup.files.push((
        "tools.yaml".into(),
        include_bytes!("../../policies/tools.yaml").to_vec(),
    ));
    setup.extra_yaml += "tools:\n  policy: tools.yaml\n";
}

/// A gateway with auth, limits and the shipped tool policy, and a token of
/// role `user`.
async fn with_tools() -> (Mock, Gateway, String) {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    tools_yaml(&mut setup);
    let gw = Gateway::start(setup).await;
    let user = keys.token("u", &["user"]);
    (mock, gw, user)
}

async fn redacting(options: MockOptions) -> (Mock, Gateway) {
    let mock = Mock::start(options).await;
    let mut setup = Setup::new(mock.addr);
    setup.extra_yaml = redaction_yaml();
    let gw = Gateway::start(setup).await;
    (mock, gw)
}

fn small_chunks() -> MockOptions {
    MockOptions {
        chunk_bytes: 3,
        ..options()
    }
}

async fn body_text(r: reqwest::Response) -> String {
    String::from_utf8(r.bytes_stream().map(|c| c.unwrap().to_vec()).concat().await).unwrap()
}

/// The JSON of every `data:` event of a raw SSE body (`[DONE]` left out).
fn events(raw: &str) -> Vec<Value> {
    raw.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// Strings at `pointer` of every choice `index`, joined across events.
fn joined(events: &[Value], index: u64, pointer: &str) -> String {
    let mut out = String::new();
    for e in events {
        for c in e["choices"].as_array().into_iter().flatten() {
            if c["index"].as_u64() == Some(index) {
                if let Some(s) = c.pointer(pointer).and_then(Value::as_str) {
                    out.push_str(s);
                }
            }
        }
    }
    out
}

fn outcome<'a>(rec: &'a Value, filter: &str) -> &'a Value {
    rec["filters"]
        .as_array()
        .and_then(|f| f.iter().find(|o| o["filter"] == filter))
        .unwrap_or_else(|| panic!("no {filter} outcome in {rec}"))
}

fn message(m: Value) -> Value {
    chat(&json!({ "mock_message": m }).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_01_pem_private_keys_never_leak_from_streams() {
    let (_mock, gw) = redacting(small_chunks()).await;
    let (key, lines) = pem_key();
    let prompt = format!("Here is the key:\n{key}\nStore it safely.");
    for stream in [true, false] {
        let mut body = chat(&prompt);
        body["stream"] = json!(stream);
        let r = gw.post("/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let raw = body_text(r).await;
        for line in &lines {
            assert!(
                !raw.contains(&line[..16]),
                "stream={stream}: key material leaked: {raw}"
            );
        }
        assert!(raw.contains("[REDACTED:private-key]"), "{raw}");
        let rec = gw.record_for(&id).await;
        assert_eq!(
            outcome(&rec, "redact")["annotations"][0]["value"]["private-key"],
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_02_logprobs_never_spell_a_redacted_secret() {
    let (_mock, gw) = redacting(small_chunks()).await;
    let secret = github_token();
    let prompt = format!("the token is {secret} ok");
    // JSON: tokens of four characters.
    let mut body = chat(&prompt);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(1);
    let reply: Value = gw
        .post("/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    let tokens = &reply["choices"][0]["logprobs"]["content"];
    let spelled: String = tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(spelled, "the token is [REDACTED:github-token] ok");
    assert!(!reply.to_string().contains(&secret[4..12]), "{reply}");
    // Streamed: one token per event of three characters.
    body["stream"] = json!(true);
    let raw = body_text(gw.post("/v1/chat/completions", &body).await).await;
    let ev = events(&raw);
    let mut spelled = String::new();
    let mut all_bytes = Vec::new();
    for e in &ev {
        for t in e
            .pointer("/choices/0/logprobs/content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            spelled.push_str(t["token"].as_str().unwrap());
            all_bytes.extend(
                t["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8),
            );
        }
    }
    assert_eq!(spelled, "the token is [REDACTED:github-token] ok");
    assert_eq!(String::from_utf8(all_bytes).unwrap(), spelled);
    assert!(!raw.contains(&secret[4..12]), "{raw}");
    // Legacy completions logprobs.
    let body = json!({"model": "mock-small", "prompt": prompt, "logprobs": 1});
    let reply: Value = gw
        .post("/v1/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    assert!(!reply.to_string().contains(&secret[4..12]), "{reply}");
    let spelled: String = reply["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(spelled, "the token is [REDACTED:github-token] ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_03_every_field_that_carries_generated_text_is_redacted() {
    let mock = Mock::start(small_chunks()).await;
    let mut setup = Setup::new(mock.addr);
    setup.extra_yaml = redaction_yaml();
    tools_yaml(&mut setup);
    let gw = Gateway::start(setup).await;
    let secret = github_token();
    let half = secret.len() / 2;
    let m = json!({
        "content": [{"type": "text", "text": format!("one {}", &secret[..half])},
                    {"type": "text", "text": format!("{} two", &secret[half..])}],
        "refusal": format!("refused {secret}"),
        "reasoning_content": format!("thinking about {secret}"),
        "audio": {"id": "audio_1", "data": "UklGRiQAAABXQVZF", "expires_at": 1, "transcript": format!("say {secret}")},
        "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json!({"city": secret}).to_string()}}],
    });
    let legacy = json!({"function_call": {"name": "get_weather", "arguments": json!({"city": secret}).to_string()}});
    for stream in [false, true] {
        for msg in [&m, &legacy] {
            let mut body = message(msg.clone());
            body["stream"] = json!(stream);
            let r = gw.post("/v1/chat/completions", &body).await;
            assert_eq!(r.status(), 200);
            let id = request_id(&r);
            let raw = body_text(r).await;
            assert!(!raw.contains(&secret[4..14]), "stream={stream}: {raw}");
            assert!(!raw.contains(&secret[half..half + 8]), "{raw}");
            assert!(raw.contains("[REDACTED:github-token]"), "{raw}");
            let rec = gw.record_for(&id).await;
            assert!(
                outcome(&rec, "redact")["annotations"][0]["value"]["github-token"]
                    .as_u64()
                    .is_some_and(|n| n >= 1)
            );
            if msg.get("tool_calls").is_some() {
                // The allowed call still reaches the client, arguments as JSON.
                let args = if stream {
                    joined(&events(&raw), 0, "/delta/tool_calls/0/function/arguments")
                        + &joined(&events(&raw), 0, "/delta/tool_calls/1/function/arguments")
                } else {
                    let v: Value = serde_json::from_str(&raw).unwrap();
                    v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                        .as_str()
                        .unwrap()
                        .to_string()
                };
                let parsed: Value = serde_json::from_str(&args).expect("arguments stay JSON");
                assert_eq!(parsed["city"], "[REDACTED:github-token]");
                // The audio that said the secret is withheld.
                assert!(!raw.contains("UklGRiQAAABXQVZF"), "{raw}");
                assert_eq!(
                    outcome(&rec, "redact")["annotations"][1]["key"],
                    "audio_withheld"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_04_an_unparseable_sse_line_ends_the_stream_with_an_error() {
    let (_mock, gw) = redacting(options()).await;
    let secret = github_token();
    let good =
        json!({"choices": [{"index": 0, "delta": {"content": "fine "}, "finish_reason": null}]});
    for bad in [
        format!("{{\"choices\": [{{\"delta\": {{\"content\": \"{secret}\""),
        format!("not json {secret}"),
        format!("\"{secret}\""),
    ] {
        let trigger = json!({"mock_raw_events": [good, bad, good]}).to_string();
        let mut body = chat(&trigger);
        body["stream"] = json!(true);
        let r = gw.post("/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let raw = body_text(r).await;
        assert!(!raw.contains(&secret[4..14]), "{raw}");
        assert!(!raw.contains("[DONE]"), "{raw}");
        let last = events(&raw).pop().unwrap();
        assert_eq!(last["error"]["code"], "upstream_error", "{raw}");
        let rec = gw.record_for(&id).await;
        assert_eq!(rec["decision"], "error");
        assert_eq!(rec["reason_code"], "upstream_error");
        assert!(rec["reason"]
            .as_str()
            .unwrap()
            .contains("not a JSON object"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_05_request_redaction_covers_prompts_and_embedding_inputs() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.extra_yaml += &format!("{}  request_tenants: [acme]\n", redaction_yaml());
    let gw = Gateway::start(setup).await;
    let user = keys.token("u", &["user"]);
    let secret = github_token();
    let client = reqwest::Client::new();
    let send = |path: &str, body: Value| {
        client
            .post(gw.url(path))
            .bearer_auth(&user)
            .json(&body)
            .send()
    };
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "mock-small", "prompt": format!("k {secret}")}),
        ),
        (
            "/v1/completions",
            json!({"model": "mock-small", "prompt": ["a", format!("k {secret}")]}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock-small", "input": format!("k {secret}")}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock-small", "input": [format!("k {secret}")]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "mock-small", "messages": [
            {"role": "user", "content": ["plain string part", format!("k {secret}")]}]}),
        ),
    ] {
        let r = send(path, body).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let sent = mock.state.last_request().unwrap();
        let sent = String::from_utf8_lossy(&sent.body);
        assert!(!sent.contains(&secret[4..14]), "{path}: {sent}");
        assert!(sent.contains("[REDACTED:github-token]"), "{path}: {sent}");
        let rec = gw.record_for(&request_id(&r)).await;
        assert_eq!(
            outcome(&rec, "request_redaction")["annotations"][0]["value"]["github-token"],
            1
        );
    }
    // Token ids cannot be screened: refused, nothing forwarded.
    let before = mock.state.requests().len();
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "mock-small", "prompt": [[1, 2, 3]]}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock-small", "input": [1, 2, 3]}),
        ),
    ] {
        let id = expect_error(send(path, body).await.unwrap(), 400, "invalid_request").await;
        let rec = gw.record_for(&id).await;
        assert_eq!(rec["blocked_by"], "request_redaction");
        assert!(rec["reason"].as_str().unwrap().contains("token ids"));
    }
    assert_eq!(mock.state.requests().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_06_legacy_functions_are_authorized_like_tools() {
    let (mock, gw, user) = with_tools().await;
    for body in [
        json!({"model": "mock-small", "functions": [{"name": "delete_records", "parameters": {}}],
            "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "mock-small", "function_call": {"name": "delete_records"},
            "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "mock-small", "messages": [
            {"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{}"}},
            {"role": "function", "name": "delete_records", "content": "done"}]}),
    ] {
        let id = expect_error(post_as(&gw, &user, &body).await, 403, "tool_not_allowed").await;
        let rec = gw.record_for(&id).await;
        assert_eq!(rec["blocked_by"], "tool_authz");
        assert!(rec["reason"].as_str().unwrap().contains("delete_records"));
    }
    assert!(mock.state.requests().is_empty(), "nothing was forwarded");
    // A model's legacy call to a denied tool is removed, JSON and streamed.
    let call =
        json!({"function_call": {"name": "delete_records", "arguments": "{\"table\":\"users\"}"}});
    for stream in [false, true] {
        let mut body = message(call.clone());
        body["stream"] = json!(stream);
        let r = post_as(&gw, &user, &body).await;
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let raw = body_text(r).await;
        assert!(
            !raw.contains("delete_records") && !raw.contains("users"),
            "{raw}"
        );
        assert!(raw.contains("blocked by policy"), "{raw}");
        let rec = gw.record_for(&id).await;
        assert_eq!(
            outcome(&rec, "response_tool_authz")["annotations"][1]["value"][0],
            "delete_records"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_07_every_choice_of_a_stream_event_is_checked() {
    let (_mock, gw, user) = with_tools().await;
    let trigger =
        json!({"mock_tool_call": {"name": "delete_records", "arguments": {"table": "users"}}});
    let body = json!({"model": "mock-small", "stream": true, "n": 3,
        "messages": [{"role": "user", "content": trigger.to_string()}]});
    let r = post_as(&gw, &user, &body).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let raw = body_text(r).await;
    assert!(
        !raw.contains("delete_records") && !raw.contains("users"),
        "{raw}"
    );
    let ev = events(&raw);
    for i in 0..3 {
        assert!(
            joined(&ev, i, "/delta/content").contains("blocked by policy"),
            "choice {i}: {raw}"
        );
    }
    let rec = gw.record_for(&id).await;
    assert_eq!(
        outcome(&rec, "response_tool_authz")["annotations"][1]["value"],
        json!(["delete_records", "delete_records", "delete_records"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_08_token_budgets_cannot_be_dodged() {
    // Events 20 ms apart: after the client leaves, the gateway's writes
    // come one at a time, so the one after the client's reset fails (all
    // at once, they could all land in the socket buffer first).
    let mock = Mock::start(MockOptions {
        event_delay_ms: 20,
        ..options()
    })
    .await;
    let keys = TestKeys::new();
    let gw = Gateway::start(secured(mock.addr, &keys, TEST_LIMITS)).await;
    let header = |r: &reqwest::Response, name: &str| -> Option<u64> {
        r.headers().get(name)?.to_str().ok()?.parse().ok()
    };
    // The trial tier has 100 tokens a minute. Overflowing max_tokens is
    // refused, not wrapped or crashed.
    let t = keys.token("overflow", &["trial"]);
    let body = json!({"model": "mock-small", "max_tokens": u64::MAX, "n": 128,
        "messages": [{"role": "user", "content": "hi"}]});
    let id = expect_error(post_as(&gw, &t, &body).await, 429, "token_budget_exceeded").await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["blocked_by"], "rate_limit");
    assert!(rec["reason"].as_str().unwrap().contains("token budget"));
    // n choices cost n completions: 3 x 40 is over the budget, 1 x 40 is not.
    let t = keys.token("n-user", &["trial"]);
    let body = |n: u64| {
        json!({"model": "mock-small", "max_tokens": 40, "n": n,
            "messages": [{"role": "user", "content": "hi"}]})
    };
    let id = expect_error(
        post_as(&gw, &t, &body(3)).await,
        429,
        "token_budget_exceeded",
    )
    .await;
    assert!(gw.record_for(&id).await["reason"]
        .as_str()
        .unwrap()
        .contains("estimate 121"));
    assert_eq!(post_as(&gw, &t, &body(1)).await.status(), 200);
    // A client that leaves mid-stream is charged what was generated, not
    // the 90-token estimate.
    let t = keys.token("leaver", &["trial"]);
    mock.state.hold_streams();
    let body = json!({"model": "mock-small", "max_tokens": 90, "stream": true,
        "messages": [{"role": "user", "content": "a long answer is coming"}]});
    let r = post_as(&gw, &t, &body).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let mut stream = r.bytes_stream();
    let _first = stream.next().await.expect("first event");
    drop(stream);
    // The gateway notices at its next write, once the provider goes on.
    mock.state.release();
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["reason"], "client disconnected mid-stream");
    let small = json!({"model": "mock-small", "max_tokens": 1,
        "messages": [{"role": "user", "content": "x"}]});
    let r = post_as(&gw, &t, &small).await;
    assert_eq!(r.status(), 200);
    let remaining = header(&r, "x-ratelimit-remaining-tokens").unwrap();
    // 100 - (6 prompt + at most a few generated) - 2 for this request; with
    // the estimate kept it would be 100 - 96 - 2 = 2.
    assert!(remaining >= 80, "remaining {remaining}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_09_duplicate_json_keys_are_refused() {
    let (mock, gw, user) = with_tools().await;
    for raw in [
        r#"{"model":"mock-small","model":"mock-large","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"mock-small","tools":[{"type":"function","function":{"name":"delete_records"}}],"messages":[{"role":"user","content":"hi"}],"tools":[]}"#,
        r#"{"model":"mock-small","messages":[{"role":"user","content":"hi","role":"system"}]}"#,
    ] {
        let r = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&user)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let id = expect_error(r, 400, "invalid_request").await;
        let rec = gw.record_for(&id).await;
        assert_eq!(rec["blocked_by"], "intake");
        assert!(rec["reason"].as_str().unwrap().contains("duplicate key"));
    }
    assert!(mock.state.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_13_no_client_or_provider_input_crashes_a_request() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.extra_yaml += &format!("{}  request_tenants: [acme]\n", redaction_yaml());
    tools_yaml(&mut setup);
    setup.env.push(("PORTCULLIS_TEST_PANIC".into(), "1".into()));
    let gw = Gateway::start(setup).await;
    let user = keys.token("u", &["user"]);
    // Client input: every shipped tier reads stream_options.
    let body = json!({"model": "mock-small", "stream": true, "stream_options": "x",
        "messages": [{"role": "user", "content": "hi"}]});
    let id = expect_error(post_as(&gw, &user, &body).await, 400, "invalid_request").await;
    assert!(gw.record_for(&id).await["reason"]
        .as_str()
        .unwrap()
        .contains("stream_options"));
    let body =
        json!({"model": "mock-small", "messages": [{"role": "user", "content": ["hi", 5, null]}]});
    assert_eq!(post_as(&gw, &user, &body).await.status(), 200);
    // Provider replies of unexpected shapes.
    for reply in [
        json!({"choices": "x"}),
        json!({"choices": [5, {"message": 5}, {"message": {"tool_calls": "x", "content": 7}}]}),
    ] {
        let r = post_as(&gw, &user, &chat(&json!({"mock_raw": reply}).to_string())).await;
        assert_eq!(r.status(), 200, "{reply}");
    }
    // A reply that is JSON but no object is no reply the stages can read:
    // refused, not passed on unscreened.
    let r = post_as(&gw, &user, &chat(&json!({"mock_raw": [1, 2]}).to_string())).await;
    expect_error(r, 502, "upstream_error").await;
    for event in [
        json!({"choices": [{"delta": 5}]}),
        json!({"choices": [{"index": "x", "delta": {"tool_calls": [5, {"index": "y"}]}, "finish_reason": 1}]}),
        json!({"choices": 5}),
    ] {
        let mut body = chat(&json!({"mock_raw_events": [event]}).to_string());
        body["stream"] = json!(true);
        let raw = body_text(post_as(&gw, &user, &body).await).await;
        assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    }
    // A request that unwinds still gets a 500 and an audit record.
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&user)
        .header("x-portcullis-test-panic", "1")
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    let id = expect_error(r, 500, "internal_error").await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["reason_code"], "internal_error");
    assert!(rec["reason"].as_str().unwrap().contains("panic"));
    // The gateway still serves.
    assert_eq!(post_as(&gw, &user, &chat("after")).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_429_keeps_its_retry_after() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let r = gw
        .post("/v1/chat/completions", &chat(r#"{"mock_error": 429}"#))
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    // With the gateway's own limits, its x-ratelimit-* win; Retry-After is
    // still the provider's.
    let keys = TestKeys::new();
    let gw = Gateway::start(secured(mock.addr, &keys, TEST_LIMITS)).await;
    let r = post_as(
        &gw,
        &keys.token("u", &["user"]),
        &chat(r#"{"mock_error": 429}"#),
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_ne!(r.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "6000");
}

/// No source file writes untrusted JSON through `value["key"]` (serde_json's
/// `IndexMut` panics on a value that is not an object): see
/// `filters::json`. Test modules are left out.
#[test]
fn untrusted_json_is_never_written_through_index_mut() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![root.join("src"), root.join("filters/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_none_or(|n| n != "tests.rs")
            {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 20, "sources not found");
    let mut found = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let line = line.trim();
            if line.starts_with("//") {
                continue;
            }
            let bad = line.match_indices("\"]").any(|(i, _)| {
                let rest = line[i + 2..].trim_start();
                (rest.starts_with('=') && !rest.starts_with("=="))
                    || rest.starts_with(".as_array_mut")
                    || rest.starts_with(".as_object_mut")
            }) || line.match_indices("&mut ").any(|(i, _)| {
                let rest = &line[i + 5..];
                let ident = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .unwrap_or(rest.len());
                ident > 0 && rest[ident..].starts_with("[\"")
            });
            if bad {
                found.push(format!("{}:{}: {line}", path.display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "IndexMut on JSON:\n{}", found.join("\n"));
}

/// The admin records, newest last.
fn admin_records(gw: &Gateway) -> Vec<Value> {
    read_records(&gw.audit_path)
        .into_iter()
        .filter(|r| r["kind"] == "admin")
        .collect()
}

/// The admin record of a response (by its `x-request-id`).
async fn admin_record(gw: &Gateway, id: &str) -> Value {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(r) = admin_records(gw)
            .into_iter()
            .find(|r| r["request_id"] == id)
        {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "no admin record {id}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn admin_gateway(extra: &str) -> (Mock, TestKeys, Gateway) {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.extra_yaml += extra;
    let gw = Gateway::start(setup).await;
    (mock, keys, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_11_a_frozen_admin_can_do_nothing() {
    let (_mock, keys, gw) = admin_gateway("").await;
    let root = keys.token("root", &["portcullis:admin"]);
    let mallory = keys.token("mallory", &["portcullis:admin"]);
    let path = |who: &str, action: &str| format!("/admin/subjects/{who}/{action}");
    let r = admin(&gw, Some(&root), "POST", &path("mallory", "freeze"), None).await;
    assert_eq!(r.status(), 200);
    // Nobody freezes itself or its own tenant by mistake.
    let id = expect_error(
        admin(&gw, Some(&root), "POST", &path("root", "freeze"), None).await,
        409,
        "invalid_transition",
    )
    .await;
    assert!(admin_record(&gw, &id).await["reason"]
        .as_str()
        .unwrap()
        .contains("itself"));
    expect_error(
        admin(&gw, Some(&root), "POST", "/admin/tenants/acme/freeze", None).await,
        409,
        "invalid_transition",
    )
    .await;
    for (method, p) in [
        ("POST", path("mallory", "unfreeze")),
        ("POST", path("root", "freeze")),
        ("GET", "/admin/models".to_string()),
    ] {
        let id = expect_error(
            admin(&gw, Some(&mallory), method, &p, None).await,
            403,
            "subject_frozen",
        )
        .await;
        let rec = admin_record(&gw, &id).await;
        assert_eq!(rec["decision"], "blocked");
        assert_eq!(rec["reason_code"], "subject_frozen");
        assert!(rec["reason"].as_str().unwrap().contains("frozen by root"));
    }
    // Another admin can lift it.
    let r = admin(&gw, Some(&root), "POST", &path("mallory", "unfreeze"), None).await;
    assert_eq!(r.status(), 200);
    let r = admin(&gw, Some(&mallory), "GET", "/admin/models", None).await;
    assert_eq!(r.status(), 200);
    // A frozen tenant freezes its admins too.
    let other = keys.sign(
        "test",
        &json!({"sub": "ops1", "tenant": "globex", "roles": ["portcullis:admin"], "iss": "test-issuer",
            "aud": "portcullis", "exp": now_secs() + 600}),
    );
    let r = admin(
        &gw,
        Some(&root),
        "POST",
        "/admin/tenants/globex/freeze",
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    expect_error(
        admin(&gw, Some(&other), "GET", "/admin/models", None).await,
        403,
        "tenant_frozen",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_11_path_parameters_are_percent_decoded() {
    let (_mock, keys, gw) = admin_gateway("").await;
    let root = keys.token("root", &["portcullis:admin"]);
    let id = "meta-llama/Llama-3";
    let new = json!({"id": id, "provider": "mock", "risk_tier": "low"});
    let r = admin(&gw, Some(&root), "POST", "/admin/models", Some(&new)).await;
    assert_eq!(r.status(), 201);
    let r = admin(
        &gw,
        Some(&root),
        "GET",
        "/admin/models/meta-llama%2FLlama-3",
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id);
    for action in ["approve", "freeze"] {
        let p = format!("/admin/models/meta-llama%2FLlama-3/{action}");
        assert_eq!(
            admin(&gw, Some(&root), "POST", &p, None).await.status(),
            200,
            "{action}"
        );
    }
    let user = keys.token("u", &["user"]);
    let body = json!({"model": id, "messages": [{"role": "user", "content": "hi"}]});
    expect_error(post_as(&gw, &user, &body).await, 403, "model_frozen").await;
    // `a%20b` freezes subject "a b", not "a%20b".
    let r = admin(
        &gw,
        Some(&root),
        "POST",
        "/admin/subjects/a%20b/freeze",
        None,
    )
    .await;
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "a b");
    let ab = keys.token("a b", &["user"]);
    expect_error(post_as(&gw, &ab, &chat("hi")).await, 403, "subject_frozen").await;
    // A broken escape is a clear 400.
    let r = admin(&gw, Some(&root), "POST", "/admin/subjects/%ZZ/freeze", None).await;
    let id = expect_error(r, 400, "invalid_request").await;
    assert!(admin_record(&gw, &id).await["reason"]
        .as_str()
        .unwrap()
        .contains("percent-encoded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue8_11_admin_bodies_are_capped_and_read_only_after_auth() {
    let (_mock, keys, gw) = admin_gateway("admin:\n  header_read_timeout_secs: 1\n").await;
    let root = keys.token("root", &["portcullis:admin"]);
    let big = portcullis::admin::MAX_ADMIN_BODY + 1;
    // Headers that announce a body over the cap, and no body at all: the
    // answer comes without the gateway waiting for a byte of it.
    let head = |token: Option<&str>| {
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!("POST /admin/simulate HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {big}\r\n\r\n")
    };
    let addr = gw.admin.trim_start_matches("http://").to_string();
    let answer = |request: String| {
        let addr = addr.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(request.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, c.read(&mut buf))
                .await
                .expect("an answer before the body")
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    };
    let no_token = answer(head(None)).await;
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    let declared = answer(head(Some(&root))).await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(declared.contains("request_too_large"), "{declared}");
    let id = declared
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        admin_record(&gw, &id).await["reason_code"],
        "request_too_large"
    );
    // A chunked body that grows past the cap: 413 too. The body is sent
    // from its own task: the gateway stops reading at the cap.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let c = tokio::net::TcpStream::connect(addr.clone()).await.unwrap();
        let (mut rd, mut wr) = c.into_split();
        let head = format!("POST /admin/simulate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {root}\r\ntransfer-encoding: chunked\r\n\r\n");
        tokio::spawn(async move {
            let _ = wr.write_all(head.as_bytes()).await;
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..20 {
                let frame = [
                    format!("{:x}\r\n", chunk.len()).into_bytes(),
                    chunk.clone(),
                    b"\r\n".to_vec(),
                ]
                .concat();
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
            let _ = wr.write_all(b"0\r\n\r\n").await;
        });
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, rd.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    }
    // A client that never finishes its headers is disconnected.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /admin/models HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the admin listener kept a slow client forever"
    );
}
