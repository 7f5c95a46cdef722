//! Where approvals of held tool calls live (`filters::approval`).
//!
//! - [`FileApprovals`] (default): one JSON file per approval under
//!   `state_dir/approvals/`, each written atomically (temporary file,
//!   fsync, rename, fsync of the folder), and all of them in memory. One
//!   instance owns the folder. A file that cannot be read stops start-up
//!   with its name: an approval is never silently dropped.
//! - [`RedisApprovals`] (`state.redis_url`): every instance sees the same
//!   approvals. One hash per approval (`state` and the `record`), changed
//!   by a compare-and-set script, with a time-ordered index for listing.
//!
//! An approval is kept for `approvals.retention_secs` after it expires
//! (its history stays visible to approvers and auditors), then removed.

use super::redis_conn::LazyRedis;
use async_trait::async_trait;
use filters::approval::{Approval, ApprovalStore, State};
use filters::Principal;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;
use tokio::sync::Mutex;

fn now_ms() -> u64 {
    filters::Clock::now_ms(&filters::SystemClock)
}

/// The fingerprints of a used approval's calls (`filters::approval::fingerprint`).
fn fingerprints(a: &Approval) -> Vec<String> {
    if a.state != State::Used {
        return Vec::new();
    }
    let caller = Principal {
        subject: a.subject.clone(),
        tenant: a.tenant.clone(),
        roles: Vec::new(),
    };
    a.calls
        .iter()
        .filter_map(|c| c.fingerprint(&caller))
        .collect()
}

/// Newest first, those in `state` as of `now`, at most `limit`.
fn select(
    all: impl Iterator<Item = Approval>,
    state: Option<State>,
    now: u64,
    limit: usize,
) -> Vec<Approval> {
    let mut out: Vec<Approval> = all
        .filter(|a| state.is_none_or(|s| a.state_at(now) == s))
        .collect();
    out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    out.truncate(limit);
    out
}

#[derive(Default)]
struct Kept {
    all: BTreeMap<String, Approval>,
    /// Fingerprints of the calls handed out.
    handed_out: HashSet<String>,
}

impl Kept {
    fn insert(&mut self, a: Approval) {
        self.handed_out.extend(fingerprints(&a));
        self.all.insert(a.id.clone(), a);
    }
}

pub struct FileApprovals {
    dir: PathBuf,
    retention_ms: u64,
    /// Read without waiting for a write's fsync.
    kept: RwLock<Kept>,
    /// One writer at a time: a compare-and-set is a read and a write.
    writer: Mutex<()>,
}

impl FileApprovals {
    /// Load every approval in `dir` (created when missing); those past
    /// their retention are removed.
    pub fn open(dir: &Path, retention: Duration) -> Result<Self, String> {
        let fail = |e: std::io::Error| format!("approvals folder {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(fail)?;
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let mut kept = Kept::default();
        for entry in std::fs::read_dir(dir).map_err(fail)? {
            let path = entry.map_err(fail)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(fail)?;
            let a: Approval = serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "approval file {} is corrupt ({e}); refusing to start. Restore it from a backup or move it aside",
                    path.display()
                )
            })?;
            if a.expires_ms.saturating_add(retention_ms) <= now {
                std::fs::remove_file(&path).map_err(fail)?;
                continue;
            }
            kept.insert(a);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            retention_ms,
            kept: RwLock::new(kept),
            writer: Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Kept> {
        self.kept.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Kept> {
        self.kept.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Write one approval's file (off the async workers: fsync blocks).
    async fn save(&self, a: &Approval) -> Result<(), String> {
        let path = self.dir.join(format!("{}.json", a.id));
        let bytes = serde_json::to_vec_pretty(a).map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || super::write_atomically(&path, &bytes))
            .await
            .map_err(|e| format!("approval write: {e}"))?
    }

    /// Drop approvals past their retention (memory and files).
    async fn prune(&self) {
        let now = now_ms();
        let old: Vec<String> = self
            .read()
            .all
            .values()
            .filter(|a| a.expires_ms.saturating_add(self.retention_ms) <= now)
            .map(|a| a.id.clone())
            .collect();
        if old.is_empty() {
            return;
        }
        {
            let mut kept = self.write();
            for id in &old {
                if let Some(a) = kept.all.remove(id) {
                    for f in fingerprints(&a) {
                        kept.handed_out.remove(&f);
                    }
                }
            }
        }
        for id in old {
            let path = self.dir.join(format!("{id}.json"));
            if let Err(e) = tokio::fs::remove_file(&path).await {
                log::warn!("approval {}: not removed: {e}", path.display());
            }
        }
    }
}

#[async_trait]
impl ApprovalStore for FileApprovals {
    async fn create(&self, approval: &Approval) -> Result<(), String> {
        let _one = self.writer.lock().await;
        self.prune().await;
        if self.read().all.contains_key(&approval.id) {
            return Err(format!("approval {} exists", approval.id));
        }
        self.save(approval).await?;
        self.write().insert(approval.clone());
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Approval>, String> {
        Ok(self.read().all.get(id).cloned())
    }

    async fn list(
        &self,
        state: Option<State>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Approval>, String> {
        Ok(select(
            self.read().all.values().cloned(),
            state,
            now_ms,
            limit,
        ))
    }

    async fn replace(&self, next: &Approval, expected: State) -> Result<bool, String> {
        let _one = self.writer.lock().await;
        if self.read().all.get(&next.id).map(|a| a.state) != Some(expected) {
            return Ok(false);
        }
        self.save(next).await?;
        self.write().insert(next.clone());
        Ok(true)
    }

    async fn handed_out(&self, fingerprint: &str) -> Result<bool, String> {
        Ok(self.read().handed_out.contains(fingerprint))
    }
}

/// Key of one approval (a hash: `state`, `record`).
const KEY: &str = "portcullis:approval:";
/// The time-ordered index of approval ids.
const INDEX: &str = "portcullis:approvals";
/// Keys of the calls handed out, per caller.
const CALL_KEY: &str = "portcullis:approval-call:";

/// Replace the record if its state is still ARGV[1]; on a redemption, mark
/// its calls handed out (KEYS[2..]). ARGV: expected state, new state, new
/// record, TTL in ms.
const CAS_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'record', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], '1', 'PX', ARGV[4])
end
return 1
"#;

pub struct RedisApprovals {
    redis: LazyRedis,
    retention_ms: u64,
    cas: redis::Script,
}

impl RedisApprovals {
    pub fn new(url: &str, timeout: Duration, retention: Duration) -> Result<Self, String> {
        Ok(Self {
            redis: LazyRedis::new(url, timeout)?,
            retention_ms: retention.as_millis() as u64,
            cas: redis::Script::new(CAS_SCRIPT),
        })
    }

