//! Every rejection: status, error code, and the audit record's reason.

use crate::support::*;
use serde_json::json;

async fn audited(gw: &Gateway, id: &str, code: &str, decision: &str) -> serde_json::Value {
    let rec = gw.record_for(id).await;
    assert_eq!(rec["reason_code"], code, "{rec}");
    assert_eq!(rec["decision"], decision, "{rec}");
    assert!(
        rec["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{rec}"
    );
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_invalid_bodies_are_400() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let client = reqwest::Client::new();
    for body in [
        "{not json".to_string(),
        "[1,2]".to_string(),
        json!({"messages": [{"role": "user", "content": "x"}]}).to_string(),
        json!({"model": "mock-small", "messages": "hi"}).to_string(),
        json!({"model": "mock-small", "stream": "yes", "messages": [{}]}).to_string(),
    ] {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let id = expect_error(r, 400, "invalid_request").await;
        let rec = audited(&gw, &id, "invalid_request", "blocked").await;
        assert_eq!(rec["blocked_by"], "intake");
    }
    assert!(
        mock.state.requests().is_empty(),
        "nothing invalid reaches the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_method_and_model() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let id = expect_error(gw.get("/v1/assistants").await, 404, "unknown_route").await;
    audited(&gw, &id, "unknown_route", "blocked").await;
    let id = expect_error(
        gw.get("/v1/chat/completions").await,
        405,
        "method_not_allowed",
    )
    .await;
    audited(&gw, &id, "method_not_allowed", "blocked").await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-unknown", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    let id = expect_error(r, 404, "model_not_found").await;
    let rec = audited(&gw, &id, "model_not_found", "blocked").await;
    assert_eq!(rec["model"], "gpt-unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_type_is_415() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body(chat("x").to_string())
        .send()
        .await
        .unwrap();
    let id = expect_error(r, 415, "unsupported_media_type").await;
    audited(&gw, &id, "unsupported_media_type", "blocked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_cap_are_413_declared_or_chunked() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.max_body_bytes = 100 * 1024;
    let gw = Gateway::start(setup).await;
    let client = reqwest::Client::new();
    let big = chat(&"x".repeat(200 * 1024)).to_string();
    // Declared Content-Length over the cap: refused before reading.
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let id = expect_error(r, 413, "request_too_large").await;
    audited(&gw, &id, "request_too_large", "blocked").await;
    // Chunked, no Content-Length: refused once the cap is passed.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = big
        .as_bytes()
        .chunks(8192)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await;
    // The gateway may close the connection while the client still sends;
    // when a response arrives it must be the 413.
    if let Ok(r) = r {
        let id = expect_error(r, 413, "request_too_large").await;
        audited(&gw, &id, "request_too_large", "blocked").await;
    }
    // Just under the cap still passes.
    let ok = chat(&"x".repeat(90 * 1024));
    let r = gw.post("/v1/chat/completions", &ok).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.state.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_is_502_and_audited() {
    let closed = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Gateway::start(Setup::new(closed)).await;
    let r = gw
        .post("/v1/chat/completions", &chat("anyone there?"))
        .await;
    let id = expect_error(r, 502, "upstream_error").await;
    let rec = audited(&gw, &id, "upstream_error", "error").await;
    assert_eq!(rec["upstream"]["provider"], "mock");
    assert!(rec["upstream"]["error"].as_str().unwrap().len() > 3);
    assert_eq!(rec["upstream"]["status"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_map_to_502_or_pass_through() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let client = reqwest::Client::new();
    let send = |status: u16| {
        client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat(&json!({"mock_error": status}).to_string()))
            .send()
    };
    // Server errors and the gateway's own credential problems: 502.
    for status in [500, 503, 401] {
        let id = expect_error(send(status).await.unwrap(), 502, "upstream_error").await;
        let rec = audited(&gw, &id, "upstream_error", "error").await;
        assert_eq!(rec["upstream"]["status"], status);
    }
    // The provider refusing the request itself: passed through.
    let r = send(400).await.unwrap();
    assert_eq!(r.status(), 400);
    let id = request_id(&r);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "mock_error");
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["upstream"]["status"], 400);
    assert_eq!(rec["status"], 400);
    // A 200 that is not JSON.
    let r = gw
        .post("/v1/chat/completions", &chat(r#"{"mock_not_json": true}"#))
        .await;
    let id = expect_error(r, 502, "upstream_error").await;
    audited(&gw, &id, "upstream_error", "error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_provider_is_504() {
    let mock = Mock::start(portcullis::testkit::mock::MockOptions {
        latency_ms: 3_000,
        ..options()
    })
    .await;
    let mut setup = Setup::new(mock.addr);
    setup.read_ms = 200;
    let gw = Gateway::start(setup).await;
    let r = gw.post("/v1/chat/completions", &chat("too slow")).await;
    let id = expect_error(r, 504, "upstream_timeout").await;
    audited(&gw, &id, "upstream_timeout", "error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.client_body_timeout_secs = 1;
    let gw = Gateway::start(setup).await;
    let mut conn = tokio::net::TcpStream::connect(gw.base.trim_start_matches("http://"))
        .await
        .unwrap();
    // 100 bytes announced, 10 sent, then silence.
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&reply).contains("\r\n\r\n{")
        || !String::from_utf8_lossy(&reply).ends_with('}')
    {
        let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("x-request-id")
        .trim()
        .to_string();
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "blocked");
    assert_eq!(rec["reason_code"], "request_timeout");
    assert_eq!(rec["blocked_by"], "intake");
    assert!(mock.state.requests().is_empty());
}

/// Bounds on what a body may hold besides its size: nesting, messages,
/// tools, characters of text. Each refusal is audited with its reason, and
/// nothing reaches the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_shape_limits_are_refused() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.limits_extra =
        "  max_json_depth: 10\n  max_messages: 4\n  max_tools: 2\n  max_text_chars: 5000\n  max_json_values: 500\n".into();
    let mut gw = Gateway::start(setup).await;
    let msg = json!({"role": "user", "content": "hi"});
    let tool = json!({"type": "function", "function": {"name": "t", "parameters": {}}});
    let mut deep = json!(1);
    for _ in 0..12 {
        deep = json!([deep]);
    }
    let cases = [
        (
            json!({"model": "mock-small", "messages": vec![msg.clone(); 5]}),
            413,
            "request_too_large",
            "`messages` has 5 entries",
        ),
        (
            json!({"model": "mock-small", "messages": [msg], "tools": vec![tool; 3]}),
            413,
            "request_too_large",
            "`tools` has 3",
        ),
        (
            json!({"model": "mock-small", "messages": [msg], "metadata": {"x": deep}}),
            400,
            "invalid_request",
            "deeper than 10",
        ),
        (
            json!({"model": "mock-small", "messages": [{"role": "user", "content": "é".repeat(6000)}]}),
            413,
            "request_too_large",
            "5000 characters",
        ),
    ];
    for (body, status, code, reason) in cases {
        let r = gw.post("/v1/chat/completions", &body).await;
        let id = expect_error(r, status, code).await;
        let rec = audited(&gw, &id, code, "blocked").await;
        assert!(rec["reason"].as_str().unwrap().contains(reason), "{rec}");
    }
    assert!(mock.state.requests().is_empty());
    let ok = json!({"model": "mock-small", "messages": vec![msg; 4]});
    assert_eq!(gw.post("/v1/chat/completions", &ok).await.status(), 200);
    gw.stop();
    verified(&gw);
}
