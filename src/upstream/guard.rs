//! The guard model's HTTP calls: the filter's decisions are in
//! `filters::guard`; this posts what it builds to the guard's provider
//! over a pooled connection, with a deadline per call and a cap on calls
//! in flight.

use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use filters::guard::filter::{CallError, GuardClient};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// The largest guard answer read.
const MAX_ANSWER: usize = 1 << 20;

pub struct UpstreamGuard {
    upstream: Arc<Upstream>,
    provider: String,
    timeout: Duration,
    slots: Arc<Semaphore>,
}

impl UpstreamGuard {
    pub fn new(
        upstream: Arc<Upstream>,
        provider: String,
        timeout: Duration,
        max_concurrency: usize,
    ) -> Self {
        Self {
            upstream,
            provider,
            timeout,
            slots: Arc::new(Semaphore::new(max_concurrency)),
        }
    }
}

#[async_trait]
impl GuardClient for UpstreamGuard {
    async fn post(&self, path: &str, body: Value) -> Result<Value, CallError> {
        // Over the cap: an error now (the filter's on_error decides), not
        // a queue that grows while the guard is slow.
        let _slot = self
            .slots
            .try_acquire()
            .map_err(|_| CallError::Overloaded("too many guard calls in flight".into()))?;
        let call = async {
            let mut exchange = self
                .upstream
                .post(
                    &self.provider,
                    path,
                    "guard",
                    Bytes::from(body.to_string()),
                    false,
                    &[],
                )
                .await
                .map_err(|e| CallError::Unavailable(e.to_string()))?;
            let status = exchange.status();
            let answer = exchange
                .body(MAX_ANSWER)
                .await
                .map_err(|e| CallError::Unavailable(e.to_string()))?;
            exchange.finish().await;
            match status {
                200 => {}
                400..=499 => {
                    return Err(CallError::Rejected(format!("the guard answered {status}")))
                }
                _ => {
                    return Err(CallError::Unavailable(format!(
                        "the guard answered {status}"
                    )))
                }
            }
            serde_json::from_slice::<Value>(&answer)
                .map_err(|e| CallError::Rejected(format!("the guard's answer is not JSON: {e}")))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| {
                CallError::Unavailable(format!("no answer within {} ms", self.timeout.as_millis()))
            })?
    }
}
