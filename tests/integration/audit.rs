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

fn verify_with(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Two processes appending to one file would interleave their chains:
/// the second is refused, and told which process holds the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_audit_file_is_refused_naming_the_holder() {
    let mock = Mock::start(options()).await;
    let mut first = Gateway::start(Setup::new(mock.addr)).await;
    let mut setup = Setup::new(mock.addr);
    setup.audit_file = Some(first.audit_path.clone());
    let second = Gateway::prepare(setup);
    let err = second.start_fails();
    assert!(err.contains("is in use by another process"), "{err}");
    assert!(
        err.contains(&first.audit_path.display().to_string()),
        "{err}"
    );
    let pid = std::fs::read_to_string(first.audit_path.with_extension("jsonl.lock")).unwrap();
    assert!(err.contains(&format!("pid {}", pid.trim())), "{err}");
    assert_eq!(
        first
            .post("/v1/chat/completions", &chat("x"))
            .await
            .status(),
        200
    );
    first.stop();
    let (ok, out) = verify(&first.audit_path);
    assert!(ok && out.contains("1 records"), "{out}");
}

/// `serve` checks everything before it says it is listening: an empty
/// keys folder stops it with the reason, and no readiness is announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_announces_nothing_before_everything_is_checked() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.extra_yaml = "auth:\n  keys:\n    - dir: empty-keys\n  issuer: test\n".into();
    setup.files = vec![("empty-keys/README".into(), b"no keys here".to_vec())];
    setup.env = vec![("RUST_LOG".into(), "info".into())];
    let err = Gateway::prepare(setup).start_fails();
    assert!(err.contains("no *.pem public keys"), "{err}");
    assert!(!err.contains("listening"), "{err}");
}

/// The audit file rotates by size, the chain continues across files, and
/// `audit verify DIR` checks the folder in order; a rotated file taken
/// away is found, with its successor's name and line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_keep_one_chain_that_verify_checks_across_the_folder() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    let folder = tempfile::tempdir().unwrap();
    setup.audit_file = Some(folder.path().join("audit.jsonl"));
    setup.audit_extra = "  rotate_size: 2 KiB\n".into();
    let mut gw = Gateway::start(setup).await;
    for i in 0..12 {
        let r = gw
            .post("/v1/chat/completions", &chat(&format!("n{i}")))
            .await;
        assert_eq!(r.status(), 200);
        // One record per write, so that rotation has several chances.
        gw.record_for(&request_id(&r)).await;
    }
    gw.stop();
    let mut files: Vec<_> = std::fs::read_dir(folder.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let (ok, out) = verify_with(&[folder.path().as_os_str()]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "12 records in {} files, chain intact",
            files.len()
        )),
        "{out}"
    );
    // A rotated file alone verifies, continuing from the one before.
    let (ok, out) = verify_with(&[files[1].as_os_str()]);
    assert!(ok && out.contains("resumes from"), "{out}");

    let empty = tempfile::tempdir().unwrap();
    let (ok, out) = verify_with(&[empty.path().as_os_str()]);
    assert!(!ok && out.contains("no audit files"), "{out}");

    std::fs::remove_file(&files[1]).unwrap();
    let (ok, out) = verify_with(&[folder.path().as_os_str()]);
    assert!(!ok, "{out}");
    let name = files[2].file_name().unwrap().to_str().unwrap();
    assert!(out.contains(name) && out.contains("line 1"), "{out}");
}

/// With an audit key the chain is an HMAC chain: `verify --key` checks
/// it, `verify` without the key says it needs one, and a file rewritten
/// with recomputed plain hashes is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_chain_verifies_only_with_its_key() {
    let mock = Mock::start(options()).await;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("audit.key");
    std::fs::write(&key, b"a-32-byte-secret-for-the-chain!!\n").unwrap();
    let mut setup = Setup::new(mock.addr);
    setup.audit_extra = format!("  key_file: {}\n", key.display());
    let mut gw = Gateway::start(setup).await;
    for i in 0..3 {
        gw.post("/v1/chat/completions", &chat(&format!("n{i}")))
            .await;
    }
    gw.stop();
    let file = gw.audit_path.as_os_str();
    let (ok, out) = verify_with(&[file, "--key".as_ref(), key.as_os_str()]);
    assert!(ok && out.contains("3 records"), "{out}");
    let (ok, out) = verify_with(&[file]);
    assert!(!ok && out.contains("--key"), "{out}");
    let other = keys.path().join("other.key");
    std::fs::write(&other, b"another-secret-of-32-bytes-long!").unwrap();
    let (ok, out) = verify_with(&[file, "--key".as_ref(), other.as_os_str()]);
    assert!(!ok && out.contains("line 1"), "{out}");
}

