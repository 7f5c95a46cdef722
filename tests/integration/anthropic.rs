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

#[tokio::test]
async fn the_provider_gets_its_key_as_x_api_key_and_the_clients_version_never_its_token() {
    let mock = Mock::start(Default::default()).await;
    let keys = TestKeys::new();
    let gw = claude_gateway(&mock, &keys).await;
    let token = keys.token("alice", &["user"]);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &token)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "interleaved-thinking-2025-05-14")
        .json(&message("hello"))
        .send()
        .await
        .unwrap();
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
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .bearer_auth(&token)
        .json(&message("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.state.last_request().unwrap();
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    // A header value that is not short visible ASCII is not passed on.
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .bearer_auth(&token)
        .header("anthropic-beta", "x".repeat(300))
        .json(&message("hello"))
        .send()
        .await
        .unwrap();
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
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &token)
        .json(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let id = r.headers()["request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not speak this API"));
    let rec = gw.record_for(&id).await;
    assert_eq!(
        (rec["blocked_by"].as_str(), rec["reason_code"].as_str()),
        (Some("model_registry"), Some("invalid_request"))
    );
    let mut openai_shaped = chat("hello");
    openai_shaped["model"] = json!("claude-x");
    let r = post_as(&gw, &token, &openai_shaped).await;
    assert_eq!(r.status(), 400);
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
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", "forged")
        .json(&message("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let id = r.headers()["request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["route"], "messages");
    assert_eq!(rec["reason_code"], "invalid_token");
    assert!(
        mock.state.requests().is_empty(),
        "nothing reached the provider"
    );
    // Intake in the API's own terms: max_tokens is required.
    let token = keys.token("alice", &["user"]);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &token)
        .json(&json!({"model": "claude-x", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
}
