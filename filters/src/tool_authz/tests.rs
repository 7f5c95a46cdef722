use super::response::ResponseToolAuthz;
use super::*;
use crate::request::Route;
use crate::response::{ResponseContext, ResponseStage};
use crate::sse::SseEvent;
use std::sync::Arc;

fn policy(on_called: &str) -> Arc<crate::shared::Shared<ToolPolicy>> {
    let text = include_str!("../../../policies/tools.yaml")
        .replace("on_called: remove", &format!("on_called: {on_called}"));
    let spec: ToolPolicySpec = serde_yaml::from_str(&text).unwrap();
    crate::shared::Shared::new(ToolPolicy::build(spec).unwrap())
}

fn who(roles: &[&str]) -> Principal {
    Principal {
        subject: "s".into(),
        tenant: "t".into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

#[test]
fn access_and_constraints() {
    let p = policy("remove").get();
    let user = who(&["user"]);
    let ops = who(&["ops"]);
    let nobody = who(&[]);
    assert_eq!(
        p.judge("get_weather", Some(&nobody), Some(&json!({"city": "Oslo"}))),
        ToolVerdict::Allowed
    );
    assert!(matches!(
        p.judge(
            "get_weather",
            Some(&nobody),
            Some(&json!({"city": "x".repeat(101)}))
        ),
        ToolVerdict::Denied(_)
    ));
    assert_eq!(
        p.judge(
            "send_email",
            Some(&user),
            Some(&json!({"to": "bob@example.com"}))
        ),
        ToolVerdict::Allowed
    );
    assert!(matches!(
        p.judge(
            "send_email",
            Some(&user),
            Some(&json!({"to": "bob@evil.com"}))
        ),
        ToolVerdict::Denied(_)
    ));
    assert!(matches!(
        p.judge("send_email", Some(&user), Some(&json!({}))),
        ToolVerdict::Denied(_)
    ));
    assert!(matches!(
        p.judge("send_email", Some(&nobody), None),
        ToolVerdict::Denied(_)
    ));
    assert_eq!(
        p.judge("run_shell", Some(&ops), Some(&json!({}))),
        ToolVerdict::Allowed
    );
    assert_eq!(
        p.judge("run_shell", Some(&user), None),
        ToolVerdict::NeedsApproval
    );
    assert!(matches!(
        p.judge("delete_records", Some(&ops), None),
        ToolVerdict::Denied(_)
    ));
    assert!(
        matches!(p.judge("mystery", Some(&ops), None), ToolVerdict::Denied(_)),
        "unknown_default deny"
    );
}

#[test]
fn bad_constraint_regexes_are_reported() {
    let spec: ToolPolicySpec = serde_yaml::from_str(
        "tools:\n  - { id: a, access: {}, constraints: [ { pointer: /x, regex: '(' } ] }\n",
    )
    .unwrap();
    assert_eq!(ToolPolicy::build(spec).err().unwrap().len(), 1);
}

fn ctx(p: &Principal) -> ResponseContext<'_> {
    ResponseContext {
        request_id: "r",
        route: Route::ChatCompletions,
        model: None,
        principal: Some(p),
        approvals: Default::default(),
    }
}

fn call(name: &str, args: Value) -> Value {
    json!({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": args.to_string()}}]}}]})
}

#[test]
fn json_calls_are_removed_or_refused() {
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let mut ok = call("get_weather", json!({"city": "Oslo"}));
    let before = ok.clone();
    stage.on_json(&ctx(&user), &mut ok).unwrap();
    assert_eq!(ok, before);
    let mut bad = call("run_shell", json!({"cmd": "rm -rf /"}));
    let d = stage.on_json(&ctx(&user), &mut bad).unwrap();
    assert!(matches!(d, Decision::Annotate(_)));
    assert!(bad["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(bad["choices"][0]["finish_reason"], "stop");
    assert!(!bad.to_string().contains("rm -rf"));
    let strict = ResponseToolAuthz::new(policy("deny"));
    let mut bad = call("delete_records", json!({}));
    match strict.on_json(&ctx(&user), &mut bad).unwrap() {
        Decision::Deny(r) => assert_eq!(r.code, ErrorCode::ToolNotAllowed),
        other => panic!("{other:?}"),
    }
}

#[test]
fn streamed_calls_are_held_then_released_or_replaced() {
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let events = |name: &str, args: &str| -> Vec<SseEvent> {
        let mut v = vec![SseEvent::data(json!({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": name, "arguments": ""}}]}, "finish_reason": null}]}).to_string())];
        for piece in args.as_bytes().chunks(3) {
            v.push(SseEvent::data(json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": std::str::from_utf8(piece).unwrap()}}]}, "finish_reason": null}]}).to_string()));
        }
        v.push(SseEvent::data(
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
                .to_string(),
        ));
        v.push(SseEvent::data("[DONE]"));
        v
    };
    // Allowed: everything comes through, after the finish.
    let mut s = stage.stream(&ctx(&user));
    let mut out = Vec::new();
    let input = events("send_email", r#"{"to":"bob@example.com"}"#);
    let n = input.len();
    for (i, e) in input.into_iter().enumerate() {
        let before = out.len();
        s.on_event(e, &mut out).unwrap();
        if i < n - 2 {
            assert_eq!(out.len(), before, "held until the call is complete");
        }
    }
    let text: String = out.iter().map(|e| e.to_string()).collect();
    let args: String = out
        .iter()
        .filter_map(|e| e.json())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(text.contains("send_email"));
    assert_eq!(args, r#"{"to":"bob@example.com"}"#);
    // Refused: not one byte of the name or the arguments.
    let mut s = stage.stream(&ctx(&user));
    let mut out = Vec::new();
    for e in events("send_email", r#"{"to":"eve@evil.com"}"#) {
        s.on_event(e, &mut out).unwrap();
    }
    let text: String = out.iter().map(|e| e.to_string()).collect();
    assert!(
        !text.contains("send_email") && !text.contains("evil.com"),
        "{text}"
    );
    assert!(
        text.contains("tool call was blocked by policy")
            && text.contains("\"finish_reason\":\"stop\""),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
}

/// A chat request's view, as `user` (or nobody).
fn view_of<'a>(body: &'a Value, user: Option<&'a Principal>) -> RequestView<'a> {
    RequestView {
        request_id: "r",
        authorization: None,
        principal: user,
        dry_run: false,
        route: Route::ChatCompletions,
        body,
        prompt: crate::prompt::of(Route::ChatCompletions, body),
        model: None,
        stream: false,
        client_ip: None,
    }
}

/// Run the request filter over a body for `user`.
async fn check(f: &ToolAuthz, user: &Principal, body: Value) -> Verdict {
    f.check(&view_of(&body, Some(user))).await.unwrap()
}

#[tokio::test]
async fn request_declarations_and_tool_results() {
    let p = policy("remove");
    let user = who(&["user"]);
    let f = ToolAuthz::new(p.clone());
    let run = |body: Value| check(&f, &user, body);
    let tools = |names: &[&str]| {
        json!(names
            .iter()
            .map(|n| json!({"type": "function", "function": {"name": n}}))
            .collect::<Vec<_>>())
    };
    let v = run(json!({"messages": [], "tools": tools(&["get_weather", "send_email"])})).await;
    assert_eq!(v.decision, Decision::Allow);
    let v = run(json!({"messages": [], "tools": tools(&["get_weather", "delete_records"])})).await;
    assert!(matches!(v.decision, Decision::Deny(ref r) if r.code == ErrorCode::ToolNotAllowed));
    let v = run(json!({"messages": [], "tools": tools(&["run_shell"])})).await;
    assert!(
        matches!(v.decision, Decision::Deny(ref r) if r.code == ErrorCode::ToolApprovalRequired && r.reason.contains("not held"))
    );
    let results = json!({"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c9", "type": "function", "function": {"name": "delete_records", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "done"}]});
    let v = run(results).await;
    assert!(
        matches!(v.decision, Decision::Deny(ref r) if r.code == ErrorCode::ToolNotAllowed && r.reason.contains("tool result"))
    );
    // Strip instead of deny.
    let text = include_str!("../../../policies/tools.yaml")
        .replace("on_declared: deny", "on_declared: strip");
    let stripping = ToolAuthz::new(crate::shared::Shared::new(
        ToolPolicy::build(serde_yaml::from_str(&text).unwrap()).unwrap(),
    ));
    let body = json!({"messages": [], "tools": tools(&["get_weather", "delete_records"])});
    let view = view_of(&body, Some(&user));
    let v = stripping.check(&view).await.unwrap();
    assert!(v.facts.contains(&crate::chain::Fact::StripTools(vec![
        "delete_records".into()
    ])));
}

fn denied(v: &Verdict, code: ErrorCode) -> bool {
    matches!(&v.decision, Decision::Deny(r) if r.code == code)
}

#[tokio::test]
async fn legacy_functions_custom_tools_and_forced_choices_are_judged() {
    let p = policy("remove");
    let user = who(&["user"]);
    let f = ToolAuthz::new(p);
    let check = |body: Value| check(&f, &user, body);
    let legacy =
        json!({"messages": [], "functions": [{"name": "delete_records", "parameters": {}}]});
    assert!(denied(&check(legacy).await, ErrorCode::ToolNotAllowed));
    let legacy_ok = json!({"messages": [], "functions": [{"name": "get_weather"}], "function_call": {"name": "get_weather"}});
    assert_eq!(check(legacy_ok).await.decision, Decision::Allow);
    let forced = json!({"messages": [], "function_call": {"name": "delete_records"}});
    assert!(denied(&check(forced).await, ErrorCode::ToolNotAllowed));
    let forced = json!({"messages": [], "tool_choice": {"type": "function", "function": {"name": "delete_records"}}});
    assert!(denied(&check(forced).await, ErrorCode::ToolNotAllowed));
    let custom = json!({"messages": [], "tools": [{"type": "custom", "custom": {"name": "delete_records"}}]});
    assert!(denied(&check(custom).await, ErrorCode::ToolNotAllowed));
    let builtin = json!({"messages": [], "tools": [{"type": "web_search"}]});
    assert!(
        denied(&check(builtin).await, ErrorCode::ToolNotAllowed),
        "unknown_default: deny"
    );
    let unnamed =
        json!({"messages": [], "tools": [{"type": "function", "function": {"parameters": {}}}]});
    assert!(denied(&check(unnamed).await, ErrorCode::InvalidRequest));
    let result = json!({"messages": [
        {"role": "assistant", "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "delete_records", "content": "done"}]});
    assert!(denied(&check(result).await, ErrorCode::ToolNotAllowed));
    let replayed = json!({"messages": [
        {"role": "assistant", "function_call": {"name": "delete_records", "arguments": "{}"}}]});
    assert!(denied(&check(replayed).await, ErrorCode::ToolNotAllowed));
}

#[test]
fn json_legacy_function_call_and_custom_calls_are_judged() {
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let mut body = json!({"choices": [
        {"index": 0, "finish_reason": "function_call", "message": {"role": "assistant", "content": null,
            "function_call": {"name": "delete_records", "arguments": "{\"all\":true}"}}},
        {"index": 1, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "delete_records", "input": "all"}}]}},
        {"index": 2, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "d", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}]});
    stage.on_json(&ctx(&user), &mut body).unwrap();
    assert!(!body.to_string().contains("delete_records"), "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][1]["finish_reason"], "stop");
    assert_eq!(
        body["choices"][2]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
}

#[test]
fn streamed_calls_in_several_choices_per_event() {
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let ev = |choices: Value| SseEvent::data(json!({"id": "x", "choices": choices}).to_string());
    let input = vec![
        ev(json!([
            {"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": null},
            {"index": 1, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "b", "type": "function", "function": {"name": "delete_records", "arguments": ""}}]}, "finish_reason": null},
            {"index": 2, "delta": {"role": "assistant", "function_call": {"name": "delete_records", "arguments": ""}}, "finish_reason": null},
            {"index": 3, "delta": {"role": "assistant", "content": "plain"}, "finish_reason": null}])),
        ev(json!([
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":\"Oslo\"}"}}]}, "finish_reason": null},
            {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"table\":\"users\"}"}}]}, "finish_reason": null},
            {"index": 2, "delta": {"function_call": {"arguments": "{\"table\":\"orders\"}"}}, "finish_reason": null}])),
        ev(json!([
            {"index": 0, "delta": {}, "finish_reason": "tool_calls"},
            {"index": 1, "delta": {}, "finish_reason": "tool_calls"},
            {"index": 2, "delta": {}, "finish_reason": "function_call"},
            {"index": 3, "delta": {}, "finish_reason": "stop"}])),
        SseEvent::data("[DONE]"),
    ];
    let mut s = stage.stream(&ctx(&user));
    let mut out = Vec::new();
    for e in input {
        s.on_event(e, &mut out).unwrap();
    }
    let text: String = out.iter().map(|e| e.to_string()).collect();
    assert!(
        !text.contains("delete_records") && !text.contains("users") && !text.contains("orders"),
        "{text}"
    );
    assert!(
        text.contains("get_weather") && text.contains("Oslo") && text.contains("plain"),
        "{text}"
    );
    let finishes: Vec<(u64, String)> = out
        .iter()
        .filter_map(SseEvent::json)
        .flat_map(|v| v["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| !c["finish_reason"].is_null())
        .map(|c| {
            (
                c["index"].as_u64().unwrap(),
                c["finish_reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        finishes.contains(&(1, "stop".into())) && finishes.contains(&(2, "stop".into())),
        "{finishes:?}"
    );
    assert!(finishes.contains(&(0, "tool_calls".into())) && finishes.contains(&(3, "stop".into())));
}

#[test]
fn a_streamed_call_larger_than_the_hold_cap_stops_the_stream() {
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let mut s = stage.stream(&ctx(&user));
    let mut out = Vec::new();
    let start = json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "send_email", "arguments": ""}}]}, "finish_reason": null}]});
    s.on_event(SseEvent::data(start.to_string()), &mut out)
        .unwrap();
    let piece = "x".repeat(64 * 1024);
    let fragment = json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "finish_reason": null}]}).to_string();
    let mut result = Ok(());
    for _ in 0..(crate::response::MAX_STREAM_HOLD / piece.len() + 2) {
        result = s.on_event(SseEvent::data(fragment.clone()), &mut out);
        if result.is_err() {
            break;
        }
    }
    let e = result.unwrap_err();
    assert!(e.limit && e.code == ErrorCode::UnscreenableOutput, "{e:?}");
    assert!(out.is_empty(), "nothing of the call was released");
}

