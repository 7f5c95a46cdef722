//! Held tool calls: a model's call to an `approval_required` tool is taken
//! out of the reply and stored; another admin approves or denies it; the
//! caller repeats its request with `x-portcullis-approval` and gets the
//! call once, from the store, without a provider call. Every refusal with
//! its status, code and audit record. (Two instances over Redis, with the
//! OpenAI SDK and the CLI: `tests/sdk/test_approvals.py`.)

use crate::support::*;
use serde_json::{json, Value};

const ADMIN: &[&str] = &["portcullis:admin"];
const ARGS: &str = r#"{"cmd":"ls /srv"}"#;

fn with_approvals(mock: &Mock, keys: &TestKeys, approvals_yaml: &str) -> Setup {
    let mut setup = secured(mock.addr, keys, TEST_LIMITS);
    setup.files.push((
        "tools.yaml".into(),
        include_bytes!("../../policies/tools.yaml").to_vec(),
    ));
    setup.extra_yaml += "tools:\n  policy: tools.yaml\n";
    setup.extra_yaml += approvals_yaml;
    setup
}

/// A request whose reply calls `run_shell` (the user needs approval).
fn shell(stream: bool) -> Value {
    let trigger = json!({"mock_tool_call": {"name": "run_shell", "arguments": {"cmd": "ls /srv"}}})
        .to_string();
    json!({"model": "mock-small", "stream": stream, "messages": [{"role": "user", "content": trigger}]})
}

/// An admin API read, as JSON.
async fn read(gw: &Gateway, token: &str, path: impl AsRef<str>) -> Value {
    admin(gw, Some(token), "GET", path.as_ref(), None)
        .await
        .json()
        .await
        .unwrap()
}