    /// How long Redis keeps an approval: until its retention ends.
    fn ttl_ms(&self, a: &Approval) -> u64 {
        a.expires_ms
            .saturating_add(self.retention_ms)
            .saturating_sub(now_ms())
            .max(1)
    }

    fn call_key(fingerprint: &str) -> String {
        format!("{CALL_KEY}{fingerprint}")
    }
}

fn state_name(s: State) -> &'static str {
    s.as_str()
}

fn parse(record: &str) -> Result<Approval, String> {
    serde_json::from_str(record).map_err(|e| format!("approval record in redis: {e}"))
}

#[async_trait]
impl ApprovalStore for RedisApprovals {
    async fn create(&self, a: &Approval) -> Result<(), String> {
        let mut conn = self.redis.get().await?;
        let record = serde_json::to_string(a).map_err(|e| e.to_string())?;
        let key = format!("{KEY}{}", a.id);
        let created = a.expires_ms; // ordered by expiry: the same order as creation
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("state")
            .arg(state_name(a.state))
            .arg("record")
            .arg(record)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(self.ttl_ms(a))
            .ignore()
            .cmd("ZADD")
            .arg(INDEX)
            .arg(created)
            .arg(&a.id)
            .ignore()
            // The index forgets what Redis has let expire.
            .cmd("ZREMRANGEBYSCORE")
            .arg(INDEX)
            .arg("-inf")
            .arg(now_ms().saturating_sub(self.retention_ms))
            .ignore();
        self.redis.run(pipe.query_async::<()>(&mut conn)).await
    }

    async fn get(&self, id: &str) -> Result<Option<Approval>, String> {
        let mut conn = self.redis.get().await?;
        let record: Option<String> = self
            .redis
            .run(
                redis::cmd("HGET")
                    .arg(format!("{KEY}{id}"))
                    .arg("record")
                    .query_async(&mut conn),
            )
            .await?;
        record.as_deref().map(parse).transpose()
    }

    async fn list(
        &self,
        state: Option<State>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Approval>, String> {
        // The index is read newest first a page at a time, until `limit`
        // approvals in `state` are found or it ends.
        const PAGE: usize = 500;
        let mut conn = self.redis.get().await?;
        let mut found = Vec::new();
        let mut from = 0;
        while found.len() < limit {
            let ids: Vec<String> = self
                .redis
                .run(
                    redis::cmd("ZREVRANGE")
                        .arg(INDEX)
                        .arg(from)
                        .arg(from + PAGE - 1)
                        .query_async(&mut conn),
                )
                .await?;
            if ids.is_empty() {
                break;
            }
            from += ids.len();
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGET").arg(format!("{KEY}{id}")).arg("record");
            }
            let records: Vec<Option<String>> = self.redis.run(pipe.query_async(&mut conn)).await?;
            for r in records.iter().flatten() {
                found.push(parse(r)?);
            }
            found = select(found.into_iter(), state, now_ms, usize::MAX);
            if ids.len() < PAGE {
                break;
            }
        }
        Ok(select(found.into_iter(), None, now_ms, limit))
    }

