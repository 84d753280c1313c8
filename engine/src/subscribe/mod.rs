//! Subscriptions: follow the log's events (or any record types) from any language
//! or from Rust, filtered by type and namespace on the record headers, without
//! decoding what is filtered out.
//!
//! A [`Subscriber`] has a name and committed positions per partition: a cursor file
//! `<data_dir>/cursors/<name>` on the embedded log ([`FileCursors`], replaced
//! atomically), the consumer group `<name>`'s committed offsets on Kafka
//! ([`KafkaCursors`]). Delivery is at least once: [`Subscriber::poll`] returns
//! records after the committed positions, [`Subscriber::commit`] persists how far
//! the caller has processed; after a restart the subscriber continues from the
//! committed positions (the start option only applies to partitions with none).
//! Records of one task are in one partition, so they arrive in log order.

mod cursor;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

#[cfg(feature = "kafka")]
pub use cursor::KafkaCursors;
pub use cursor::{CursorStore, FileCursors, NoCursors};

use crate::cloudevents::CloudEvent;
use crate::codec::{self, JsonFallback};
use crate::log::{Headers, Log, LogError, LogReader, Record};
use crate::record::{Envelope, Kind, PartitionId, Position, RecordType, Timestamp};
use crate::runtime::derive_task_id;

/// Why a subscription failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("subscriber name `{0}` must be 1-200 of A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("cursor file {}: {message}", path.display())]
    Cursor {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("kafka: {0}")]
    Kafka(String),
}

/// Which records a subscriber receives: all events by default; with `types`, the
/// records of those types (commands and control records too); with `namespaces`,
/// only records whose headers name one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub types: Option<BTreeSet<RecordType>>,
    pub namespaces: Option<Vec<Bytes>>,
}

impl Filter {
    /// `"task.completed,step.failed"` and `"shop,billing"` (empty: no filter).
    pub fn parse(types: &[String], namespaces: &[String]) -> Result<Filter, String> {
        let mut set = BTreeSet::new();
        for t in types.iter().flat_map(|t| t.split(',')) {
            let t = t.trim();
            if t.is_empty() {
                continue;
            }
            let rt = RecordType::from_name(t)
                .ok_or_else(|| format!("unknown record type `{t}` (`tasker events` lists them)"))?;
            set.insert(rt);
        }
        let ns: Vec<Bytes> = namespaces
            .iter()
            .flat_map(|n| n.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| Bytes::from(n.to_owned()))
            .collect();
        Ok(Filter {
            types: (!set.is_empty()).then_some(set),
            namespaces: (!ns.is_empty()).then_some(ns),
        })
    }

    /// Decides from the headers alone.
    pub fn matches(&self, headers: &Headers) -> bool {
        let type_ok = match &self.types {
            Some(types) => headers.record_type.is_some_and(|t| types.contains(&t)),
            None => headers.kind == Some(Kind::Event),
        };
        type_ok
            && match &self.namespaces {
                Some(ns) => headers
                    .namespace
                    .as_ref()
                    .is_some_and(|n| ns.iter().any(|x| x == n)),
                None => true,
            }
    }
}

/// Where a partition without a committed position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    /// Only records appended from now on.
    Latest,
    Position(Position),
    /// The first record stamped at or after this time.
    Time(Timestamp),
}

impl FromStr for StartAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "earliest" => Ok(StartAt::Earliest),
            "latest" => Ok(StartAt::Latest),
            other => match other.parse::<crate::audit::Bound>() {
                Ok(crate::audit::Bound::Position(p)) => Ok(StartAt::Position(p)),
                Ok(crate::audit::Bound::Time(t)) => Ok(StartAt::Time(t)),
                Err(_) => Err(format!(
                    "`{other}` is not earliest, latest, a position or an RFC 3339 time"
                )),
            },
        }
    }
}

/// One record delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: PartitionId,
    pub position: Position,
    pub record: Record,
    pub envelope: Envelope,
}

impl Delivery {
    /// The record as the CloudEvent the JSON mirror publishes.
    pub fn cloud_event(&self, topic: &str) -> CloudEvent {
        let ns = self
            .record
            .headers
            .namespace
            .as_ref()
            .and_then(|n| std::str::from_utf8(n).ok());
        CloudEvent::from_record(topic, self.partition, self.position, &self.envelope, ns)
    }
}

/// A named, filtered, resumable reader of the log.
pub struct Subscriber {
    name: String,
    partitions: u32,
    readers: Vec<Box<dyn LogReader>>,
    filter: Filter,
    cursors: Box<dyn CursorStore>,
    committed: BTreeMap<PartitionId, Position>,
    /// The position after the last record polled, per partition.
    polled: BTreeMap<PartitionId, Position>,
    next_reader: usize,
    undecodable: u64,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .field("committed", &self.committed)
            .field("polled", &self.polled)
            .finish_non_exhaustive()
    }
}

/// Checks a subscriber name (it names a file and a consumer group).
pub fn check_name(name: &str) -> Result<(), SubscribeError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SubscribeError::BadName(name.to_owned()))
    }
}

impl Subscriber {
    /// A subscriber of the embedded log with its cursor under `<data_dir>/cursors`.
    pub fn embedded(
        name: &str,
        log: Arc<dyn Log>,
        data_dir: &Path,
        filter: Filter,
        start: StartAt,
    ) -> Result<Subscriber, SubscribeError> {
        check_name(name)?;
        let cursors = FileCursors::new(data_dir.join("cursors").join(name));
        let partitions: Vec<PartitionId> = (0..log.partitions()).map(PartitionId).collect();
        Subscriber::open(name, log, &partitions, filter, start, Box::new(cursors))
    }

