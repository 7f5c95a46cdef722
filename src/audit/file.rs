//! The audit file: one writer per file (an exclusive lock), recovery of a
//! record cut short by a crash, rotation by size and by day with the chain
//! continuing across files, and a write that either lands whole or leaves
//! the file and the chain as they were.
//!
//! Files of one chain: the active file `NAME.EXT` and rotated files
//! `NAME.YYYYMMDDTHHMMSSmmmZ.EXT` (UTC time of rotation), which sort in
//! order by name. The first record of each new file carries the last hash
//! of the file before it as its `prev_hash`.

use super::chain::{Sealer, GENESIS};
use super::writer::Sink;
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How the file sink behaves.
#[derive(Debug, Clone)]
pub struct FileOptions {
    pub path: PathBuf,
    /// Rotate once the active file has this many bytes; 0: never.
    pub rotate_bytes: u64,
    /// Rotate when the UTC day changes.
    pub rotate_daily: bool,
    /// At most this long between a write and its fsync; zero: fsync after
    /// every batch.
    pub fsync_every: Duration,
}

pub struct FileSink {
    opts: FileOptions,
    sealer: Sealer,
    file: File,
    /// Held for the life of the sink: the exclusive lock.
    _lock: File,
    /// Length of the file up to its last whole record.
    len: u64,
    /// UTC day (days since the epoch) the active file belongs to.
    day: u64,
    prev: String,
    unsynced_since: Option<Instant>,
    /// The last fsync failed: its error, and when to try again.
    sync_failed: Option<(String, Instant)>,
}

impl FileSink {
    /// Lock the file, repair a cut-off last record, and find where the
    /// chain goes on.
    pub fn open(opts: FileOptions, sealer: Sealer) -> anyhow::Result<Self> {
        let path = &opts.path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!(
                    "audit file {}: cannot create its folder: {e}",
                    path.display()
                )
            })?;
        }
        let lock = lock(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("audit file {}: {e}", path.display()))?;
        let len = repair_tail(path, &file)?;
        let last = match last_hash_of(path, &file, len)? {
            Some(last) => Some(last),
            None => previous_file_last(path)?,
        };
        let prev = match last {
            Some((hash, keyed)) => {
                if keyed != sealer.key.is_some() {
                    anyhow::bail!(
                        "audit file {} was written {} an audit key, and the config says {}: one file \
                         holds one kind of chain. Move the file aside (or rotate it) before changing `audit.key_file`",
                        path.display(),
                        if keyed { "with" } else { "without" },
                        if keyed { "none" } else { "to use one" }
                    );
                }
                hash
            }
            None => GENESIS.into(),
        };
        let modified = file
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| SystemTime::now());
        Ok(Self {
            day: if len > 0 { day_of(modified) } else { today() },
            opts,
            sealer,
            file,
            _lock: lock,
            len,
            prev,
            unsynced_since: None,
            sync_failed: None,
        })
    }

    fn rotate_due(&self) -> bool {
        self.len > 0
            && ((self.opts.rotate_bytes > 0 && self.len >= self.opts.rotate_bytes)
                || (self.opts.rotate_daily && today() != self.day))
    }

    /// Close the active file under a dated name and start a new one. If
    /// an earlier attempt renamed the file but could not open the new one,
    /// the rename is not made again.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        self.unsynced_since = None;
        let target = free_rotated_name(&self.opts.path);
        if self.opts.path.exists() {
            std::fs::rename(&self.opts.path, &target)?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.opts.path)?;
        if let Some(dir) = self.opts.path.parent() {
            // The rename and the new file are durable once the folder is.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.len = 0;
        self.day = today();
        log::info!(
            "audit file rotated to {}; the chain continues in {}",
            target.display(),
            self.opts.path.display()
        );
        Ok(())
    }

    fn try_write(&mut self, records: &[Value]) -> std::io::Result<()> {
        // An earlier failed write may have left part of a line; a file
        // shorter than what was written was cut by someone else, and is not
        // padded back (that would put zeros into the chain).
        let actual = self.file.metadata()?.len();
        if actual < self.len {
            return Err(std::io::Error::other(format!(
                "the file was truncated by another process ({actual} bytes, {} written); \
                 the chain cannot go on in it",
                self.len
            )));
        }
        if actual > self.len {
            self.file.set_len(self.len)?;
        }
        if self.rotate_due() {
            self.rotate()?;
        }
        let (buf, prev) = self.sealer.seal_lines(records, &self.prev);
        if let Err(e) = self.file.write_all(buf.as_bytes()) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.prev = prev;
        self.unsynced_since.get_or_insert_with(Instant::now);
        Ok(())
    }
}

