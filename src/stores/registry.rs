//! Where the model registry and the freeze lists live.
//!
//! - [`FileStore`] (default): one JSON file under `state_dir`, written
//!   atomically (temporary file, fsync, rename, fsync of the folder). A
//!   corrupt or unreadable file stops start-up with a message naming it;
//!   it is never silently reset.
//! - [`RedisStore`] (`state.redis_url`): one JSON document in Redis,
//!   changed by compare-and-set and announced on a channel. Every instance
//!   reloads on each announcement and at least every 250 ms; if it has not
//!   managed a load for a second, its snapshot is refused and the filters
//!   fail closed.
//!
//! The seed (models from the config and `registry.seed_file`) is written
//! only when no state exists yet: once the registry has state, it wins.
//! If Redis loses the registry (restarted without persistence), running
//! instances put back their last snapshot, also over a seed another
//! instance wrote meanwhile (revisions only grow), and a change is never
//! applied to a missing registry. To reset a Redis registry to its seed,
//! stop every instance, delete the key, start again.

use async_trait::async_trait;
use filters::model_registry::{RegistryError, RegistryState, RegistryView};
use futures_util::StreamExt;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Why a registry change failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("registry store: {0}")]
    Store(String),
}

/// A change to apply: may run more than once (compare-and-set retries).
pub type Change<'a> =
    &'a (dyn Fn(&mut RegistryState) -> Result<Value, RegistryError> + Send + Sync);

#[async_trait]
pub trait RegistryStore: RegistryView {
    /// Apply `change` atomically, persist it and make every instance see it.
    async fn update(&self, change: Change<'_>) -> Result<Value, UpdateError>;
}

pub struct FileStore {
    path: PathBuf,
    state: RwLock<Arc<RegistryState>>,
    writer: tokio::sync::Mutex<()>,
}

impl FileStore {
    /// Load the state file, or write `seed` when there is none.
    pub fn open(path: &Path, seed: RegistryState) -> Result<Self, String> {
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "registry state file {} is corrupt ({e}); refusing to start. Restore it from a backup, \
                     or move it aside to start from the seed",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomically(path, &seed)?;
                seed
            }
            Err(e) => return Err(format!("registry state file {}: {e}", path.display())),
        };
        Ok(Self {
            path: path.to_path_buf(),
            state: RwLock::new(Arc::new(state)),
            writer: tokio::sync::Mutex::new(()),
        })
    }
}

fn write_atomically(path: &Path, state: &RegistryState) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
    super::write_atomically(path, &bytes).map_err(|e| format!("registry state file {e}"))
}

impl RegistryView for FileStore {
    fn snapshot(&self) -> Result<Arc<RegistryState>, String> {
        self.state
            .read()
            .map(|s| s.clone())
            .map_err(|_| "registry state lock poisoned".to_string())
    }
}

#[async_trait]
impl RegistryStore for FileStore {
    async fn update(&self, change: Change<'_>) -> Result<Value, UpdateError> {
        let _one_writer = self.writer.lock().await;
        let mut next = (*self.snapshot().map_err(UpdateError::Store)?).clone();
        let result = change(&mut next)?;
        // The fsyncs block: off the async workers that serve requests.
        let next = Arc::new(next);
        let (path, state) = (self.path.clone(), next.clone());
        tokio::task::spawn_blocking(move || write_atomically(&path, &state))
            .await
            .map_err(|e| UpdateError::Store(format!("registry writer: {e}")))?
            .map_err(UpdateError::Store)?;
        if let Ok(mut s) = self.state.write() {
            *s = next;
        }
        Ok(result)
    }
}

const KEY: &str = "portcullis:registry";
const CHANNEL: &str = "portcullis:registry:changed";
/// A snapshot older than this is not trusted.
const STALE_AFTER: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(250);

/// Set `KEYS[1]` to `ARGV[2]` only if it still holds `ARGV[1]` ('' = absent),
/// then announce the change.
const CAS_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#;