    /// A subscriber of `partitions` with its positions in `cursors`.
    pub fn open(
        name: &str,
        log: Arc<dyn Log>,
        partitions: &[PartitionId],
        filter: Filter,
        start: StartAt,
        mut cursors: Box<dyn CursorStore>,
    ) -> Result<Subscriber, SubscribeError> {
        check_name(name)?;
        let committed = cursors.load(partitions)?;
        let mut readers = Vec::with_capacity(partitions.len());
        let mut polled = BTreeMap::new();
        let by_time = match start {
            StartAt::Time(t) => Some(cursors.positions_at(partitions, t)?),
            _ => None,
        };
        for &p in partitions {
            let from = match committed.get(&p) {
                Some(pos) => *pos,
                None => match start {
                    StartAt::Earliest => log.start(p)?,
                    StartAt::Latest => log.end(p)?,
                    StartAt::Position(pos) => pos.max(log.start(p)?),
                    StartAt::Time(t) => match by_time.as_ref().and_then(|m| m.get(&p)) {
                        Some(pos) => *pos,
                        None => position_at_time(&*log, p, t)?,
                    },
                },
            };
            readers.push(log.reader(p, from)?);
            polled.insert(p, from);
        }
        Ok(Subscriber {
            name: name.to_owned(),
            partitions: log.partitions(),
            readers,
            filter,
            cursors,
            committed,
            polled,
            next_reader: 0,
            undecodable: 0,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Up to `max` matching records after those already polled, waiting up to
    /// `wait` for the first.
    pub fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, SubscribeError> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let n = self.readers.len();
        loop {
            for _ in 0..n {
                if out.len() >= max {
                    break;
                }
                let i = self.next_reader % n;
                self.next_reader = self.next_reader.wrapping_add(1);
                let reader = &mut self.readers[i];
                let partition = reader.partition();
                let batch = reader.poll((max - out.len()).min(4096), Duration::ZERO)?;
                for rec in batch {
                    self.polled.insert(partition, rec.position.next());
                    if !self.filter.matches(&rec.record.headers) {
                        continue;
                    }
                    match decode(partition, self.partitions, rec.position, &rec.record) {
                        Some(envelope) => out.push(Delivery {
                            partition,
                            position: rec.position,
                            record: rec.record,
                            envelope,
                        }),
                        None => self.undecodable += 1,
                    }
                }
            }
            if !out.is_empty() || Instant::now() >= deadline {
                return Ok(out);
            }
            std::thread::sleep(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(10)),
            );
        }
    }

    /// Persists that every record of `partition` before `next` is processed.
    pub fn commit(&mut self, partition: PartitionId, next: Position) -> Result<(), SubscribeError> {
        self.committed.insert(partition, next);
        self.cursors.save(&self.committed)
    }

    /// Persists that `delivery` and everything before it in its partition is processed.
    pub fn commit_delivery(&mut self, delivery: &Delivery) -> Result<(), SubscribeError> {
        self.commit(delivery.partition, delivery.position.next())
    }

    /// Persists that every one of `delivered` (a prefix of what `poll` gave)
    /// and everything before it in its partition is processed: per partition,
    /// the position after its last delivery there. For a consumer that stops
    /// partway through a batch spanning partitions.
    pub fn commit_deliveries(&mut self, delivered: &[Delivery]) -> Result<(), SubscribeError> {
        if delivered.is_empty() {
            return Ok(());
        }
        for d in delivered {
            self.committed.insert(d.partition, d.position.next());
        }
        self.cursors.save(&self.committed)
    }

    /// Persists everything polled so far (including records the filter skipped).
    pub fn commit_polled(&mut self) -> Result<(), SubscribeError> {
        if self.polled == self.committed {
            return Ok(());
        }
        self.committed.clone_from(&self.polled);
        self.cursors.save(&self.committed)
    }

    /// Committed positions, per partition (partitions never committed are absent).
    pub fn committed(&self) -> &BTreeMap<PartitionId, Position> {
        &self.committed
    }

    /// The position after the last record polled, per partition.
    pub fn polled(&self) -> &BTreeMap<PartitionId, Position> {
        &self.polled
    }

    /// Matching records that could not be decoded (skipped).
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }
}

fn decode(
    partition: PartitionId,
    partitions: u32,
    position: Position,
    record: &Record,
) -> Option<Envelope> {
    let fallback = JsonFallback {
        task_id: derive_task_id(partition, partitions, position, record.timestamp),
        at: record.timestamp,
    };
    codec::decode_any(record.headers.content_type, &record.payload, &fallback).ok()
}

/// The first position of `partition` stamped at or after `t` (its end if none), by
/// reading the headers from the start.
pub fn position_at_time(
    log: &dyn Log,
    partition: PartitionId,
    t: Timestamp,
) -> Result<Position, LogError> {
    let end = log.end(partition)?;
    let mut reader = log.reader(partition, log.start(partition)?)?;
    while reader.position() < end {
        let batch = reader.poll(16_384, Duration::from_millis(200))?;
        if batch.is_empty() {
            break;
        }
        if let Some(r) = batch.iter().find(|r| r.record.timestamp >= t) {
            return Ok(r.position);
        }
    }
    Ok(end)
}
