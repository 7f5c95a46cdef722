//! A bounded cache of guard verdicts keyed by the SHA-256 of exactly what
//! was sent (guard, model, body), each kept for a time to live. When it is
//! full the oldest entry goes. Nothing of the text is kept, only its hash.

use super::protocol::Judgement;
use crate::clock::Clock;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

pub type Key = [u8; 32];

/// The key for what one tenant sends to one guard at `path`: the SHA-256
/// of `guard`, a zero byte, and the JSON array `[tenant, path, body]`,
/// hashed as it is written, without a copy of the body.
pub fn key(guard: &str, tenant: &str, path: &str, body: &serde_json::Value) -> Key {
    let mut h = Hashing(Sha256::new());
    h.0.update(guard.as_bytes());
    h.0.update([0]);
    serde_json::to_writer(&mut h, &(tenant, path, body))
        .expect("strings and a JSON value always serialize, and hashing never fails");
    h.0.finalize().into()
}

/// An `io::Write` that feeds a SHA-256.
struct Hashing(Sha256);

impl std::io::Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Inner {
    /// Verdict, when it was stored, and its insertion number.
    entries: HashMap<Key, (Judgement, u64, u64)>,
    /// Insertion order, for eviction: an entry replaced or expired since
    /// leaves a stale number here, which eviction skips.
    order: VecDeque<(Key, u64)>,
    next: u64,
}

pub struct VerdictCache {
    capacity: usize,
    ttl_ms: u64,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl VerdictCache {
    pub fn new(capacity: usize, ttl_ms: u64, clock: Arc<dyn Clock>) -> Self {
        Self {
            capacity,
            ttl_ms,
            clock,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                next: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn get(&self, key: &Key) -> Option<Judgement> {
        let now = self.clock.now_ms();
        let mut i = self.lock();
        match i.entries.get(key) {
            Some((j, at, _)) if now.saturating_sub(*at) < self.ttl_ms => Some(j.clone()),
            Some(_) => {
                i.entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, key: Key, judgement: Judgement) {
        if self.capacity == 0 {
            return;
        }
        let now = self.clock.now_ms();
        let mut i = self.lock();
        let seq = i.next;
        i.next += 1;
        i.entries.insert(key, (judgement, now, seq));
        i.order.push_back((key, seq));
        while i.entries.len() > self.capacity {
            let Some((old, old_seq)) = i.order.pop_front() else {
                break;
            };
            if i.entries.get(&old).is_some_and(|e| e.2 == old_seq) {
                i.entries.remove(&old);
            }
        }
        // Stale numbers pile up as entries are replaced or expire.
        if i.order.len() > 2 * self.capacity {
            let Inner { entries, order, .. } = &mut *i;
            order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.2 == *s));
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
