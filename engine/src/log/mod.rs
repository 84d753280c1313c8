//! The log: one trait, two backends (embedded segment files and Kafka), one
//! conformance suite both must pass.
//!
//! ```text
//!  partition p:  [0][1][2][3] ... [end-1] | end
//!                 ^ start                  ^ the position the next append gets
//! ```
//! Positions are per partition, contiguous for the file backend and Kafka offsets
//! for Kafka. A batch is appended in order; on the file backend it is also atomic
//! (a torn batch is dropped whole on recovery).

#[cfg(any(test, feature = "testkit"))]
pub mod conformance;
pub mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
mod partitioner;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

pub use partitioner::{murmur2, partition_for_key, partition_for_task};

use crate::record::{ContentType, Kind, PartitionId, Position, RecordType, TaskId, Timestamp};

/// What a record says about itself without being decoded (Kafka headers
/// `tasker-type`, `tasker-kind`, `tasker-schema`, `content-type`, `tasker-namespace`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Headers {
    pub content_type: ContentType,
    pub kind: Option<Kind>,
    pub record_type: Option<RecordType>,
    /// 0 when unknown.
    pub schema: u16,
    /// The task's namespace, so subscribers filter without decoding.
    pub namespace: Option<Bytes>,
}

impl Headers {
    pub fn unknown() -> Self {
        Headers {
            content_type: ContentType::Unknown,
            kind: None,
            record_type: None,
            schema: 0,
            namespace: None,
        }
    }
}

/// One record as appended and as read back.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Record {
    /// The task the record belongs to (the Kafka key); [`TaskId::NIL`] for none.
    pub key: TaskId,
    pub headers: Headers,
    pub timestamp: Timestamp,
    pub payload: Bytes,
}

/// A record read from the log, with its position.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredRecord {
    pub position: Position,
    pub record: Record,
}

/// Why the log could not do what was asked. Every variant names where.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is locked by another writer ({holder}); stop it, or send commands to it instead",
        path.display()
    )]
    Locked { path: PathBuf, holder: String },
    #[error("corrupt log data in {} at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("partition {partition} does not exist (the log has {partitions})")]
    NoSuchPartition {
        partition: PartitionId,
        partitions: u32,
    },
    #[error("position {position} of partition {partition} is before the log start {start}")]
    PositionGone {
        partition: PartitionId,
        position: Position,
        start: Position,
    },
    #[error("record of {len} bytes exceeds the {limit}-byte limit")]
    RecordTooLarge { len: usize, limit: usize },
    #[error("log configuration mismatch: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("the writer of partition {partition} was fenced by epoch {epoch}")]
    Fenced { partition: PartitionId, epoch: u64 },
}

/// A log of P partitions. Cheap to share; writers and readers are per partition.
pub trait Log: Send + Sync {
    fn partitions(&self) -> u32;

    /// The exclusive writer of a partition (a second one, in any process, fails
    /// with [`LogError::Locked`] on the file backend).
    fn writer(&self, partition: PartitionId) -> Result<Box<dyn LogWriter>, LogError>;

    /// A reader positioned at `from`.
    fn reader(
        &self,
        partition: PartitionId,
        from: Position,
    ) -> Result<Box<dyn LogReader>, LogError>;

    /// The position the next appended record will get.
    fn end(&self, partition: PartitionId) -> Result<Position, LogError>;

    /// The oldest readable position.
    fn start(&self, partition: PartitionId) -> Result<Position, LogError>;

    /// For messages: where the log lives.
    fn describe(&self) -> String;

    /// Anyone may append to any partition (Kafka); commands for partitions another
    /// engine owns can then be appended directly. False for the embedded log, whose
    /// partitions each have one locked writer.
    fn shared_writers(&self) -> bool {
        false
    }
}

/// Appends to one partition.
pub trait LogWriter: Send {
    fn partition(&self) -> PartitionId;

    /// Appends `batch` in order and makes it durable per the backend's policy before
    /// returning the position of each record.
    fn append(&mut self, batch: &[Record]) -> Result<Vec<Position>, LogError>;

    /// True when nobody else can append while this writer lives (the file lock):
    /// the next append starts exactly at the current end, and the partition holds
    /// only what this writer appended since it opened.
    fn exclusive(&self) -> bool {
        false
    }
}

/// Reads one partition in order.
pub trait LogReader: Send {
    fn partition(&self) -> PartitionId;

    /// Up to `max` records from the cursor on, waiting up to `wait` for the first.
    fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<StoredRecord>, LogError>;

    /// Moves the cursor.
    fn seek(&mut self, to: Position) -> Result<(), LogError>;

    /// The position the next `poll` starts at.
    fn position(&self) -> Position;
}
