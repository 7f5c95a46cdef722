//! Secrets and personal data are removed from model output: JSON and
//! streamed, however the provider splits the text.

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

const SECRET: &str = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";

fn redacting(mock: &Mock) -> Setup {
    let mut setup = Setup::new(mock.addr);
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/redaction.yaml");
    setup.extra_yaml = format!("redaction:\n  policy: {}\n", policy.display());
    setup
}

fn leaky() -> String {
    format!("Sure. The token is {SECRET} and you can mail jane.doe@corp.net or call +44 20 7946 0958. Bye 🦀")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_redacted_and_counted_in_the_audit_record() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(redacting(&mock)).await;
    let r = gw.post("/v1/chat/completions", &chat(&leaky())).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let body: Value = r.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        text,
        "Sure. The token is [REDACTED:github-token] and you can mail [REDACTED:email] or call [REDACTED:phone]. Bye 🦀"
    );
    let rec = gw.record_for(&id).await;
    let redact = rec["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["filter"] == "redact")
        .unwrap();
    assert_eq!(
        redact["annotations"][0]["value"],
        json!({"email": 1, "github-token": 1, "phone": 1})
    );
    assert!(
        !rec.to_string().contains(SECRET),
        "the audit record never holds the matched text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_output_is_redacted_across_events() {
    // Chunks of 3 characters: the token spans many events.
    let mock = Mock::start(portcullis::testkit::mock::MockOptions {
        chunk_bytes: 3,
        ..options()
    })
    .await;
    let gw = Gateway::start(redacting(&mock)).await;
    let body = json!({"model": "mock-small", "stream": true, "messages": [{"role": "user", "content": leaky()}]});
    let r = gw.post("/v1/chat/completions", &body).await;
    let id = request_id(&r);
    let raw =
        String::from_utf8(r.bytes_stream().map(|c| c.unwrap().to_vec()).concat().await).unwrap();
    assert!(
        !raw.contains(SECRET) && !raw.contains("jane.doe"),
        "leaked: {raw}"
    );
    let text: String = raw
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        text,
        "Sure. The token is [REDACTED:github-token] and you can mail [REDACTED:email] or call [REDACTED:phone]. Bye 🦀"
    );
    assert!(raw.ends_with("data: [DONE]\n\n"));
    let rec = gw.record_for(&id).await;
    let redact = rec["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["filter"] == "redact")
        .unwrap();
    assert_eq!(redact["annotations"][0]["value"]["github-token"], 1);

    // Completions stream the same way, in `text`.
    let body = json!({"model": "mock-small", "stream": true, "prompt": leaky()});
    let raw = String::from_utf8(
        gw.post("/v1/completions", &body)
            .await
            .bytes_stream()
            .map(|c| c.unwrap().to_vec())
            .concat()
            .await,
    )
    .unwrap();
    assert!(!raw.contains(SECRET));
    assert!(raw.contains("[REDACTED:github-token]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_arguments_stay_valid_json() {
    let mock = Mock::start(options()).await;
    let gw = Gateway::start(redacting(&mock)).await;
    let call = json!({"mock_tool_call": {"name": "send_email", "arguments": {"to": "bob@corp.net", "body": format!("use {SECRET}")}}});
    let r = gw
        .post("/v1/chat/completions", &chat(&call.to_string()))
        .await;
    let body: Value = r.json().await.unwrap();
    let args = body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    let parsed: Value = serde_json::from_str(args).expect("arguments are still JSON");
    assert_eq!(parsed["to"], "[REDACTED:email]");
    assert_eq!(parsed["body"], "use [REDACTED:github-token]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_side_redaction_is_per_tenant() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/redaction.yaml");
    setup.extra_yaml += &format!(
        "redaction:\n  policy: {}\n  request_tenants: [acme]\n",
        policy.display()
    );
    let gw = Gateway::start(setup).await;
    let body = chat(&format!("please store {SECRET} for me"));
    let r = post_as(&gw, &keys.token("a", &["user"]), &body).await;
    assert_eq!(r.status(), 200);
    let sent: Value = serde_json::from_slice(&mock.state.last_request().unwrap().body).unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        "please store [REDACTED:github-token] for me"
    );
    let rec = gw.record_for(&request_id(&r)).await;
    let outcome = rec["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["filter"] == "request_redaction")
        .unwrap();
    assert_eq!(outcome["annotations"][0]["value"]["github-token"], 1);

    // Another tenant's messages go as they are (output is still redacted).
    let other = keys.sign(
        "test",
        &json!({"sub": "b", "tenant": "globex", "roles": ["user"], "iss": "test-issuer",
        "aud": "portcullis", "exp": now_secs() + 600}),
    );
    let r = post_as(&gw, &other, &body).await;
    let sent: Value = serde_json::from_slice(&mock.state.last_request().unwrap().body).unwrap();
    assert!(sent["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains(SECRET));
    let reply: Value = r.json().await.unwrap();
    assert!(!reply.to_string().contains(SECRET));
}
