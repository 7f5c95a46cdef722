//! The admin API, the model registry and freezes, through the gateway.

use crate::support::*;
use serde_json::{json, Value};

async fn start() -> (Mock, TestKeys, Gateway) {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.registry_yaml =
        "registry:\n  approve_seed: true\n  default_max_risk: medium\n  max_risk_by_role: { ops: high }\n".into();
    let gw = Gateway::start(setup).await;
    (mock, keys, gw)
}

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

async fn admin_records(gw: &Gateway, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let recs: Vec<Value> = read_records(&gw.audit_path)
            .into_iter()
            .filter(|r| r["kind"] == "admin")
            .collect();
        if recs.len() >= n {
            return recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} admin records, found {}",
            recs.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_auth_no_token_wrong_role_and_auditor_writing() {
    let (_mock, keys, gw) = start().await;
    let user = keys.token("u", &["user"]);
    let auditor = keys.token("aud", &["portcullis:auditor"]);
    let root = keys.token("root", &["portcullis:admin"]);

    expect_error(
        admin(&gw, None, "GET", "/admin/models", None).await,
        401,
        "invalid_token",
    )
    .await;
    expect_error(
        admin(&gw, Some("junk"), "GET", "/admin/models", None).await,
        401,
        "invalid_token",
    )
    .await;
    expect_error(
        admin(&gw, Some(&user), "GET", "/admin/models", None).await,
        403,
        "forbidden",
    )
    .await;
    let r = admin(&gw, Some(&auditor), "GET", "/admin/models", None).await;
    assert_eq!(r.status(), 200);
    expect_error(
        admin(
            &gw,
            Some(&auditor),
            "POST",
            "/admin/models/mock-small/freeze",
            None,
        )
        .await,
        403,
        "forbidden",
    )
    .await;
    let r = admin(
        &gw,
        Some(&root),
        "POST",
        "/admin/models/mock-small/freeze",
        None,
    )
    .await;
    assert_eq!(r.status(), 200);

    let recs = admin_records(&gw, 6).await;
    let refused: Vec<&Value> = recs.iter().filter(|r| r["decision"] == "blocked").collect();
    assert_eq!(refused.len(), 4);
    assert_eq!(refused[3]["sub"], "aud");
    assert_eq!(refused[3]["action"], "model.freeze");
    let done = recs.last().unwrap();
    assert_eq!(
        (done["sub"].as_str(), done["decision"].as_str()),
        (Some("root"), Some("allowed"))
    );
    assert_eq!(done["before"]["status"], "approved");
    assert_eq!(done["after"]["status"], "frozen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_api_gates_traffic() {
    let (mock, keys, gw) = start().await;
    let root = keys.token("root", &["portcullis:admin"]);
    let user = keys.token("u", &["user"]);
    let new = json!({"id": "m-new", "provider": "mock", "upstream_model": "mock-new-v1", "version": "v1", "risk_tier": "low"});
    let r = admin(&gw, Some(&root), "POST", "/admin/models", Some(&new)).await;
    assert_eq!(r.status(), 201);
    let entry: Value = r.json().await.unwrap();
    assert_eq!(entry["status"], "registered");
    expect_error(
        admin(&gw, Some(&root), "POST", "/admin/models", Some(&new)).await,
        409,
        "invalid_transition",
    )
    .await;
    let bogus = json!({"id": "x", "provider": "nowhere"});
    expect_error(
        admin(&gw, Some(&root), "POST", "/admin/models", Some(&bogus)).await,
        400,
        "invalid_request",
    )
    .await;

    let body = ask("m-new");
    let call = || post_as(&gw, &user, &body);
    let id = expect_error(call().await, 403, "model_not_approved").await;
    assert_eq!(gw.record_for(&id).await["blocked_by"], "model_registry");

    let step = |action: &'static str| {
        admin(
            &gw,
            Some(&root),
            "POST",
            match action {
                "approve" => "/admin/models/m-new/approve",
                "freeze" => "/admin/models/m-new/freeze",
                "unfreeze" => "/admin/models/m-new/unfreeze",
                _ => "/admin/models/m-new/retire",
            },
            None,
        )
    };
    let r = step("approve").await;
    assert_eq!(r.status(), 200);
    let after: Value = r.json().await.unwrap();
    assert_eq!(
        (after["status"].as_str(), after["approved_by"].as_str()),
        (Some("approved"), Some("root"))
    );
    let r = call().await;
    assert_eq!(r.status(), 200);
    let sent: Value = serde_json::from_slice(&mock.state.last_request().unwrap().body).unwrap();
    assert_eq!(sent["model"], "mock-new-v1", "routed by the registry entry");

    expect_error(step("approve").await, 409, "invalid_transition").await;
    assert_eq!(step("freeze").await.status(), 200);
    expect_error(call().await, 403, "model_frozen").await;
    expect_error(step("freeze").await, 409, "invalid_transition").await;
    assert_eq!(step("unfreeze").await.status(), 200);
    assert_eq!(call().await.status(), 200);
    assert_eq!(step("retire").await.status(), 200);
    expect_error(call().await, 403, "model_not_approved").await;
    for action in ["approve", "freeze", "unfreeze", "retire"] {
        expect_error(step(action).await, 409, "invalid_transition").await;
    }
    expect_error(
        admin(
            &gw,
            Some(&root),
            "POST",
            "/admin/models/ghost/approve",
            None,
        )
        .await,
        404,
        "model_not_found",
    )
    .await;
    expect_error(
        admin(
            &gw,
            Some(&root),
            "POST",
            "/admin/models/m-new/explode",
            None,
        )
        .await,
        400,
        "invalid_request",
    )
    .await;

    let r = admin(&gw, Some(&root), "GET", "/admin/models/m-new", None).await;
    let entry: Value = r.json().await.unwrap();
    let steps: Vec<&str> = entry["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["registered", "approved", "frozen", "approved", "retired"]
    );
    assert!(entry["history"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .all(|t| t["actor"] == "root"));

    // Admin records are in the same chain as request records.
    let mut gw = gw;
    gw.stop();
    let out = std::process::Command::new(bin())
        .args(["audit", "verify"])
        .arg(&gw.audit_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezes_risk_tiers_and_the_model_list() {
    let (_mock, keys, gw) = start().await;
    // An admin of another tenant: it may freeze tenant acme.
    let root = keys.sign(
        "test",
        &json!({"sub": "root", "tenant": "platform", "roles": ["portcullis:admin"],
            "iss": "test-issuer", "aud": "portcullis", "exp": now_secs() + 600}),
    );
    let eve = keys.token("eve", &["user"]);
    assert_eq!(post_as(&gw, &eve, &ask("mock-small")).await.status(), 200);
    assert_eq!(
        admin(&gw, Some(&root), "POST", "/admin/subjects/eve/freeze", None)
            .await
            .status(),
        200
    );
    let id = expect_error(
        post_as(&gw, &eve, &ask("mock-small")).await,
        403,
        "subject_frozen",
    )
    .await;
    assert!(gw.record_for(&id).await["reason"]
        .as_str()
        .unwrap()
        .contains("frozen by root"));
    assert_eq!(
        admin(
            &gw,
            Some(&root),
            "POST",
            "/admin/subjects/eve/unfreeze",
            None
        )
        .await
        .status(),
        200
    );
    assert_eq!(post_as(&gw, &eve, &ask("mock-small")).await.status(), 200);
    assert_eq!(
        admin(&gw, Some(&root), "POST", "/admin/tenants/acme/freeze", None)
            .await
            .status(),
        200
    );
    expect_error(
        post_as(&gw, &eve, &ask("mock-small")).await,
        403,
        "tenant_frozen",
    )
    .await;
    assert_eq!(
        admin(
            &gw,
            Some(&root),
            "POST",
            "/admin/tenants/acme/unfreeze",
            None
        )
        .await
        .status(),
        200
    );

    // A high-risk model: not for role user, fine for ops.
    let r = admin(
        &gw,
        Some(&root),
        "POST",
        "/admin/models",
        Some(&json!({"id": "wild", "provider": "mock", "risk_tier": "high"})),
    )
    .await;
    assert_eq!(r.status(), 201);
    admin(&gw, Some(&root), "POST", "/admin/models/wild/approve", None).await;
    expect_error(post_as(&gw, &eve, &ask("wild")).await, 403, "forbidden").await;
    let ops = keys.token("olly", &["ops"]);
    assert_eq!(post_as(&gw, &ops, &ask("wild")).await.status(), 200);

    // /v1/models lists what the caller may use now.
    let list = |token: String| {
        let url = gw.url("/v1/models");
        async move {
            let v: Value = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mut ids: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(list(eve.clone()).await, ["mock-large", "mock-small"]);
    assert_eq!(list(ops).await, ["mock-large", "mock-small", "wild"]);
    admin(
        &gw,
        Some(&root),
        "POST",
        "/admin/models/mock-large/freeze",
        None,
    )
    .await;
    assert_eq!(list(eve).await, ["mock-small"]);
    let r = reqwest::Client::new()
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "invalid_token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_survive_kill_9_and_a_corrupt_state_file_stops_start_up() {
    let (_mock, keys, mut gw) = start().await;
    let root = keys.token("root", &["portcullis:admin"]);
    let user = keys.token("u", &["user"]);
    let new = json!({"id": "durable", "provider": "mock"});
    assert_eq!(
        admin(&gw, Some(&root), "POST", "/admin/models", Some(&new))
            .await
            .status(),
        201
    );
    assert_eq!(
        admin(
            &gw,
            Some(&root),
            "POST",
            "/admin/models/durable/approve",
            None
        )
        .await
        .status(),
        200
    );
    gw.kill_hard();
    gw.restart().await;
    assert_eq!(
        post_as(&gw, &user, &ask("durable")).await.status(),
        200,
        "approval lost after kill -9"
    );
    gw.kill_hard();

    let state = gw.dir.path().join("var/registry.json");
    assert!(state.exists());
    std::fs::write(&state, b"{\"revision\": 3, \"models\": {trunc").unwrap();
    let err = gw.start_fails();
    assert!(
        err.contains("registry.json") && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        b"{\"revision\": 3, \"models\": {trunc",
        "never reset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_reports_every_filter_and_spends_nothing() {
    let (mock, keys, gw) = start().await;
    let root = keys.token("root", &["portcullis:admin"]);
    let sim = |who: Value, model: &str| json!({"principal": who, "body": {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}});
    let trial = json!({"sub": "tina", "tenant": "acme", "roles": ["trial"]});
    for _ in 0..10 {
        let r = admin(
            &gw,
            Some(&root),
            "POST",
            "/admin/simulate",
            Some(&sim(trial.clone(), "mock-small")),
        )
        .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["decision"], "allowed", "{v}");
        let names: Vec<&str> = v["filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["filter"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["jwt_auth", "freeze", "rate_limit", "model_registry"]
        );
        assert_eq!(v["upstream"]["provider"], "mock");
    }
    let r = admin(
        &gw,
        Some(&root),
        "POST",
        "/admin/simulate",
        Some(&sim(trial.clone(), "nope")),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (
            v["decision"].as_str(),
            v["blocked_by"].as_str(),
            v["reason_code"].as_str()
        ),
        (
            Some("blocked"),
            Some("model_registry"),
            Some("model_not_found")
        )
    );

    // The trial burst of 3 is untouched by 11 simulations.
    let tina = keys.sign(
        "test",
        &json!({"sub": "tina", "tenant": "acme", "roles": ["trial"], "iss": "test-issuer",
        "aud": "portcullis", "exp": now_secs() + 600}),
    );
    let small = json!({"model": "mock-small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        assert_eq!(post_as(&gw, &tina, &small).await.status(), 200);
    }
    assert_eq!(post_as(&gw, &tina, &small).await.status(), 429);
    assert_eq!(
        mock.state.requests().len(),
        3,
        "simulations forward nothing"
    );
    let records = gw.records(15).await;
    assert_eq!(
        records.iter().filter(|r| r["kind"] == "request").count(),
        4,
        "only the 4 real requests"
    );
    assert_eq!(records.iter().filter(|r| r["kind"] == "admin").count(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_admin_api() {
    let (_mock, keys, gw) = start().await;
    let root = keys.token("root", &["portcullis:admin"]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .args(["--admin-url", &gw.admin])
            .env("PORTCULLIS_ADMIN_TOKEN", &root)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = run(&[
        "models",
        "register",
        "cli-model",
        "--provider",
        "mock",
        "--risk-tier",
        "low",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["models", "approve", "cli-model"]);
    assert!(ok && out.contains("cli-model is now approved"), "{out}");
    let (ok, out) = run(&["models", "list"]);
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS") && header.contains("RISK"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("cli-model") && l.contains("approved") && l.contains("root")),
        "{out}"
    );
    let (ok, out) = run(&["models", "show", "cli-model"]);
    assert!(
        ok && out.contains("history") && out.contains("registered"),
        "{out}"
    );
    let (ok, out) = run(&["models", "approve", "cli-model"]);
    assert!(!ok && out.contains("409 invalid_transition"), "{out}");
    let (ok, out) = run(&["freeze", "--subject", "eve"]);
    assert!(ok && out.contains("subject eve is frozen"), "{out}");
    let eve = keys.token("eve", &["user"]);
    expect_error(
        post_as(&gw, &eve, &ask("cli-model")).await,
        403,
        "subject_frozen",
    )
    .await;
    let (ok, out) = run(&["unfreeze", "--subject", "eve"]);
    assert!(ok, "{out}");
    assert_eq!(post_as(&gw, &eve, &ask("cli-model")).await.status(), 200);
    let (ok, out) = run(&["freeze", "--tenant", "globex"]);
    assert!(ok && out.contains("tenant globex is frozen"), "{out}");
    // Names are percent-encoded into the path.
    let (ok, out) = run(&["freeze", "--subject", "a b/c"]);
    assert!(ok && out.contains("subject a b/c is frozen"), "{out}");
    let out = std::process::Command::new(bin())
        .args(["models", "list", "--admin-url", &gw.admin])
        .env_remove("PORTCULLIS_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_rate_limit_policy() {
    let (_mock, keys, gw) = start().await;
    let root = keys.token("root", &["portcullis:admin"]);
    let user = keys.token("rita", &["trial"]);
    let r = post_as(&gw, &user, &ask("mock-small")).await;
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
    std::fs::write(
        gw.dir.path().join("limits.yaml"),
        TEST_LIMITS.replace(
            "requests_per_minute: 3, burst: 3",
            "requests_per_minute: 30, burst: 30",
        ),
    )
    .unwrap();
    let r = admin(&gw, Some(&root), "POST", "/admin/reload", None).await;
    assert_eq!(r.status(), 200);
    let r = post_as(&gw, &user, &ask("mock-small")).await;
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "30");
    // A broken policy is refused and the running one kept.
    std::fs::write(
        gw.dir.path().join("limits.yaml"),
        "tiers: []\ndefault_tier: gone\n",
    )
    .unwrap();
    let r = admin(&gw, Some(&root), "POST", "/admin/reload", None).await;
    expect_error(r, 400, "invalid_request").await;
    let r = post_as(&gw, &user, &ask("mock-small")).await;
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "30");
}
