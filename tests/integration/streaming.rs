//! Streamed (SSE) responses.

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn text_of(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_reaches_the_client_before_the_provider_finishes() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    // The mock sends its first event, then waits until released: a gateway
    // that buffered the stream would deliver nothing and hit the deadline.
    mock.state.hold_streams();
    let resp = gw
        .post(
            "/v1/chat/completions",
            &stream_chat("streamed echo, chunk by chunk"),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let id = request_id(&resp);
    let mut events = Events::new(resp);
    let first = events.next().await.expect("first event");
    assert_eq!(mock.state.streams_completed.load(Ordering::SeqCst), 0);
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    mock.state.release();
    let rest = events.rest().await;
    assert_eq!(text_of(&rest), "streamed echo, chunk by chunk");
    assert_eq!(rest.last().unwrap(), "[DONE]");
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "allowed");
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["usage"]["completion_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_one_by_one_with_a_slow_provider() {
    let mock = Mock::start(portcullis::testkit::mock::MockOptions {
        event_delay_ms: 30,
        chunk_bytes: 2,
        ..options()
    })
    .await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let resp = gw
        .post("/v1/chat/completions", &stream_chat("abcdefghij"))
        .await;
    let mut body = resp.bytes_stream();
    let mut chunks = 0;
    let mut text = String::new();
    let started = Instant::now();
    while let Some(chunk) = body.next().await {
        chunks += 1;
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        assert!(started.elapsed() < Duration::from_secs(20), "stream hung");
    }
    // 1 role + 5 content + finish + usage + [DONE] events, each its own chunk.
    assert!(chunks >= 5, "stream was buffered into {chunks} chunks");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_completions_and_tool_calls_pass_through() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let resp = gw
        .post(
            "/v1/completions",
            &json!({"model": "mock-small", "prompt": "complete me", "stream": true}),
        )
        .await;
    let events = Events::new(resp).rest().await;
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "complete me");

    let call = json!({"mock_tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}});
    let resp = gw
        .post("/v1/chat/completions", &stream_chat(&call.to_string()))
        .await;
    let events = Events::new(resp).rest().await;
    let args = streamed_arguments(events.iter().map(String::as_str));
    assert_eq!(args, r#"{"city":"Oslo"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_provider_stream_ends_with_an_error_event_and_is_audited() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let resp = gw
        .post(
            "/v1/chat/completions",
            &stream_chat(r#"{"mock_broken_stream": true}"#),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let events = Events::new(resp).rest().await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["reason_code"], "upstream_error");
    assert!(rec["upstream"]["error"].as_str().unwrap().len() > 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_stops_the_provider_read() {
    // 150 events, 5 ms apart: the provider is still sending when the
    // gateway hangs up, and notices.
    let mock = Mock::start(portcullis::testkit::mock::MockOptions {
        event_delay_ms: 5,
        ..options()
    })
    .await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    mock.state.hold_streams();
    let resp = gw
        .post(
            "/v1/chat/completions",
            &stream_chat(&"long answer ".repeat(50)),
        )
        .await;
    let id = request_id(&resp);
    let mut events = Events::new(resp);
    events.next().await.expect("first event");
    drop(events);
    // Released, the mock tries to send the rest; the gateway's next write to
    // the departed client fails, so it closes the provider connection.
    mock.state.release();
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["client_gone"], true);
    assert_eq!(rec["decision"], "error");
    let deadline = Instant::now() + PATIENCE;
    while mock.state.streams_aborted.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "provider stream was never abandoned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mock.state.streams_completed.load(Ordering::SeqCst), 0);
}
