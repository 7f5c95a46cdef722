//! Rate limits and token budgets through the gateway (in-process state).

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

fn header(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers().get(name)?.to_str().ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_then_429_with_headers_and_an_audit_record() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(secured(mock.addr, &keys, TEST_LIMITS)).await;
    let trial = keys.token("tina", &["trial"]);
    let small = json!({"model": "mock-small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    for left in (0..3).rev() {
        let r = post_as(&gw, &trial, &small).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some(3));
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some(left));
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some(100));
        assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
        assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    }
    let r = post_as(&gw, &trial, &small).await;
    assert_eq!(header(&r, "retry-after"), Some(20));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some(0));
    let id = expect_error(r, 429, "rate_limited").await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["blocked_by"], "rate_limit");
    assert_eq!(rec["reason_code"], "rate_limited");
    assert!(rec["reason"].as_str().unwrap().contains("tier 'trial'"));
    // Another subject is not affected.
    let other = keys.token("olga", &["trial"]);
    assert_eq!(post_as(&gw, &other, &small).await.status(), 200);
    assert_eq!(mock.state.requests().len(), 4);
}

/// Remaining tokens after one request of estimate 2 + 40 = 42 whose real
/// usage is 2 + 2 = 4: with settlement the next request sees 100 - 4 - 42.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_is_settled_from_real_usage_in_json_and_streams() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(secured(mock.addr, &keys, TEST_LIMITS)).await;
    let body = |stream: bool| {
        json!({"model": "mock-small", "max_tokens": 40, "stream": stream,
            "messages": [{"role": "user", "content": "12345678"}]})
    };

    let t = keys.token("json-user", &["trial"]);
    let r = post_as(&gw, &t, &body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        Some(58),
        "100 - 42 reserved"
    );
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["usage"]["total_tokens"], 4);
    let r = post_as(&gw, &t, &body(false)).await;
    let remaining = header(&r, "x-ratelimit-remaining-tokens").unwrap();
    assert!(
        (54..=56).contains(&remaining),
        "settled to 4 used, then 42 reserved: {remaining}"
    );

    // Streamed, without asking for usage: the gateway asks, settles, and
    // does not pass the extra usage event on.
    let t = keys.token("stream-user", &["trial"]);
    let r = post_as(&gw, &t, &body(true)).await;
    assert_eq!(r.status(), 200);
    let sent: Value = serde_json::from_slice(&mock.state.last_request().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let text =
        String::from_utf8(r.bytes_stream().map(|c| c.unwrap().to_vec()).concat().await).unwrap();
    assert!(
        !text.contains("\"usage\""),
        "usage event leaked to a client that did not ask: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    let r = post_as(&gw, &t, &body(true)).await;
    let remaining = header(&r, "x-ratelimit-remaining-tokens").unwrap();
    assert!(
        (54..=56).contains(&remaining),
        "stream settled: {remaining}"
    );
    let rec = gw.record_for(&request_id(&r)).await;
    assert_eq!(rec["usage"]["total_tokens"], 4);

    // A client that asked for usage still gets it.
    let t = keys.token("usage-user", &["trial"]);
    let mut asked = body(true);
    asked["stream_options"] = json!({"include_usage": true});
    let r = post_as(&gw, &t, &asked).await;
    let text =
        String::from_utf8(r.bytes_stream().map(|c| c.unwrap().to_vec()).concat().await).unwrap();
    assert!(text.contains("\"usage\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_exceeded_is_429() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(secured(mock.addr, &keys, TEST_LIMITS)).await;
    let t = keys.token("big", &["trial"]);
    let huge = json!({"model": "mock-small", "max_tokens": 500, "messages": [{"role": "user", "content": "x"}]});
    let r = post_as(&gw, &t, &huge).await;
    assert!(header(&r, "retry-after").is_some());
    let id = expect_error(r, 429, "token_budget_exceeded").await;
    let rec = gw.record_for(&id).await;
    assert!(rec["reason"].as_str().unwrap().contains("token budget"));
    assert!(mock.state.requests().is_empty());
}
