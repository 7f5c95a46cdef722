//! Tool-call authorization at every point: declared tools, the model's
//! calls in JSON and streams, and tool results sent back.

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

fn with_tools(mock: &Mock, keys: &TestKeys, on_declared: &str) -> Setup {
    let mut setup = secured(mock.addr, keys, TEST_LIMITS);
    let policy = include_str!("../../policies/tools.yaml")
        .replace("on_declared: deny", &format!("on_declared: {on_declared}"));
    setup.files.push(("tools.yaml".into(), policy.into_bytes()));
    setup.extra_yaml += "tools:\n  policy: tools.yaml\n";
    setup
}

fn tool_call(name: &str, args: Value, stream: bool) -> Value {
    let trigger = json!({"mock_tool_call": {"name": name, "arguments": args}}).to_string();
    json!({"model": "mock-small", "stream": stream, "messages": [{"role": "user", "content": trigger}]})
}

fn declaring(names: &[&str]) -> Value {
    let tools: Vec<Value> = names
        .iter()
        .map(|n| json!({"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}))
        .collect();
    json!({"model": "mock-small", "tools": tools, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_tools_are_refused_or_stripped() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(with_tools(&mock, &keys, "deny")).await;
    let user = keys.token("u", &["user"]);
    assert_eq!(
        post_as(&gw, &user, &declaring(&["get_weather", "send_email"]))
            .await
            .status(),
        200
    );
    let id = expect_error(
        post_as(&gw, &user, &declaring(&["get_weather", "delete_records"])).await,
        403,
        "tool_not_allowed",
    )
    .await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["blocked_by"], "tool_authz");
    // A tool that needs approval may be offered: its calls are held
    // (`approvals.rs`; off there, it is refused).
    assert_eq!(
        post_as(&gw, &user, &declaring(&["run_shell"]))
            .await
            .status(),
        200
    );
    let ops = keys.token("o", &["ops"]);
    assert_eq!(
        post_as(&gw, &ops, &declaring(&["run_shell"]))
            .await
            .status(),
        200
    );
    assert_eq!(mock.state.requests().len(), 3);

    let mock2 = Mock::start(options()).await;
    let gw = Gateway::start(with_tools(&mock2, &keys, "strip")).await;
    let r = post_as(&gw, &user, &declaring(&["get_weather", "delete_records"])).await;
    assert_eq!(r.status(), 200);
    let sent: Value = serde_json::from_slice(&mock2.state.last_request().unwrap().body).unwrap();
    let names: Vec<&str> = sent["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["get_weather"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_for_forbidden_tools_are_refused() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(with_tools(&mock, &keys, "deny")).await;
    let user = keys.token("u", &["user"]);
    let body = json!({"model": "mock-small", "messages": [
        {"role": "user", "content": "clean up"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "delete_records", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "deleted 100 rows"}]});
    let id = expect_error(post_as(&gw, &user, &body).await, 403, "tool_not_allowed").await;
    assert!(gw.record_for(&id).await["reason"]
        .as_str()
        .unwrap()
        .contains("tool result"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_tool_calls_are_checked_with_their_arguments() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(with_tools(&mock, &keys, "deny")).await;
    let user = keys.token("u", &["user"]);
    let r = post_as(
        &gw,
        &user,
        &tool_call("send_email", json!({"to": "bob@example.com"}), false),
    )
    .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "send_email"
    );

    let r = post_as(
        &gw,
        &user,
        &tool_call("send_email", json!({"to": "eve@evil.com"}), false),
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let body: Value = r.json().await.unwrap();
    let message = &body["choices"][0]["message"];
    assert!(message.get("tool_calls").is_none(), "{body}");
    assert_eq!(message["content"], "[a tool call was blocked by policy]");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(!body.to_string().contains("evil.com"));
    let rec = gw.record_for(&id).await;
    let outcome = rec["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["filter"] == "response_tool_authz")
        .unwrap();
    assert!(outcome.to_string().contains("send_email"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_are_held_then_released_or_replaced() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(with_tools(&mock, &keys, "deny")).await;
    let user = keys.token("u", &["user"]);
    let read = |r: reqwest::Response| async move {
        String::from_utf8(r.bytes_stream().map(|c| c.unwrap().to_vec()).concat().await).unwrap()
    };
    let raw = read(
        post_as(
            &gw,
            &user,
            &tool_call("get_weather", json!({"city": "Oslo"}), true),
        )
        .await,
    )
    .await;
    let args = streamed_arguments(
        raw.split(
            "

",
        )
        .filter_map(|e| e.strip_prefix("data: ")),
    );
    assert_eq!(args, r#"{"city":"Oslo"}"#);

    let raw = read(
        post_as(
            &gw,
            &user,
            &tool_call("delete_records", json!({"table": "shadow"}), true),
        )
        .await,
    )
    .await;
    assert!(
        !raw.contains("delete_records") && !raw.contains("shadow"),
        "leaked: {raw}"
    );
    assert!(raw.contains("[a tool call was blocked by policy]"));
    assert!(raw.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_tool_policy() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(with_tools(&mock, &keys, "deny")).await;
    let user = keys.token("u", &["user"]);
    let root = keys.token("root", &["portcullis:admin"]);
    assert_eq!(
        post_as(&gw, &user, &declaring(&["get_weather"]))
            .await
            .status(),
        200
    );
    let policy = include_str!("../../policies/tools.yaml")
        .replace(r#"access: { "*": allow }"#, r#"access: { "*": deny }"#);
    std::fs::write(gw.dir.path().join("tools.yaml"), policy).unwrap();
    let r = admin(&gw, Some(&root), "POST", "/admin/reload", None).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["reloaded"].as_str().unwrap().contains("tools.yaml"),
        "{v}"
    );
    expect_error(
        post_as(&gw, &user, &declaring(&["get_weather"])).await,
        403,
        "tool_not_allowed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_called_deny_refuses_the_whole_response() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = with_tools(&mock, &keys, "deny");
    let policy =
        include_str!("../../policies/tools.yaml").replace("on_called: remove", "on_called: deny");
    setup.files.retain(|(name, _)| name != "tools.yaml");
    setup.files.push(("tools.yaml".into(), policy.into_bytes()));
    let gw = Gateway::start(setup).await;
    let user = keys.token("u", &["user"]);
    let r = post_as(
        &gw,
        &user,
        &tool_call("delete_records", json!({"table": "users"}), false),
    )
    .await;
    let id = expect_error(r, 403, "tool_not_allowed").await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "blocked");
    assert_eq!(rec["blocked_by"], "response_tool_authz");
    assert_eq!(rec["reason_code"], "tool_not_allowed");
}