impl Sink for FileSink {
    fn name(&self) -> String {
        format!("audit file {}", self.opts.path.display())
    }

    fn write(&mut self, records: &[Value]) -> Result<(), String> {
        self.try_write(records).map_err(|e| e.to_string())
    }

    /// fsync when due. A failure is reported (the sink counts as failing)
    /// and tried again a second later, not in a tight loop; the records
    /// stay written (they are not written twice).
    fn sync_if_due(&mut self, force: bool) -> Result<(), String> {
        let Some(since) = self.unsynced_since else {
            return Ok(());
        };
        if let Some((e, retry_at)) = &self.sync_failed {
            if !force && Instant::now() < *retry_at {
                return Err(e.clone());
            }
        }
        if force || since.elapsed() >= self.opts.fsync_every {
            if let Err(e) = self.file.sync_data() {
                let e = format!("fsync: {e}");
                self.sync_failed = Some((e.clone(), Instant::now() + Duration::from_secs(1)));
                return Err(e);
            }
            self.unsynced_since = None;
            self.sync_failed = None;
        }
        Ok(())
    }

    fn sync_deadline(&self) -> Option<Instant> {
        let due = self.unsynced_since.map(|t| t + self.opts.fsync_every)?;
        Some(match &self.sync_failed {
            Some((_, retry_at)) => due.max(*retry_at),
            None => due,
        })
    }
}

/// The lock file `FILE.lock`: exclusively locked while a process writes
/// the audit file, holding that process's pid. The lock goes with the
/// process, however it ends.
fn lock(path: &Path) -> anyhow::Result<File> {
    let lock_path = sibling(path, ".lock");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("audit lock file {}: {e}", lock_path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "unknown" } else { holder };
            anyhow::bail!(
                "audit file {} is in use by another process (pid {holder}); two writers would break its chain. \
                 Give each instance its own `audit.file` (e.g. a `{{instance}}` in its name)",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("audit lock file {}: {e}", lock_path.display())
        }
    }
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// A file whose last line has no newline was cut short by a crash in the
/// middle of a write: move that part to `FILE.partial` and cut it off, so
/// the chain goes on from the last whole record. Returns the new length.
fn repair_tail(path: &Path, file: &File) -> anyhow::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 || byte_at(file, len - 1)? == b'\n' {
        return Ok(len);
    }
    let keep = last_newline_before(file, len)?.map_or(0, |p| p + 1);
    let mut partial = vec![0; (len - keep) as usize];
    read_at(file, keep, &mut partial)?;
    let partial_path = sibling(path, ".partial");
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial_path)?;
    out.write_all(&partial)?;
    out.write_all(b"\n")?;
    out.sync_all()?;
    file.set_len(keep)?;
    file.sync_all()?;
    log::warn!(
        "audit file {} ended in a record cut short ({} bytes, from a crash during a write); \
         moved to {} and the chain goes on from the last whole record",
        path.display(),
        len - keep,
        partial_path.display()
    );
    Ok(keep)
}

/// The `hash` of the last record in the first `len` bytes and whether it
/// is keyed, `None` when there is none. A last line that is not a record
/// stops the start.
fn last_hash_of(path: &Path, file: &File, len: u64) -> anyhow::Result<Option<(String, bool)>> {
    if len == 0 {
        return Ok(None);
    }
    // `len` ends in a newline (repair_tail): the last line starts after the
    // newline before it.
    let start = last_newline_before(file, len - 1)?.map_or(0, |p| p + 1);
    let mut line = vec![0; (len - 1 - start) as usize];
    read_at(file, start, &mut line)?;
    serde_json::from_slice::<Value>(&line)
        .ok()
        .and_then(|v| {
            let hash = v.get("hash")?.as_str()?.to_string();
            Some((hash, v.get("mac").is_some()))
        })
        .map(Some)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "audit file {}: its last line is not an audit record, so the hash chain cannot be continued; \
                 check it with `portcullis audit verify` and move it aside",
                path.display()
            )
        })
}

