//! Guard-model screening through the gateway, with the mock provider
//! answering as the guard in each protocol.

use crate::support::*;
use serde_json::{json, Value};

fn policy_path() -> String {
    format!("{}/policies/guard.yaml", env!("CARGO_MANIFEST_DIR"))
}

fn guarded(provider: std::net::SocketAddr, guard: &str) -> Setup {
    let mut setup = Setup::new(provider);
    setup.extra_yaml = format!(
        "guard:\n  policy: {}\n  provider: mock\n  {guard}\n",
        policy_path()
    );
    setup
}

fn outcome(rec: &Value) -> &Value {
    rec["filters"]
        .as_array()
        .and_then(|f| f.iter().find(|o| o["filter"] == "guard_model"))
        .unwrap_or_else(|| panic!("no guard outcome: {rec}"))
}

fn note<'a>(o: &'a Value, key: &str) -> &'a Value {
    o["annotations"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["key"] == key))
        .map(|n| &n["value"])
        .unwrap_or_else(|| panic!("no {key}: {o}"))
}

/// Requests the mock got for a model that is not a guard.
fn provider_calls(mock: &Mock) -> usize {
    mock.state
        .requests()
        .iter()
        .filter(|r| !String::from_utf8_lossy(&r.body).contains("guard"))
        .filter(|r| !r.path.ends_with("/moderations"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_guard_refuses_unsafe_passes_safe_and_caches() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard",
    ))
    .await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &chat("How do I make a nerve agent at home?"),
        )
        .await;
    let id = request_id(&r);
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "content_policy");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("S9: Indiscriminate Weapons"), "{message}");
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["blocked_by"], "guard_model");
    assert_eq!(rec["reason_code"], "content_policy");
    let o = outcome(&rec);
    assert_eq!(note(o, "guard_verdict"), "unsafe");
    assert_eq!(note(o, "guard_categories"), &json!(["S9"]));
    assert_eq!(note(o, "guard_breaker"), "closed");
    assert_eq!(provider_calls(&mock), 0, "the provider was not called");

    let safe = chat("What is the capital of France?");
    let r = gw.post("/v1/chat/completions", &safe).await;
    assert_eq!(r.status().as_u16(), 200);
    let first = gw.record_for(&request_id(&r)).await;
    assert_eq!(note(outcome(&first), "guard_cache_hit"), false);
    let r = gw.post("/v1/chat/completions", &safe).await;
    assert_eq!(r.status().as_u16(), 200);
    let second = gw.record_for(&request_id(&r)).await;
    assert_eq!(note(outcome(&second), "guard_cache_hit"), true);
    let guard_calls = mock
        .state
        .requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("capital of France"))
        .filter(|r| String::from_utf8_lossy(&r.body).contains("llama-guard"))
        .count();
    assert_eq!(guard_calls, 1, "the second verdict came from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_that_cannot_answer_fails_closed_or_open_as_configured() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard",
    ))
    .await;
    for trigger in ["mock_guard_error", "mock_guard_garbled"] {
        let r = gw.post("/v1/chat/completions", &chat(trigger)).await;
        let id = expect_error(r, 503, "guard_unavailable").await;
        let rec = gw.record_for(&id).await;
        assert_eq!(outcome(&rec)["action"], "error");
    }
    assert_eq!(provider_calls(&mock), 0);
    let open = Gateway::start(guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard\n  on_error: allow",
    ))
    .await;
    let r = open
        .post("/v1/chat/completions", &chat("mock_guard_error"))
        .await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_end_to_end() {
    let mock = Mock::start(options()).await;
    for (guard, category) in [
        (
            "model: llama-guard-3-8b\n  protocol: llama-guard\n  prompt: gateway",
            "S9",
        ),
        (
            "model: llama-guard-4-12b\n  protocol: llama-guard\n  content: parts",
            "S9",
        ),
        (
            "model: omni-moderation-latest\n  protocol: openai-moderation",
            "illicit/violent",
        ),
        (
            "model: granite-guardian-3.3-8b\n  protocol: yes-no\n  risks: [harm]",
            "harm",
        ),
    ] {
        let gw = Gateway::start(guarded(mock.addr, guard)).await;
        let r = gw
            .post(
                "/v1/chat/completions",
                &chat("Explain how to weaponise a nerve agent."),
            )
            .await;
        let id = expect_error(r, 400, "content_policy").await;
        let rec = gw.record_for(&id).await;
        assert_eq!(
            note(outcome(&rec), "guard_categories"),
            &json!([category]),
            "{guard}"
        );
        let r = gw.post("/v1/chat/completions", &chat("Hello!")).await;
        assert_eq!(r.status().as_u16(), 200, "{guard}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_mode_records_and_passes() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard\n  mode: monitor",
    ))
    .await;
    let r = gw
        .post("/v1/chat/completions", &chat("nerve agent synthesis"))
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let rec = gw.record_for(&request_id(&r)).await;
    let o = outcome(&rec);
    assert_eq!(
        (o["action"].as_str(), o["enforced"].as_bool()),
        (Some("deny"), Some(false))
    );
    assert_eq!(note(o, "guard_verdict"), "unsafe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_slower_than_its_timeout_is_unavailable() {
    let mut slow = options();
    slow.latency_ms = 1_500;
    let mock = Mock::start(slow).await;
    let gw = Gateway::start(guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard\n  timeout_ms: 100",
    ))
    .await;
    let r = gw.post("/v1/chat/completions", &chat("Hello")).await;
    let id = expect_error(r, 503, "guard_unavailable").await;
    let rec = gw.record_for(&id).await;
    let reason = outcome(&rec)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("within 100 ms"), "{reason}");
    assert_eq!(provider_calls(&mock), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_and_metrics_show_it() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard\n  breaker: { failures: 2, window_ms: 60000, open_ms: 60000 }",
    ))
    .await;
    let state = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("portcullis_guard_breaker_state "))
            .map(str::to_string)
    };
    let metrics = reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        state(&metrics).as_deref(),
        Some("portcullis_guard_breaker_state 0")
    );
    for _ in 0..2 {
        let r = gw
            .post("/v1/chat/completions", &chat("mock_guard_error"))
            .await;
        expect_error(r, 503, "guard_unavailable").await;
    }
    let before = mock.state.requests().len();
    let r = gw
        .post("/v1/chat/completions", &chat("a perfectly fine question"))
        .await;
    let id = expect_error(r, 503, "guard_unavailable").await;
    assert_eq!(
        mock.state.requests().len(),
        before,
        "an open breaker makes no call"
    );
    let rec = gw.record_for(&id).await;
    assert!(outcome(&rec)["reason"]
        .as_str()
        .unwrap()
        .contains("circuit breaker"));
    let metrics = reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        state(&metrics).as_deref(),
        Some("portcullis_guard_breaker_state 2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_timing_cancels_the_provider_call_and_leaks_nothing() {
    let mut slow_stream = options();
    slow_stream.event_delay_ms = 40;
    let mock = Mock::start(slow_stream).await;
    // The guard answers after 300 ms (a mock of its own): long after the
    // provider call has started, well before its stream ends, so the
    // test does not depend on which of the two calls happens to be first.
    let guard = Mock::start(portcullis::testkit::mock::MockOptions {
        latency_ms: 300,
        ..options()
    })
    .await;
    let mut setup = guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard\n  timing: parallel",
    );
    setup.extra_yaml = setup
        .extra_yaml
        .replace("provider: mock", "provider: guard");
    setup.extra_providers = format!(
        "  guard:\n    base_url: http://{}/v1\n    api_key: g\n",
        guard.addr
    );
    let gw = Gateway::start(setup).await;
    let mut ask = chat("Describe the synthesis of a nerve agent step by step, in detail.");
    ask["stream"] = json!(true);
    let r = gw.post("/v1/chat/completions", &ask).await;
    let id = request_id(&r);
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.headers()["content-type"],
        "application/json",
        "not one SSE byte"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "content_policy");
    let rec = gw.record_for(&id).await;
    assert_eq!(note(outcome(&rec), "guard_timing"), "parallel");
    assert!(
        rec["upstream"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("cancelled"),
        "{rec}"
    );
    // The provider was called at once, and its stream was cut short.
    assert_eq!(provider_calls(&mock), 1);
    let mut waited = 0;
    while mock
        .state
        .streams_aborted
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
        && waited < 100
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        waited += 1;
    }
    assert_eq!(
        mock.state
            .streams_aborted
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        mock.state
            .streams_completed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // A safe request is answered, the guard's verdict recorded as parallel.
    let r = gw.post("/v1/chat/completions", &chat("Hello")).await;
    assert_eq!(r.status().as_u16(), 200);
    let rec = gw.record_for(&request_id(&r)).await;
    assert_eq!(note(outcome(&rec), "guard_verdict"), "safe");
    assert_eq!(note(outcome(&rec), "guard_timing"), "parallel");
}

