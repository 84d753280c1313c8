//! Group commit off the processor's thread, for exclusive writers: the processor
//! keeps deciding while the previous batch is written and fsynced, and everything
//! it produced meanwhile goes to disk in the next single append. Only one append
//! is ever in flight, so at most the last batch can be torn by a crash.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::SubmitOutcome;
use super::metrics::{EventCounts, Metrics, SLOW_APPEND};
use crate::log::{LogError, LogWriter, Record};
use crate::record::{Position, StepId, TaskId};
use crate::state::TaskState;

/// What a batch changes outside the state, released once it is durable: answers,
/// step dispatches, the read view, observers, the counters.
#[derive(Default)]
pub(crate) struct Commit {
    /// The position after the batch's last record.
    pub end: Position,
    pub replies: Vec<(Position, SubmitOutcome)>,
    pub dispatch: Vec<(TaskId, StepId, u32)>,
    pub finished: Vec<TaskId>,
    /// Tasks as of this batch (`None`: left memory).
    pub views: Vec<(TaskId, Option<Arc<TaskState>>)>,
    pub counts: EventCounts,
}

/// How often a writer thread may log a slow append.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

struct Job {
    records: Vec<Record>,
    end: Position,
}

/// The thread that owns the writer and appends what the processor queues.
pub(crate) struct WriterThread {
    jobs: Option<Sender<Job>>,
    done: Receiver<Result<Position, LogError>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl WriterThread {
    pub(crate) fn start(
        mut writer: Box<dyn LogWriter>,
        metrics: Arc<Metrics>,
        name: String,
    ) -> std::io::Result<WriterThread> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new().name(name.clone()).spawn(move || {
            let mut last_warned: Option<Instant> = None;
            while let Ok(first) = jobs_rx.recv() {
                let mut end = first.end;
                let mut records = first.records;
                while let Ok(more) = jobs_rx.try_recv() {
                    end = more.end;
                    records.extend(more.records);
                }
                let started = Instant::now();
                let result = writer
                    .append(&records)
                    .and_then(|positions| match positions.last() {
                        Some(last) if last.next() == end => Ok(end),
                        other => Err(LogError::Config(format!(
                            "the exclusive writer ended at {other:?}, expected {end}"
                        ))),
                    });
                let took = started.elapsed();
                metrics.append_latency_us.record(took.as_micros() as u64);
                if took > SLOW_APPEND {
                    metrics.slow_appends.inc();
                    // At most one line per partition per 10 s: a stalling disk
                    // stalls every append.
                    if last_warned.is_none_or(|at: Instant| at.elapsed() > WARN_EVERY) {
                        last_warned = Some(Instant::now());
                        tracing::warn!(
                            thread = %name,
                            records = records.len(),
                            ms = took.as_millis() as u64,
                            "a log append (write + fsync) was slow; every task of this partition waited for it (a disk stall when the write itself is small)"
                        );
                    }
                }
                metrics.append_batch_records.record(records.len() as u64);
                metrics.records_appended.add(records.len() as u64);
                let failed = result.is_err();
                if done_tx.send(result).is_err() || failed {
                    return;
                }
            }
        })?;
        Ok(WriterThread {
            jobs: Some(jobs_tx),
            done: done_rx,
            handle: Some(handle),
        })
    }

    /// Queues records whose last position is `end - 1`.
    pub(crate) fn submit(&self, records: Vec<Record>, end: Position) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|j| j.send(Job { records, end }).is_ok())
    }

    /// Durable ends (or the append's failure), in order.
    pub(crate) fn done(&self) -> &Receiver<Result<Position, LogError>> {
        &self.done
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
