//! One Redis connection, made on first use and remade after Redis comes
//! back: shared by the stores that call Redis from requests (limits,
//! approvals). Made lazily so it belongs to a runtime that lives as long as
//! the process, not to the start-up one.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, RwLock};

pub struct LazyRedis {
    client: redis::Client,
    conn: RwLock<Option<ConnectionManager>>,
    last_attempt: Mutex<Option<Instant>>,
    /// Longest wait for one operation.
    pub timeout: Duration,
}

impl LazyRedis {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            client: redis::Client::open(url).map_err(|e| format!("redis URL: {e}"))?,
            conn: RwLock::new(None),
            last_attempt: Mutex::new(None),
            timeout,
        })
    }

    /// The connection, or why there is none. One connection attempt at a
    /// time, and not more than twice a second.
    pub async fn get(&self) -> Result<ConnectionManager, String> {
        if let Some(c) = self.conn.read().await.clone() {
            return Ok(c);
        }
        let mut last = self.last_attempt.lock().await;
        if let Some(c) = self.conn.read().await.clone() {
            return Ok(c);
        }
        if last.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return Err("redis unreachable (reconnecting)".into());
        }
        *last = Some(Instant::now());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            self.timeout * 3,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| "redis connect timed out".to_string())?
        .map_err(|e| format!("redis connect: {e}"))?;
        *self.conn.write().await = Some(manager.clone());
        Ok(manager)
    }

    /// Run one Redis call within the timeout.
    pub async fn run<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| "redis timed out".to_string())?
            .map_err(|e| format!("redis: {e}"))
    }
}
