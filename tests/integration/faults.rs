//! The fault matrix: what the gateway does when the provider, the client,
//! Redis, a policy file or the operator misbehaves. Each test provokes the
//! fault through the gateway binary and checks the status, the error code,
//! the audit record, and that `audit verify` still passes.
//!
//! Faults covered elsewhere: provider down (`rejections::provider_down_is_502_and_audited`),
//! slower than `read_ms` before the first byte (`rejections::slow_provider_is_504`),
//! 429/500/503/401 and a non-JSON 200 (`rejections::provider_errors_map_to_502_or_pass_through`,
//! `sweep::provider_429_keeps_its_retry_after`), reset mid-stream
//! (`streaming::broken_provider_stream_ends_with_an_error_event_and_is_audited`),
//! client gone mid-stream (`streaming::client_leaving_mid_stream_stops_the_provider_read`),
//! Redis down and back (`redis::redis_down_fails_closed_and_recovers`,
//! `redis::a_registry_lost_by_redis_is_restored_not_wiped`), disk full
//! (`audit::a_full_disk_stops_admission_and_nothing_is_lost_when_it_clears`),
//! `kill -9` (`audit::kill_9_loses_at_most_the_last_instant_and_the_chain_goes_on`).

use crate::support::*;
use portcullis::testkit::mock::MockOptions;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// The last event of a stream that had to stop: an error with this code,
/// and no `[DONE]`.
fn ends_with_error(events: &[String], code: &str) {
    let last: Value = serde_json::from_str(events.last().expect("events")).unwrap();
    assert_eq!(last["error"]["code"], code, "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
}

async fn error_record(gw: &Gateway, id: &str, code: &str) -> Value {
    let rec = gw.record_for(id).await;
    assert_eq!(rec["decision"], "error", "{rec}");
    assert_eq!(rec["reason_code"], code, "{rec}");
    rec
}

/// The provider closes the connection after reading the whole request,
/// with no answer: 502, and the request is not sent a second time (it may
/// have been processed and billed), even on a reused pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_reset_before_headers_is_502_and_never_sent_twice() {
    let mock = Mock::start(options()).await;
    let mut gw = Gateway::start(Setup::new(mock.addr)).await;
    // A first call leaves a pooled connection that the next one reuses.
    assert_eq!(
        gw.post("/v1/chat/completions", &chat("warm"))
            .await
            .status(),
        200
    );
    let r = gw
        .post("/v1/chat/completions", &chat(r#"{"mock_reset": true}"#))
        .await;
    let id = expect_error(r, 502, "upstream_error").await;
    let rec = error_record(&gw, &id, "upstream_error").await;
    assert!(rec["upstream"]["error"].as_str().is_some(), "{rec}");
    let resets = mock
        .state
        .requests()
        .iter()
        .filter(|c| String::from_utf8_lossy(&c.body).contains("mock_reset"))
        .count();
    assert_eq!(resets, 1, "the provider got the request {resets} times");
    assert_eq!(
        gw.post("/v1/chat/completions", &chat("after"))
            .await
            .status(),
        200
    );
    gw.stop();
    verified(&gw);
}

/// The provider goes silent between two events for longer than `read_ms`:
/// the stream ends with an `upstream_timeout` error event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_silent_between_events_ends_the_stream_with_upstream_timeout() {
    let mock = Mock::start(MockOptions {
        event_delay_ms: 2_000,
        ..options()
    })
    .await;
    let mut setup = Setup::new(mock.addr);
    setup.read_ms = 300;
    let mut gw = Gateway::start(setup).await;
    let r = gw
        .post("/v1/chat/completions", &stream_chat("two events at least"))
        .await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let events = Events::new(r).rest().await;
    ends_with_error(&events, "upstream_timeout");
    error_record(&gw, &id, "upstream_timeout").await;
    gw.stop();
    verified(&gw);
}

/// A stream that ends cleanly but without `[DONE]` is not taken as
/// complete: an error event ends it for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_done_ends_with_an_error_event() {
    let mock = Mock::start(options()).await;
    let mut gw = Gateway::start(Setup::new(mock.addr)).await;
    let chunk = json!({"id": "c", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": null}]});
    let trigger = json!({"mock_raw_events": [chunk], "mock_no_done": true}).to_string();
    let r = gw
        .post("/v1/chat/completions", &stream_chat(&trigger))
        .await;
    let id = request_id(&r);
    let events = Events::new(r).rest().await;
    ends_with_error(&events, "upstream_error");
    let rec = error_record(&gw, &id, "upstream_error").await;
    assert!(
        rec["reason"].as_str().unwrap().contains("end marker"),
        "{rec}"
    );
    gw.stop();
    verified(&gw);
}

/// One SSE event larger than the cap (1 MiB) is not buffered without end:
/// the stream stops with an error event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_event_over_the_cap_ends_the_stream_with_an_error() {
    let mock = Mock::start(options()).await;
    let mut gw = Gateway::start(Setup::new(mock.addr)).await;
    let huge = json!({"choices": [{"index": 0, "delta": {"content": "x".repeat(1_100_000)}}]});
    let trigger = json!({"mock_raw_events": [huge]}).to_string();
    let r = gw
        .post("/v1/chat/completions", &stream_chat(&trigger))
        .await;
    let id = request_id(&r);
    assert_eq!(r.status(), 200);
    let events = Events::new(r).rest().await;
    ends_with_error(&events, "upstream_error");
    let rec = error_record(&gw, &id, "upstream_error").await;
    assert!(
        rec["reason"].as_str().unwrap().contains("exceeded"),
        "{rec}"
    );
    gw.stop();
    verified(&gw);
}

/// SIGHUP with a broken policy file: every old policy is kept, the
/// failure is logged and counted, and a fixed file loads on the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_policy_keeps_the_old_one_and_counts_the_failure() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let limits = "tiers:\n  - { id: basic, roles: [], requests_per_minute: 600, burst: 2 }\ndefault_tier: basic\n";
    let mut setup = secured(mock.addr, &keys, limits);
    setup.env = vec![("RUST_LOG".into(), "error".into())];
    let mut gw = Gateway::start(setup).await;
    let policy = gw.dir.path().join("limits.yaml");
    assert!(policy.exists(), "the test's policy file");
    let t = keys.token("user", &["user"]);
    let hup = |gw: &Gateway| {
        let pid = gw.pid();
        let s = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status();
        assert!(s.unwrap().success());
    };
    let reloads = |gw: &Gateway, result: &'static str| {
        let admin = gw.admin.clone();
        async move {
            let text = reqwest::get(format!("{admin}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let line = format!("portcullis_policy_reloads_total{{result=\"{result}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&line))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    std::fs::write(&policy, "tiers: [ this is not yaml").unwrap();
    hup(&gw);
    let deadline = Instant::now() + PATIENCE;
    while reloads(&gw, "failed").await < 1 {
        assert!(
            Instant::now() < deadline,
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old policy (burst 2) still holds.
    let statuses = [
        post_as(&gw, &t, &chat("a")).await.status(),
        post_as(&gw, &t, &chat("b")).await.status(),
        post_as(&gw, &t, &chat("c")).await.status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [200, 200, 429]);
    assert_eq!(reloads(&gw, "ok").await, 0);

    std::fs::write(&policy, limits.replace("burst: 2", "burst: 50")).unwrap();
    hup(&gw);
    let deadline = Instant::now() + PATIENCE;
    while reloads(&gw, "ok").await < 1 {
        assert!(Instant::now() < deadline, "the good reload was not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop();
    verified(&gw);
}

/// SIGTERM while a stream is open: the stream finishes, its record is
/// written with every other, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_streams_finish_and_flushes_every_record() {
    let mock = Mock::start(MockOptions {
        event_delay_ms: 40,
        ..options()
    })
    .await;
    let mut setup = Setup::new(mock.addr);
    setup.shutdown_grace_secs = 20;
    let mut gw = Gateway::start(setup).await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &stream_chat(&"slow words ".repeat(8)),
        )
        .await;
    let id = request_id(&r);
    let mut events = Events::new(r);
    events.next().await.expect("first event");
    let pid = gw.pid();
    let stopper = std::thread::spawn(move || {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    });
    let rest = events.rest().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    assert!(stopper.join().unwrap().success());
    let status = gw.wait_exit();
    assert!(status.success(), "{status:?}");
    let records = read_records(&gw.audit_path);
    let rec = records.iter().find(|r| r["request_id"] == id.as_str());
    let rec = rec.expect("the stream's record was written before exit");
    assert_eq!(rec["decision"], "allowed");
    assert_eq!(rec["status"], 200);
    verified(&gw);
}

/// A stream still running when the grace period ends is cut off, and its
/// record says so: no request goes unaudited, however it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlasting_the_grace_period_is_cut_off_and_still_audited() {
    let mock = Mock::start(MockOptions {
        event_delay_ms: 200,
        ..options()
    })
    .await;
    let mut setup = Setup::new(mock.addr);
    setup.shutdown_grace_secs = 1;
    let mut gw = Gateway::start(setup).await;
    let r = gw
        .post(
            "/v1/chat/completions",
            &stream_chat(&"slow words ".repeat(20)),
        )
        .await;
    let id = request_id(&r);
    let mut events = Events::new(r);
    events.next().await.expect("first event");
    let pid = gw.pid();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let rest = events.rest().await;
    assert!(!rest.iter().any(|e| e == "[DONE]"), "{rest:?}");
    let status = gw.wait_exit();
    assert!(status.success(), "{status:?}");
    let records = read_records(&gw.audit_path);
    let rec = records.iter().find(|r| r["request_id"] == id.as_str());
    let rec = rec.expect("the cut-off stream has its record");
    assert_eq!(rec["decision"], "error");
    assert!(rec["reason"].as_str().unwrap().contains("cut off"), "{rec}");
    verified(&gw);
}

/// A streamed reply opens a PEM private key block and never ends it, for
/// more than the redactor may hold (64 KiB). The held text is never
/// released: the stream ends with `unscreenable_output`, also when the
/// redaction filter is set to fail open (`on_error: allow`), since going
/// on would release unscreened text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_run_over_the_cap_stops_the_stream_and_releases_nothing() {
    let line = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7abcdefghijkl";
    let prompt = format!(
        "here it is: -----BEGIN PRIVATE KEY-----\n{}",
        format!("{line}\n").repeat(1100)
    );
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/redaction.yaml");
    for on_error in ["deny", "allow"] {
        let mock = Mock::start(MockOptions {
            chunk_bytes: 256,
            ..options()
        })
        .await;
        let mut setup = Setup::new(mock.addr);
        setup.extra_yaml = format!(
            "redaction:\n  policy: {}\n  on_error: {on_error}\n",
            policy.display()
        );
        let mut gw = Gateway::start(setup).await;
        let r = gw.post("/v1/chat/completions", &stream_chat(&prompt)).await;
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let events = Events::new(r).rest().await;
        assert!(
            !events.iter().any(|e| e.contains("MIIEvQ")),
            "on_error {on_error}: key material released"
        );
        ends_with_error(&events, "unscreenable_output");
        let rec = error_record(&gw, &id, "unscreenable_output").await;
        assert!(
            rec["reason"].as_str().unwrap().contains("over the cap"),
            "{rec}"
        );
        gw.stop();
        verified(&gw);
    }
}

/// A client that asks for a stream and stops reading: once its socket is
/// full, the gateway's write times out, the provider stream is abandoned
/// and the record says the client was cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_the_provider_released() {
    use tokio::io::AsyncWriteExt;
    // Sixteen choices of a 2 MiB echo (32 MiB) in 256 events of 128 KiB,
    // 40 ms apart (every event carries all choices), to a client with a
    // 4 KiB receive buffer. The provider paces itself, so it is still
    // sending ten seconds on, whatever the kernel lets the gateway's socket
    // buffers hold; the gateway's send buffer (at most 4 MiB by Linux
    // defaults) is full within about two seconds, and one second later the
    // gateway gives up. So "released" cannot be mistaken for a stream that
    // fit into buffers and ended.
    let mock = Mock::start(MockOptions {
        chunk_bytes: 8 * 1024,
        event_delay_ms: 40,
        ..options()
    })
    .await;
    let mut setup = Setup::new(mock.addr);
    setup.client_write_timeout_secs = 1;
    let mut gw = Gateway::start(setup).await;
    let mut body = stream_chat(&"z".repeat(2 << 20));
    body["n"] = json!(16);
    let body = body.to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = gw.base.trim_start_matches("http://").parse().unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    // Never read. Wait for the gateway to give up on this client.
    let deadline = Instant::now() + PATIENCE;
    let rec = loop {
        let found = read_records(&gw.audit_path)
            .into_iter()
            .find(|r| r["route"] == "chat/completions");
        if let Some(r) = found {
            break r;
        }
        assert!(Instant::now() < deadline, "the stalled write never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rec["client_gone"], true, "{rec}");
    assert_eq!(rec["decision"], "error", "{rec}");
    let deadline = Instant::now() + PATIENCE;
    while mock
        .state
        .streams_aborted
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        let completed = mock
            .state
            .streams_completed
            .load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            Instant::now() < deadline && completed == 0,
            "the provider stream was kept (completed: {completed})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(conn);
    gw.stop();
    verified(&gw);
}