async fn repeat(gw: &Gateway, token: &str, body: &Value, approval: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("x-portcullis-approval", approval)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Send `shell(false)`: the approval id from the header, and the reply.
async fn hold(gw: &Gateway, token: &str) -> (String, Value, String) {
    let r = post_as(gw, token, &shell(false)).await;
    assert_eq!(r.status(), 200);
    let rid = request_id(&r);
    let id = r.headers()["x-portcullis-approval-id"]
        .to_str()
        .unwrap()
        .to_string();
    (id, r.json().await.unwrap(), rid)
}

async fn decide(
    gw: &Gateway,
    token: &str,
    id: &str,
    action: &str,
    reason: Option<&str>,
) -> reqwest::Response {
    let body = json!({ "reason": reason });
    admin(
        gw,
        Some(token),
        "POST",
        &format!("/admin/approvals/{id}/{action}"),
        Some(&body),
    )
    .await
}

/// A refused repeat: status, code, and the record says the approval
/// refused it.
async fn refused(gw: &Gateway, resp: reqwest::Response, status: u16, code: &str) -> Value {
    let rid = expect_error(resp, status, code).await;
    let rec = gw.record_for(&rid).await;
    assert_eq!(rec["blocked_by"], "approval", "{rec}");
    assert_eq!(rec["reason_code"], code, "{rec}");
    assert!(rec["upstream"].is_null(), "no provider call: {rec}");
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_is_approved_by_another_admin_and_handed_out_once() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut hook = Receiver::start().await;
    let gw = Gateway::start(with_approvals(
        &mock,
        &keys,
        &format!("approvals:\n  webhook_url: {}/hook\n", hook.url),
    ))
    .await;
    let user = keys.token("alice", &["user"]);
    let boss = keys.token("bob", ADMIN);

    // The reply: no call, a notice naming the approval, the id in a header.
    let (id, reply, rid) = hold(&gw, &user).await;
    assert!(id.starts_with("apr_"), "{id}");
    let message = &reply["choices"][0]["message"];
    assert!(message.get("tool_calls").is_none(), "{reply}");
    assert!(message["content"]
        .as_str()
        .unwrap()
        .contains(&format!("held for approval {id}")));
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    assert!(!reply.to_string().contains("ls /srv"), "{reply}");
    let rec = gw.record_for(&rid).await;
    assert_eq!(
        rec["approval"],
        json!({"id": id, "event": "held", "tools": ["run_shell"]})
    );
    assert_eq!(mock.state.requests().len(), 1);

    // The webhook hears of it, without the arguments.
    let (path, told) = hook.next().await;
    assert_eq!(path, "/hook");
    assert!(told["text"].as_str().unwrap().contains(&id), "{told}");
    assert!(!told.to_string().contains("ls /srv"), "{told}");

    // Listed as pending, with the call as the model wrote it.
    let listed: Value = read(&gw, &boss, "/admin/approvals?state=pending").await;
    let a = &listed["data"][0];
    assert_eq!(a["id"], id.as_str());
    assert_eq!(a["subject"], "alice");
    assert_eq!(a["request_id"], rid.as_str());
    assert_eq!(a["tools"], json!(["run_shell"]));
    let none: Value = read(&gw, &boss, "/admin/approvals?state=used").await;
    assert_eq!(none["data"], json!([]));

    // Pending: not yet.
    refused(
        &gw,
        repeat(&gw, &user, &shell(false), &id).await,
        403,
        "approval_pending",
    )
    .await;

    // Nobody decides on their own call, even with the admin role; a user
    // cannot decide at all; an auditor may only read.
    let self_admin = keys.token("alice", &["user", "portcullis:admin"]);
    let r = decide(&gw, &self_admin, &id, "approve", None).await;
    let arid = expect_error(r, 403, "self_approval").await;
    let arec = gw.record_for(&arid).await;
    assert_eq!(arec["action"], "approval.approve");
    assert_eq!(arec["reason_code"], "self_approval");
    expect_error(
        decide(&gw, &user, &id, "approve", None).await,
        403,
        "forbidden",
    )
    .await;
    let auditor = keys.token("carol", &["portcullis:auditor"]);
    let seen: Value = read(&gw, &auditor, &format!("/admin/approvals/{id}")).await;
    assert_eq!(seen["tools"], json!(["run_shell"]));
    assert!(
        !seen.to_string().contains("ls /srv"),
        "an auditor reads no arguments: {seen}"
    );
    assert!(
        !listed.to_string().contains("ls /srv"),
        "a listing holds no arguments: {listed}"
    );
    let shown: Value = read(&gw, &boss, &format!("/admin/approvals/{id}")).await;
    assert_eq!(shown["calls"][0]["call"]["function"]["arguments"], ARGS);
    for body in [
        json!({"reason": "x".repeat(1001)}),
        json!({"reason": "ok", "extra": true}),
        json!(["not", "an", "object"]),
    ] {
        let r = admin(
            &gw,
            Some(&boss),
            "POST",
            &format!("/admin/approvals/{id}/approve"),
            Some(&body),
        )
        .await;
        expect_error(r, 400, "invalid_request").await;
    }
    expect_error(
        admin(&gw, Some(&boss), "GET", "/admin/approvals/not-an-id", None).await,
        404,
        "approval_not_found",
    )
    .await;
    assert_eq!(
        admin(
            &gw,
            Some(&auditor),
            "GET",
            &format!("/admin/approvals/{id}"),
            None
        )
        .await
        .status(),
        200
    );
    expect_error(
        decide(&gw, &auditor, &id, "approve", None).await,
        403,
        "forbidden",
    )
    .await;
    expect_error(
        decide(&gw, &boss, &id, "deny", None).await,
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        decide(&gw, &boss, &id, "maybe", None).await,
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        decide(&gw, &boss, "apr_nothing", "approve", None).await,
        404,
        "approval_not_found",
    )
    .await;

    // Approved by another admin, recorded with before and after.
    let r = decide(&gw, &boss, &id, "approve", Some("read-only listing")).await;
    assert_eq!(r.status(), 200);
    let arid = request_id(&r);
    let approved: Value = r.json().await.unwrap();
    assert_eq!(approved["state"], "approved");
    assert_eq!(approved["decided_by"], "bob");
    let arec = gw.record_for(&arid).await;
    assert_eq!(arec["before"]["state"], "pending");
    assert_eq!(arec["after"]["state"], "approved");
    assert_eq!(arec["after"]["reason"], "read-only listing");
    expect_error(
        decide(&gw, &boss, &id, "deny", Some("no")).await,
        409,
        "invalid_transition",
    )
    .await;

    // Someone else's approval does not exist for them; another request
    // is not the one approved; an id that is not one is a bad request.
    let mallory = keys.token("mallory", &["user"]);
    refused(
        &gw,
        repeat(&gw, &mallory, &shell(false), &id).await,
        404,
        "approval_not_found",
    )
    .await;
    let mut other = shell(false);
    other["messages"][0]["content"] = json!("something else");
    refused(
        &gw,
        repeat(&gw, &user, &other, &id).await,
        403,
        "approval_mismatch",
    )
    .await;
    let completions = reqwest::Client::new()
        .post(gw.url("/v1/completions"))
        .bearer_auth(&user)
        .header("x-portcullis-approval", &id)
        .json(&json!({"model": "mock-small", "prompt": "ls"}))
        .send()
        .await
        .unwrap();
    refused(&gw, completions, 403, "approval_mismatch").await;
    refused(
        &gw,
        repeat(&gw, &user, &shell(false), "../../etc/passwd").await,
        400,
        "invalid_request",
    )
    .await;

    // Handed out: the call exactly as the model wrote it, no provider call.
    let r = repeat(&gw, &user, &shell(false), &id).await;
    assert_eq!(r.status(), 200);
    let rid = request_id(&r);
    let out: Value = r.json().await.unwrap();
    assert_eq!(
        out["choices"][0]["message"]["tool_calls"],
        json!([{"id": "call_mock_0", "type": "function", "function": {"name": "run_shell", "arguments": ARGS}}])
    );
    assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(mock.state.requests().len(), 1, "answered from the store");
    let rec = gw.record_for(&rid).await;
    assert_eq!(rec["approval"]["event"], "handed_out");
    assert_eq!(rec["decision"], "allowed");
    assert!(rec["upstream"].is_null());

    // Once.
    let rec = refused(
        &gw,
        repeat(&gw, &user, &shell(false), &id).await,
        403,
        "approval_used",
    )
    .await;
    assert!(rec["reason"].as_str().unwrap().contains(&rid), "{rec}");

    // The tool's result comes back for the call handed out, and only it.
    let answer = |call_id: &str| {
        json!({"model": "mock-small", "messages": [
            {"role": "user", "content": "list /srv"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": call_id, "type": "function",
                "function": {"name": "run_shell", "arguments": ARGS}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "backups\nwww"}]})
    };
    assert_eq!(
        post_as(&gw, &user, &answer("call_mock_0")).await.status(),
        200
    );
    let rid = expect_error(
        post_as(&gw, &user, &answer("call_forged")).await,
        403,
        "tool_approval_required",
    )
    .await;
    assert_eq!(gw.record_for(&rid).await["blocked_by"], "tool_authz");
    let rid = expect_error(
        post_as(&gw, &mallory, &answer("call_mock_0")).await,
        403,
        "tool_approval_required",
    )
    .await;
    assert_eq!(
        gw.record_for(&rid).await["reason_code"],
        "tool_approval_required"
    );

    let held = metric(&gw, "portcullis_approvals_total{event=\"held\"}").await;
    let handed = metric(&gw, "portcullis_approvals_total{event=\"handed_out\"}").await;
    let sent = metric(&gw, "portcullis_approvals_total{event=\"webhook_sent\"}").await;
    assert_eq!((held, handed, sent), (1.0, 1.0, 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_held_and_handed_out_as_streams_and_denials_and_expiry_refuse() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    // A webhook nobody listens on: counted as failed, the reply unharmed.
    let mut gw = Gateway::start(with_approvals(
        &mock,
        &keys,
        &format!(
            "approvals:\n  ttl_secs: 2\n  webhook_url: http://127.0.0.1:{}/hook\n  webhook_timeout_ms: 500\n",
            free_port()
        ),
    ))
    .await;
    let user = keys.token("alice", &["user"]);
    let boss = keys.token("bob", ADMIN);

    // Streamed: not a byte of the call; the id is in the notice.
    let r = post_as(&gw, &user, &shell(true)).await;
    assert_eq!(r.status(), 200);
    let events = Events::new(r).rest().await;
    let raw = events.join("\n");
    assert!(
        !raw.contains("ls /srv") && !raw.contains("call_mock_0"),
        "{raw}"
    );
    let notice: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let id = notice
        .split_whitespace()
        .find(|w| w.starts_with("apr_"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .unwrap_or_else(|| panic!("no approval id in {notice:?}"));
    assert_eq!(events.last().unwrap(), "[DONE]");

    let deadline = std::time::Instant::now() + PATIENCE;
    while metric(&gw, "portcullis_approvals_total{event=\"webhook_failed\"}").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "webhook failure not counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Kept across a restart (the state folder).
    gw.stop();
    gw.restart().await;
    assert_eq!(decide(&gw, &boss, &id, "approve", None).await.status(), 200);
    let r = repeat(&gw, &user, &shell(true), &id).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = Events::new(r).rest().await;
    let args = streamed_arguments(events.iter().map(String::as_str));
    assert_eq!(args, ARGS);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(mock.state.requests().len(), 1);

    // Denied, with the reason in the record.
    let (id, _, _) = hold(&gw, &user).await;
    assert_eq!(
        decide(&gw, &boss, &id, "deny", Some("no shells on prod"))
            .await
            .status(),
        200
    );
    let rec = refused(
        &gw,
        repeat(&gw, &user, &shell(false), &id).await,
        403,
        "approval_denied",
    )
    .await;
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("no shells on prod"),
        "{rec}"
    );

    // Expired: not handed out, not decided, listed as expired.
    let (id, _, _) = hold(&gw, &user).await;
    let (late, _, _) = hold(&gw, &user).await;
    assert_eq!(decide(&gw, &boss, &id, "approve", None).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    refused(
        &gw,
        repeat(&gw, &user, &shell(false), &id).await,
        403,
        "approval_expired",
    )
    .await;
    expect_error(
        decide(&gw, &boss, &late, "approve", None).await,
        409,
        "invalid_transition",
    )
    .await;
    let expired: Value = read(&gw, &boss, "/admin/approvals?state=expired").await;
    let ids: Vec<&str> = expired["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&id.as_str()) && ids.contains(&late.as_str()),
        "{ids:?}"
    );
    expect_error(
        admin(
            &gw,
            Some(&boss),
            "GET",
            "/admin/approvals?state=bogus",
            None,
        )
        .await,
        400,
        "invalid_request",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_approvals_off_such_calls_are_refused_as_before() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(with_approvals(
        &mock,
        &keys,
        "approvals:\n  enabled: false\n",
    ))
    .await;
    let user = keys.token("alice", &["user"]);
    let r = post_as(&gw, &user, &shell(false)).await;
    assert!(r.headers().get("x-portcullis-approval-id").is_none());
    let reply: Value = r.json().await.unwrap();
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "[a tool call was blocked by policy]"
    );
    let declared = json!({"model": "mock-small", "tools": [{"type": "function", "function": {"name": "run_shell"}}],
        "messages": [{"role": "user", "content": "hi"}]});
    let rid = expect_error(
        post_as(&gw, &user, &declared).await,
        403,
        "tool_approval_required",
    )
    .await;
    assert!(gw.record_for(&rid).await["reason"]
        .as_str()
        .unwrap()
        .contains("not held"));
    let r = repeat(&gw, &user, &shell(false), "apr_0123").await;
    refused(&gw, r, 400, "invalid_request").await;
    let boss = keys.token("bob", ADMIN);
    expect_error(
        admin(&gw, Some(&boss), "GET", "/admin/approvals", None).await,
        400,
        "invalid_request",
    )
    .await;
}

/// A tool denied by a policy reload after its call was approved: the repeat
/// is refused, and the approval is not spent (a reload back hands it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_denied_after_approval_is_refused_without_spending_the_approval() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = with_approvals(&mock, &keys, "");
    let allowed =
        include_str!("../../policies/tools.yaml").replace("on_called: remove", "on_called: deny");
    setup.files.retain(|(n, _)| n != "tools.yaml");
    setup
        .files
        .push(("tools.yaml".into(), allowed.clone().into_bytes()));
    let gw = Gateway::start(setup).await;
    let user = keys.token("alice", &["user"]);
    let boss = keys.token("bob", ADMIN);
    let (id, _, _) = hold(&gw, &user).await;
    assert_eq!(decide(&gw, &boss, &id, "approve", None).await.status(), 200);

    let denied = allowed.replace(
        "access: { ops: allow, user: approval_required }",
        "access: { ops: allow, user: deny }",
    );
    std::fs::write(gw.dir.path().join("tools.yaml"), &denied).unwrap();
    assert_eq!(
        admin(&gw, Some(&boss), "POST", "/admin/reload", None)
            .await
            .status(),
        200
    );
    let rid = expect_error(
        repeat(&gw, &user, &shell(false), &id).await,
        403,
        "tool_not_allowed",
    )
    .await;
    assert_eq!(
        gw.record_for(&rid).await["blocked_by"],
        "response_tool_authz"
    );
    let state: Value = read(&gw, &boss, &format!("/admin/approvals/{id}")).await;
    assert_eq!(state["state"], "approved", "not spent");

    std::fs::write(gw.dir.path().join("tools.yaml"), &allowed).unwrap();
    assert_eq!(
        admin(&gw, Some(&boss), "POST", "/admin/reload", None)
            .await
            .status(),
        200
    );
    let r = repeat(&gw, &user, &shell(false), &id).await;
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    assert_eq!(
        out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        ARGS
    );
}

/// The output guard judges the calls (their arguments are generated text)
/// before they are handed out: with a guard policy that blocks what it
/// only flagged when the call was held, the repeat is refused and the
/// approval is not spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_guard_judges_approved_calls_before_they_are_handed_out() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = with_approvals(&mock, &keys, "");
    let blocking = include_str!("../../policies/guard.yaml").to_string();
    let flagging = blocking.replace(
        "{ code: S9, name: Indiscriminate Weapons, action: block }",
        "{ code: S9, name: Indiscriminate Weapons, action: flag }",
    );
    assert_ne!(blocking, flagging);
    setup
        .files
        .push(("guard.yaml".into(), flagging.into_bytes()));
    setup.extra_yaml += "guard:\n  policy: guard.yaml\n  provider: mock\n  model: llama-guard-3-8b\n  protocol: llama-guard\n  input: false\n  output: held\n";
    let gw = Gateway::start(setup).await;
    let user = keys.token("alice", &["user"]);
    let boss = keys.token("bob", ADMIN);
    let trigger = json!({"mock_tool_call": {"name": "run_shell",
        "arguments": {"cmd": "echo how to make a nerve agent"}}})
    .to_string();
    let body = json!({"model": "mock-small", "messages": [{"role": "user", "content": trigger}]});
    let r = post_as(&gw, &user, &body).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-portcullis-approval-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(decide(&gw, &boss, &id, "approve", None).await.status(), 200);

    std::fs::write(gw.dir.path().join("guard.yaml"), &blocking).unwrap();
    let reload = admin(&gw, Some(&boss), "POST", "/admin/reload", None).await;
    assert_eq!(reload.status(), 200);
    let rid = expect_error(repeat(&gw, &user, &body, &id).await, 400, "content_policy").await;
    let rec = gw.record_for(&rid).await;
    assert_eq!(rec["blocked_by"], "output_guard");
    assert_eq!(rec["approval"]["event"], "refused");
    let state = read(&gw, &boss, format!("/admin/approvals/{id}")).await;
    assert_eq!(state["state"], "approved", "not spent");
}
