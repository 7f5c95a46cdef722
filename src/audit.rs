//! Audit records: one JSON line per request (and per admin action),
//! hash-chained so that `portcullis audit verify` finds any edit, deletion,
//! insertion or reordering.
//!
//! Records are handed to [`AuditLog::send`] (never blocking the request
//! path) and written by one background thread, which chains them:
//! `hash = SHA-256(prev_hash + "\n" + canonical(record without hash))`.
//! Each line is itself written in canonical form (keys sorted, no
//! whitespace), so a changed byte anywhere in a line is a break even when it
//! would not change the parsed value. The chain continues across restarts
//! from the last line of the file. The writer flushes to the OS after every
//! batch, so a killed process loses only records still queued; a graceful
//! shutdown (SIGTERM) drains the queue and fsyncs before exit. The queue is
//! unbounded so that no record is ever dropped; its depth is the
//! `portcullis_audit_queue_depth` gauge.

use crate::metrics;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

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
    pub request_id: String,
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
}

/// `prev_hash` of the first record of a file.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where records go.
#[derive(Debug, Clone, Default)]
pub struct AuditTargets {
    pub file: Option<PathBuf>,
    pub stdout: bool,
}

enum Msg {
    Record(Value),
    Close,
}

/// The sending side, cheap to clone, safe to share between threads.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
}

/// Owns the writer thread; [`AuditWriter::close`] drains and joins it.
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Queue a record. Never blocks.
    pub fn send<T: Serialize>(&self, record: &T) {
        match serde_json::to_value(record) {
            Ok(value) => {
                metrics::AUDIT_QUEUE_DEPTH.inc();
                if self.tx.send(Msg::Record(value)).is_err() {
                    metrics::AUDIT_QUEUE_DEPTH.dec();
                    metrics::AUDIT_WRITE_ERRORS.inc();
                    log::error!("audit writer has stopped; record lost");
                }
            }
            Err(e) => {
                metrics::AUDIT_WRITE_ERRORS.inc();
                log::error!("audit record not serializable: {e}");
            }
        }
    }
}

impl AuditWriter {
    /// Open the targets and start the writer thread. Fails when the file
    /// cannot be opened or its last line is not a record (the chain cannot
    /// be continued: run `portcullis audit verify` on it).
    pub fn start(targets: AuditTargets) -> anyhow::Result<(AuditWriter, AuditLog)> {
        let (file, prev) = match &targets.file {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        anyhow::anyhow!(
                            "audit file {}: cannot create its folder: {e}",
                            path.display()
                        )
                    })?;
                }
                let prev = last_hash(path)?;
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| anyhow::anyhow!("audit file {}: {e}", path.display()))?;
                (Some(BufWriter::new(file)), prev)
            }
            None => (None, GENESIS.to_string()),
        };
        let (tx, rx) = mpsc::channel();
        let stdout = targets.stdout;
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(rx, file, stdout, prev))?;
        Ok((
            AuditWriter {
                tx: tx.clone(),
                thread: Some(thread),
            },
            AuditLog { tx },
        ))
    }

    /// Write everything queued so far, fsync, and stop the thread.
    pub fn close(mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    rx: mpsc::Receiver<Msg>,
    mut file: Option<BufWriter<File>>,
    stdout: bool,
    mut prev: String,
) {
    'outer: while let Ok(msg) = rx.recv() {
        let mut next = Some(msg);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(v) => write_one(v, &mut prev, &mut file, stdout),
                Msg::Close => break 'outer,
            }
            next = rx.try_recv().ok();
        }
        flush(&mut file, false);
    }
    flush(&mut file, true);
}