// ---- Approvals: calls held, handed out, and their results let back in.

fn holding_ctx<'a>(
    p: &'a Principal,
    approvals: crate::approval::Approvals<'a>,
) -> ResponseContext<'a> {
    ResponseContext {
        approvals,
        ..ctx(p)
    }
}

#[test]
fn json_calls_that_need_approval_are_held_as_written_with_a_notice() {
    use crate::approval::{Approvals, HeldCall, Holding};
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let holding = Holding::new("req-1");
    let shell = json!({"id": "c1", "type": "function",
        "function": {"name": "run_shell", "arguments": "{\"cmd\":\"ls /srv\"}"}});
    let weather = json!({"id": "c2", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}});
    let mut reply = json!({"choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
            "content": "Let me look.", "tool_calls": [shell.clone()]}},
        {"index": 1, "finish_reason": "tool_calls", "message": {"role": "assistant",
            "content": null, "tool_calls": [weather.clone(), shell.clone()]}},
        {"index": 2, "finish_reason": "function_call", "message": {"role": "assistant",
            "content": null, "function_call": {"name": "run_shell", "arguments": "{}"}}}]});
    let d = stage
        .on_json(&holding_ctx(&user, Approvals::Hold(&holding)), &mut reply)
        .unwrap();
    let Decision::Annotate(notes) = d else {
        panic!("{d:?}")
    };
    let note = |k: &str| notes.iter().find(|a| a.key == k).map(|a| a.value.clone());
    assert_eq!(note("approval_id"), Some(json!("apr_req1")));
    assert_eq!(
        note("tools_held_for_approval"),
        Some(json!(["run_shell", "run_shell"]))
    );
    // A legacy call has no id its result could be matched by: refused.
    assert_eq!(note("tools_denied"), Some(json!(["run_shell"])));
    assert!(!reply.to_string().contains("ls /srv"), "{reply}");
    // Choice 0: the model's text kept, the notice after it, finished.
    let m0 = &reply["choices"][0];
    let text = m0["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with("Let me look.\n\n[tool call 'run_shell' held for approval apr_req1"),
        "{text}"
    );
    assert!(text.contains("x-portcullis-approval: apr_req1"), "{text}");
    assert_eq!(m0["finish_reason"], "stop");
    // Choice 1: the allowed call stays, the reply still ends in tool calls.
    let m1 = &reply["choices"][1];
    assert_eq!(m1["message"]["tool_calls"], json!([weather]));
    assert_eq!(m1["finish_reason"], "tool_calls");
    assert!(m1["message"]["content"]
        .as_str()
        .unwrap()
        .contains("apr_req1"));
    // The holding has each call exactly as the model wrote it.
    assert_eq!(
        holding.take(),
        vec![
            HeldCall {
                choice: 0,
                call: shell.clone(),
                legacy: false
            },
            HeldCall {
                choice: 1,
                call: shell,
                legacy: false
            },
        ]
    );
    let m2 = &reply["choices"][2];
    assert!(m2["message"].get("function_call").is_none());
    assert_eq!(
        m2["message"]["content"],
        "[a tool call was blocked by policy]"
    );
    // With `on_called: deny` for refused calls, held ones still do not
    // fail the reply.
    let strict = ResponseToolAuthz::new(policy("deny"));
    let holding = Holding::new("req-3");
    let mut reply = call("run_shell", json!({"cmd": "ls"}));
    let d = strict
        .on_json(&holding_ctx(&user, Approvals::Hold(&holding)), &mut reply)
        .unwrap();
    assert!(matches!(d, Decision::Annotate(_)), "{d:?}");
    assert_eq!(holding.take().len(), 1);
}

