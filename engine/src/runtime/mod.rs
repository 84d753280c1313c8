//! The running engine: one processor thread per owned partition (each the only
//! owner of its state), an executor running steps, and read views for everyone
//! else. A processor that fails is restarted from the log after a backoff, unless
//! it was fenced by a newer owner or the log is corrupt.

mod commit;
mod encode;
mod executor;
mod ids;
mod limit;
pub mod metrics;
#[cfg(feature = "kafka")]
mod ownership;
mod pacing;
mod processor;
pub mod snapshot;
mod timers;
mod view;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

pub use encode::to_record;
pub use ids::{derive_task_id, new_task_id, partition_for_idempotency_key};
pub use limit::AdaptiveLimit;
pub use metrics::Metrics;
#[cfg(feature = "kafka")]
pub use ownership::GroupMembership;
pub use processor::ProcessorError;
pub use timers::Timers;
pub use view::PartitionView;

use self::executor::Executor;
use self::processor::{Processor, run_reader};
use crate::config::{Config, Resolved};
use crate::log::{Log, LogError, partition_for_task};
use crate::record::{Envelope, PartitionId, Position, RejectReason, StepId, StepOutcome, TaskId};
use crate::registry::TemplateRegistry;
use crate::state::{Digest, TaskState};

/// Called (on the processor thread, after the append is durable) when a task
/// reaches a terminal status. Keep it cheap.
pub type TaskObserver = Arc<dyn Fn(&TaskState) + Send + Sync>;

/// Runtime settings (see `Config` for the user-facing names).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub retention: Duration,
    /// Where snapshots go; `None` disables them (every start folds the whole log).
    pub snapshot_dir: Option<PathBuf>,
    pub snapshot_every_events: u64,
    pub snapshot_interval: Duration,
    pub max_context_bytes: usize,
    pub max_batch: usize,
    pub min_concurrent_steps: usize,
    pub max_concurrent_steps: usize,
    /// Submissions waiting per partition before `submit` answers `Overloaded`.
    pub inbox_capacity: usize,
    /// Written into ownership claims, for operators.
    pub owner: String,
    /// Run steps in this process (false: decide and record only, e.g. replay tools).
    pub run_steps: bool,
    /// Hand started steps to handlers before their batch is durable (embedded log).
    pub eager_dispatch: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            retention: Duration::from_secs(15 * 60),
            snapshot_dir: None,
            snapshot_every_events: 1_000_000,
            snapshot_interval: Duration::from_secs(60),
            max_context_bytes: 256 * 1024,
            max_batch: 8192,
            min_concurrent_steps: 8,
            max_concurrent_steps: 512,
            inbox_capacity: 65_536,
            owner: format!("pid {}", std::process::id()),
            run_steps: true,
            eager_dispatch: true,
        }
    }
}

impl EngineOptions {
    pub fn from_config(config: &Config, resolved: &Resolved) -> Self {
        EngineOptions {
            retention: resolved.retention,
            snapshot_dir: Some(config.data_dir.join("snapshots")),
            snapshot_every_events: config.engine.snapshot_every_events,
            snapshot_interval: resolved.snapshot_interval,
            max_context_bytes: config.engine.max_context_bytes,
            max_batch: config.engine.max_batch,
            min_concurrent_steps: config.execution.min_concurrent_steps,
            max_concurrent_steps: config.execution.max_concurrent_steps,
            eager_dispatch: config.execution.dispatch == crate::config::Dispatch::Eager,
            ..EngineOptions::default()
        }
    }
}

/// How a submitted command was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// `task.requested` accepted: the task exists.
    Accepted { task_id: TaskId, position: Position },
    /// Another command took effect with `events` events.
    Applied {
        task_id: TaskId,
        position: Position,
        events: usize,
    },
    /// Appended for a partition another engine owns (shared logs): that engine
    /// decides it; the answer is in the log and the read model.
    Recorded { task_id: TaskId, position: Position },
    /// Refused; recorded as `task.rejected` at `position`'s answer.
    Rejected {
        task_id: TaskId,
        position: Position,
        reason: RejectReason,
        message: String,
        details: Vec<String>,
    },
}

