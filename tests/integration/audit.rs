//! The audit file written by a running gateway, checked with the CLI.

use crate::support::*;
use std::process::Command;

fn verify(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_every_record_and_the_chain_verifies() {
    let mock = Mock::start(options()).await;
    let mut gw = Gateway::start(Setup::new(mock.addr)).await;
    for i in 0..20 {
        let r = gw
            .post("/v1/chat/completions", &chat(&format!("n{i}")))
            .await;
        assert_eq!(r.status(), 200);
    }
    gw.get("/v1/unknown").await;
    let status = gw.stop();
    assert!(status.success(), "exit status {status:?}");
    // Read right after exit: nothing may still be queued.
    let records = read_records(&gw.audit_path);
    assert_eq!(records.len(), 21);
    let (ok, out) = verify(&gw.audit_path);
    assert!(ok, "{out}");
    assert!(out.contains("21 records"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_on_one_changed_byte_and_on_moved_lines() {
    let mock = Mock::start(options()).await;
    let mut gw = Gateway::start(Setup::new(mock.addr)).await;
    for i in 0..3 {
        gw.post("/v1/chat/completions", &chat(&format!("n{i}")))
            .await;
    }
    gw.stop();
    let original = std::fs::read_to_string(&gw.audit_path).unwrap();
    let tampered = gw.dir.path().join("tampered.jsonl");

    // One byte: a status digit of the second record.
    let second = original.find('\n').unwrap() + 1;
    let at = second + original[second..].find("\"status\":200").unwrap() + 10;
    let mut bytes = original.clone().into_bytes();
    bytes[at] = b'3';
    std::fs::write(&tampered, &bytes).unwrap();
    let (ok, out) = verify(&tampered);
    assert!(!ok && out.contains("line 2"), "{out}");

    let lines: Vec<&str> = original.lines().collect();
    for (what, edited) in [
        ("deleted", [lines[0], lines[2]].join("\n")),
        ("reordered", [lines[0], lines[2], lines[1]].join("\n")),
        (
            "inserted",
            [lines[0], lines[1], lines[1], lines[2]].join("\n"),
        ),
    ] {
        std::fs::write(&tampered, edited + "\n").unwrap();
        let (ok, out) = verify(&tampered);
        assert!(!ok, "{what} line not found: {out}");
    }
    let (ok, out) = verify(&gw.audit_path);
    assert!(ok && out.contains("3 records"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_content_opt_in_records_the_bodies() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.record_content = true;
    let gw = Gateway::start(setup).await;
    let r = gw.post("/v1/chat/completions", &chat("remember me")).await;
    let rec = gw.record_for(&request_id(&r)).await;
    assert_eq!(
        rec["content"]["request"]["messages"][0]["content"],
        "remember me"
    );
    assert_eq!(
        rec["content"]["response"]["choices"][0]["message"]["content"],
        "remember me"
    );
}