#[test]
fn without_a_holding_approval_calls_are_refused_and_when_handed_out_they_pass() {
    use crate::approval::Approvals;
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let mut off = call("run_shell", json!({"cmd": "ls"}));
    stage.on_json(&ctx(&user), &mut off).unwrap();
    assert!(off["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(
        off["choices"][0]["message"]["content"],
        "[a tool call was blocked by policy]"
    );
    let strict = ResponseToolAuthz::new(policy("deny"));
    let mut off = call("run_shell", json!({"cmd": "ls"}));
    match strict.on_json(&ctx(&user), &mut off).unwrap() {
        Decision::Deny(r) => assert_eq!(r.code, ErrorCode::ToolApprovalRequired),
        other => panic!("{other:?}"),
    }
    // Handed out: the approved tool passes; a denied one is still removed.
    let redeem = holding_ctx(&user, Approvals::Redeem);
    let mut approved = call("run_shell", json!({"cmd": "ls"}));
    let before = approved.clone();
    stage.on_json(&redeem, &mut approved).unwrap();
    assert_eq!(approved, before);
    let mut denied = call("delete_records", json!({}));
    stage.on_json(&redeem, &mut denied).unwrap();
    assert!(denied["choices"][0]["message"].get("tool_calls").is_none());
}

#[test]
fn a_call_breaking_its_constraints_is_refused_not_put_to_an_approver() {
    use crate::approval::{Approvals, Holding};
    let text = include_str!("../../../policies/tools.yaml").replace(
        "access: { ops: allow, user: approval_required }",
        "access: { ops: allow, user: approval_required }\n    constraints: [ { pointer: /cmd, max_length: 8 } ]",
    );
    let policy = crate::shared::Shared::new(
        ToolPolicy::build(serde_yaml::from_str(&text).unwrap()).unwrap(),
    );
    let user = who(&["user"]);
    assert!(matches!(
        policy.get().judge(
            "run_shell",
            Some(&user),
            Some(&json!({"cmd": "rm -rf /srv"}))
        ),
        ToolVerdict::Denied(_)
    ));
    let stage = ResponseToolAuthz::new(policy);
    let holding = Holding::new("r");
    let mut reply = call("run_shell", json!({"cmd": "rm -rf /srv"}));
    stage
        .on_json(&holding_ctx(&user, Approvals::Hold(&holding)), &mut reply)
        .unwrap();
    assert!(holding.is_empty());
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "[a tool call was blocked by policy]"
    );
}