/// Whether this test process may mount a file system (root).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: usize) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs (this test runs as root)");
        SmallDisk { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fill the disk: writes until the file system says it is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let block = vec![0u8; 4096];
        loop {
            if let Err(e) = f.write_all(&block).and_then(|_| f.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(28), "{e}"); // ENOSPC
                return;
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The disk under the audit file fills up. By default the gateway stops
/// admitting requests (503 `audit_unavailable`, admin changes too), says
/// so in `/readyz` and a metric, holds the records it could not write, and
/// once there is room again writes them all, in one unbroken chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_admission_and_nothing_is_lost_when_it_clears() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let disk = SmallDisk::mount(512 * 1024);
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.audit_file = Some(disk.path().join("audit.jsonl"));
    let mut gw = Gateway::start(setup).await;
    let user = keys.token("user", &["user"]);
    let root = keys.token("root", &["portcullis:admin"]);
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = post_as(&gw, &user, &chat(&format!("before {i}"))).await;
        assert_eq!(r.status(), 200);
        ids.push(request_id(&r));
    }
    gw.records(3).await;

    disk.fill();
    // The request whose record first fails is served; admission stops as
    // soon as the writer has failed once.
    let mut refused = Vec::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while refused.is_empty() {
        assert!(std::time::Instant::now() < deadline, "never refused");
        let r = post_as(&gw, &user, &chat("during")).await;
        ids.push(request_id(&r));
        match r.status().as_u16() {
            200 => {}
            503 => refused.push(expect_error(r, 503, "audit_unavailable").await),
            s => panic!("status {s}"),
        }
    }
    let r = admin(&gw, Some(&root), "POST", "/admin/subjects/eve/freeze", None).await;
    ids.push(request_id(&r));
    expect_error(r, 503, "audit_unavailable").await;
    let r = gw.get("/readyz").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("audit sink failing"));
    assert_eq!(metric(&gw, "portcullis_audit_sink_failing").await, 1.0);
    assert!(metric(&gw, "portcullis_audit_write_errors_total").await >= 1.0);

    disk.free();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let r = post_as(&gw, &user, &chat("after")).await;
        ids.push(request_id(&r));
        if r.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&gw, "portcullis_audit_sink_failing").await, 0.0);
    assert_eq!(gw.get("/readyz").await.status(), 200);
    gw.stop();
    let (ok, out) = verify(&gw.audit_path);
    assert!(ok, "{out}");
    let records = read_records(&gw.audit_path);
    for id in &ids {
        assert!(
            records.iter().any(|r| r["request_id"] == id.as_str()),
            "the record of {id} was lost"
        );
    }
    let rec = records
        .iter()
        .find(|r| r["request_id"] == refused[0].as_str())
        .unwrap();
    assert_eq!(rec["reason_code"], "audit_unavailable");
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["status"], 503);
    let reason = rec["reason"].as_str().unwrap();
    assert!(reason.contains("No space left on device"), "{reason}");
}

/// `on_error: allow` keeps serving while the disk is full; the records are
/// held and written once it clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_allow_serves_through_a_full_disk_and_writes_the_records_later() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let disk = SmallDisk::mount(512 * 1024);
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.audit_file = Some(disk.path().join("audit.jsonl"));
    setup.audit_extra = "  on_error: allow\n".into();
    let mut gw = Gateway::start(setup).await;
    disk.fill();
    let mut ids = Vec::new();
    for i in 0..10 {
        let r = gw
            .post("/v1/chat/completions", &chat(&format!("n{i}")))
            .await;
        assert_eq!(r.status(), 200);
        ids.push(request_id(&r));
    }
    let deadline = std::time::Instant::now() + PATIENCE;
    while metric(&gw, "portcullis_audit_sink_failing").await != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the metric never said so"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Still ready: with `allow` the instance keeps serving.
    assert_eq!(gw.get("/readyz").await.status(), 200);
    assert_eq!(read_records(&gw.audit_path).len(), 0);
    disk.free();
    gw.records(10).await;
    gw.stop();
    let (ok, out) = verify(&gw.audit_path);
    assert!(ok && out.contains("10 records"), "{out}");
    let records = read_records(&gw.audit_path);
    for id in &ids {
        assert!(
            records.iter().any(|r| r["request_id"] == id.as_str()),
            "{id}"
        );
    }
}

/// `kill -9` under load: every record the writer had written survives
/// (a record cut short is moved aside at the next start), the chain goes
/// on, and the records lost are only those of requests that finished in
/// the last instant. The number lost is printed: it is the loss window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_at_most_the_last_instant_and_the_chain_goes_on() {
    let mock = Mock::start(options()).await;
    let mut gw = Gateway::start(Setup::new(mock.addr)).await;
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for c in 0..4 {
        let url = gw.url("/v1/chat/completions");
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0.. {
                let Ok(r) = client
                    .post(&url)
                    .json(&chat(&format!("c{c} n{i}")))
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() == 200 {
                    let id = request_id(&r);
                    if r.bytes().await.is_ok() {
                        done.lock().unwrap().push(id);
                    }
                }
            }
        }));
    }
    let deadline = std::time::Instant::now() + PATIENCE;
    while done.lock().unwrap().len() < 400 {
        assert!(std::time::Instant::now() < deadline, "load did not run");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    gw.kill_hard();
    for c in clients {
        let _ = c.await;
    }
    let completed = done.lock().unwrap().clone();
    gw.restart().await;
    gw.stop();
    let (ok, out) = verify(&gw.audit_path);
    assert!(ok, "{out}");
    let written: std::collections::HashSet<String> = read_records(&gw.audit_path)
        .iter()
        .filter_map(|r| r["request_id"].as_str().map(str::to_string))
        .collect();
    let lost = completed.iter().filter(|id| !written.contains(*id)).count();
    eprintln!(
        "kill -9 loss window: {lost} of {} completed requests had no record",
        completed.len()
    );
    // Lost: records queued but not yet written at the kill. On an idle
    // machine that is 0 to 2; the bound leaves room for a writer thread
    // starved by other tests on a busy one, and is far below what a
    // writer that batched lazily (or lost its queue) would show.
    assert!(lost <= 100, "{lost} records lost");
}