impl SubmitOutcome {
    pub fn task_id(&self) -> TaskId {
        match self {
            SubmitOutcome::Accepted { task_id, .. }
            | SubmitOutcome::Applied { task_id, .. }
            | SubmitOutcome::Recorded { task_id, .. }
            | SubmitOutcome::Rejected { task_id, .. } => *task_id,
        }
    }
}

/// Why a command could not be submitted (it was not, or may not have been, recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("partition {0} is not owned by this engine")]
    NotOwned(PartitionId),
    #[error("partition {0} is overloaded; retry shortly")]
    Overloaded(PartitionId),
    #[error("only commands can be submitted")]
    NotACommand,
    #[error("the engine stopped before answering (the command may or may not have been recorded)")]
    Interrupted,
}

/// A partition's state digest and hash-chain head at a position, for audits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestReport {
    pub partition: PartitionId,
    /// The state is the fold of every record before this position.
    pub position: Position,
    pub digest: Digest,
    pub chain: Digest,
    pub records: u64,
    pub tasks_in_memory: usize,
}

pub(crate) enum Inbox {
    Submit {
        envelope: Box<Envelope>,
        reply: oneshot::Sender<Result<SubmitOutcome, SubmitError>>,
    },
    StepDone {
        task: TaskId,
        step: StepId,
        attempt: u32,
        outcome: StepOutcome,
    },
    Digest {
        reply: oneshot::Sender<DigestReport>,
    },
    Shutdown,
}

/// A partition's health as its supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionStatus {
    Starting,
    Live,
    Restarting { error: String },
    Stopped { error: Option<String> },
}

/// Where a partition's supervisor reports how its first recovery went.
type FirstRecovery = crossbeam_channel::Receiver<Result<(), ProcessorError>>;

struct PartitionRunner {
    inbox: Sender<Inbox>,
    view: Arc<ArcSwap<PartitionView>>,
    status: Arc<Mutex<PartitionStatus>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The engine of one process.
pub struct Engine {
    log: Arc<dyn Log>,
    registry: Arc<TemplateRegistry>,
    options: Arc<EngineOptions>,
    metrics: Arc<Metrics>,
    observer: Option<TaskObserver>,
    partitions: Mutex<BTreeMap<PartitionId, PartitionRunner>>,
    /// Writers for commands to partitions other engines own (shared logs only).
    remote: Arc<Mutex<BTreeMap<PartitionId, Box<dyn crate::log::LogWriter>>>>,
    executor: Option<Executor>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("log", &self.log.describe())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    #[error("cannot start the executor: {0}")]
    Executor(std::io::Error),
}

impl Engine {
    /// Starts processors for every partition of `log` (the embedded engine) and
    /// waits until each has recovered.
    pub fn start(
        log: Arc<dyn Log>,
        registry: Arc<TemplateRegistry>,
        options: EngineOptions,
        observer: Option<TaskObserver>,
    ) -> Result<Engine, EngineError> {
        let engine = Engine::new(log, registry, options, observer)?;
        let all: Vec<PartitionId> = (0..engine.log.partitions()).map(PartitionId).collect();
        for (_, started) in engine.start_partitions(&all) {
            started?;
        }
        Ok(engine)
    }

    /// An engine that owns no partition yet (partitions come from `start_partition`).
    pub fn new(
        log: Arc<dyn Log>,
        registry: Arc<TemplateRegistry>,
        options: EngineOptions,
        observer: Option<TaskObserver>,
    ) -> Result<Engine, EngineError> {
        let metrics = Arc::new(Metrics::default());
        let executor = if options.run_steps {
            Some(
                Executor::start(
                    options.min_concurrent_steps,
                    options.max_concurrent_steps,
                    Arc::clone(&metrics),
                )
                .map_err(EngineError::Executor)?,
            )
        } else {
            None
        };
        Ok(Engine {
            log,
            registry,
            options: Arc::new(options),
            metrics,
            observer,
            partitions: Mutex::new(BTreeMap::new()),
            remote: Arc::new(Mutex::new(BTreeMap::new())),
            executor,
        })
    }