fn write_one(record: Value, prev: &mut String, file: &mut Option<BufWriter<File>>, stdout: bool) {
    metrics::AUDIT_QUEUE_DEPTH.dec();
    let line = seal(record, prev);
    if let Some(f) = file.as_mut() {
        if let Err(e) = f
            .write_all(line.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
        {
            metrics::AUDIT_WRITE_ERRORS.inc();
            log::error!("audit write failed: {e}");
        }
    }
    if stdout {
        println!("{line}");
    }
    metrics::AUDIT_RECORDS_WRITTEN.inc();
}

fn flush(file: &mut Option<BufWriter<File>>, sync: bool) {
    if let Some(f) = file.as_mut() {
        let result = f
            .flush()
            .and_then(|_| if sync { f.get_ref().sync_all() } else { Ok(()) });
        if let Err(e) = result {
            metrics::AUDIT_WRITE_ERRORS.inc();
            log::error!("audit flush failed: {e}");
        }
    }
}

/// Chain a record to `prev`: sets `prev_hash` and `hash`, returns the
/// canonical line and moves `prev` on.
fn seal(mut record: Value, prev: &mut String) -> String {
    if let Value::Object(map) = &mut record {
        map.remove("hash");
        map.insert("prev_hash".into(), Value::String(prev.clone()));
    }
    let hash = chain_hash(prev, &canonical(&record));
    if let Value::Object(map) = &mut record {
        map.insert("hash".into(), Value::String(hash.clone()));
    }
    *prev = hash;
    canonical(&record)
}

fn chain_hash(prev: &str, canonical_without_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(canonical_without_hash.as_bytes());
    hex::encode(h.finalize())
}

/// JSON with object keys sorted at every level and no whitespace.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The `hash` of the last line of an existing audit file, or the genesis
/// hash for a missing or empty one.
fn last_hash(path: &Path) -> anyhow::Result<String> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GENESIS.into()),
        Err(e) => anyhow::bail!("audit file {}: {e}", path.display()),
    };
    let len = file.metadata()?.len();
    // A record is far smaller than this; read only the file's tail.
    let start = len.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = String::new();
    file.read_to_string(&mut tail).map_err(|e| {
        anyhow::anyhow!("audit file {}: tail is not UTF-8 text: {e}", path.display())
    })?;
    let Some(last) = tail.lines().rev().find(|l| !l.trim().is_empty()) else {
        return Ok(GENESIS.into());
    };
    serde_json::from_str::<Value>(last)
        .ok()
        .and_then(|v| v.get("hash")?.as_str().map(str::to_string))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "audit file {}: its last line is not an audit record, so the hash chain cannot be continued; \
                 check it with `portcullis audit verify` and move it aside",
                path.display()
            )
        })
}

/// The result of checking a file's chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Verification {
    Intact {
        records: usize,
    },
    Broken {
        records: usize,
        line: usize,
        why: String,
    },
}

/// Check every line of an audit file.
pub fn verify(path: &Path) -> std::io::Result<Verification> {
    let reader = BufReader::new(File::open(path)?);
    let mut prev = GENESIS.to_string();
    let mut records = 0;
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let broken = |why: String| Verification::Broken {
            records,
            line: line_no,
            why,
        };
        let line = match line {
            Ok(l) => l,
            Err(e) => return Ok(broken(format!("unreadable: {e}"))),
        };
        let Ok(mut value) = serde_json::from_str::<Value>(&line) else {
            return Ok(broken("not a JSON record".into()));
        };
        if canonical(&value) != line {
            return Ok(broken("not in canonical form (the line was edited)".into()));
        }
        let Some(map) = value.as_object_mut() else {
            return Ok(broken("not a JSON object".into()));
        };
        let hash = map
            .remove("hash")
            .and_then(|h| h.as_str().map(str::to_string));
        let record_prev = map.get("prev_hash").and_then(Value::as_str).unwrap_or("");
        let Some(hash) = hash else {
            return Ok(broken("has no hash".into()));
        };
        if record_prev != prev {
            return Ok(broken(
                "prev_hash does not match the line before (a line was deleted, inserted or moved)"
                    .into(),
            ));
        }
        if chain_hash(&prev, &canonical(&value)) != hash {
            return Ok(broken(
                "hash does not match the content (the line was edited)".into(),
            ));
        }
        prev = hash;
        records += 1;
    }
    Ok(Verification::Intact { records })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write_records(path: &Path, n: usize) {
        let (writer, log) = AuditWriter::start(AuditTargets {
            file: Some(path.to_path_buf()),
            stdout: false,
        })
        .unwrap();
        for i in 0..n {
            // Floats that a fast-but-inexact parser would not round-trip.
            let f = (i as f64 + 1.0) / 3.0 * 1.000_000_1 + 2.036_093;
            log.send(
                &json!({"kind": "request", "n": i, "f": f, "nested": {"b": 1, "a": [1.5, "é"]}}),
            );
        }
        writer.close();
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
        assert_eq!(verify(&path).unwrap(), Verification::Intact { records: 50 });
        let first: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first["prev_hash"], GENESIS);
    }

    fn broken_at(path: &Path) -> usize {
        match verify(path).unwrap() {
            Verification::Broken { line, .. } => line,
            v => panic!("tampering not found: {v:?}"),
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
        let err = AuditWriter::start(AuditTargets {
            file: Some(path.clone()),
            stdout: false,
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("last line is not an audit record"), "{err}");
    }

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let v = json!({"b": {"z": 1, "a": null}, "a": [true, "x\"y"]});
        assert_eq!(canonical(&v), r#"{"a":[true,"x\"y"],"b":{"a":null,"z":1}}"#);
    }
}