/// A streamed call to `name` with its arguments in pieces of `cut` bytes,
/// with or without its finishing event.
fn streamed_call(name: &str, args: &str, cut: usize, finished: bool) -> Vec<SseEvent> {
    let chunk = |delta: Value, finish: Value| {
        SseEvent::from_json(
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    };
    let mut v = vec![chunk(
        json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_7", "type": "function",
            "function": {"name": name, "arguments": ""}}]}),
        Value::Null,
    )];
    for piece in args.as_bytes().chunks(cut) {
        v.push(chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": std::str::from_utf8(piece).unwrap()}}]}),
            Value::Null,
        ));
    }
    if finished {
        v.push(chunk(json!({}), json!("tool_calls")));
    }
    v.push(SseEvent::data("[DONE]"));
    v
}

#[test]
fn streamed_calls_that_need_approval_are_held_whole_and_never_sent() {
    use crate::approval::{Approvals, HeldCall, Holding};
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let args = r#"{"cmd":"cat /etc/shadow"}"#;
    for finished in [true, false] {
        let holding = Holding::new("req-2");
        let mut s = stage.stream(&holding_ctx(&user, Approvals::Hold(&holding)));
        let mut out = Vec::new();
        for e in streamed_call("run_shell", args, 1, finished) {
            s.on_event(e, &mut out).unwrap();
        }
        s.finish(&mut out).unwrap();
        let text: String = out.iter().map(|e| e.to_string()).collect();
        assert!(
            !text.contains("shadow") && !text.contains("call_7"),
            "{text}"
        );
        let said: String = out
            .iter()
            .filter_map(|e| {
                e.json()?
                    .pointer("/choices/0/delta/content")?
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert!(
            said.contains("'run_shell' held for approval apr_req2"),
            "{said}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert_eq!(
            holding.take(),
            vec![HeldCall {
                choice: 0,
                call: json!({"id": "call_7", "type": "function",
                    "function": {"name": "run_shell", "arguments": args}}),
                legacy: false,
            }],
            "finished: {finished}"
        );
        let notes = s.report();
        assert!(notes
            .iter()
            .any(|a| a.key == "approval_id" && a.value == "apr_req2"));
    }
}

#[test]
fn an_approved_call_replays_as_the_model_wrote_it_whole_or_streamed() {
    use crate::approval::{Approval, HeldCall, Holding, NewApproval};
    use crate::dialect::{for_route, Replayed};
    let shell = json!({"id": "call_7", "type": "function",
        "function": {"name": "run_shell", "arguments": "{\"cmd\":\"ls\"}"}});
    let holding = Holding::new("r");
    let caller = who(&["user"]);
    let approval = Approval::pending(
        NewApproval {
            holding: &holding,
            calls: vec![
                HeldCall {
                    choice: 0,
                    call: shell.clone(),
                    legacy: false,
                },
                HeldCall {
                    choice: 1,
                    call: json!({"name": "run_shell", "arguments": "{}"}),
                    legacy: true,
                },
            ],
            request_id: "r",
            caller: &caller,
            route: "chat/completions",
            model: "mock-small",
            stream: false,
            request_sha256: "x",
        },
        0,
        1,
    );
    let chat = for_route(Route::ChatCompletions).unwrap();
    assert!(chat.holds_calls());
    assert!(!for_route(Route::Completions).unwrap().holds_calls());
    assert!(!for_route(Route::Messages).unwrap().holds_calls());
    let Some(Replayed::Json(reply)) = chat.replay(&approval, &json!({})) else {
        panic!("no JSON replay")
    };
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "mock-small");
    assert_eq!(reply["choices"][0]["message"]["tool_calls"], json!([shell]));
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        reply["choices"][1]["message"]["function_call"]["name"],
        "run_shell"
    );
    assert_eq!(reply["choices"][1]["finish_reason"], "function_call");
    assert_eq!(reply["usage"]["total_tokens"], 0);
    let ask = json!({"stream": true, "stream_options": {"include_usage": true}});
    let Some(Replayed::Events(events)) = chat.replay(&approval, &ask) else {
        panic!("no stream replay")
    };
    assert!(events.last().unwrap().is_done());
    assert_eq!(
        events[events.len() - 2].json().unwrap()["usage"]["total_tokens"],
        0
    );
    let part = events
        .iter()
        .find_map(|e| e.json()?.pointer("/choices/0/delta/tool_calls/0").cloned())
        .unwrap();
    assert_eq!(part["index"], 0);
    assert_eq!(part["id"], "call_7");
    assert_eq!(part["function"], shell["function"]);
}

