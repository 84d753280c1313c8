//! Replay: fold a partition's log from its first record into the state digest and
//! the hash chain, exactly as the live engine folds it (events and control records
//! decoded and applied; commands only chained), so the two can be compared at any
//! position.
//!
//! One thread per partition, or two ([`ReplayOptions::pipeline`]): one reads and
//! chains (blake3 per record), the other decodes and applies, batches going
//! between them over a bounded channel. Callers replay partitions in parallel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::checkpoints::Reference;
use super::{AuditError, Bound};
use crate::codec;
use crate::log::{Log, LogError, StoredRecord};
use crate::record::{Kind, PartitionId, Position, Timestamp};
use crate::state::{Digest, FoldStats, HashChain, State};

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Stop here (default: the log's end when the replay starts).
    pub to: Option<Bound>,
    /// Retention of the fold (the digest does not depend on it; memory does).
    pub retention_ms: u64,
    /// Also record the digest and chain head at these positions.
    pub capture: Vec<Position>,
    /// Records per read.
    pub batch: usize,
    /// Read and chain on a second thread (worth it when there are fewer
    /// partitions to replay than cores).
    pub pipeline: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            to: None,
            retention_ms: crate::state::DEFAULT_RETENTION_MS,
            capture: Vec::new(),
            // The file reader's poll allocates for 4,096 records: more reallocates.
            batch: 4_096,
            pipeline: false,
        }
    }
}

/// The state digest and chain head after every record before `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture {
    pub position: Position,
    pub digest: Digest,
    pub chain: Digest,
}

/// What a replay of one partition produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub partition: PartitionId,
    /// The state is the fold of every record before this position.
    pub end: Position,
    pub records: u64,
    /// Records of kind event (applied, fenced or anomalous).
    pub events: u64,
    pub digest: Digest,
    pub chain: Digest,
    pub stats: FoldStats,
    /// Events or control records that did not decode (the engine skips them too).
    pub undecodable: u64,
    pub tasks_in_memory: usize,
    /// The time of the last record replayed.
    pub last_time: Option<Timestamp>,
    pub captures: Vec<Capture>,
}

enum Msg {
    Records(Vec<StoredRecord>),
    Capture(Position, Digest),
    End {
        end: Position,
        chain: Digest,
        last_time: Option<Timestamp>,
    },
    Failed(AuditError),
}

/// Replays `partition` from its first record. `progress` counts records folded.
pub fn replay_partition(
    log: &dyn Log,
    partition: PartitionId,
    options: &ReplayOptions,
    progress: &AtomicU64,
) -> Result<ReplayReport, AuditError> {
    let (report, state) = replay_partition_state(log, partition, options, progress)?;
    // Freeing a big state takes a while: do it off the caller's path.
    let _ = std::thread::Builder::new()
        .name("tasker-replay-drop".into())
        .spawn(move || drop(state));
    Ok(report)
}

/// [`replay_partition`], also returning the final state (a process about to exit
/// may leak it rather than spend time freeing it).
pub fn replay_partition_state(
    log: &dyn Log,
    partition: PartitionId,
    options: &ReplayOptions,
    progress: &AtomicU64,
) -> Result<(ReplayReport, State), AuditError> {
    let start = log.start(partition)?;
    if start != Position(0) {
        return Err(AuditError::NotFromStart { partition, start });
    }
    let log_end = log.end(partition)?;
    let stop = match options.to {
        Some(Bound::Position(p)) => p.min(log_end),
        _ => log_end,
    };
    let mut capture: Vec<Position> = options
        .capture
        .iter()
        .copied()
        .filter(|p| *p <= stop)
        .collect();
    capture.sort_unstable();
    capture.dedup();
    let read = Read {
        reader: log.reader(partition, Position(0))?,
        partition,
        stop,
        time_bound: match options.to {
            Some(Bound::Time(t)) => Some(t),
            _ => None,
        },
        capture,
        batch: options.batch.max(1),
    };
    let mut folder = Folder::new(partition, options.retention_ms, progress);
    if !options.pipeline {
        let mut report = None;
        read.run(|msg| {
            report = folder.handle(msg);
            report.is_none()
        });
        return report.unwrap_or_else(|| Err(stopped(partition)));
    }
    let (tx, rx) = crossbeam_channel::bounded::<Msg>(16);
    std::thread::scope(|scope| {
        scope.spawn(move || read.run(|msg| tx.send(msg).is_ok()));
        for msg in rx.iter() {
            if let Some(report) = folder.handle(msg) {
                return report;
            }
        }
        Err(stopped(partition))
    })
}

fn stopped(partition: PartitionId) -> AuditError {
    AuditError::Log(LogError::Config(format!(
        "the replay reader of partition {partition} stopped"
    )))
}

/// Reads and chains records, handing batches, captures and the end to `sink`.
struct Read {
    reader: Box<dyn crate::log::LogReader>,
    partition: PartitionId,
    stop: Position,
    time_bound: Option<Timestamp>,
    capture: Vec<Position>,
    batch: usize,
}

