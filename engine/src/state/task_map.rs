//! The partition's tasks by id, split over shards so that growing never stops
//! the processor for long. One hash table doubles by moving every entry at
//! once: 11–12 ms of the processor's thread at 230,000 tasks on the bench
//! machine, ~0.6 s extrapolated to the 13.5 M tasks a 15-minute retention keeps
//! at 15,000 tasks/s. Each shard moves 1/64 of the entries, and the shards cross
//! their thresholds at different inserts.

use rustc_hash::FxHashMap;

use crate::record::TaskId;

/// Also the readers' task table's shard count (`runtime::view`), for the same reason.
pub(crate) const SHARDS: usize = 64;

/// A map from task id to `V` with bounded rehash pauses. Iteration order is
/// unspecified (as a hash map's); nothing that must be deterministic depends on it.
#[derive(Debug, Clone)]
pub(crate) struct TaskMap<V> {
    shards: Box<[FxHashMap<TaskId, V>]>,
    len: usize,
}

impl<V> Default for TaskMap<V> {
    fn default() -> Self {
        TaskMap {
            shards: (0..SHARDS).map(|_| FxHashMap::default()).collect(),
            len: 0,
        }
    }
}

/// The shard of `id`: its last byte, random in the UUIDv7s the engine makes
/// and in v4s, and cycling through every value for ids that count up. (Hashing
/// the id for it cost 10–20 % of the fold's apply throughput.)
fn shard_of(id: &TaskId) -> usize {
    id.as_bytes()[15] as usize & (SHARDS - 1)
}

impl<V> TaskMap<V> {
    pub(crate) fn get(&self, id: &TaskId) -> Option<&V> {
        self.shards[shard_of(id)].get(id)
    }

    pub(crate) fn get_mut(&mut self, id: &TaskId) -> Option<&mut V> {
        self.shards[shard_of(id)].get_mut(id)
    }

    pub(crate) fn insert(&mut self, id: TaskId, value: V) -> Option<V> {
        let old = self.shards[shard_of(&id)].insert(id, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, id: &TaskId) -> Option<V> {
        let old = self.shards[shard_of(id)].remove(id);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Timestamp;
    use std::collections::BTreeMap;

    #[test]
    fn behaves_like_a_map_and_spreads_over_the_shards() {
        let mut map = TaskMap::default();
        let mut model = BTreeMap::new();
        // Ids as the engine makes them: UUIDv7, a millisecond clock and random bits.
        let ids: Vec<TaskId> = (0..5_000u64)
            .map(|i| {
                let rand = (u128::from(i)).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
                TaskId::v7(Timestamp(1_800_000_000_000 + i / 10), rand)
            })
            .collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(map.insert(*id, i), model.insert(*id, i));
            if i % 3 == 0 {
                let gone = ids[i / 2];
                assert_eq!(map.remove(&gone), model.remove(&gone));
            }
            if i % 7 == 0 {
                assert_eq!(map.insert(*id, i + 1), model.insert(*id, i + 1));
            }
        }
        assert_eq!(map.len(), model.len());
        for id in &ids {
            assert_eq!(map.get(id), model.get(id));
        }
        if let Some(v) = map.get_mut(&ids[4_999]) {
            *v = 42;
        }
        assert_eq!(map.get(&ids[4_999]), Some(&42));
        let mut values: Vec<usize> = map.values().copied().collect();
        values.sort_unstable();
        model.insert(ids[4_999], 42);
        let mut expected: Vec<usize> = model.values().copied().collect();
        expected.sort_unstable();
        assert_eq!(values, expected);
        // Every shard holds a share: no shard does all the growing.
        let smallest = map.shards.iter().map(|s| s.len()).min().unwrap_or(0);
        assert!(
            smallest > model.len() / SHARDS / 2,
            "smallest shard {smallest}"
        );
    }
}