/// An approval store that knows one call handed out, and fails on
/// another.
struct OneCall {
    handed_out: String,
    down: String,
}

impl OneCall {
    fn new(user: &Principal) -> Self {
        Self {
            handed_out: crate::approval::fingerprint(user, "call_ok", "run_shell", "{}"),
            down: crate::approval::fingerprint(user, "down", "run_shell", "{}"),
        }
    }
}

#[async_trait]
impl crate::approval::ApprovalStore for OneCall {
    async fn create(&self, _: &crate::approval::Approval) -> Result<(), String> {
        Ok(())
    }
    async fn get(&self, _: &str) -> Result<Option<crate::approval::Approval>, String> {
        Ok(None)
    }
    async fn list(
        &self,
        _: Option<crate::approval::State>,
        _: u64,
        _: usize,
    ) -> Result<Vec<crate::approval::Approval>, String> {
        Ok(vec![])
    }
    async fn replace(
        &self,
        _: &crate::approval::Approval,
        _: crate::approval::State,
    ) -> Result<bool, String> {
        Ok(false)
    }
    async fn handed_out(&self, fingerprint: &str) -> Result<bool, String> {
        if fingerprint == self.down {
            return Err("store down".into());
        }
        Ok(fingerprint == self.handed_out)
    }
}