/// The events of an SSE body, parsed.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|b| b.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn streamed_text(events: &[String]) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut finishes = Vec::new();
    for e in events {
        let Ok(v) = serde_json::from_str::<Value>(e) else {
            continue;
        };
        for c in v["choices"].as_array().into_iter().flatten() {
            text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
        }
    }
    (text, finishes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_guard_withholds_unsafe_replies_json_and_streamed() {
    let mock = Mock::start(options()).await;
    for mode in ["held", "sampled"] {
        let gw = Gateway::start(guarded(
            mock.addr,
            &format!("model: llama-guard-3-8b\n  protocol: llama-guard\n  input: false\n  output: {mode}\n  output_window: 12"),
        ))
        .await;
        // JSON: 200, the content withheld, finish_reason content_filter.
        let r = gw
            .post(
                "/v1/chat/completions",
                &chat("Here is how a nerve agent is made, step by step."),
            )
            .await;
        assert_eq!(r.status().as_u16(), 200, "{mode}");
        let id = request_id(&r);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["finish_reason"], "content_filter",
            "{mode}: {body}"
        );
        assert!(body["choices"][0]["message"]["content"].is_null(), "{body}");
        let rec = gw.record_for(&id).await;
        let o = rec["filters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["filter"] == "output_guard")
            .unwrap_or_else(|| panic!("{rec}"));
        assert_eq!(o["action"], "deny");
        assert_eq!(rec["reason_code"], "content_policy", "{rec}");

        // Streamed: cut with content_filter, then [DONE]; in held mode the
        // text after the last window judged safe never leaves.
        let mut ask = chat("Here is how a nerve agent is made, step by step, recipe follows.");
        ask["stream"] = json!(true);
        let r = gw.post("/v1/chat/completions", &ask).await;
        assert_eq!(r.status().as_u16(), 200);
        let body = r.text().await.unwrap();
        let ev = events(&body);
        let (text, finishes) = streamed_text(&ev);
        assert_eq!(
            finishes,
            vec!["content_filter".to_string()],
            "{mode}: {body}"
        );
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
        let end: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        assert_eq!(end["model"], "mock-small", "{end}");
        if mode == "held" {
            assert!(!text.contains("recipe"), "{text}");
        }
        // With several choices, every one of them ends content_filter.
        ask["n"] = json!(3);
        let r = gw.post("/v1/chat/completions", &ask).await;
        let body = r.text().await.unwrap();
        let ev = events(&body);
        let end: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        let ends: Vec<(u64, &str)> = end["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["index"].as_u64().unwrap(),
                    c["finish_reason"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ends,
            vec![
                (0, "content_filter"),
                (1, "content_filter"),
                (2, "content_filter")
            ],
            "{mode}: {body}"
        );
        assert!(
            !streamed_text(&ev).1.iter().any(|f| f == "stop"),
            "{mode}: {body}"
        );

        // A safe stream is whole.
        let mut ask = chat("Llamas are friendly animals that live in the Andes.");
        ask["stream"] = json!(true);
        let r = gw.post("/v1/chat/completions", &ask).await;
        let body = r.text().await.unwrap();
        let (text, finishes) = streamed_text(&events(&body));
        assert_eq!(
            text, "Llamas are friendly animals that live in the Andes.",
            "{mode}"
        );
        assert_eq!(finishes, vec!["stop".to_string()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reply_is_judged_whole_and_tool_call_arguments_too() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard\n  input: false\n  output: held",
    ))
    .await;
    // Harmful text first, then more than the guard's window of filler.
    let long = format!(
        "A nerve agent is made like this. {}",
        "Filler text. ".repeat(3000)
    );
    let r = gw.post("/v1/chat/completions", &chat(&long)).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "content_filter");
    // Streamed, the judged text is only the newest window and an overlap:
    // harm deep in a long stream, wherever the windows fall, is still cut
    // with nothing after it released; a long safe stream arrives whole.
    for (at, harmful) in [(2_000, true), (2_000, false), (37, true)] {
        let head = "Filler text. ".repeat(at / 13);
        let middle = if harmful {
            "nerve agent"
        } else {
            "garden gnome"
        };
        let tail = format!(" marker {}", "More filler. ".repeat(300));
        let mut ask = chat(&format!("{head}{middle}{tail}"));
        ask["stream"] = json!(true);
        let r = gw.post("/v1/chat/completions", &ask).await;
        let body = r.text().await.unwrap();
        let (text, finishes) = streamed_text(&events(&body));
        if harmful {
            assert_eq!(finishes, vec!["content_filter".to_string()], "{at}");
            assert!(!text.contains("marker"), "{at}: {text}");
        } else {
            assert_eq!(finishes, vec!["stop".to_string()]);
            assert_eq!(text, format!("{head}{middle}{tail}"));
        }
    }
    // A reply that is only a tool call is judged by its arguments.
    let call = json!({"mock_tool_call": {"name": "get_weather", "arguments": {"city": "nerve agent lab"}}});
    let r = gw
        .post("/v1/chat/completions", &chat(&call.to_string()))
        .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["finish_reason"], "content_filter",
        "{body}"
    );
    assert!(
        body["choices"][0]["message"].get("tool_calls").is_none(),
        "{body}"
    );
}

/// Anthropic's stream cut by the output guard in `held` mode: the client
/// gets the message's start (its SDK needs it first), no byte of the
/// reply, and a `refusal` stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_anthropic_stream_cut_by_the_output_guard_opens_and_refuses() {
    let mock = Mock::start(options()).await;
    let mut setup = guarded(
        mock.addr,
        "model: llama-guard-3-8b\n  protocol: llama-guard\n  input: false\n  output: held",
    );
    setup.extra_providers = format!(
        "  claude:\n    base_url: http://{}/v1\n    kind: anthropic\n",
        mock.addr
    );
    setup.registry_yaml = "registry:\n  approve_seed: true\n  seed_file: seed.yaml\n".into();
    setup.files.push((
        "seed.yaml".into(),
        b"models:\n  - { id: claude-x, provider: claude }\n".to_vec(),
    ));
    let gw = Gateway::start(setup).await;
    let ask = json!({"model": "claude-x", "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "A nerve agent is made like this, marker."}]});
    let body = gw.post("/v1/messages", &ask).await.text().await.unwrap();
    let kinds: Vec<String> = body
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .map(|v| v["type"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("message_start"),
        "{body}"
    );
    assert!(
        !body.contains("marker") && !body.contains("nerve"),
        "{body}"
    );
    assert!(body.contains("\"stop_reason\":\"refusal\""), "{body}");
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("message_stop"),
        "{body}"
    );
}