    /// Takes ownership of a partition: recovers it (returning the first recovery's
    /// error) and keeps it running, restarting it after failures.
    pub fn start_partition(&self, partition: PartitionId) -> Result<(), EngineError> {
        self.start_partitions(&[partition])
            .pop()
            .map_or(Ok(()), |(_, started)| started)
    }

    /// [`Engine::start_partition`] for several partitions, recovered side by
    /// side: each recovery mostly waits on the log (its claim's round trip,
    /// reading back), so one after another a start took ~30 ms per partition.
    pub fn start_partitions(
        &self,
        partitions: &[PartitionId],
    ) -> Vec<(PartitionId, Result<(), EngineError>)> {
        let spawned: Vec<_> = partitions
            .iter()
            .map(|&p| (p, self.spawn_partition(p)))
            .collect();
        spawned
            .into_iter()
            .map(|(p, spawned)| {
                let started = spawned.and_then(|(runner, first)| {
                    if let Err(e) = first.recv().unwrap_or(Ok(())) {
                        runner.stop.store(true, Ordering::Relaxed);
                        drop(runner);
                        return Err(e.into());
                    }
                    self.lock_partitions().insert(p, runner);
                    Ok(())
                });
                (p, started)
            })
            .collect()
    }

    /// Starts a partition's supervisor thread; the receiver gets the outcome
    /// of its first recovery.
    fn spawn_partition(
        &self,
        partition: PartitionId,
    ) -> Result<(PartitionRunner, FirstRecovery), EngineError> {
        let (inbox_tx, inbox_rx) = crossbeam_channel::bounded(self.options.inbox_capacity);
        let view = Arc::new(ArcSwap::from_pointee(PartitionView::empty(partition)));
        let status = Arc::new(Mutex::new(PartitionStatus::Starting));
        let stop = Arc::new(AtomicBool::new(false));
        let (first_tx, first_rx) = crossbeam_channel::bounded::<Result<(), ProcessorError>>(1);
        let ctx = Supervised {
            partition,
            log: Arc::clone(&self.log),
            registry: Arc::clone(&self.registry),
            options: Arc::clone(&self.options),
            inbox: inbox_rx,
            self_tx: inbox_tx.clone(),
            jobs: self.executor.as_ref().and_then(Executor::steps),
            view: Arc::clone(&view),
            metrics: Arc::clone(&self.metrics),
            observer: self.observer.clone(),
            status: Arc::clone(&status),
            stop: Arc::clone(&stop),
        };
        let thread = std::thread::Builder::new()
            .name(format!("tasker-p{}", partition.0))
            .spawn(move || ctx.supervise(first_tx))
            .map_err(EngineError::Executor)?;
        let runner = PartitionRunner {
            inbox: inbox_tx,
            view,
            status,
            stop,
            thread: Some(thread),
        };
        Ok((runner, first_rx))
    }

