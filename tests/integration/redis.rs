//! Shared limits through a real `redis-server` (started here, on a free
//! port; `scripts/setup.sh` installs it).

use crate::support::*;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/setup.sh installs it)");
        let deadline = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Redis { port, child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn clustered(provider: std::net::SocketAddr, keys: &TestKeys, redis: &Redis) -> Setup {
    let mut setup = secured(provider, keys, TEST_LIMITS);
    setup.extra_yaml += &format!(
        "state:\n  redis_url: redis://127.0.0.1:{}\n  redis_timeout_ms: 300\n",
        redis.port
    );
    setup
}

/// Limits and the registry fail open when Redis is gone.
fn fail_open_without_redis(setup: &mut Setup) {
    setup.extra_yaml = setup
        .extra_yaml
        .replace("rate_limit:\n", "rate_limit:\n  on_error: allow\n");
    setup.registry_yaml = "registry:\n  approve_seed: true\n  on_error: allow\n".into();
}

fn small() -> serde_json::Value {
    json!({"model": "mock-small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_limit() {
    let redis = Redis::start(free_port()).await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let a = Gateway::start(clustered(mock.addr, &keys, &redis)).await;
    let b = Gateway::start(clustered(mock.addr, &keys, &redis)).await;

    // One after the other, alternating: the trial burst of 3 holds across both.
    let t = keys.token("shared", &["trial"]);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        statuses.push(post_as(gw, &t, &small()).await.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        5,
        "{statuses:?}"
    );

    // All at once, across both: still never more than the limit.
    let t = keys.token("burst", &["trial"]);
    let body = small();
    let sends = (0..20).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        post_as(gw, &t, &body)
    });
    let results = futures_util::future::join_all(sends).await;
    let admitted = results.iter().filter(|r| r.status() == 200).count();
    assert_eq!(admitted, 3);
    assert!(results
        .iter()
        .all(|r| r.status() == 200 || r.status() == 429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_and_recovers() {
    let port = free_port();
    let mut redis = Redis::start(port).await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let gw = Gateway::start(clustered(mock.addr, &keys, &redis)).await;
    let t = keys.token("user", &["user"]);
    assert_eq!(post_as(&gw, &t, &small()).await.status(), 200);

    redis.kill();
    // Fail closed: the limiter cannot decide at once, and the registry
    // snapshot is refused once it is a second old.
    let mut codes = std::collections::BTreeSet::new();
    let deadline = Instant::now() + PATIENCE;
    while !codes.contains("registry_unavailable") {
        assert!(
            Instant::now() < deadline,
            "registry never failed closed: {codes:?}"
        );
        let r = post_as(&gw, &t, &small()).await;
        assert_eq!(r.status(), 503);
        let id = request_id(&r);
        let body: serde_json::Value = r.json().await.unwrap();
        let code = body["error"]["code"].as_str().unwrap().to_string();
        assert!(
            code == "limiter_unavailable" || code == "registry_unavailable",
            "{code}"
        );
        let rec = gw.record_for(&id).await;
        assert_eq!(rec["decision"], "error");
        assert_eq!(rec["reason_code"], code.as_str());
        let failed = rec["filters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["action"] == "error");
        assert!(failed.is_some(), "{rec}");
        codes.insert(code);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        mock.state.requests().len(),
        1,
        "nothing forwarded while Redis is down"
    );

    let _redis = Redis::start(port).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = post_as(&gw, &t, &small()).await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            Instant::now() < deadline,
            "gateway did not reconnect to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A freeze made through one instance's admin API is applied by the other.
/// The delay is printed (and reported), not asserted: no test here depends
/// on wall-clock time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_on_one_instance_is_applied_by_the_other() {
    let redis = Redis::start(free_port()).await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let a = Gateway::start(clustered(mock.addr, &keys, &redis)).await;
    let b = Gateway::start(clustered(mock.addr, &keys, &redis)).await;
    let root = keys.token("root", &["portcullis:admin"]);
    let user = keys.token("mallory", &["user"]);
    assert_eq!(post_as(&b, &user, &small()).await.status(), 200);

    for (path, code) in [
        ("/admin/subjects/mallory/freeze", "subject_frozen"),
        ("/admin/models/mock-small/freeze", "model_frozen"),
    ] {
        if code == "model_frozen" {
            admin(
                &a,
                Some(&root),
                "POST",
                "/admin/subjects/mallory/unfreeze",
                None,
            )
            .await;
            let deadline = Instant::now() + PATIENCE;
            while post_as(&b, &user, &small()).await.status() != 200 {
                assert!(Instant::now() < deadline, "unfreeze never reached b");
            }
        }
        let r = admin(&a, Some(&root), "POST", path, None).await;
        assert_eq!(r.status(), 200);
        let frozen_at = Instant::now();
        let deadline = frozen_at + PATIENCE;
        loop {
            let r = post_as(&b, &user, &small()).await;
            if r.status() == 403 {
                expect_error(r, 403, code).await;
                break;
            }
            assert_eq!(r.status(), 200);
            assert!(
                Instant::now() < deadline,
                "{path} never reached the other instance"
            );
        }
        eprintln!(
            "propagation: {path} on instance a refused by instance b after {:?}",
            frozen_at.elapsed()
        );
    }
    // b's own admin API shows a's change.
    let v: serde_json::Value = admin(&b, Some(&root), "GET", "/admin/models/mock-small", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "frozen");
}

/// Redis restarts without its data while instance `a` runs; instance `b`
/// then starts and may seed a fresh registry. `a` puts its newer snapshot
/// back (revisions only grow), and an admin change made after that is
/// applied to the restored registry: the freeze made before the loss
/// still holds everywhere, and so do the approvals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_lost_by_redis_is_restored_not_wiped() {
    let port = free_port();
    let mut redis = Redis::start(port).await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let a = Gateway::start(clustered(mock.addr, &keys, &redis)).await;
    let root = keys.token("root", &["portcullis:admin"]);
    let mallory = keys.token("mallory", &["user"]);
    let r = admin(
        &a,
        Some(&root),
        "POST",
        "/admin/subjects/mallory/freeze",
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    expect_error(post_as(&a, &mallory, &small()).await, 403, "subject_frozen").await;

    redis.kill();
    let _redis = Redis::start(port).await;
    let b = Gateway::start(clustered(mock.addr, &keys, &_redis)).await;
    let deadline = Instant::now() + PATIENCE;
    while post_as(&b, &mallory, &small()).await.status() != 403 {
        assert!(
            Instant::now() < deadline,
            "the freeze was lost with Redis's data"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A change after the loss lands on the restored registry.
    let r = admin(&b, Some(&root), "POST", "/admin/subjects/eve/freeze", None).await;
    assert_eq!(r.status(), 200);
    let eve = keys.token("eve", &["user"]);
    let deadline = Instant::now() + PATIENCE;
    while post_as(&a, &eve, &small()).await.status() != 403 {
        assert!(Instant::now() < deadline, "eve's freeze never reached a");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_error(post_as(&b, &mallory, &small()).await, 403, "subject_frozen").await;
    expect_error(post_as(&a, &mallory, &small()).await, 403, "subject_frozen").await;
    let user = keys.token("user", &["user"]);
    assert_eq!(
        post_as(&a, &user, &small()).await.status(),
        200,
        "approvals kept"
    );

    // The data goes again, and a change comes at once, before any reload
    // could restore it: the change must not be applied to an empty
    // registry.
    let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
    let r = admin(
        &a,
        Some(&root),
        "POST",
        "/admin/subjects/trudy/freeze",
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let _: () = redis::cmd("PING").query(&mut con).unwrap();
    expect_error(post_as(&a, &mallory, &small()).await, 403, "subject_frozen").await;
    assert_eq!(
        post_as(&a, &user, &small()).await.status(),
        200,
        "approvals kept"
    );
    let state: String = redis::cmd("GET")
        .arg("portcullis:registry")
        .query(&mut con)
        .unwrap();
    for who in ["mallory", "eve", "trudy"] {
        assert!(state.contains(who), "{who} missing from {state}");
    }
}

fn verify_stream(port: u16, stream: &str) -> (bool, String) {
    let out = Command::new(bin())
        .args(["audit", "verify", "--redis"])
        .arg(format!("redis://127.0.0.1:{port}"))
        .arg(stream)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Two instances write their records to one Redis Stream, each its own
/// chain (its instance id in every record); `audit verify --redis`
/// checks each, and finds a record deleted from the middle of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_stream_holds_one_chain_per_instance() {
    let redis = Redis::start(free_port()).await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut gws = Vec::new();
    for _ in 0..2 {
        // Each instance's id defaults to HOST-PORT: two ids.
        let mut setup = clustered(mock.addr, &keys, &redis);
        setup.audit_extra = "  redis: { stream: audit-test }\n".into();
        gws.push(Gateway::start(setup).await);
    }
    let t = keys.token("user", &["user"]);
    for (gw, n) in gws.iter().zip([3, 2]) {
        for _ in 0..n {
            assert_eq!(post_as(gw, &t, &small()).await.status(), 200);
        }
    }
    for gw in &mut gws {
        gw.stop();
    }
    let (ok, out) = verify_stream(redis.port, "audit-test");
    assert!(ok, "{out}");
    assert_eq!(out.matches("chain intact").count(), 2, "{out}");
    assert!(
        out.contains(": 3 records") && out.contains(": 2 records"),
        "{out}"
    );

    let mut con = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .get_connection()
        .unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("audit-test")
        .arg("-")
        .arg("+")
        .query(&mut con)
        .unwrap();
    // The second record of the instance that wrote three.
    let instance_of = |e: &(String, Vec<(String, String)>)| e.1[0].1.clone();
    let busy = entries
        .iter()
        .map(instance_of)
        .find(|i| entries.iter().filter(|e| instance_of(e) == *i).count() == 3)
        .unwrap();
    let second = entries
        .iter()
        .filter(|e| instance_of(e) == busy)
        .nth(1)
        .unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg("audit-test")
        .arg(&second.0)
        .query(&mut con)
        .unwrap();
    let (ok, out) = verify_stream(redis.port, "audit-test");
    assert!(!ok, "{out}");
    assert!(out.contains(&busy) && out.contains("prev_hash"), "{out}");
}

/// `config/cluster.yaml` as shipped: two instances on one host, each with
/// its own audit file; `audit verify` on the folder checks both chains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cluster_config_runs_two_instances_on_one_host() {
    let redis = Redis::start(free_port()).await;
    let mock = Mock::start(options()).await;
    let tree = shipped_tree();
    let var = tree.path().join("var");
    let mut children = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..2 {
        let (port, admin_port) = (free_port(), free_port());
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(tree.path().join("config/cluster.yaml"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .env("REDIS_URL", format!("redis://127.0.0.1:{}", redis.port))
            .env("PROVIDER_BASE_URL", format!("http://{}/v1", mock.addr))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        children.push(child);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + PATIENCE;
        while client
            .get(format!("http://127.0.0.1:{admin_port}/readyz"))
            .send()
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(Instant::now() < deadline, "instance not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bases.push(format!("http://127.0.0.1:{port}"));
    }
    let out = Command::new(bin())
        .args(["token", "--sub", "ann", "--roles", "user", "--key"])
        .arg(tree.path().join("keys/private/dev.key"))
        .output()
        .unwrap();
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    for base in &bases {
        for _ in 0..2 {
            let r = reqwest::Client::new()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&token)
                .json(&small())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    for mut c in children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        assert!(c.wait().unwrap().success());
    }
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .arg(&var)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("2 records, chain intact").count(), 2, "{text}");
}

/// The Redis audit sink driven directly. Redis loses the newest records
/// of an instance while it runs (a failover to a replica behind: the head
/// goes back): the sink does not stay stuck, and verify shows the break.
/// Records cut from the end with their head deleted, or an instance's
/// records deleted with its head left, are found too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_stream_sink_survives_a_head_that_goes_back_and_verify_sees_it() {
    use portcullis::audit::redis::RedisOptions;
    use portcullis::audit::{AuditOptions, AuditWriter, Sealer};
    let redis = Redis::start(free_port()).await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let opts = |stream: &str, instance: &str| AuditOptions {
        redis: Some(RedisOptions {
            url: url.clone(),
            stream: stream.into(),
            max_len: 10_000,
            timeout: Duration::from_millis(500),
        }),
        sealer: Sealer {
            key: None,
            instance: Some(instance.into()),
        },
        ..AuditOptions::default()
    };
    let write = |stream: &str, instance: &str, n: u64| {
        let (writer, log) = AuditWriter::start(opts(stream, instance)).unwrap();
        for i in 0..n {
            log.send(&json!({"kind": "request", "n": i}));
        }
        writer.close();
    };
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let entries = |con: &mut redis::Connection, stream: &str, instance: &str| {
        let all: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(con)
            .unwrap();
        all.into_iter()
            .filter(|e| e.1[0].1 == instance)
            .collect::<Vec<_>>()
    };

    // The head goes back under a running sink.
    let (writer, log) = AuditWriter::start(opts("failover", "a")).unwrap();
    for i in 0..3 {
        log.send(&json!({"kind": "request", "n": i}));
    }
    let deadline = Instant::now() + PATIENCE;
    while entries(&mut con, "failover", "a").len() < 3 {
        assert!(Instant::now() < deadline, "not written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = entries(&mut con, "failover", "a");
    let second: serde_json::Value = serde_json::from_str(&first[1].1[1].1).unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg("failover")
        .arg(&first[2].0)
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("failover:head:a")
        .arg(second["hash"].as_str().unwrap())
        .query(&mut con)
        .unwrap();
    log.send(&json!({"kind": "request", "n": 3}));
    while entries(&mut con, "failover", "a").len() < 3 {
        assert!(Instant::now() < deadline, "stuck: {:?}", log.failure());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.close();
    let (ok, out) = verify_stream(redis.port, "failover");
    assert!(
        !ok && out.contains("prev_hash"),
        "the lost record is not shown: {out}"
    );

    // Cut from the end, head deleted.
    write("cut", "a", 3);
    write("cut", "b", 2);
    let (ok, out) = verify_stream(redis.port, "cut");
    assert!(ok, "{out}");
    let a = entries(&mut con, "cut", "a");
    let _: i64 = redis::cmd("XDEL")
        .arg("cut")
        .arg(&a.last().unwrap().0)
        .query(&mut con)
        .unwrap();
    let _: i64 = redis::cmd("DEL").arg("cut:head:a").query(&mut con).unwrap();
    let (ok, out) = verify_stream(redis.port, "cut");
    assert!(!ok && out.contains("head key is missing"), "{out}");

    // Every record of one instance deleted, its head left.
    write("gone", "a", 2);
    write("gone", "b", 2);
    for (id, _) in entries(&mut con, "gone", "b") {
        let _: i64 = redis::cmd("XDEL")
            .arg("gone")
            .arg(&id)
            .query(&mut con)
            .unwrap();
    }
    let (ok, out) = verify_stream(redis.port, "gone");
    assert!(!ok && out.contains("instance b"), "{out}");
    let (ok, out) = verify_stream(redis.port, "no-such-stream");
    assert!(!ok && out.contains("no records"), "{out}");
}

/// Redis down with both Redis-backed filters set to fail open
/// (`rate_limit.on_error: allow`, `registry.on_error: allow`): requests
/// are served, and each record says which filter could not decide; once
/// Redis is back, limits apply again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_error_allow_serves_and_records_why() {
    let port = free_port();
    let mut redis = Redis::start(port).await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = clustered(mock.addr, &keys, &redis);
    fail_open_without_redis(&mut setup);
    let gw = Gateway::start(setup).await;
    let t = keys.token("user", &["user"]);
    assert_eq!(post_as(&gw, &t, &small()).await.status(), 200);

    redis.kill();
    let deadline = Instant::now() + PATIENCE;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "errors recorded: {seen:?}");
        let r = post_as(&gw, &t, &small()).await;
        assert_eq!(r.status(), 200, "fail-open filters refused");
        let rec = gw.record_for(&request_id(&r)).await;
        assert_eq!(rec["decision"], "allowed");
        for o in rec["filters"].as_array().unwrap() {
            if o["action"] == "error" {
                assert_eq!(o["enforced"], false, "{o}");
                seen.insert(o["filter"].as_str().unwrap().to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.contains("rate_limit") && seen.contains("model_registry"),
        "{seen:?}"
    );

    let _redis = Redis::start(port).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = post_as(&gw, &t, &small()).await;
        let rec = gw.record_for(&request_id(&r)).await;
        let errors = rec["filters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["action"] == "error")
            .count();
        if errors == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "limits never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Approvals kept in Redis fail closed when it goes away: a reply that
/// held a call is not sent (its notice would name an approval that was
/// never stored), a repeat cannot be answered, and a tool result that
/// needs a handed-out call cannot be checked; each a 503
/// `approval_unavailable` with its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_fail_closed_when_redis_goes_away() {
    let mut redis = Redis::start(free_port()).await;
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = clustered(mock.addr, &keys, &redis);
    // Limits and the registry fail open here, so what is seen is the
    // approval store's own failure.
    fail_open_without_redis(&mut setup);
    setup.files.push((
        "tools.yaml".into(),
        include_bytes!("../../policies/tools.yaml").to_vec(),
    ));
    // The tool filter fails open on its own errors here: the approval
    // store's failure is enforced all the same.
    setup.extra_yaml += "tools:\n  policy: tools.yaml\n  on_error: allow\n";
    let gw = Gateway::start(setup).await;
    let t = keys.token("alice", &["user"]);
    let trigger = json!({"mock_tool_call": {"name": "run_shell", "arguments": {"cmd": "ls"}}});
    let shell = json!({"model": "mock-small", "messages": [{"role": "user", "content": trigger.to_string()}]});
    let r = post_as(&gw, &t, &shell).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-portcullis-approval-id"));

    redis.kill();
    let rid = expect_error(post_as(&gw, &t, &shell).await, 503, "approval_unavailable").await;
    let rec = gw.record_for(&rid).await;
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["reason_code"], "approval_unavailable");
    assert_eq!(mock.state.requests().len(), 2, "the provider did answer");

    // A stream has sent its notice by then: it ends with an error event.
    let mut streamed = shell.clone();
    streamed["stream"] = json!(true);
    let r = post_as(&gw, &t, &streamed).await;
    assert_eq!(r.status(), 200);
    let rid = request_id(&r);
    let events = Events::new(r).rest().await;
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "approval_unavailable", "{events:?}");
    let rec = gw.record_for(&rid).await;
    assert_eq!(rec["reason_code"], "approval_unavailable");

    let repeat = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&t)
        .header("x-portcullis-approval", "apr_0123abc")
        .json(&shell)
        .send()
        .await
        .unwrap();
    let rid = expect_error(repeat, 503, "approval_unavailable").await;
    assert_eq!(gw.record_for(&rid).await["approval"]["event"], "refused");

    let result = json!({"model": "mock-small", "messages": [
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "run_shell", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x"}]});
    let rid = expect_error(post_as(&gw, &t, &result).await, 503, "approval_unavailable").await;
    let rec = gw.record_for(&rid).await;
    assert!(
        rec["filters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["filter"] == "tool_authz"
                && o["action"] == "error"
                && o["enforced"] == true),
        "{rec}"
    );
}
