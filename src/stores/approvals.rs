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
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::Mutex;

/// How many approvals a listing shows (newest first).
pub const LIST_MAX: usize = 1000;

fn now_ms() -> u64 {
    filters::Clock::now_ms(&filters::SystemClock)
}

/// Whether the caller owns a used approval with this call.
fn hands_out(a: &Approval, caller: &Principal, call_id: &str) -> bool {
    a.state == State::Used
        && a.subject == caller.subject
        && a.tenant == caller.tenant
        && a.calls.iter().any(|c| c.id() == Some(call_id))
}

fn newest_first(mut all: Vec<Approval>) -> Vec<Approval> {
    all.sort_by(|a, b| b.created_at.cmp(&a.created_at));
    all.truncate(LIST_MAX);
    all
}

pub struct FileApprovals {
    dir: PathBuf,
    retention_ms: u64,
    all: Mutex<BTreeMap<String, Approval>>,
}

impl FileApprovals {
    /// Load every approval in `dir` (created when missing); those past
    /// their retention are removed.
    pub fn open(dir: &Path, retention: Duration) -> Result<Self, String> {
        let fail = |e: std::io::Error| format!("approvals folder {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(fail)?;
        let retention_ms = retention.as_millis() as u64;
        let now = now_ms();
        let mut all = BTreeMap::new();
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
            all.insert(a.id.clone(), a);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            retention_ms,
            all: Mutex::new(all),
        })
    }

    /// Write one approval's file (off the async workers: fsync blocks).
    async fn write(&self, a: &Approval) -> Result<(), String> {
        let path = self.dir.join(format!("{}.json", a.id));
        let bytes = serde_json::to_vec_pretty(a).map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || super::write_atomically(&path, &bytes))
            .await
            .map_err(|e| format!("approval write: {e}"))?
    }

    /// Drop approvals past their retention (memory and files).
    async fn prune(&self, all: &mut BTreeMap<String, Approval>) {
        let now = now_ms();
        let old: Vec<String> = all
            .values()
            .filter(|a| a.expires_ms.saturating_add(self.retention_ms) <= now)
            .map(|a| a.id.clone())
            .collect();
        for id in old {
            all.remove(&id);
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
        let mut all = self.all.lock().await;
        self.prune(&mut all).await;
        if all.contains_key(&approval.id) {
            return Err(format!("approval {} exists", approval.id));
        }
        self.write(approval).await?;
        all.insert(approval.id.clone(), approval.clone());
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Approval>, String> {
        Ok(self.all.lock().await.get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<Approval>, String> {
        let mut all = self.all.lock().await;
        self.prune(&mut all).await;
        Ok(newest_first(all.values().cloned().collect()))
    }

    async fn replace(&self, next: &Approval, expected: State) -> Result<bool, String> {
        let mut all = self.all.lock().await;
        if all.get(&next.id).map(|a| a.state) != Some(expected) {
            return Ok(false);
        }
        self.write(next).await?;
        all.insert(next.id.clone(), next.clone());
        Ok(true)
    }

    async fn redeemed_call(&self, caller: &Principal, call_id: &str) -> Result<bool, String> {
        let all = self.all.lock().await;
        Ok(all.values().any(|a| hands_out(a, caller, call_id)))
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

    fn call_key(caller_tenant: &str, caller: &str, call_id: &str) -> String {
        let mut h = Sha256::new();
        for part in [caller_tenant, caller, call_id] {
            h.update(part.len().to_le_bytes());
            h.update(part.as_bytes());
        }
        format!("{CALL_KEY}{}", hex::encode(h.finalize()))
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

    async fn list(&self) -> Result<Vec<Approval>, String> {
        let mut conn = self.redis.get().await?;
        let ids: Vec<String> = self
            .redis
            .run(
                redis::cmd("ZREVRANGE")
                    .arg(INDEX)
                    .arg(0)
                    .arg(LIST_MAX - 1)
                    .query_async(&mut conn),
            )
            .await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGET").arg(format!("{KEY}{id}")).arg("record");
        }
        let records: Vec<Option<String>> = self.redis.run(pipe.query_async(&mut conn)).await?;
        let all = records
            .iter()
            .flatten()
            .map(|r| parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(newest_first(all))
    }

    async fn replace(&self, next: &Approval, expected: State) -> Result<bool, String> {
        let mut conn = self.redis.get().await?;
        let record = serde_json::to_string(next).map_err(|e| e.to_string())?;
        let mut call = self.cas.prepare_invoke();
        call.key(format!("{KEY}{}", next.id));
        if next.state == State::Used {
            for c in next.calls.iter().filter_map(|c| c.id()) {
                call.key(Self::call_key(&next.tenant, &next.subject, c));
            }
        }
        call.arg(state_name(expected))
            .arg(state_name(next.state))
            .arg(record)
            .arg(self.ttl_ms(next));
        let done: i64 = self.redis.run(call.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }

    async fn redeemed_call(&self, caller: &Principal, call_id: &str) -> Result<bool, String> {
        let mut conn = self.redis.get().await?;
        let key = Self::call_key(&caller.tenant, &caller.subject, call_id);
        let n: i64 = self
            .redis
            .run(redis::cmd("EXISTS").arg(key).query_async(&mut conn))
            .await?;
        Ok(n == 1)
    }
}
