//! Where subscribers keep their committed positions: a file on the embedded log,
//! the consumer group's committed offsets on Kafka, or nowhere.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
#[cfg(feature = "kafka")]
use std::time::Duration;

#[cfg(feature = "kafka")]
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
#[cfg(feature = "kafka")]
use rdkafka::{Offset, TopicPartitionList};

use super::SubscribeError;
#[cfg(feature = "kafka")]
use crate::log::kafka::KafkaLogConfig;
use crate::record::{PartitionId, Position, Timestamp};

/// Committed positions, per partition.
pub trait CursorStore: Send {
    /// The committed positions of `partitions` (absent: never committed).
    fn load(
        &mut self,
        partitions: &[PartitionId],
    ) -> Result<BTreeMap<PartitionId, Position>, SubscribeError>;

    /// Persists the positions (every record before each is processed).
    fn save(&mut self, cursors: &BTreeMap<PartitionId, Position>) -> Result<(), SubscribeError>;

    /// Positions by time, when the store can look them up cheaply (Kafka); the
    /// subscriber scans the log for partitions missing here.
    fn positions_at(
        &mut self,
        _partitions: &[PartitionId],
        _t: Timestamp,
    ) -> Result<BTreeMap<PartitionId, Position>, SubscribeError> {
        Ok(BTreeMap::new())
    }
}

/// An ephemeral subscriber: commits are kept in memory only.
#[derive(Debug, Default)]
pub struct NoCursors;

impl CursorStore for NoCursors {
    fn load(
        &mut self,
        _: &[PartitionId],
    ) -> Result<BTreeMap<PartitionId, Position>, SubscribeError> {
        Ok(BTreeMap::new())
    }

    fn save(&mut self, _: &BTreeMap<PartitionId, Position>) -> Result<(), SubscribeError> {
        Ok(())
    }
}

/// A cursor file: one `partition=position` line per partition, replaced
/// atomically (temporary file, fsync, rename, fsync of the directory).
#[derive(Debug, Clone)]
pub struct FileCursors {
    path: PathBuf,
}

impl FileCursors {
    pub fn new(path: PathBuf) -> Self {
        FileCursors { path }
    }

    fn err(&self, message: impl std::fmt::Display) -> SubscribeError {
        SubscribeError::Cursor {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }
}

impl CursorStore for FileCursors {
    fn load(
        &mut self,
        partitions: &[PartitionId],
    ) -> Result<BTreeMap<PartitionId, Position>, SubscribeError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = line
                .split_once('=')
                .and_then(|(p, pos)| Some((p.trim().parse().ok()?, pos.trim().parse().ok()?)));
            let Some((p, pos)) = parsed else {
                return Err(self.err(format!(
                    "line {} is not `partition=position`: {line}",
                    n + 1
                )));
            };
            let p = PartitionId(p);
            if partitions.contains(&p) {
                out.insert(p, Position(pos));
            }
        }
        Ok(out)
    }

    fn save(&mut self, cursors: &BTreeMap<PartitionId, Position>) -> Result<(), SubscribeError> {
        let dir = self
            .path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        fs::create_dir_all(&dir).map_err(|e| self.err(e))?;
        // Keep partitions this subscriber does not read (another instance may).
        let mut all = if self.path.exists() {
            self.load_all()?
        } else {
            BTreeMap::new()
        };
        all.extend(cursors.iter().map(|(p, pos)| (*p, *pos)));
        let mut text = String::from("# tasker subscriber cursor: partition=next position\n");
        for (p, pos) in &all {
            text.push_str(&format!("{}={}\n", p.0, pos.0));
        }
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| self.err(e))
    }
}

impl FileCursors {
    fn load_all(&self) -> Result<BTreeMap<PartitionId, Position>, SubscribeError> {
        let text = fs::read_to_string(&self.path).map_err(|e| self.err(e))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (p, pos) = l.trim().split_once('=')?;
                Some((
                    PartitionId(p.trim().parse().ok()?),
                    Position(pos.trim().parse().ok()?),
                ))
            })
            .collect())
    }
}

/// The consumer group `<name>`'s committed offsets. The subscriber reads by
/// assignment (every partition it was given), and commits as a group member
/// would, so Kafka tools show the group and its lag.
#[cfg(feature = "kafka")]
pub struct KafkaCursors {
    consumer: BaseConsumer,
    topic: String,
    timeout: Duration,
}

#[cfg(feature = "kafka")]
impl std::fmt::Debug for KafkaCursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaCursors")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "kafka")]
fn kafka(e: rdkafka::error::KafkaError) -> SubscribeError {
    SubscribeError::Kafka(e.to_string())
}

#[cfg(feature = "kafka")]
impl KafkaCursors {
    pub fn new(config: &KafkaLogConfig, group: &str) -> Result<KafkaCursors, SubscribeError> {
        super::check_name(group)?;
        let mut c = config.reader_config();
        c.set("group.id", group);
        let consumer: BaseConsumer = c.create().map_err(kafka)?;
        Ok(KafkaCursors {
            consumer,
            topic: config.topic.clone(),
            timeout: Duration::from_secs(10),
        })
    }

    fn tpl(
        &self,
        partitions: &[PartitionId],
        offset: impl Fn(PartitionId) -> Offset,
    ) -> Result<TopicPartitionList, SubscribeError> {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition_offset(&self.topic, p.0 as i32, offset(p))
                .map_err(kafka)?;
        }
        Ok(tpl)
    }
}

#[cfg(feature = "kafka")]
impl CursorStore for KafkaCursors {
    fn load(
        &mut self,
        partitions: &[PartitionId],
    ) -> Result<BTreeMap<PartitionId, Position>, SubscribeError> {
        let tpl = self.tpl(partitions, |_| Offset::Invalid)?;
        let committed = self
            .consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(kafka)?;
        let mut out = BTreeMap::new();
        for e in committed.elements_for_topic(&self.topic) {
            if let Offset::Offset(o) = e.offset()
                && o >= 0
            {
                out.insert(PartitionId(e.partition() as u32), Position(o as u64));
            }
        }
        drop(committed);
        Ok(out)
    }

    fn save(&mut self, cursors: &BTreeMap<PartitionId, Position>) -> Result<(), SubscribeError> {
        let partitions: Vec<PartitionId> = cursors.keys().copied().collect();
        let tpl = self.tpl(&partitions, |p| {
            Offset::Offset(cursors.get(&p).map_or(0, |pos| pos.0 as i64))
        })?;
        self.consumer.commit(&tpl, CommitMode::Sync).map_err(kafka)
    }

    fn positions_at(
        &mut self,
        partitions: &[PartitionId],
        t: Timestamp,
    ) -> Result<BTreeMap<PartitionId, Position>, SubscribeError> {
        let tpl = self.tpl(partitions, |_| Offset::Offset(t.as_millis() as i64))?;
        let found = self
            .consumer
            .offsets_for_times(tpl, self.timeout)
            .map_err(kafka)?;
        let mut out = BTreeMap::new();
        for e in found.elements_for_topic(&self.topic) {
            if let Offset::Offset(o) = e.offset()
                && o >= 0
            {
                out.insert(PartitionId(e.partition() as u32), Position(o as u64));
            }
        }
        drop(found);
        Ok(out)
    }
}