impl Read {
    /// `sink` returns false to stop.
    fn run(mut self, mut sink: impl FnMut(Msg) -> bool) {
        let (partition, stop) = (self.partition, self.stop);
        let mut chain = HashChain::genesis(partition);
        let mut next = Position(0);
        // The state is the fold of every record before `end`.
        let mut end = stop;
        let mut last_time = None;
        let mut captures = std::mem::take(&mut self.capture).into_iter().peekable();
        let mut idle_since: Option<Instant> = None;
        'read: while next < stop {
            let mut records = match self.reader.poll(self.batch, Duration::from_millis(100)) {
                Ok(r) => r,
                Err(e) => {
                    sink(Msg::Failed(e.into()));
                    return;
                }
            };
            if records.is_empty() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(10) {
                    sink(Msg::Failed(AuditError::Log(LogError::Config(format!(
                        "partition {partition} ends at position {next}, before its reported end {stop}"
                    )))));
                    return;
                }
                continue;
            }
            idle_since = None;
            // Cut the batch at the stop, the time bound, and every capture.
            let mut finished = false;
            let mut i = 0;
            while i < records.len() {
                let (position, timestamp) = (records[i].position, records[i].record.timestamp);
                let beyond_time = self.time_bound.is_some_and(|t| timestamp > t);
                if position >= stop || beyond_time {
                    if beyond_time {
                        end = position;
                    }
                    records.truncate(i);
                    finished = true;
                    break;
                }
                if captures.peek().is_some_and(|c| *c <= position) {
                    if i > 0 {
                        let tail = records.split_off(i);
                        if !sink(Msg::Records(std::mem::replace(&mut records, tail))) {
                            return;
                        }
                        i = 0;
                    }
                    while let Some(at) = captures.next_if(|c| *c <= position) {
                        if !sink(Msg::Capture(at, chain.head())) {
                            return;
                        }
                    }
                }
                chain.push(&records[i].record.payload);
                next = position.next();
                last_time = Some(timestamp);
                i += 1;
            }
            if !records.is_empty() && !sink(Msg::Records(records)) {
                return;
            }
            if finished {
                break 'read;
            }
        }
        for at in captures.filter(|c| *c <= end) {
            if !sink(Msg::Capture(at, chain.head())) {
                return;
            }
        }
        sink(Msg::End {
            end,
            chain: chain.head(),
            last_time,
        });
    }
}
/// Decodes and applies what the reader hands over.
struct Folder<'a> {
    partition: PartitionId,
    state: State,
    records: u64,
    events: u64,
    undecodable: u64,
    captures: Vec<Capture>,
    progress: &'a AtomicU64,
}

impl<'a> Folder<'a> {
    fn new(partition: PartitionId, retention_ms: u64, progress: &'a AtomicU64) -> Self {
        Folder {
            partition,
            state: State::new(retention_ms),
            records: 0,
            events: 0,
            undecodable: 0,
            captures: Vec::new(),
            progress,
        }
    }

    /// Handles one message; the report once the replay ended.
    fn handle(&mut self, msg: Msg) -> Option<Result<(ReplayReport, State), AuditError>> {
        match msg {
            Msg::Records(batch) => {
                let n = batch.len() as u64;
                for rec in &batch {
                    let kind = rec.record.headers.kind;
                    if kind == Some(Kind::Event) {
                        self.events += 1;
                    }
                    // As the engine folds: events and claims; commands are only chained.
                    if matches!(kind, Some(Kind::Event) | Some(Kind::Control)) {
                        match codec::decode(&rec.record.payload) {
                            Ok(env) => {
                                self.state.apply(&env);
                            }
                            Err(_) => self.undecodable += 1,
                        }
                    }
                }
                self.records += n;
                self.progress.fetch_add(n, Ordering::Relaxed);
                None
            }
            Msg::Capture(position, chain) => {
                self.captures.push(Capture {
                    position,
                    digest: self.state.digest(),
                    chain,
                });
                None
            }
            Msg::End {
                end,
                chain,
                last_time,
            } => {
                let report = ReplayReport {
                    partition: self.partition,
                    end,
                    records: self.records,
                    events: self.events,
                    digest: self.state.digest(),
                    chain,
                    stats: self.state.stats(),
                    undecodable: self.undecodable,
                    tasks_in_memory: self.state.task_count(),
                    last_time,
                    captures: std::mem::take(&mut self.captures),
                };
                Some(Ok((report, std::mem::take(&mut self.state))))
            }
            Msg::Failed(e) => Some(Err(e)),
        }
    }
}

/// One reference compared with the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub reference: Reference,
    /// `None`: the replay did not reach the reference's position.
    pub replayed: Option<Capture>,
}

impl Comparison {
    pub fn agrees(&self) -> bool {
        self.replayed
            .is_some_and(|c| c.chain == self.reference.chain && c.digest == self.reference.digest)
    }
}

/// Pairs every reference with the replay's capture at its position (the replay
/// must have been asked to capture them).
pub fn compare(report: &ReplayReport, references: &[Reference]) -> Vec<Comparison> {
    references
        .iter()
        .map(|r| Comparison {
            reference: r.clone(),
            replayed: report
                .captures
                .iter()
                .find(|c| c.position == r.position && r.position <= report.end)
                .copied(),
        })
        .collect()
}
