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

/// Run the request filter over a body for `user`.
async fn check(f: &ToolAuthz, user: &Principal, body: Value) -> Verdict {
    let view = RequestView {
        request_id: "r",
        authorization: None,
        principal: Some(user),
        dry_run: false,
        route: Route::ChatCompletions,
        body: &body,
        prompt: crate::prompt::of(Route::ChatCompletions, &body),
        model: None,
        stream: false,
        client_ip: None,
    };
    f.check(&view).await.unwrap()
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
        matches!(v.decision, Decision::Deny(ref r) if r.code == ErrorCode::ToolApprovalRequired && r.reason.contains("pending"))
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
    let view = RequestView {
        request_id: "r",
        authorization: None,
        principal: Some(&user),
        dry_run: false,
        route: Route::ChatCompletions,
        body: &body,
        prompt: crate::prompt::of(Route::ChatCompletions, &body),
        model: None,
        stream: false,
        client_ip: None,
    };
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
