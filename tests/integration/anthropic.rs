//! Anthropic's Messages API through the real binary: what reaches the
//! provider (its key as `x-api-key`, the client's API version and beta
//! flags, never the client's token), and the API's error shape.

use crate::support::*;
use serde_json::{json, Value};

async fn claude_gateway(mock: &Mock, keys: &TestKeys) -> Gateway {
    let mut setup = secured(mock.addr, keys, TEST_LIMITS);
    setup.extra_providers = format!(
        "  claude:\n    base_url: http://{}/v1\n    kind: anthropic\n    api_key: sk-ant-provider-secret\n",
        mock.addr
    );
    let gw = Gateway::start(setup).await;
    let admin_token = keys.token("root", &["portcullis:admin"]);
    for (path, body) in [
        (
            "/admin/models",
            Some(json!({"id": "claude-x", "provider": "claude"})),
        ),
        ("/admin/models/claude-x/approve", None),
    ] {
        let r = admin(&gw, Some(&admin_token), "POST", path, body.as_ref()).await;
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    gw
}

fn message(text: &str) -> Value {
    json!({"model": "claude-x", "max_tokens": 32, "messages": [{"role": "user", "content": text}]})
}

/// POST /v1/messages with these headers.
async fn post_messages(gw: &Gateway, headers: &[(&str, &str)], body: &Value) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(gw.url("/v1/messages"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.json(body).send().await.expect("gateway answers")
}

/// A refusal in Anthropic's shape with this status and error type, and
/// its audit record (the route, the code and the filter that refused).
async fn refused(
    gw: &Gateway,
    r: reqwest::Response,
    status: u16,
    kind: &str,
    (code, by): (&str, &str),
) -> Value {
    assert_eq!(r.status(), status);
    let id = r.headers()["request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], kind, "{body}");
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["route"], "messages");
    assert_eq!(
        (rec["reason_code"].as_str(), rec["blocked_by"].as_str()),
        (Some(code), Some(by))
    );
    body
}

#[tokio::test]
async fn the_provider_gets_its_key_as_x_api_key_and_the_clients_version_never_its_token() {
    let mock = Mock::start(Default::default()).await;
    let keys = TestKeys::new();
    let gw = claude_gateway(&mock, &keys).await;
    let token = keys.token("alice", &["user"]);
    let headers = [
        ("x-api-key", token.as_str()),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "interleaved-thinking-2025-05-14"),
    ];
    let r = post_messages(&gw, &headers, &message("hello")).await;
    assert_eq!(r.status(), 200);
    let seen = mock.state.last_request().unwrap();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-provider-secret"));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        seen.header("anthropic-beta"),
        Some("interleaved-thinking-2025-05-14")
    );
    assert_eq!(seen.header("authorization"), None);
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains(&token)),
        "client token forwarded"
    );
    // Without a version from the client, the gateway names one; a bearer
    // token works as well as x-api-key.
    let bearer = format!("Bearer {token}");
    let r = post_messages(&gw, &[("authorization", &bearer)], &message("hello")).await;
    assert_eq!(r.status(), 200);
    let seen = mock.state.last_request().unwrap();
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    // A header value that is not short visible ASCII is not passed on.
    let long = "x".repeat(300);
    let headers = [
        ("authorization", bearer.as_str()),
        ("anthropic-beta", long.as_str()),
    ];
    let r = post_messages(&gw, &headers, &message("hello")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        mock.state.last_request().unwrap().header("anthropic-beta"),
        None
    );
}

#[tokio::test]
async fn a_model_on_a_provider_of_another_api_is_refused_clearly() {
    let mock = Mock::start(Default::default()).await;
    let keys = TestKeys::new();
    let gw = claude_gateway(&mock, &keys).await;
    let token = keys.token("alice", &["user"]);
    // mock-small is served by an OpenAI provider; claude-x by Anthropic's.
    let mut wrong = message("hello");
    wrong["model"] = json!("mock-small");
    let r = post_messages(&gw, &[("x-api-key", &token)], &wrong).await;
    let body = refused(
        &gw,
        r,
        400,
        "invalid_request_error",
        ("invalid_request", "model_registry"),
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not speak this API"));
    let mut openai_shaped = chat("hello");
    openai_shaped["model"] = json!("claude-x");
    let r = post_as(&gw, &token, &openai_shaped).await;
    let id = expect_error(r, 400, "invalid_request").await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["blocked_by"], "model_registry");
    assert!(
        mock.state.requests().is_empty(),
        "nothing reached a provider"
    );
}

#[tokio::test]
async fn refusals_have_anthropics_shape_and_a_request_id() {
    let mock = Mock::start(Default::default()).await;
    let keys = TestKeys::new();
    let gw = claude_gateway(&mock, &keys).await;
    let r = post_messages(&gw, &[("x-api-key", "forged")], &message("hello")).await;
    refused(
        &gw,
        r,
        401,
        "authentication_error",
        ("invalid_token", "jwt_auth"),
    )
    .await;
    assert!(
        mock.state.requests().is_empty(),
        "nothing reached the provider"
    );
    // Intake in the API's own terms: max_tokens is required.
    let token = keys.token("alice", &["user"]);
    let no_max = json!({"model": "claude-x", "messages": [{"role": "user", "content": "x"}]});
    let r = post_messages(&gw, &[("x-api-key", &token)], &no_max).await;
    let body = refused(
        &gw,
        r,
        400,
        "invalid_request_error",
        ("invalid_request", "intake"),
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    // Token counting is never streamed.
    let mut streamed = message("x");
    streamed["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", &token)
        .json(&streamed)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(r.status(), 400);
    let id = r.headers()["request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["route"], "messages/count_tokens");
    assert_eq!(
        (rec["reason_code"].as_str(), rec["blocked_by"].as_str()),
        (Some("invalid_request"), Some("intake"))
    );
    assert!(
        mock.state.requests().is_empty(),
        "nothing reached the provider"
    );
}
