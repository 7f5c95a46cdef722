//! The operator's view: every metric the Grafana dashboard
//! (`dashboards/portcullis.json`) and the alert rules
//! (`dashboards/alerts.yml`) use is served by a gateway that has seen
//! traffic, and promtool accepts the rules, their unit tests and every
//! dashboard query.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SECRET: &str = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";

/// Every PromQL expression of the dashboard: its panels' targets and its
/// variables' queries.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("dashboards/portcullis.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                if let Some(Value::String(q)) = m.get("definition") {
                    out.push(q.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut out);
    out
}

/// Every alert rule: (name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("dashboards/alerts.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"]
                .as_str()
                .expect("every alert has an expression");
            assert!(rule["for"].as_str().is_some(), "{name}: no `for`");
            assert!(
                ["warning", "critical"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            out.push((name.to_string(), expr.to_string()));
        }
    }
    out
}

/// The metric names in an expression.
fn names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("portcullis_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The names of the series served (a histogram's `_bucket`, `_sum` and
/// `_count` each), with at least one sample.
fn served(text: &str) -> BTreeSet<String> {
    let mut families = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        families.insert(name.to_string());
    }
    families
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_is_served() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    for (name, path) in [
        ("tools.yaml", "policies/tools.yaml"),
        ("redaction.yaml", "policies/redaction.yaml"),
    ] {
        setup.files.push((
            name.into(),
            std::fs::read(Path::new(ROOT).join(path)).unwrap(),
        ));
    }
    setup.extra_yaml += "tools:\n  policy: tools.yaml\nredaction:\n  policy: redaction.yaml\n";
    let gw = Gateway::start(setup).await;
    let user = keys.token("alice", &["user"]);
    let trigger = |v: Value| json!({"model": "mock-small", "messages": [{"role": "user", "content": v.to_string()}]});

    // Traffic that touches every family: a plain reply (tokens, latency),
    // a secret redacted, tool calls allowed, denied and held, a refusal,
    // a provider failing.
    assert_eq!(post_as(&gw, &user, &chat("hello")).await.status(), 200);
    assert_eq!(
        post_as(&gw, &user, &chat(&format!("my token is {SECRET}")))
            .await
            .status(),
        200
    );
    for (tool, args) in [
        ("get_weather", json!({"city": "Oslo"})),
        ("delete_records", json!({})),
        ("run_shell", json!({"cmd": "ls"})),
    ] {
        let r = post_as(
            &gw,
            &user,
            &trigger(json!({"mock_tool_call": {"name": tool, "arguments": args}})),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let declared = json!({"model": "mock-small", "tools": [{"type": "function", "function": {"name": "delete_records"}}],
        "messages": [{"role": "user", "content": "hi"}]});
    expect_error(
        post_as(&gw, &user, &declared).await,
        403,
        "tool_not_allowed",
    )
    .await;
    expect_error(
        post_as(&gw, &user, &trigger(json!({"mock_error": 500}))).await,
        502,
        "upstream_error",
    )
    .await;
    // A client cannot add label values: an unknown model, a tool the
    // policy does not list.
    let unknown =
        json!({"model": "made-up-model-xyz", "messages": [{"role": "user", "content": "hi"}]});
    expect_error(post_as(&gw, &user, &unknown).await, 404, "model_not_found").await;
    let mystery = trigger(json!({"mock_tool_call": {"name": "mystery_tool_xyz", "arguments": {}}}));
    assert_eq!(post_as(&gw, &user, &mystery).await.status(), 200);
    // A stream's usage is counted too.
    let r = post_as(&gw, &user, &stream_chat("streamed words")).await;
    assert_eq!(r.status(), 200);
    Events::new(r).rest().await;
    // The record is written when the request closes, the metrics with it.
    let records = gw.records(10).await;

    let text = reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let families = served(&text);
    let mut used = BTreeSet::new();
    for q in dashboard_queries() {
        used.extend(names(&q));
    }
    let rules = alert_rules();
    assert_eq!(
        rules.len(),
        5,
        "blocked spike, audit sink, guard, upstream errors, latency budget"
    );
    for (_, expr) in &rules {
        used.extend(names(expr));
    }
    assert!(used.len() >= 20, "{used:?}");
    // A histogram is served as its `_bucket`, `_sum` and `_count` series.
    let missing: Vec<&String> = used.iter().filter(|n| !families.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used but not served: {missing:?}\n{text}"
    );

    // The new series carry what happened.
    for line in [
        "portcullis_tool_calls_total{decision=\"allowed\",tool=\"get_weather\"} 1",
        "portcullis_tool_calls_total{decision=\"denied\",tool=\"delete_records\"} 1",
        "portcullis_tool_calls_total{decision=\"denied\",tool=\"other\"} 1",
        "portcullis_refusals_total{code=\"model_not_found\",filter=\"model_registry\"} 1",
        "portcullis_tool_calls_total{decision=\"held\",tool=\"run_shell\"} 1",
        "portcullis_refusals_total{code=\"tool_not_allowed\",filter=\"tool_authz\"} 1",
        "portcullis_upstream_errors_total{kind=\"status_5xx\",provider=\"mock\"} 1",
        "portcullis_models{status=\"approved\"}",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("portcullis_redactions_total{filter=\"redact\",rule=\"github")),
        "{text}"
    );
    assert!(
        !text.contains("made-up-model-xyz") && !text.contains("mystery_tool_xyz"),
        "{text}"
    );
    // Output tokens: those every record reports, the stream's included.
    let output: f64 = text
        .lines()
        .filter(|l| l.starts_with("portcullis_tokens_total{kind=\"output\",model=\"mock-small\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let recorded: u64 = records
        .iter()
        .filter_map(|r| r["usage"]["completion_tokens"].as_u64())
        .sum();
    assert!(records
        .iter()
        .any(|r| r["stream"] == true && r["usage"].is_object()));
    assert_eq!(output, recorded as f64, "{text}");
}

/// `promtool` from Debian's `prometheus` package (`scripts/setup.sh`).
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool must be installed (scripts/setup.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn promtool_accepts_the_rules_their_tests_and_every_dashboard_query() {
    let dir = Path::new(ROOT).join("dashboards");
    assert!(promtool(&["check", "rules", "alerts.yml"], &dir).contains("SUCCESS: 5 rules found"));
    // Each alert fires on the series that should fire it (and not before).
    assert!(promtool(&["test", "rules", "alerts.test.yml"], &dir).contains("SUCCESS"));

    // The dashboard's queries, with Grafana's variables filled in, as
    // recording rules: promtool parses every one.
    let tmp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|q| !q.starts_with("label_values("))
        .collect();
    assert!(queries.len() >= 25, "{}", queries.len());
    for (i, q) in queries.iter().enumerate() {
        let q = q
            .replace("$__rate_interval", "5m")
            .replace("$model", ".*")
            .replace("$tenant", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&q).unwrap()
        ));
    }
    std::fs::write(tmp.path().join("queries.yml"), rules).unwrap();
    let out = promtool(&["check", "rules", "queries.yml"], tmp.path());
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}