    async fn replace(&self, next: &Approval, expected: State) -> Result<bool, String> {
        let mut conn = self.redis.get().await?;
        let record = serde_json::to_string(next).map_err(|e| e.to_string())?;
        let mut call = self.cas.prepare_invoke();
        call.key(format!("{KEY}{}", next.id));
        for f in fingerprints(next) {
            call.key(Self::call_key(&f));
        }
        call.arg(state_name(expected))
            .arg(state_name(next.state))
            .arg(record)
            .arg(self.ttl_ms(next));
        let done: i64 = self.redis.run(call.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }

    async fn handed_out(&self, fingerprint: &str) -> Result<bool, String> {
        let mut conn = self.redis.get().await?;
        let n: i64 = self
            .redis
            .run(
                redis::cmd("EXISTS")
                    .arg(Self::call_key(fingerprint))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filters::approval::{HeldCall, Holding, NewApproval};
    use serde_json::json;

    fn approval(n: u64, caller: &Principal) -> Approval {
        let holding = Holding::new(&format!("req-{n}"));
        let call = HeldCall {
            choice: 0,
            call: json!({"id": format!("call_{n}"), "type": "function",
                "function": {"name": "run_shell", "arguments": "{}"}}),
            legacy: false,
        };
        Approval::pending(
            NewApproval {
                holding: &holding,
                calls: vec![call],
                request_id: &format!("req-{n}"),
                caller,
                route: "chat/completions",
                model: "m",
                stream: false,
                request_sha256: "x",
            },
            // One a second apart: newest last.
            now_ms() + n * 1000,
            3_600_000,
        )
    }

    #[tokio::test]
    async fn listings_filter_before_they_cut_and_handed_out_calls_are_known_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let week = Duration::from_secs(7 * 86_400);
        let store = FileApprovals::open(dir.path(), week).unwrap();
        let alice = Principal {
            subject: "alice".into(),
            tenant: "t".into(),
            roles: vec![],
        };
        let all: Vec<Approval> = (0..5).map(|n| approval(n, &alice)).collect();
        for a in &all {
            store.create(a).await.unwrap();
        }
        assert!(store.create(&all[0]).await.is_err(), "ids are unique");
        // The three newest are decided: the two pending ones are older.
        let bob = Principal {
            subject: "bob".into(),
            ..alice.clone()
        };
        for a in &all[2..] {
            let mut next = a.clone();
            next.decide(true, &bob, None, now_ms()).unwrap();
            assert!(store.replace(&next, State::Pending).await.unwrap());
            assert!(
                !store.replace(&next, State::Pending).await.unwrap(),
                "compare-and-set"
            );
        }
        let now = now_ms();
        let pending = store.list(Some(State::Pending), now, 2).await.unwrap();
        let ids: Vec<&str> = pending.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, [all[1].id.as_str(), all[0].id.as_str()]);
        assert_eq!(store.list(None, now, 3).await.unwrap()[0].id, all[4].id);

        // Handed out: its call's fingerprint is known, also after a restart.
        let mut used = store.get(&all[4].id).await.unwrap().unwrap();
        used.redeem(&alice, "chat/completions", "x", "req-9", now)
            .unwrap();
        assert!(store.replace(&used, State::Approved).await.unwrap());
        let print = filters::approval::fingerprint(&alice, "call_4", "run_shell", "{}");
        assert!(store.handed_out(&print).await.unwrap());
        let other = filters::approval::fingerprint(&alice, "call_3", "run_shell", "{}");
        assert!(
            !store.handed_out(&other).await.unwrap(),
            "approved, not handed out"
        );
        drop(store);
        let store = FileApprovals::open(dir.path(), week).unwrap();
        assert!(store.handed_out(&print).await.unwrap());
        assert_eq!(store.list(None, now, 100).await.unwrap().len(), 5);

        // A corrupt file stops start-up with its name.
        std::fs::write(dir.path().join("apr_broken.json"), b"{").unwrap();
        let e = FileApprovals::open(dir.path(), week).err().unwrap();
        assert!(
            e.contains("apr_broken.json") && e.contains("corrupt"),
            "{e}"
        );
    }
}
