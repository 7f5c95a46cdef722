//! A map split into shards, each behind its own mutex, for state that
//! every request touches (the token cache, the in-process limiter): two
//! requests wait for each other only when their keys share a shard, and
//! clean-ups walk one shard, not the whole map.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

/// Shards of a [`Sharded`] map (a power of two).
pub const SHARDS: usize = 16;

pub struct Sharded<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: RandomState,
}

/// One shard: its entries, and the size at which it is next swept.
pub struct Shard<K, V> {
    pub map: HashMap<K, V>,
    sweep_at: usize,
}

impl<K, V> Shard<K, V> {
    /// Run `sweep` when the shard has grown past `floor` and past twice
    /// its size after the last sweep: however many entries stay, the work
    /// is amortised to a constant per insert.
    pub fn sweep_if_grown(&mut self, floor: usize, sweep: impl FnOnce(&mut HashMap<K, V>)) {
        if self.map.len() > floor && self.map.len() >= self.sweep_at {
            sweep(&mut self.map);
            self.sweep_at = (self.map.len() * 2).max(floor);
        }
    }
}

impl<K: Hash + Eq, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        sweep_at: 0,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
        }
    }
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    /// The shard a key lives in.
    pub fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) as usize) & (SHARDS - 1)
    }

    /// The shard for a key that is itself uniformly random (a digest):
    /// picked from one of its bytes, with no hashing.
    pub fn shard_of_random(byte: u8) -> usize {
        byte as usize & (SHARDS - 1)
    }

    /// Lock one shard. A poisoned shard (a panic while it was held) is
    /// still consistent: every change to it is a single map operation.
    pub fn lock(&self, shard: usize) -> MutexGuard<'_, Shard<K, V>> {
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Lock several shards at once, in index order (so that two callers
    /// never wait for each other in a cycle). Returns (shard, guard),
    /// sorted by shard.
    pub fn lock_many(&self, mut shards: Vec<usize>) -> Vec<(usize, MutexGuard<'_, Shard<K, V>>)> {
        shards.sort_unstable();
        shards.dedup();
        shards.into_iter().map(|s| (s, self.lock(s))).collect()
    }

    /// Entries in every shard (for tests and metrics).
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|s| self.lock(s).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_are_amortised_however_many_entries_stay() {
        let mut shard: Shard<u32, ()> = Shard {
            map: HashMap::new(),
            sweep_at: 0,
        };
        let mut sweeps = 0;
        for i in 0..100_000 {
            shard.map.insert(i, ());
            // Nothing is ever idle: a sweep removes nothing.
            shard.sweep_if_grown(1_000, |_| sweeps += 1);
        }
        // 1 000, 2 002, 4 004, … : about log2(100) sweeps, not 99 000.
        assert!(sweeps <= 8, "{sweeps} sweeps");
    }

    #[test]
    fn lock_many_takes_each_shard_once_in_order() {
        let m: Sharded<String, u32> = Sharded::default();
        let guards = m.lock_many(vec![5, 1, 5, 3]);
        let order: Vec<usize> = guards.iter().map(|(s, _)| *s).collect();
        assert_eq!(order, [1, 3, 5]);
    }
}
