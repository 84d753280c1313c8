//! Typed identifiers and scalars that appear in every record.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A task's identity: a UUIDv7, so ids sort by creation time. Also the Kafka key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(Uuid);

impl TaskId {
    /// The id used for records that belong to no task (undecodable input, ownership claims).
    pub const NIL: TaskId = TaskId(Uuid::nil());

    /// A fresh UUIDv7 for `at`; `rand` fills the random bits so callers control entropy
    /// (the engine passes values derived from the record when it must be deterministic).
    pub fn v7(at: Timestamp, rand: u128) -> Self {
        let ms = at.as_millis() & 0xFFFF_FFFF_FFFF; // 48 bits
        let mut bits: u128 = (ms as u128) << 80;
        bits |= 0x7u128 << 76; // version
        bits |= ((rand >> 64) & 0x0FFF) << 64; // rand_a (12 bits)
        bits |= 0b10u128 << 62; // variant
        bits |= rand & 0x3FFF_FFFF_FFFF_FFFF; // rand_b (62 bits)
        TaskId(Uuid::from_u128(bits))
    }

    /// A fresh random UUIDv7 from the system clock and RNG (clients only, never the fold).
    pub fn generate() -> Self {
        TaskId(Uuid::now_v7())
    }

    pub const fn from_uuid(uuid: Uuid) -> Self {
        TaskId(uuid)
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    pub fn is_nil(&self) -> bool {
        self.0.is_nil()
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The canonical hyphenated form: the Kafka key and the partitioner input.
    pub fn key_string(&self) -> String {
        self.0.hyphenated().to_string()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0.hyphenated())
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TaskId)
    }
}

/// Ties every record of one request together across systems; carried from the
/// request through every event of the task.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CorrelationId(Uuid);

impl CorrelationId {
    pub const NIL: CorrelationId = CorrelationId(Uuid::nil());

    pub const fn from_uuid(uuid: Uuid) -> Self {
        CorrelationId(uuid)
    }

    pub fn generate() -> Self {
        CorrelationId(Uuid::now_v7())
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CorrelationId({})", self.0.hyphenated())
    }
}

impl FromStr for CorrelationId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(CorrelationId)
    }
}

/// A step's index in its task's template snapshot (stable for the task's life).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct StepId(pub u32);

impl StepId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A record's offset within its partition (a Kafka offset, or a file-log sequence number).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct Position(pub u64);

impl Position {
    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A partition of the log topic.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A partition writer's ownership generation; a higher epoch fences every lower one.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Milliseconds since the Unix epoch, stamped once by a record's writer. The fold
/// reads time only from here.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    pub fn saturating_add_ms(self, ms: u64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if the clock went backwards.
    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The wall clock. Only writers (runtime, clients) call this; the pure core never does.
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.0);
        write!(f, "{}", humantime::format_rfc3339_millis(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_ids_carry_time_and_version() {
        let id = TaskId::v7(Timestamp(1_700_000_000_123), 0xDEAD_BEEF_u128 << 40 | 7);
        assert_eq!(id.as_uuid().get_version_num(), 7);
        let (secs, nanos) = id
            .as_uuid()
            .get_timestamp()
            .map(|t| t.to_unix())
            .unwrap_or((0, 0));
        assert_eq!(
            secs * 1000 + u64::from(nanos) / 1_000_000,
            1_700_000_000_123
        );
        assert_eq!(id.as_uuid().get_variant(), uuid::Variant::RFC4122);
        let parsed: TaskId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
    }
}