    /// Stops a partition's processor cleanly (it finishes its round and snapshots).
    pub fn stop_partition(&self, partition: PartitionId) {
        let runner = self.lock_partitions().remove(&partition);
        if let Some(mut r) = runner {
            r.stop.store(true, Ordering::Relaxed);
            let _ = r.inbox.send(Inbox::Shutdown);
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn lock_partitions(&self) -> std::sync::MutexGuard<'_, BTreeMap<PartitionId, PartitionRunner>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn log(&self) -> &Arc<dyn Log> {
        &self.log
    }

    pub fn registry(&self) -> &Arc<TemplateRegistry> {
        &self.registry
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// The partition a task lives on.
    pub fn partition_of(&self, task: TaskId) -> PartitionId {
        partition_for_task(task, self.log.partitions())
    }

    pub fn owned_partitions(&self) -> Vec<PartitionId> {
        self.lock_partitions().keys().copied().collect()
    }

    /// Queues a command for its task's partition; the receiver answers once the
    /// command is recorded and decided (and its events are durable).
    pub fn submit(
        &self,
        envelope: Envelope,
    ) -> Result<oneshot::Receiver<Result<SubmitOutcome, SubmitError>>, SubmitError> {
        let partition = self.partition_of(envelope.task_id);
        let parts = self.lock_partitions();
        let runner = parts
            .get(&partition)
            .ok_or(SubmitError::NotOwned(partition))?;
        let (tx, rx) = oneshot::channel();
        match runner.inbox.try_send(Inbox::Submit {
            envelope: Box::new(envelope),
            reply: tx,
        }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded(partition)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Interrupted),
        }
    }

    /// Submits and waits for the answer. On a shared log, a command for a
    /// partition another engine owns is appended for that engine to decide.
    pub async fn request(&self, envelope: Envelope) -> Result<SubmitOutcome, SubmitError> {
        match self.submit(envelope.clone()) {
            Ok(rx) => rx.await.unwrap_or(Err(SubmitError::Interrupted)),
            Err(SubmitError::NotOwned(partition)) if self.log.shared_writers() => {
                let (log, remote) = (Arc::clone(&self.log), Arc::clone(&self.remote));
                tokio::task::spawn_blocking(move || {
                    record_remote(&*log, &remote, partition, &envelope)
                })
                .await
                .unwrap_or(Err(SubmitError::Interrupted))
            }
            Err(e) => Err(e),
        }
    }

    /// Submits and blocks the calling (non-async) thread for the answer.
    pub fn request_blocking(&self, envelope: Envelope) -> Result<SubmitOutcome, SubmitError> {
        match self.submit(envelope.clone()) {
            Ok(rx) => rx.blocking_recv().unwrap_or(Err(SubmitError::Interrupted)),
            Err(SubmitError::NotOwned(partition)) if self.log.shared_writers() => {
                record_remote(&*self.log, &self.remote, partition, &envelope)
            }
            Err(e) => Err(e),
        }
    }

    /// The latest published view of a partition.
    pub fn view(&self, partition: PartitionId) -> Option<Arc<PartitionView>> {
        self.lock_partitions()
            .get(&partition)
            .map(|r| r.view.load_full())
    }

    /// A task as its processor last published it (if still in memory).
    pub fn task(&self, id: TaskId) -> Option<Arc<TaskState>> {
        self.view(self.partition_of(id)).and_then(|v| v.task(&id))
    }

    pub fn status(&self, partition: PartitionId) -> Option<PartitionStatus> {
        self.lock_partitions()
            .get(&partition)
            .map(|r| r.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Asks a partition for its digest and chain head at a consistent position.
    pub fn digest(&self, partition: PartitionId) -> Option<oneshot::Receiver<DigestReport>> {
        let parts = self.lock_partitions();
        let runner = parts.get(&partition)?;
        let (tx, rx) = oneshot::channel();
        runner.inbox.send(Inbox::Digest { reply: tx }).ok()?;
        Some(rx)
    }

    /// Stops every partition cleanly, then the executor.
    pub fn shutdown(mut self) {
        self.stop_all();
        self.executor = None;
    }

    fn stop_all(&self) {
        let ids = self.owned_partitions();
        for p in ids {
            self.stop_partition(p);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Appends a command to a partition this engine does not own.
fn record_remote(
    log: &dyn Log,
    remote: &Mutex<BTreeMap<PartitionId, Box<dyn crate::log::LogWriter>>>,
    partition: PartitionId,
    envelope: &Envelope,
) -> Result<SubmitOutcome, SubmitError> {
    let mut writers = remote.lock().unwrap_or_else(|p| p.into_inner());
    let writer = match writers.entry(partition) {
        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::btree_map::Entry::Vacant(v) => match log.writer(partition) {
            Ok(w) => v.insert(w),
            Err(_) => return Err(SubmitError::NotOwned(partition)),
        },
    };
    let namespace = match &envelope.body {
        crate::record::Body::Command(crate::record::Command::RequestTask(r)) => {
            Some(bytes::Bytes::from(r.namespace.clone()))
        }
        _ => None,
    };
    let record =
        to_record(envelope, namespace, &mut Vec::new()).map_err(|_| SubmitError::NotACommand)?;
    match writer.append(&[record]) {
        Ok(positions) => Ok(SubmitOutcome::Recorded {
            task_id: envelope.task_id,
            position: positions.first().copied().unwrap_or_default(),
        }),
        Err(e) => {
            tracing::warn!(%partition, error = %e, "cannot append a command for another engine");
            writers.remove(&partition);
            Err(SubmitError::Interrupted)
        }
    }
}

/// Everything a partition's supervisor thread needs.
struct Supervised {
    partition: PartitionId,
    log: Arc<dyn Log>,
    registry: Arc<TemplateRegistry>,
    options: Arc<EngineOptions>,
    inbox: crossbeam_channel::Receiver<Inbox>,
    self_tx: Sender<Inbox>,
    jobs: Option<executor::Steps>,
    view: Arc<ArcSwap<PartitionView>>,
    metrics: Arc<Metrics>,
    observer: Option<TaskObserver>,
    status: Arc<Mutex<PartitionStatus>>,
    stop: Arc<AtomicBool>,
}

impl Supervised {
    fn set_status(&self, s: PartitionStatus) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Runs the processor; after a recoverable failure, rebuilds it from the log.
    fn supervise(self, first: Sender<Result<(), ProcessorError>>) {
        let mut first = Some(first);
        let mut backoff = Duration::from_millis(200);
        loop {
            let recovered = Processor::recover(
                self.partition,
                Arc::clone(&self.log),
                Arc::clone(&self.registry),
                Arc::clone(&self.options),
                self.inbox.clone(),
                self.self_tx.clone(),
                self.jobs.clone(),
                Arc::clone(&self.view),
                Arc::clone(&self.metrics),
                self.observer.clone(),
            );
            let result = match recovered {
                Ok(processor) => {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(()));
                    }
                    self.set_status(PartitionStatus::Live);
                    backoff = Duration::from_millis(200);
                    self.run(processor)
                }
                Err(e) => {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Err(e));
                        self.set_status(PartitionStatus::Stopped { error: None });
                        return;
                    }
                    Err(e)
                }
            };
            match result {
                Ok(()) => {
                    self.set_status(PartitionStatus::Stopped { error: None });
                    return;
                }
                Err(e) => {
                    let fatal = matches!(
                        e,
                        ProcessorError::Fenced { .. }
                            | ProcessorError::Log {
                                source: LogError::Corrupt { .. },
                                ..
                            }
                    );
                    tracing::error!(partition = %self.partition, error = %e, fatal, "partition processor stopped");
                    if fatal || self.stop.load(Ordering::Relaxed) {
                        self.set_status(PartitionStatus::Stopped {
                            error: Some(e.to_string()),
                        });
                        return;
                    }
                    self.set_status(PartitionStatus::Restarting {
                        error: e.to_string(),
                    });
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn run(&self, processor: Processor) -> Result<(), ProcessorError> {
        if !processor.needs_reader() {
            return processor.run(crossbeam_channel::never());
        }
        let reader = self
            .log
            .reader(self.partition, processor.read_position())
            .map_err(|source| ProcessorError::Log {
                partition: self.partition,
                source,
            })?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        let stop = Arc::new(AtomicBool::new(false));
        let reader_stop = Arc::clone(&stop);
        let max = self.options.max_batch;
        let reader_thread = std::thread::Builder::new()
            .name(format!("tasker-r{}", self.partition.0))
            .spawn(move || run_reader(reader, tx, max, reader_stop))
            .map_err(|e| ProcessorError::Log {
                partition: self.partition,
                source: LogError::Io {
                    op: "spawn reader",
                    path: PathBuf::new(),
                    source: e,
                },
            })?;
        let result = processor.run(rx);
        stop.store(true, Ordering::Relaxed);
        let _ = reader_thread.join();
        result
    }
}
