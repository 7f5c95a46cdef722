//! Audit records: one JSON line per request (and per admin action),
//! hash-chained so that `portcullis audit verify` finds any edit, deletion,
//! insertion or reordering.
//!
//! - [`chain`]: canonical form, sealing (SHA-256, or HMAC with a key) and
//!   checking one line;
//! - [`writer`]: the bounded queue, the writer thread, held records and
//!   retries when a sink fails, the admission check;
//! - [`file`]: the file sink (exclusive lock, crash repair, rotation);
//! - [`redis`]: the Redis Streams sink, one chain per instance;
//! - [`verify`]: checking a file or a folder of rotated files.
//!
//! What a crash can lose: the writer writes each batch as soon as it is
//! queued, so a `kill -9` loses only the records queued in that instant
//! (those of requests that finished within the last write, typically a
//! fraction of a millisecond), and a record cut short by the kill is moved
//! aside at the next start. A power cut also loses what the OS had not yet
//! written to disk: at most `audit.fsync_ms` of records (10 ms by
//! default; 0: fsync after every batch).

pub mod chain;
pub mod file;
pub mod redis;
pub mod verify;
pub mod writer;

pub use chain::{canonical, AuditKey, Sealer, GENESIS};
pub use writer::{AuditLog, AuditOptions, AuditWriter};

use serde::Serialize;
use serde_json::Value;

/// `decision` of a request record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    #[default]
    Allowed,
    Blocked,
    Error,
}

/// What the gateway learnt from the provider.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamRecord {
    pub provider: String,
    /// The provider's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Time to the provider's response header.
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
}

/// One request's audit record. Fields that do not apply are `null`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    pub kind: &'static str,
    pub ts: String,
    /// Unique per record: made by the gateway.
    pub request_id: String,
    /// The client's own `x-request-id`, when it sent a well-formed one
    /// (not unique: any client may send any id).
    pub client_request_id: Option<String>,
    pub tenant: Option<String>,
    pub sub: Option<String>,
    pub roles: Vec<String>,
    pub client_ip: Option<String>,
    pub method: String,
    pub path: String,
    pub route: Option<filters::Route>,
    pub model: Option<String>,
    pub upstream_model: Option<String>,
    pub stream: bool,
    pub decision: Verdict,
    /// `intake`, or the filter that refused the request.
    pub blocked_by: Option<String>,
    pub reason_code: Option<filters::ErrorCode>,
    /// Why, in words; never shown to the client.
    pub reason: Option<String>,
    pub filters: Vec<filters::FilterOutcome>,
    pub upstream: Option<UpstreamRecord>,
    /// The provider's `usage` object.
    pub usage: Option<Value>,
    /// The status the client was sent (499: the client left first).
    pub status: u16,
    pub duration_ms: f64,
    pub request_bytes: usize,
    pub response_bytes: usize,
    /// The client disconnected before the response was complete.
    pub client_gone: bool,
    /// SHA-256 of the request body as received.
    pub prompt_sha256: Option<String>,
    /// Raw request and response bodies, only with `audit.record_content`.
    pub content: Option<Value>,
    /// The approval this request's reply held calls for, or whose approved
    /// calls it was answered with.
    pub approval: Option<ApprovalNote>,
}

