//! Java-compatible key partitioning (Kafka's `murmur2`), so every client puts a
//! task's commands on the partition that owns the task.

use crate::record::{PartitionId, TaskId};

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions`, as Kafka's default partitioner and
/// librdkafka's `murmur2_random` compute it.
pub fn partition_for_key(key: &[u8], partitions: u32) -> PartitionId {
    let positive = (murmur2(key) as u32) & 0x7fff_ffff;
    PartitionId(positive % partitions.max(1))
}

/// The partition that owns a task (keyed by its canonical hyphenated id).
pub fn partition_for_task(task: TaskId, partitions: u32) -> PartitionId {
    let mut buf = uuid::Uuid::encode_buffer();
    let key = task.as_uuid().hyphenated().encode_lower(&mut buf);
    partition_for_key(key.as_bytes(), partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafka_java_murmur2() {
        // Vectors from Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key),
                expected,
                "key {:?}",
                String::from_utf8_lossy(key)
            );
        }
        assert!(partition_for_key(b"foobar", 6).0 < 6);
    }
}
