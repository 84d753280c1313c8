//! A log whose reader skips a command once, as a client library that loses
//! part of a fetch would: the processor notices the gap in positions, counts it
//! and reads the partition again (a live processor restarts from its snapshot;
//! recovery seeks back), and every task still completes, in the log too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{engine, envelopes, fold, request, wait_complete};
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::log::{Log, LogError, LogReader, LogWriter, Record, StoredRecord};
use tasker_engine::record::{Kind, PartitionId, Position, TaskId};
use tasker_engine::runtime::{SubmitError, SubmitOutcome, to_record};
use tasker_engine::state::TaskStatus;
use tokio::sync::oneshot::error::TryRecvError;

/// The embedded log, read back like a shared one (the processor reads its own
/// appends and decides commands as it reads them), whose readers drop the
/// first command at or after `skip` the first time one returns it.
struct GappyLog {
    inner: FileLog,
    skip: Position,
    skipped: Arc<AtomicBool>,
}

struct SharedWriter(Box<dyn LogWriter>);

impl LogWriter for SharedWriter {
    fn partition(&self) -> PartitionId {
        self.0.partition()
    }
    fn append(&mut self, batch: &[Record]) -> Result<Vec<Position>, LogError> {
        self.0.append(batch)
    }
    fn exclusive(&self) -> bool {
        false
    }
}

struct GappyReader {
    inner: Box<dyn LogReader>,
    skip: Position,
    skipped: Arc<AtomicBool>,
}

impl LogReader for GappyReader {
    fn partition(&self) -> PartitionId {
        self.inner.partition()
    }
    fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<StoredRecord>, LogError> {
        let mut batch = self.inner.poll(max, wait)?;
        if let Some(i) = batch
            .iter()
            .position(|r| r.position >= self.skip && r.record.headers.kind == Some(Kind::Command))
            && !self.skipped.swap(true, Ordering::SeqCst)
        {
            batch.remove(i);
        }
        Ok(batch)
    }
    fn seek(&mut self, to: Position) -> Result<(), LogError> {
        self.inner.seek(to)
    }
    fn position(&self) -> Position {
        self.inner.position()
    }
}

impl Log for GappyLog {
    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }
    fn writer(&self, partition: PartitionId) -> Result<Box<dyn LogWriter>, LogError> {
        Ok(Box::new(SharedWriter(self.inner.writer(partition)?)))
    }
    fn reader(
        &self,
        partition: PartitionId,
        from: Position,
    ) -> Result<Box<dyn LogReader>, LogError> {
        Ok(Box::new(GappyReader {
            inner: self.inner.reader(partition, from)?,
            skip: self.skip,
            skipped: Arc::clone(&self.skipped),
        }))
    }
    fn end(&self, partition: PartitionId) -> Result<Position, LogError> {
        self.inner.end(partition)
    }
    fn start(&self, partition: PartitionId) -> Result<Position, LogError> {
        self.inner.start(partition)
    }
    fn describe(&self) -> String {
        format!("{} (skipping a record once)", self.inner.describe())
    }
}

/// The log of one partition, its readers skipping the first command at or
/// after `skip` once; and whether they have.
fn gappy(dir: &std::path::Path, skip: Position) -> (Arc<dyn Log>, Arc<AtomicBool>) {
    let file = FileLog::open(
        dir,
        FileLogConfig {
            partitions: 1,
            ..FileLogConfig::default()
        },
    )
    .unwrap();
    let skipped = Arc::new(AtomicBool::new(false));
    let log = Arc::new(GappyLog {
        inner: file,
        skip,
        skipped: Arc::clone(&skipped),
    });
    (log, skipped)
}

/// The tasks whose `task.requested` the log holds.
fn requested_in_log(log: &dyn Log) -> Vec<TaskId> {
    envelopes(log)
        .into_iter()
        .filter(|env| env.as_command().is_some())
        .map(|env| env.task_id)
        .collect()
}

/// The log itself holds every task, complete.
fn assert_log_complete(log: &dyn Log, ids: &[TaskId]) {
    let state = fold(log);
    for id in ids {
        let task = state.task(id).expect("every task is in the log");
        assert_eq!(task.status, TaskStatus::Complete, "{id}");
    }
}

#[test]
fn a_live_reader_that_skips_a_command_makes_the_processor_read_again_and_lose_nothing() {
    let dir = tempfile::TempDir::new().unwrap();
    // The engine starts on an empty log, so the live reader meets the skip.
    let (log, skipped) = gappy(dir.path(), Position(0));
    let engine = engine(Arc::clone(&log)).unwrap();
    let mut submitted = Vec::new();
    while submitted.len() < 100 {
        let env = request();
        let id = env.task_id;
        match engine.submit(env) {
            Ok(answer) => submitted.push((id, answer)),
            Err(SubmitError::Overloaded(_) | SubmitError::Interrupted) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("submit: {e}"),
        }
    }
    // An answer is `Accepted`, or `Interrupted` when the processor stopped
    // for the gap before answering: its command may or may not be in the log.
    // Every acknowledged task is in the log, and every task whose command is
    // in the log completes, the skipped one among them.
    let mut acknowledged = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !submitted.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} submissions never answered (log gaps seen: {})",
            submitted.len(),
            engine.metrics().log_gaps.get()
        );
        submitted.retain_mut(|(id, answer)| match answer.try_recv() {
            Err(TryRecvError::Empty) => true,
            Ok(Ok(SubmitOutcome::Accepted { .. })) => {
                acknowledged.push(*id);
                false
            }
            Ok(Err(SubmitError::Interrupted)) | Err(TryRecvError::Closed) => false,
            other => panic!("{id}: {other:?}"),
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    let ids = requested_in_log(&*log);
    assert!(
        ids.len() >= 50,
        "only {} commands reached the log",
        ids.len()
    );
    for id in &acknowledged {
        assert!(ids.contains(id), "acknowledged {id} is not in the log");
    }
    wait_complete(&engine, &ids);
    assert!(skipped.load(Ordering::SeqCst), "no command was skipped");
    assert_eq!(engine.metrics().log_gaps.get(), 1);
    assert_log_complete(&*log, &ids);
    engine.shutdown();
}

#[test]
fn a_recovering_reader_that_skips_a_command_reads_it_again() {
    let dir = tempfile::TempDir::new().unwrap();
    // Commands written before the engine starts: its recovery reads them.
    let (log, skipped) = gappy(dir.path(), Position(0));
    let mut ids = Vec::new();
    {
        let mut writer = log.writer(PartitionId(0)).unwrap();
        let mut buf = Vec::new();
        let records: Vec<Record> = (0..20)
            .map(|_| {
                let env = request();
                ids.push(env.task_id);
                to_record(&env, None, &mut buf).unwrap()
            })
            .collect();
        writer.append(&records).unwrap();
    }
    let engine = engine(Arc::clone(&log)).unwrap();
    wait_complete(&engine, &ids);
    assert!(skipped.load(Ordering::SeqCst), "no command was skipped");
    assert_eq!(engine.metrics().log_gaps.get(), 1);
    assert_log_complete(&*log, &ids);
    engine.shutdown();
}