/// A request's part in an approval: `held` (its reply's calls were taken
/// out and stored for approval) or `handed_out` (it was answered with the
/// approved calls).
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalNote {
    pub id: String,
    pub event: &'static str,
    pub tools: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::chain::MAC;
    use super::file::FileOptions;
    use super::verify::{verify_dir, verify_file, Broken, Intact};
    use super::*;
    use serde_json::json;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    fn options(path: &Path) -> AuditOptions {
        AuditOptions {
            file: Some(FileOptions {
                path: path.to_path_buf(),
                rotate_bytes: 0,
                rotate_daily: false,
                fsync_every: Duration::ZERO,
            }),
            ..Default::default()
        }
    }

    fn write_with(opts: AuditOptions, n: usize) {
        let (writer, log) = AuditWriter::start(opts).unwrap();
        for i in 0..n {
            // Floats that a fast-but-inexact parser would not round-trip.
            let f = (i as f64 + 1.0) / 3.0 * 1.000_000_1 + 2.036_093;
            log.send(
                &json!({"kind": "request", "n": i, "f": f, "nested": {"b": 1, "a": [1.5, "é"]}}),
            );
        }
        writer.close();
    }

    fn write_records(path: &Path, n: usize) {
        write_with(options(path), n)
    }

    fn verify(path: &Path) -> Result<Intact, Broken> {
        verify_file(path, None).unwrap()
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn chain_verifies_and_continues_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.jsonl");
        write_records(&path, 30);
        write_records(&path, 20);
        assert_eq!(verify(&path).unwrap().records, 50);
        let first: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first["prev_hash"], GENESIS);
    }

    fn broken_at(path: &Path) -> usize {
        match verify(path) {
            Err(b) => b.line,
            Ok(v) => panic!("tampering not found: {v:?}"),
        }
    }

    fn tamper(f: impl Fn(&mut Vec<String>)) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_records(&path, 4);
        let mut l = lines(&path);
        f(&mut l);
        std::fs::write(&path, l.join("\n") + "\n").unwrap();
        broken_at(&path)
    }

    #[test]
    fn each_kind_of_tampering_is_found() {
        // Edited value.
        assert_eq!(tamper(|l| l[1] = l[1].replace("\"n\":1", "\"n\":7")), 2);
        // Deleted line.
        assert_eq!(tamper(|l| drop(l.remove(1))), 2);
        // Inserted copy.
        assert_eq!(tamper(|l| l.insert(2, l[0].clone())), 3);
        // Reordered.
        assert_eq!(tamper(|l| l.swap(1, 2)), 2);
        // Key order or spacing changed (same parsed value).
        assert_eq!(tamper(|l| l[3] = l[3].replacen(",", ", ", 1)), 4);
    }

    #[test]
    fn every_single_byte_change_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_records(&path, 2);
        let original = std::fs::read(&path).unwrap();
        let second_line = original.iter().position(|b| *b == b'\n').unwrap() + 1;
        for i in 0..original.len() - 1 {
            let mut bytes = original.clone();
            bytes[i] = if bytes[i] == b'1' { b'2' } else { b'1' };
            std::fs::write(&path, &bytes).unwrap();
            let expected = if i < second_line { 1 } else { 2 };
            assert_eq!(broken_at(&path), expected, "byte {i} changed");
        }
    }

    #[test]
    fn a_corrupt_last_line_refuses_to_continue_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "not json\n").unwrap();
        let err = AuditWriter::start(options(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("last line is not an audit record"), "{err}");
    }

    #[test]
    fn a_record_cut_short_by_a_crash_is_moved_aside_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_records(&path, 3);
        let whole = std::fs::read_to_string(&path).unwrap();
        let cut = &lines(&path)[1][..40];
        std::fs::write(&path, format!("{}\n{cut}", lines(&path)[0])).unwrap();
        write_records(&path, 2);
        assert_eq!(verify(&path).unwrap().records, 3);
        let partial = std::fs::read_to_string(dir.path().join("audit.jsonl.partial")).unwrap();
        assert_eq!(partial, format!("{cut}\n"));
        assert!(whole.starts_with(&lines(&path)[0]));
    }

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (writer, _log) = AuditWriter::start(options(&path)).unwrap();
        let err = AuditWriter::start(options(&path))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("in use by another process"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        writer.close();
        // Released on close: the next writer may start.
        let (writer, _log) = AuditWriter::start(options(&path)).unwrap();
        writer.close();
    }

    fn rotating(path: &Path, bytes: u64) -> AuditOptions {
        let mut o = options(path);
        if let Some(f) = o.file.as_mut() {
            f.rotate_bytes = bytes;
        }
        o
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rotation_continues_the_chain_and_a_folder_verifies_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // One record per batch (each is written before the next is sent):
        // each write after the first 300 bytes rotates.
        let (writer, log) = AuditWriter::start(rotating(&path, 300)).unwrap();
        let count = |dir: &Path| -> usize {
            files(dir)
                .iter()
                .map(|f| {
                    std::fs::read_to_string(f)
                        .unwrap_or_default()
                        .lines()
                        .count()
                })
                .sum()
        };
        for i in 0..6 {
            log.send(&json!({"kind": "request", "n": i, "pad": "x".repeat(200)}));
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while count(dir.path()) < i + 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "record {i} not written"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        writer.close();
        let all = files(dir.path());
        assert!(all.len() >= 3, "{all:?}");
        let report = verify_dir(dir.path(), None).unwrap().unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!((report[0].records, report[0].files), (6, all.len()));
        assert_eq!(report[0].resumes_from, None);
        // A rotated file on its own resumes from the one before it.
        let second = verify(&all[1]).unwrap();
        assert!(second.resumes_from.is_some());
        // Restarting continues the chain from the newest file.
        write_with(rotating(&path, 300), 1);
        assert_eq!(verify_dir(dir.path(), None).unwrap().unwrap()[0].records, 7);

        // A rotated file removed from the middle is found, with its place.
        std::fs::remove_file(&all[1]).unwrap();
        let b = verify_dir(dir.path(), None).unwrap().unwrap_err();
        assert_eq!((b.file.clone(), b.line), (all[2].clone(), 1), "{b:?}");
        assert!(b.why.contains("file before"), "{b:?}");
    }

    #[test]
    fn an_emptied_active_file_continues_from_the_newest_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_records(&path, 2);
        std::fs::rename(&path, dir.path().join("audit.20261130T000000000Z.jsonl")).unwrap();
        write_records(&path, 2);
        let report = verify_dir(dir.path(), None).unwrap().unwrap();
        assert_eq!((report[0].records, report[0].files), (4, 2));
    }

    #[test]
    fn a_keyed_chain_needs_its_key_and_a_rewrite_without_it_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let key = AuditKey::from_bytes(b"0123456789abcdef0123456789abcdef");
        let mut opts = options(&path);
        opts.sealer.key = Some(key.clone());
        write_with(opts, 3);
        assert!(lines(&path)[0].contains(&format!("\"mac\":\"{MAC}\"")));
        assert_eq!(verify_file(&path, Some(&key)).unwrap().unwrap().records, 3);
        let no_key = verify(&path).unwrap_err();
        assert!(no_key.why.contains("--key"), "{no_key:?}");
        let other = AuditKey::from_bytes(b"another key of sixteen bytes or more");
        assert_eq!(
            verify_file(&path, Some(&other)).unwrap().unwrap_err().line,
            1
        );

        // Rewrite the whole file with a changed value, recomputing every
        // hash without the key: found with the key.
        let sealer = Sealer::default();
        let mut prev = GENESIS.to_string();
        let mut out = String::new();
        for l in lines(&path) {
            let mut v: Value = serde_json::from_str(&l).unwrap();
            v["n"] = json!(99);
            let (line, hash) = sealer.seal(&v, &prev);
            out.push_str(&line);
            out.push('\n');
            prev = hash;
        }
        std::fs::write(&path, out).unwrap();
        assert!(verify(&path).is_ok(), "the plain chain is consistent");
        let found = verify_file(&path, Some(&key)).unwrap().unwrap_err();
        assert_eq!(found.line, 1);
        assert!(found.why.contains("not keyed"), "{found:?}");
    }

    #[test]
    fn the_instance_goes_into_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut opts = options(&path);
        opts.sealer.instance = Some("host-8080".into());
        write_with(opts, 2);
        for l in lines(&path) {
            assert!(l.contains("\"instance\":\"host-8080\""), "{l}");
        }
        assert!(verify(&path).is_ok());
    }

    #[test]
    fn a_full_queue_drops_counts_and_records_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut opts = options(&path);
        opts.capacity = 4;
        opts.on_error = filters::OnError::Deny;
        let (writer, log) = AuditWriter::start(opts).unwrap();
        // The writer may take records while they are sent; send enough
        // that some must find the queue full.
        for i in 0..2000 {
            log.send(&json!({"kind": "request", "n": i}));
        }
        writer.close();
        let records: Vec<Value> = lines(&path)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let requests = records.iter().filter(|r| r["kind"] == "request").count();
        let dropped: u64 = records
            .iter()
            .filter(|r| r["kind"] == "audit_gap")
            .map(|r| r["dropped"].as_u64().unwrap())
            .sum();
        assert_eq!(
            requests as u64 + dropped,
            2000,
            "every record written or counted"
        );
        assert!(verify(&path).is_ok());
    }

    #[test]
    fn turning_the_key_on_for_an_existing_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_records(&path, 2);
        let mut opts = options(&path);
        opts.sealer.key = Some(AuditKey::from_bytes(b"0123456789abcdef0123"));
        let err = AuditWriter::start(opts).err().unwrap().to_string();
        assert!(err.contains("written without an audit key"), "{err}");
        assert_eq!(verify(&path).unwrap().records, 2);
    }

    #[test]
    fn a_file_cut_by_someone_else_is_not_padded_and_the_sink_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (writer, log) = AuditWriter::start(options(&path)).unwrap();
        log.send(&json!({"kind": "request", "n": 1}));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lines(&path).is_empty() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10)
            .unwrap();
        log.send(&json!({"kind": "request", "n": 2}));
        while log.failure().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the cut was not noticed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(log
            .failure()
            .unwrap()
            .contains("truncated by another process"));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10, "not padded");
        drop(writer);
    }

    /// A sink that records what it is given; its fsync fails the first
    /// `sync_failures` times, and its writes panic when `panic` is set.
    struct Fake {
        written: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
        syncs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        sync_failures: usize,
        panic: bool,
        unsynced: bool,
        retry_at: Option<std::time::Instant>,
    }

    impl writer::Sink for Fake {
        fn name(&self) -> String {
            "fake".into()
        }
        fn write(&mut self, records: &[Value]) -> Result<(), String> {
            assert!(!self.panic, "fake sink panics");
            self.written.lock().unwrap().extend_from_slice(records);
            self.unsynced = true;
            Ok(())
        }
        fn sync_if_due(&mut self, _force: bool) -> Result<(), String> {
            if !self.unsynced {
                return Ok(());
            }
            if self.retry_at.is_some_and(|t| std::time::Instant::now() < t) {
                return Err("fsync failed".into());
            }
            let n = self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < self.sync_failures {
                self.retry_at = Some(std::time::Instant::now() + Duration::from_millis(100));
                return Err("fsync failed".into());
            }
            self.unsynced = false;
            Ok(())
        }
        fn sync_deadline(&self) -> Option<std::time::Instant> {
            self.unsynced
                .then(|| self.retry_at.unwrap_or_else(std::time::Instant::now))
        }
    }

    fn fake(
        sync_failures: usize,
        panic: bool,
    ) -> (
        Fake,
        std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let syncs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            Fake {
                written: written.clone(),
                syncs: syncs.clone(),
                sync_failures,
                panic,
                unsynced: false,
                retry_at: None,
            },
            written,
            syncs,
        )
    }

    #[test]
    fn a_failing_fsync_neither_rewrites_records_nor_spins() {
        let (sink, written, syncs) = fake(3, false);
        let (writer, log) = AuditWriter::start_with(vec![Box::new(sink)], AuditOptions::default());
        for i in 0..5 {
            log.send(&json!({"kind": "request", "n": i}));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while syncs.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            assert!(std::time::Instant::now() < deadline, "fsync never retried");
            std::thread::sleep(Duration::from_millis(10));
        }
        writer.close();
        let n: Vec<u64> = written
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["n"].as_u64().unwrap())
            .collect();
        assert_eq!(n, [0, 1, 2, 3, 4], "each record written once");
        // Three failures 100 ms apart, then success: a handful of attempts,
        // not thousands.
        assert!(syncs.load(std::sync::atomic::Ordering::SeqCst) <= 6);
    }

    #[test]
    fn a_writer_that_dies_stops_admission() {
        let (sink, _, _) = fake(0, true);
        let (writer, log) = AuditWriter::start_with(vec![Box::new(sink)], AuditOptions::default());
        assert!(log.admit().is_ok());
        log.send(&json!({"kind": "request"}));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.admit().is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "a dead writer went unnoticed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(log.admit().unwrap_err().contains("stopped"));
        writer.close();
    }

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let v = json!({"b": {"z": 1, "a": null}, "a": [true, "x\"y"]});
        assert_eq!(canonical(&v), r#"{"a":[true,"x\"y"],"b":{"a":null,"z":1}}"#);
    }
}
