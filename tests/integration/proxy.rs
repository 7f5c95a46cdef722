//! Allowed traffic: what reaches the provider and what comes back.

use crate::support::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_chat_is_forwarded_with_the_provider_key_and_audited() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("client-token-must-not-leak")
        .header("accept-encoding", "gzip")
        .json(&chat("Hello there"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello there");

    let seen = mock.state.last_request().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.header("authorization"),
        Some(&*format!("Bearer {PROVIDER_KEY}"))
    );
    assert_eq!(seen.header("host"), Some(&*mock.addr.to_string()));
    assert_eq!(seen.header("accept-encoding"), None);
    assert_eq!(seen.header("x-request-id"), Some(id.as_str()));
    assert!(
        !seen
            .headers
            .iter()
            .any(|(_, v)| v.contains("client-token-must-not-leak")),
        "client token forwarded"
    );

    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "allowed");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["model"], "mock-small");
    assert_eq!(rec["upstream"]["status"], 200);
    assert_eq!(rec["usage"]["completion_tokens"], 3);
    assert_eq!(
        rec["content"],
        Value::Null,
        "raw content is not recorded by default"
    );
    assert_eq!(rec["prompt_sha256"].as_str().unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_model_name_replaces_the_client_id() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let resp = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "mock-large", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let sent: Value = serde_json::from_slice(&mock.state.last_request().unwrap().body).unwrap();
    assert_eq!(sent["model"], "mock-large-2026-01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_prompt_reaches_the_provider_byte_exact() {
    // Regression: Pingora drops request bodies over 64 KiB when they are
    // read in request_filter and then proxied; the gateway re-originates.
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let prompt: String = (0..1024 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let body = serde_json::to_vec(&chat(&prompt)).unwrap();
    assert!(body.len() > 1024 * 1024);
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = mock.state.last_request().unwrap();
    assert_eq!(seen.body.len(), body.len());
    assert!(seen.body == body, "body changed on the way");
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len(),
        prompt.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_embeddings_and_models() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;

    let r: Value = gw
        .post(
            "/v1/completions",
            &json!({"model": "mock-small", "prompt": "Say this"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["choices"][0]["text"], "Say this");

    let r: Value = gw
        .post(
            "/v1/embeddings",
            &json!({"model": "mock-small", "input": ["a", "b"], "dimensions": 4}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"].as_array().unwrap().len(), 2);
    assert_eq!(r["data"][1]["embedding"].as_array().unwrap().len(), 4);

    let r: Value = gw.get("/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mock-large", "mock-small"]);
    let r = gw.get("/v1/models/mock-small").await;
    assert_eq!(r.status(), 200);
    let r = gw.get("/v1/models/nope").await;
    expect_error(r, 404, "model_not_found").await;
    assert_eq!(
        mock.state.requests().len(),
        2,
        "the model list is answered by the gateway, not the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_unique_and_the_clients_id_is_kept_beside_them() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let client = reqwest::Client::new();
    let send = |id: &'static str| {
        client
            .post(gw.url("/v1/chat/completions"))
            .header("x-request-id", id)
            .json(&chat("x"))
            .send()
    };
    // The same client id twice: two records, two ids, both keeping it.
    let first = request_id(&send("trace-abc-123").await.unwrap());
    let second = request_id(&send("trace-abc-123").await.unwrap());
    assert_ne!(first, second);
    for id in [&first, &second] {
        assert_eq!(id.len(), 36, "{id}");
        let rec = gw.record_for(id).await;
        assert_eq!(rec["client_request_id"], "trace-abc-123");
    }
    let r = send("bad id with spaces").await.unwrap();
    let id = request_id(&r);
    assert_eq!(gw.record_for(&id).await["client_request_id"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    let body = chat("continue please").to_string();
    let mut conn = tokio::net::TcpStream::connect(gw.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    while !String::from_utf8_lossy(&reply).contains("continue please") {
        let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&reply)
        );
        reply.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&reply).contains("200 OK"));
    assert!(mock
        .state
        .last_request()
        .unwrap()
        .header("expect")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(Setup::new(mock.addr)).await;
    gw.post("/v1/chat/completions", &chat("x")).await;
    gw.get("/v1/nope").await;
    gw.records(2).await;
    assert_eq!(gw.get("/healthz").await.status(), 200);
    assert_eq!(gw.get("/readyz").await.status(), 200);
    let text = gw.get("/metrics").await.text().await.unwrap();
    for needle in [
        r#"portcullis_requests_total{decision="allowed",route="chat/completions",status="200"} 1"#,
        r#"portcullis_requests_total{decision="blocked",route="other",status="404"} 1"#,
        "portcullis_request_duration_seconds_bucket",
        "portcullis_upstream_duration_seconds_bucket",
        "portcullis_audit_queue_depth 0",
        "portcullis_audit_records_written_total 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}