#[tokio::test]
async fn with_approvals_such_tools_are_offered_and_only_handed_out_calls_come_back() {
    let user = who(&["user"]);
    let f = ToolAuthz::new(policy("remove")).with_approvals(Arc::new(OneCall::new(&user)));
    let declared = json!({"messages": [], "tools": [{"type": "function", "function": {"name": "run_shell"}}],
        "tool_choice": {"type": "function", "function": {"name": "run_shell"}}});
    assert_eq!(check(&f, &user, declared).await.decision, Decision::Allow);
    let result = |id: &str, name: &str, args: &str| {
        json!({"messages": [
            {"role": "assistant", "tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "tool_call_id": id, "content": "total 0"}]})
    };
    assert_eq!(
        check(&f, &user, result("call_ok", "run_shell", "{}"))
            .await
            .decision,
        Decision::Allow
    );
    // Another id, or other arguments under the handed-out id.
    for body in [
        result("call_forged", "run_shell", "{}"),
        result("call_ok", "run_shell", r#"{"cmd":"rm -rf /"}"#),
    ] {
        let v = check(&f, &user, body).await;
        assert!(denied(&v, ErrorCode::ToolApprovalRequired), "{v:?}");
    }
    // Another caller under the same id.
    let other = Principal {
        subject: "someone-else".into(),
        ..who(&["user"])
    };
    let v = check(&f, &other, result("call_ok", "run_shell", "{}")).await;
    assert!(denied(&v, ErrorCode::ToolApprovalRequired), "{v:?}");
    // A result whose call is not in the conversation, or with no call id,
    // cannot be matched to an approval.
    for body in [
        json!({"messages": [{"role": "tool", "tool_call_id": "call_ok", "name": "run_shell", "content": "x"}]}),
        json!({"messages": [{"role": "function", "name": "run_shell", "content": "x"}]}),
    ] {
        let v = check(&f, &user, body).await;
        assert!(denied(&v, ErrorCode::ToolApprovalRequired), "{v:?}");
    }
    // Denied tools are refused before the store is asked (it is down for
    // the other call here).
    let mixed = json!({"messages": [
        {"role": "assistant", "tool_calls": [
            {"id": "down", "type": "function", "function": {"name": "run_shell", "arguments": "{}"}},
            {"id": "d1", "type": "function", "function": {"name": "delete_records", "arguments": "{}"}}]}]});
    let v = check(&f, &user, mixed).await;
    assert!(denied(&v, ErrorCode::ToolNotAllowed), "{v:?}");
    // A store that cannot answer refuses, whatever `on_error` says.
    let body = result("down", "run_shell", "{}");
    let view = view_of(&body, Some(&user));
    let e = f.check(&view).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ApprovalUnavailable);
    assert!(e.limit, "enforced even with on_error: allow");
    // Without a caller nothing can be held: a tool every caller may use
    // with approval is refused to an anonymous one.
    let text = include_str!("../../../policies/tools.yaml").replace(
        "access: { ops: allow, user: approval_required }",
        "access: { ops: allow, \"*\": approval_required }",
    );
    let anyone = ToolAuthz::new(crate::shared::Shared::new(
        ToolPolicy::build(serde_yaml::from_str(&text).unwrap()).unwrap(),
    ))
    .with_approvals(Arc::new(OneCall::new(&user)));
    let declared =
        json!({"messages": [], "tools": [{"type": "function", "function": {"name": "run_shell"}}]});
    let v = anyone.check(&view_of(&declared, None)).await.unwrap();
    assert!(denied(&v, ErrorCode::ToolApprovalRequired), "{v:?}");
    assert_eq!(
        check(&anyone, &user, declared).await.decision,
        Decision::Allow
    );
}

#[test]
fn held_streams_finish_once_per_choice_with_custom_tools_and_no_logprobs() {
    use crate::approval::{Approvals, Holding};
    let user = who(&["user"]);
    let stage = ResponseToolAuthz::new(policy("remove"));
    let holding = Holding::new("req-4");
    let mut s = stage.stream(&holding_ctx(&user, Approvals::Hold(&holding)));
    let chunk = |choices: Value| {
        SseEvent::from_json(
            json!({"id": "x", "object": "chat.completion.chunk", "choices": choices}),
        )
    };
    let events = vec![
        // Choice 0: the whole call and its finish in one event, with log
        // probabilities over the call's tokens. Choice 1: a custom tool.
        chunk(json!([
            {"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "c1", "type": "function",
                "function": {"name": "run_shell", "arguments": "{\"cmd\":\"secret-cmd\"}"}}]},
             "logprobs": {"content": [{"token": "secret-cmd", "logprob": -0.1}]}, "finish_reason": "tool_calls"},
            {"index": 1, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "c2", "type": "custom",
                "custom": {"name": "run_shell", "input": "secret-input"}}]}, "finish_reason": null}])),
        chunk(json!([{"index": 1, "delta": {}, "finish_reason": "tool_calls"}])),
        SseEvent::data("[DONE]"),
    ];
    let mut out = Vec::new();
    for e in events {
        s.on_event(e, &mut out).unwrap();
    }
    s.finish(&mut out).unwrap();
    let text: String = out.iter().map(|e| e.to_string()).collect();
    assert!(
        !text.contains("secret") && !text.contains("logprobs"),
        "{text}"
    );
    for choice in [0, 1] {
        let finishes: Vec<Value> = out
            .iter()
            .filter_map(|e| e.json())
            .flat_map(|v| v["choices"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["index"] == choice && !c["finish_reason"].is_null())
            .collect();
        assert_eq!(finishes.len(), 1, "choice {choice}: {text}");
        assert_eq!(finishes[0]["finish_reason"], "stop");
        assert!(finishes[0]["delta"]["content"]
            .as_str()
            .unwrap()
            .contains("held for approval apr_req4"));
    }
    let held = holding.take();
    assert_eq!(held.len(), 2);
    assert_eq!(
        held[0].call["function"]["arguments"],
        "{\"cmd\":\"secret-cmd\"}"
    );
    assert_eq!(
        held[1].call,
        json!({"id": "c2", "type": "custom", "custom": {"name": "run_shell", "input": "secret-input"}})
    );
    assert_eq!(held[1].choice, 1);

    // JSON: the log probabilities of a choice whose call was held go too.
    let holding = Holding::new("req-5");
    let mut reply = call("run_shell", json!({"cmd": "secret-cmd"}));
    reply["choices"][0]["logprobs"] = json!({"content": [{"token": "secret-cmd"}]});
    stage
        .on_json(&holding_ctx(&user, Approvals::Hold(&holding)), &mut reply)
        .unwrap();
    assert!(!reply.to_string().contains("secret"), "{reply}");
}