/// Where a new (or emptied) active file continues the chain: the last
/// record of the newest rotated file (its hash, and whether it is keyed).
fn previous_file_last(path: &Path) -> anyhow::Result<Option<(String, bool)>> {
    let Some(newest) = rotated_files(path)?.pop() else {
        return Ok(None);
    };
    let file = OpenOptions::new().read(true).write(true).open(&newest)?;
    let len = repair_tail(&newest, &file)?;
    last_hash_of(&newest, &file, len)
}

fn byte_at(file: &File, pos: u64) -> std::io::Result<u8> {
    let mut b = [0u8];
    read_at(file, pos, &mut b)?;
    Ok(b[0])
}

fn read_at(file: &File, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, pos)
}

/// Position of the last `\n` before `end`, reading backwards in blocks.
fn last_newline_before(file: &File, end: u64) -> std::io::Result<Option<u64>> {
    const BLOCK: u64 = 64 * 1024;
    let mut hi = end;
    let mut buf = vec![0u8; BLOCK as usize];
    while hi > 0 {
        let lo = hi.saturating_sub(BLOCK);
        let chunk = &mut buf[..(hi - lo) as usize];
        read_at(file, lo, chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `NAME.EXT` → (`NAME`, `.EXT`); no extension → (`NAME`, ``).
fn split_name(file_name: &str) -> (&str, &str) {
    match file_name.rfind('.') {
        Some(i) if i > 0 => (&file_name[..i], &file_name[i..]),
        _ => (file_name, ""),
    }
}

/// `YYYYMMDDTHHMMSSmmmZ`.
fn is_stamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b[8] == b'T'
        && b[18] == b'Z'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 8 || i == 18 || c.is_ascii_digit())
}

/// The active file a file in an audit folder belongs to: itself, or for a
/// rotated file the name it was rotated from. `None` for lock and partial
/// files.
pub fn chain_of(file_name: &str) -> Option<String> {
    if file_name.starts_with('.') || file_name.ends_with(".lock") || file_name.ends_with(".partial")
    {
        return None;
    }
    let (stem, ext) = split_name(file_name);
    if is_stamp(ext.trim_start_matches('.')) {
        // `NAME.STAMP` without an extension.
        return Some(stem.to_string());
    }
    match split_name(stem) {
        (base, stamp) if is_stamp(stamp.trim_start_matches('.')) => Some(format!("{base}{ext}")),
        _ => Some(file_name.to_string()),
    }
}

/// Rotated files of the chain of `path`, oldest first.
pub fn rotated_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(n) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if n != name && chain_of(&n).as_deref() == Some(name) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

fn free_rotated_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("audit.jsonl");
    let (stem, ext) = split_name(name);
    let mut t = SystemTime::now();
    loop {
        let candidate = path.with_file_name(format!("{stem}.{}{ext}", stamp(t)));
        if !candidate.exists() {
            return candidate;
        }
        t += Duration::from_millis(1);
    }
}

fn stamp(t: SystemTime) -> String {
    // 2026-11-30T11:21:42.123Z → 20261130T112142123Z
    humantime::format_rfc3339_millis(t)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T' || *c == 'Z')
        .collect()
}

fn day_of(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

fn today() -> u64 {
    day_of(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_a_chain() {
        assert_eq!(chain_of("audit.jsonl").as_deref(), Some("audit.jsonl"));
        assert_eq!(
            chain_of("audit.20261130T112142123Z.jsonl").as_deref(),
            Some("audit.jsonl")
        );
        assert_eq!(
            chain_of("audit-host-8080.20261130T112142123Z.jsonl").as_deref(),
            Some("audit-host-8080.jsonl")
        );
        assert_eq!(
            chain_of("audit.20261130T112142123Z").as_deref(),
            Some("audit")
        );
        assert_eq!(chain_of("audit.jsonl.lock"), None);
        assert_eq!(chain_of("audit.jsonl.partial"), None);
        assert_eq!(
            chain_of("audit.2026.jsonl").as_deref(),
            Some("audit.2026.jsonl")
        );
        let s = stamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_501_702_123));
        assert!(is_stamp(&s), "{s}");
        assert_eq!(s, "20251130T112142123Z");
    }
}
