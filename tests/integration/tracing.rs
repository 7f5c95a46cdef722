//! OpenTelemetry traces: one request's spans (the request, a child per
//! filter, the provider call) reach an in-process OTLP/HTTP receiver, in
//! the client's trace, and the provider gets the provider call's span as
//! its parent. Off, the client's `traceparent` passes through unchanged.

use crate::support::*;
use serde_json::Value;
use std::collections::BTreeMap;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

async fn post_traced(
    gw: &Gateway,
    token: &str,
    body: &Value,
    traceparent: &str,
) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=abc")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Spans received until those of `trace` include a root span, by trace.
async fn spans_of(collector: &mut Receiver, all: &mut Vec<Value>, trace: &str) -> Vec<Value> {
    loop {
        let mine: Vec<Value> = all
            .iter()
            .filter(|s| s["traceId"] == trace)
            .cloned()
            .collect();
        if mine.iter().any(|s| s["kind"] == 2) {
            return mine;
        }
        let (path, body) = collector.next().await;
        assert_eq!(path, "/v1/traces");
        let resource = &body["resourceSpans"][0]["resource"]["attributes"];
        assert!(
            resource
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["key"] == "service.name" && a["value"]["stringValue"] == "portcullis"),
            "{resource}"
        );
        for s in body["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap()
        {
            all.push(s.clone());
        }
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
        .unwrap_or(&Value::Null)
}

fn ns(span: &Value, field: &str) -> u128 {
    span[field].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_one_trace_with_a_span_per_filter_and_the_provider_call() {
    let mut collector = Receiver::start().await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.files.push((
        "tools.yaml".into(),
        include_bytes!("../../policies/tools.yaml").to_vec(),
    ));
    setup.extra_yaml += &format!(
        "tools:\n  policy: tools.yaml\ntracing:\n  otlp_endpoint: {}/v1/traces\n  batch: 64\n",
        collector.url
    );
    let gw = Gateway::start(setup).await;
    let token = keys.token("alice", &["user"]);
    let mut all = Vec::new();

    // A request in the client's trace, not to be sampled: no span leaves.
    let quiet = "00-11111111111111111111111111111111-2222222222222222-00";
    assert_eq!(
        post_traced(&gw, &token, &chat("quiet"), quiet)
            .await
            .status(),
        200
    );
    let sent = mock.state.last_request().unwrap();
    assert_eq!(
        &sent.header("traceparent").unwrap()[..36],
        "00-11111111111111111111111111111111-",
        "the provider stays in the unsampled trace"
    );
    assert!(sent.header("traceparent").unwrap().ends_with("-00"));

    // A sampled request.
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let r = post_traced(&gw, &token, &chat("hello"), &traceparent).await;
    assert_eq!(r.status(), 200);
    let request_id = request_id(&r);
    let sent = mock.state.last_request().unwrap();
    let upstream = sent
        .header("traceparent")
        .expect("traceparent to the provider")
        .to_string();
    assert_eq!(sent.header("tracestate"), Some("vendor=abc"));
    let parts: Vec<&str> = upstream.split('-').collect();
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", CLIENT_TRACE, "01"),
        "{upstream}"
    );
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "the provider's parent is the gateway's span"
    );

    let spans = spans_of(&mut collector, &mut all, CLIENT_TRACE).await;
    assert!(
        all.iter()
            .all(|s| s["traceId"] != "11111111111111111111111111111111"),
        "an unsampled trace was exported"
    );
    let root = spans.iter().find(|s| s["kind"] == 2).unwrap();
    assert_eq!(root["parentSpanId"], CLIENT_SPAN);
    assert_eq!(root["name"], "POST /v1/chat/completions");
    assert_eq!(
        attr(root, "portcullis.request_id")["stringValue"],
        request_id.as_str()
    );
    assert_eq!(attr(root, "portcullis.decision")["stringValue"], "allowed");
    assert_eq!(attr(root, "http.response.status_code")["intValue"], "200");
    let root_id = root["spanId"].as_str().unwrap();
    let (start, end) = (ns(root, "startTimeUnixNano"), ns(root, "endTimeUnixNano"));
    assert!(start < end);

    let children: BTreeMap<String, &Value> = spans
        .iter()
        .filter(|s| s["parentSpanId"] == root_id)
        .map(|s| (s["name"].as_str().unwrap().to_string(), s))
        .collect();
    for name in [
        "filter jwt_auth",
        "filter rate_limit",
        "filter freeze",
        "filter model_registry",
        "filter tool_authz",
        "filter response_tool_authz",
        "provider mock",
    ] {
        let s = children
            .get(name)
            .unwrap_or_else(|| panic!("no span `{name}` in {children:?}"));
        assert!(
            ns(s, "startTimeUnixNano") >= start && ns(s, "endTimeUnixNano") <= end,
            "{name} outside the request: {s}"
        );
    }
    let auth = children["filter jwt_auth"];
    assert_eq!(
        attr(auth, "portcullis.filter.action")["stringValue"],
        "allow"
    );
    let provider = children["provider mock"];
    assert_eq!(provider["kind"], 3);
    assert_eq!(
        provider["spanId"], parts[2],
        "the provider's parent is this span"
    );
    assert_eq!(
        attr(provider, "http.response.status_code")["intValue"],
        "200"
    );
    assert!(attr(provider, "gen_ai.usage.output_tokens")["intValue"].is_string());
    // Filters run before the provider is called.
    assert!(
        ns(children["filter tool_authz"], "endTimeUnixNano") <= ns(provider, "startTimeUnixNano")
    );

    // Without a traceparent: a trace of its own. A refusal is traced too.
    let r = post_as(&gw, "not-a-token", &chat("hi")).await;
    let rid = expect_error(r, 401, "invalid_token").await;
    let mut root = None;
    while root.is_none() {
        let (_, body) = collector.next().await;
        for s in body["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap()
        {
            if attr(s, "portcullis.request_id")["stringValue"] == rid.as_str() {
                root = Some(s.clone());
            }
        }
    }
    let root = root.unwrap();
    assert!(root.get("parentSpanId").is_none());
    assert_ne!(root["traceId"], CLIENT_TRACE);
    assert_eq!(
        attr(&root, "portcullis.reason_code")["stringValue"],
        "invalid_token"
    );
    assert_eq!(
        attr(&root, "portcullis.blocked_by")["stringValue"],
        "jwt_auth"
    );

    let exported = metric(&gw, "portcullis_trace_spans_total{result=\"exported\"}").await;
    assert!(exported >= 8.0, "{exported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_the_clients_traceparent_reaches_the_provider_unchanged() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(secured(mock.addr, &keys, TEST_LIMITS)).await;
    let token = keys.token("alice", &["user"]);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(
        post_traced(&gw, &token, &chat("hi"), &traceparent)
            .await
            .status(),
        200
    );
    let sent = mock.state.last_request().unwrap();
    assert_eq!(sent.header("traceparent"), Some(traceparent.as_str()));
    assert_eq!(sent.header("tracestate"), Some("vendor=abc"));
    // A malformed one is not passed on.
    assert_eq!(
        post_traced(&gw, &token, &chat("hi"), "00-nonsense")
            .await
            .status(),
        200
    );
    let sent = mock.state.last_request().unwrap();
    assert_eq!(sent.header("traceparent"), None);
    assert_eq!(sent.header("tracestate"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_a_collector_does_not_take_are_counted_and_requests_go_on() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.extra_yaml += &format!(
        "tracing:\n  otlp_endpoint: http://127.0.0.1:{}/v1/traces\n  timeout_ms: 500\n",
        free_port()
    );
    let gw = Gateway::start(setup).await;
    let token = keys.token("alice", &["user"]);
    assert_eq!(post_as(&gw, &token, &chat("hi")).await.status(), 200);
    let deadline = std::time::Instant::now() + PATIENCE;
    while metric(&gw, "portcullis_trace_spans_total{result=\"failed\"}").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "failed export not counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        post_as(&gw, &token, &chat("still served")).await.status(),
        200
    );
}
