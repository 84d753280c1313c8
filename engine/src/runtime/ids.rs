//! Choosing task ids so that every command about a task, and every request
//! with the same idempotency key, lands on the same partition.

use crate::log::{partition_for_key, partition_for_task};
use crate::record::{PartitionId, Position, TaskId, Timestamp};

/// The partition that owns an idempotency key: requests carrying the same key must
/// meet on one partition for the duplicate to be seen. Kafka clients publishing
/// JSON should use `<namespace>/<key>` as the message key for the same reason.
pub fn partition_for_idempotency_key(namespace: &str, key: &str, partitions: u32) -> PartitionId {
    partition_for_key(format!("{namespace}/{key}").as_bytes(), partitions)
}

/// A fresh UUIDv7 for a new task. With an idempotency key, the id is chosen to
/// live on the key's partition (about `partitions` tries).
pub fn new_task_id(namespace: &str, idempotency_key: Option<&str>, partitions: u32) -> TaskId {
    let Some(key) = idempotency_key else {
        return TaskId::generate();
    };
    let target = partition_for_idempotency_key(namespace, key, partitions);
    loop {
        let id = TaskId::generate();
        if partition_for_task(id, partitions) == target {
            return id;
        }
    }
}

/// A task id for a JSON `task.requested` that came without one: derived from the
/// record's place in the log (so replays agree) and chosen to belong to the
/// partition it was read from (so the task's later commands route there).
pub fn derive_task_id(
    partition: PartitionId,
    partitions: u32,
    position: Position,
    at: Timestamp,
) -> TaskId {
    let mut id = TaskId::NIL;
    for counter in 0u64..100_000 {
        let mut h = blake3::Hasher::new();
        h.update(b"tasker.derived-task-id");
        h.update(&partition.0.to_le_bytes());
        h.update(&position.0.to_le_bytes());
        h.update(&counter.to_le_bytes());
        let mut bits = [0u8; 16];
        bits.copy_from_slice(&h.finalize().as_bytes()[..16]);
        id = TaskId::v7(at, u128::from_le_bytes(bits));
        if partition_for_task(id, partitions) == partition {
            break;
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_land_where_their_key_or_record_lives() {
        for p in 0..6 {
            let id = derive_task_id(
                PartitionId(p),
                6,
                Position(42),
                Timestamp(1_700_000_000_000),
            );
            assert_eq!(partition_for_task(id, 6), PartitionId(p));
            assert_eq!(
                id,
                derive_task_id(
                    PartitionId(p),
                    6,
                    Position(42),
                    Timestamp(1_700_000_000_000)
                )
            );
        }
        let want = partition_for_idempotency_key("shop", "order-9", 8);
        for _ in 0..20 {
            let id = new_task_id("shop", Some("order-9"), 8);
            assert_eq!(partition_for_task(id, 8), want);
            assert_eq!(id.as_uuid().get_version_num(), 7);
        }
    }
}