pub struct RedisStore {
    client: redis::Client,
    timeout: Duration,
    cache: RwLock<Option<(Instant, String, Arc<RegistryState>)>>,
    cas: redis::Script,
    /// One connection, reused by reloads and updates; dropped on any error
    /// so the next use reconnects.
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl RedisStore {
    /// Connect, write the seed if Redis holds no registry yet, and load.
    /// Returns an error when Redis cannot be reached: an instance must load
    /// the current state before it serves.
    pub async fn open(
        url: &str,
        timeout: Duration,
        seed: RegistryState,
    ) -> Result<Arc<Self>, String> {
        let store = Arc::new(Self {
            client: redis::Client::open(url).map_err(|e| format!("redis URL: {e}"))?,
            timeout,
            cache: RwLock::new(None),
            cas: redis::Script::new(CAS_SCRIPT),
            conn: tokio::sync::Mutex::new(None),
        });
        let mut conn = store.connection().await?;
        let seed_json = serde_json::to_string(&seed).map_err(|e| e.to_string())?;
        let _: Option<String> = redis::cmd("SET")
            .arg(KEY)
            .arg(seed_json)
            .arg("NX")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        store.reload().await?;
        // That connection belongs to the start-up runtime: do not keep it.
        store.forget().await;
        Ok(store)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let mut cached = self.conn.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = tokio::time::timeout(
            self.timeout * 2,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| "redis connect timed out".to_string())?
        .map_err(|e| format!("redis: {e}"))?;
        *cached = Some(conn.clone());
        Ok(conn)
    }

    async fn reload(&self) -> Result<(), String> {
        let result = self.reload_once().await;
        if result.is_err() {
            self.forget().await;
        }
        result
    }

    async fn reload_once(&self) -> Result<(), String> {
        self.reload_at(0).await
    }

    /// `restores`: how many snapshot restores this reload already made; a
    /// few at most (two instances each holding a newer snapshot could
    /// otherwise trade them back and forth).
    async fn reload_at(&self, restores: u8) -> Result<(), String> {
        let mut conn = self.connection().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(KEY)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let raw = match raw {
            Some(raw) => raw,
            None => {
                // Redis lost its data (restarted without persistence): put
                // back this instance's last snapshot rather than forget
                // approvals and freezes. Another instance may win the race.
                let last = self
                    .cache
                    .read()
                    .ok()
                    .and_then(|c| c.as_ref().map(|(_, raw, _)| raw.clone()));
                let last = last.ok_or("the registry key is missing from Redis")?;
                log::warn!("registry missing from Redis; restoring this instance's last snapshot");
                let _: Option<String> = redis::cmd("SET")
                    .arg(KEY)
                    .arg(&last)
                    .arg("NX")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
                let raw: Option<String> = redis::cmd("GET")
                    .arg(KEY)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
                raw.ok_or("the registry key is missing from Redis")?
            }
        };
        let unchanged =
            matches!(self.cache.read().ok().as_deref(), Some(Some((_, old, _))) if *old == raw);
        let state = if unchanged {
            None
        } else {
            let state = serde_json::from_str::<RegistryState>(&raw)
                .map_err(|e| format!("registry in Redis is corrupt: {e}"))?;
            if let Some((last_raw, last)) = self.newer_snapshot(state.revision) {
                if restores >= 3 {
                    // Never fall back to the older state: keep serving the
                    // newer snapshot until a later reload settles it.
                    return Err(format!(
                        "registry in Redis keeps going back (revision {} here, {} there)",
                        last.revision, state.revision
                    ));
                }
                // Revisions only grow: an older one means Redis lost its
                // data and another instance seeded it again. Put back the
                // newer state (compare-and-set: a concurrent change wins).
                log::warn!(
                    "registry in Redis went back from revision {} to {}; restoring this instance's snapshot",
                    last.revision,
                    state.revision
                );
                let _: i64 = self
                    .cas
                    .key(KEY)
                    .arg(&raw)
                    .arg(&last_raw)
                    .arg(CHANNEL)
                    .arg(last.revision)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
                return Box::pin(self.reload_at(restores + 1)).await;
            }
            Some(Arc::new(state))
        };
        if let Ok(mut c) = self.cache.write() {
            let state = match (state, c.take()) {
                (Some(s), _) => s,
                (None, Some((_, _, s))) => s,
                (None, None) => return Err("registry cache lost".into()),
            };
            *c = Some((Instant::now(), raw, state));
        }
        Ok(())
    }

    /// This instance's snapshot, when it is newer than `revision`.
    fn newer_snapshot(&self, revision: u64) -> Option<(String, Arc<RegistryState>)> {
        let cache = self.cache.read().ok()?;
        let (_, raw, state) = cache.as_ref()?;
        (state.revision > revision).then(|| (raw.clone(), state.clone()))
    }

    /// Keep the snapshot current: reload on every announcement, and poll.
    pub async fn follow(self: Arc<Self>, mut shutdown: pingora::server::ShutdownWatch) {
        let poller = {
            let store = self.clone();
            async move {
                loop {
                    if let Err(e) = store.reload().await {
                        log::warn!("registry reload: {e}");
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        };
        let listener = {
            let store = self.clone();
            async move {
                loop {
                    match store.client.get_async_pubsub().await {
                        Ok(mut pubsub) => {
                            if pubsub.subscribe(CHANNEL).await.is_ok() {
                                let mut messages = pubsub.on_message();
                                while messages.next().await.is_some() {
                                    if let Err(e) = store.reload().await {
                                        log::warn!("registry reload: {e}");
                                    }
                                }
                            }
                        }
                        Err(e) => log::warn!("registry subscription: {e}"),
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = poller => {}
            _ = listener => {}
        }
    }
}

impl RegistryView for RedisStore {
    fn snapshot(&self) -> Result<Arc<RegistryState>, String> {
        let cache = self
            .cache
            .read()
            .map_err(|_| "registry cache poisoned".to_string())?;
        match cache.as_ref() {
            Some((at, _, state)) if at.elapsed() < STALE_AFTER => Ok(state.clone()),
            Some((at, _, _)) => Err(format!(
                "registry not refreshed for {:?} (Redis unreachable)",
                at.elapsed()
            )),
            None => Err("registry not loaded".into()),
        }
    }
}

#[async_trait]
impl RegistryStore for RedisStore {
    async fn update(&self, change: Change<'_>) -> Result<Value, UpdateError> {
        let result = self.update_once(change).await;
        if matches!(result, Err(UpdateError::Store(_))) {
            self.forget().await;
        }
        result
    }
}

impl RedisStore {
    async fn update_once(&self, change: Change<'_>) -> Result<Value, UpdateError> {
        let mut conn = self.connection().await.map_err(UpdateError::Store)?;
        for _ in 0..10 {
            let raw: Option<String> = redis::cmd("GET")
                .arg(KEY)
                .query_async(&mut conn)
                .await
                .map_err(|e| UpdateError::Store(e.to_string()))?;
            let Some(raw) = raw else {
                // Redis lost the registry: never apply a change to an empty
                // one (that would wipe every approval and freeze). Put back
                // this instance's last snapshot, or fail.
                self.reload_once().await.map_err(UpdateError::Store)?;
                continue;
            };
            let mut state: RegistryState = serde_json::from_str(&raw)
                .map_err(|e| UpdateError::Store(format!("corrupt registry: {e}")))?;
            let result = change(&mut state)?;
            let next =
                serde_json::to_string(&state).map_err(|e| UpdateError::Store(e.to_string()))?;
            let done: i64 = self
                .cas
                .key(KEY)
                .arg(&raw)
                .arg(&next)
                .arg(CHANNEL)
                .arg(state.revision)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| UpdateError::Store(e.to_string()))?;
            if done == 1 {
                let _ = self.reload().await;
                return Ok(result);
            }
        }
        Err(UpdateError::Store(
            "too many concurrent registry changes; retry".into(),
        ))
    }
}
