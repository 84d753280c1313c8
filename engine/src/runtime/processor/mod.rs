//! One partition's processor: the only owner of its state. It reads the log in
//! order, decides commands, executor results and due timers, appends the resulting
//! events in one batch per round (group commit), and only after the append is
//! durable dispatches steps (or, with eager dispatch, as soon as it is queued),
//! answers clients and publishes a read view.
//!
//! Its own events come back through the reader; they were applied when decided,
//! so on the way back they only extend the hash chain.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::oneshot;

use super::commit::{Commit, WriterThread};
use super::encode::to_record;
use super::executor::{Job, Steps};
use super::ids::derive_task_id;
use super::metrics::{EventCounts, GaugePart, Metrics};
use super::snapshot::{SnapshotError, SnapshotStore};
use super::timers::Timers;
use super::view::{PartitionView, TaskTable};
use super::{DigestReport, EngineOptions, Inbox, SubmitError, SubmitOutcome, TaskObserver};
use crate::codec::{self, JsonFallback};
use crate::decide::{Input, Rejection, Resolution, decide};
use crate::handler::REMOTE_HANDLER;
use crate::log::{Log, LogError, LogReader, LogWriter, Record, StoredRecord, partition_for_task};
use crate::record::{
    Body, Command, Control, CorrelationId, Envelope, Epoch, Event, Kind, PartitionClaimed,
    PartitionId, Position, RejectReason, StepId, TaskId, TaskRejected, Timestamp,
};
use crate::registry::TemplateRegistry;
use crate::state::{Applied, HashChain, SnapshotCache, State, StepStatus, TaskState};

mod flush;
mod publish;
mod recover;

/// Why a processor stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("partition {partition}: {source}")]
    Log {
        partition: PartitionId,
        #[source]
        source: LogError,
    },
    #[error(
        "partition {partition} was claimed by a newer owner (epoch {epoch}); this writer stopped"
    )]
    Fenced {
        partition: PartitionId,
        epoch: Epoch,
    },
    /// The reader skipped positions. Positions of a partition are contiguous
    /// (no compaction, no transaction markers), so records went missing between
    /// the log and this reader; the processor restarts, which reads the
    /// partition again from its last snapshot on a fresh reader (and goes past
    /// a gap that is still there on a second read).
    #[error(
        "partition {partition}: the log skipped positions {expected} to {got}; reading it again"
    )]
    Gap {
        partition: PartitionId,
        expected: Position,
        got: Position,
    },
    #[error("partition {partition}: cannot encode an event: {source}")]
    Encode {
        partition: PartitionId,
        #[source]
        source: codec::EncodeError,
    },
}

pub(crate) enum ReaderMsg {
    Records(Vec<StoredRecord>),
    Failed(LogError),
}

/// Everything one round produced, released after the append.
#[derive(Default)]
struct Round {
    commands: Vec<(Envelope, Option<Reply>)>,
    events: Vec<Envelope>,
    replies: Vec<(Position, SubmitOutcome)>,
    dispatch: Vec<(TaskId, StepId, u32)>,
    finished: Vec<TaskId>,
    changed: FxHashSet<TaskId>,
    counts: EventCounts,
}

pub(crate) struct Processor {
    partition: PartitionId,
    partitions: u32,
    log: Arc<dyn Log>,
    writer: Option<Box<dyn LogWriter>>,
    state: State,
    chain: HashChain,
    read_pos: Position,
    epoch: Epoch,
    /// The writer is the only one (embedded log): commands are decided as they are
    /// appended and nothing needs reading back.
    exclusive: bool,
    /// Where durability stands: everything before this position is on disk.
    durable_end: Position,
    /// Exclusive writers append from their own thread (group commit).
    pipeline: Option<WriterThread>,
    /// Appended batches waiting to become durable, oldest first.
    commits: VecDeque<Commit>,
    /// Starts decided but not yet dispatched (their batch is not durable yet).
    pending_dispatch: usize,
    /// Positions of records this processor appended (events, claims), not yet read back.
    own: VecDeque<Position>,
    appended_end: Position,
    registry: Arc<TemplateRegistry>,
    options: Arc<EngineOptions>,
    inbox: Receiver<Inbox>,
    self_tx: Sender<Inbox>,
    jobs: Option<Steps>,
    timers: Timers,
    view: Arc<ArcSwap<PartitionView>>,
    /// The tasks readers see, updated in place as batches are released.
    table: Arc<TaskTable>,
    /// The same tasks as a persistent map, for snapshots: taking it is O(1), and
    /// since only a snapshot being written shares it, updates are in place.
    snapshot_tasks: imbl::HashMap<TaskId, Arc<crate::state::TaskState>>,
    snapshots: Option<SnapshotStore>,
    /// The background snapshot being written; it hands the cache back.
    snapshot_job: Option<std::thread::JoinHandle<SnapshotCache>>,
    /// Task hashes and images from the last snapshot (see [`SnapshotCache`]).
    snapshot_cache: SnapshotCache,
    events_since_snapshot: u64,
    last_snapshot: Instant,
    metrics: Arc<Metrics>,
    /// This partition's parts of the engine's tasks-in-memory and inbox gauges.
    tasks_gauge: GaugePart,
    inbox_gauge: GaugePart,
    observer: Option<TaskObserver>,
    waiting: FxHashMap<Position, Reply>,
    digest_waiters: Vec<oneshot::Sender<DigestReport>>,
    /// Steps ready to start, oldest first, waiting for executor capacity.
    ready: VecDeque<(TaskId, StepId)>,
    queued: FxHashSet<(TaskId, StepId)>,
    /// Attempts handed to the executor and not yet reported back.
    in_flight: usize,
    namespaces: FxHashMap<String, Bytes>,
    round: Round,
    buf: Vec<u8>,
    shutting_down: bool,
}

type Reply = oneshot::Sender<Result<SubmitOutcome, SubmitError>>;

impl Processor {
    /// Whether the log needs reading back (shared logs) or not (exclusive writers).
    pub(crate) fn needs_reader(&self) -> bool {
        !self.exclusive
    }

    /// The position the reader must continue from.
    pub(crate) fn read_position(&self) -> Position {
        self.read_pos
    }

    /// Runs rounds until shutdown or a fatal error.
    pub(crate) fn run(mut self, records: Receiver<ReaderMsg>) -> Result<(), ProcessorError> {
        let never = crossbeam_channel::never();
        let durable = match &self.pipeline {
            Some(p) => p.done().clone(),
            None => crossbeam_channel::never(),
        };
        loop {
            let timeout = self.next_wakeup();
            let take_inbox = self.accepting_work();
            crossbeam_channel::select! {
                recv(records) -> msg => match msg {
                    Ok(msg) => self.on_reader(msg)?,
                    Err(_) => return Err(ProcessorError::Log {
                        partition: self.partition,
                        source: LogError::Config("log reader stopped".into()),
                    }),
                },
                recv(if take_inbox { &self.inbox } else { &never }) -> msg => {
                    match msg {
                        Ok(m) => self.on_inbox(m),
                        Err(_) => self.shutting_down = true,
                    }
                },
                recv(durable) -> msg => self.on_append_result(msg)?,
                default(timeout) => {}
            }
            while let Ok(msg) = durable.try_recv() {
                self.on_append_result(Ok(msg))?;
            }
            self.drain(&records)?;
            self.fire_timers();
            self.start_ready();
            self.flush()?;
            self.maybe_snapshot();
            self.answer_digests();
            self.inbox_gauge.set(self.inbox.len() as i64);
            if self.shutting_down && self.settled() {
                self.snapshot(true);
                return Ok(());
            }
        }
    }

    fn on_append_result(
        &mut self,
        msg: Result<Result<Position, LogError>, crossbeam_channel::RecvError>,
    ) -> Result<(), ProcessorError> {
        match msg {
            Ok(Ok(end)) => {
                self.on_durable(end);
                Ok(())
            }
            // A failed append (or fsync) may have lost data: stop; recovery rebuilds
            // the state from what is really in the log.
            Ok(Err(source)) => Err(ProcessorError::Log {
                partition: self.partition,
                source,
            }),
            Err(_) => Err(ProcessorError::Log {
                partition: self.partition,
                source: LogError::Config("the log writer thread stopped".into()),
            }),
        }
    }

    /// New work waits while shutting down, and while a due snapshot waits for the
    /// reader to catch up with this processor's appends.
    fn accepting_work(&self) -> bool {
        !self.shutting_down && (!self.snapshot_due() || self.settled())
    }

    fn next_wakeup(&self) -> Duration {
        let mut wait = Duration::from_millis(250);
        if let Some(at) = self.timers.next_due() {
            let now = Timestamp::now();
            wait = wait.min(Duration::from_millis(at.millis_since(now)));
        }
        wait
    }

    /// Takes whatever else is already waiting, up to the round's batch limit.
    fn drain(&mut self, records: &Receiver<ReaderMsg>) -> Result<(), ProcessorError> {
        let max = self.options.max_batch;
        let take_inbox = self.accepting_work();
        loop {
            let full = self.round.events.len() + self.round.commands.len() >= max;
            let mut progressed = false;
            if let Ok(msg) = records.try_recv() {
                self.on_reader(msg)?;
                progressed = true;
            }
            if take_inbox
                && !full
                && let Ok(msg) = self.inbox.try_recv()
            {
                self.on_inbox(msg);
                progressed = true;
            }
            if !progressed || full {
                return Ok(());
            }
        }
    }

    fn on_inbox(&mut self, msg: Inbox) {
        let now = Timestamp::now();
        match msg {
            Inbox::Submit { envelope, reply } => {
                if !matches!(envelope.body, Body::Command(_)) {
                    let _ = reply.send(Err(SubmitError::NotACommand));
                    return;
                }
                if self.exclusive {
                    // This writer's next append starts at `appended_end`, commands first:
                    // decide now, append the command with its answer in one batch.
                    let position = Position(self.appended_end.0 + self.round.commands.len() as u64);
                    self.waiting.insert(position, reply);
                    self.decide_command(position, &envelope, now);
                    self.round.commands.push((*envelope, None));
                } else {
                    self.round.commands.push((*envelope, Some(reply)));
                }
            }
            Inbox::StepDone {
                task,
                step,
                attempt,
                outcome,
            } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let input = Input::StepFinished {
                    task,
                    step,
                    attempt,
                    outcome: &outcome,
                };
                match decide(&self.state, input, now) {
                    Ok(events) => {
                        let corr = self.correlation(task);
                        self.emit(task, corr, None, events, now);
                    }
                    Err(r) => {
                        self.metrics.stale_results.inc();
                        tracing::debug!(%task, %step, attempt, reason = %r, "step result dropped");
                    }
                }
            }
            Inbox::Digest { reply } => self.digest_waiters.push(reply),
            Inbox::Shutdown => self.shutting_down = true,
        }
    }

    fn on_reader(&mut self, msg: ReaderMsg) -> Result<(), ProcessorError> {
        let batch = match msg {
            ReaderMsg::Records(batch) => batch,
            ReaderMsg::Failed(source) => {
                return Err(ProcessorError::Log {
                    partition: self.partition,
                    source,
                });
            }
        };
        let now = Timestamp::now();
        for rec in batch {
            if rec.position < self.read_pos {
                continue; // already folded (recovery overlap)
            }
            if rec.position > self.read_pos {
                self.metrics.log_gaps.inc();
                return Err(ProcessorError::Gap {
                    partition: self.partition,
                    expected: self.read_pos,
                    got: rec.position,
                });
            }
            self.chain.push(&rec.record.payload);
            self.read_pos = rec.position.next();
            self.metrics.records_read.inc();
            while self.own.front().is_some_and(|p| *p < rec.position) {
                self.own.pop_front();
                tracing::warn!(partition = %self.partition, "an appended record was not read back in order");
            }
            if self.own.front() == Some(&rec.position) {
                self.own.pop_front();
                continue; // our own event, applied when decided
            }
            match rec.record.headers.kind {
                Some(Kind::Event) => match codec::decode(&rec.record.payload) {
                    Ok(env) => {
                        self.fold(&env);
                        self.round.changed.insert(env.task_id);
                    }
                    Err(_) => self.metrics.ignored_events.inc(),
                },
                Some(Kind::Control) => {
                    if let Ok(env) = codec::decode(&rec.record.payload) {
                        self.fold(&env);
                        if self.state.epoch() > self.epoch {
                            return Err(ProcessorError::Fenced {
                                partition: self.partition,
                                epoch: self.state.epoch(),
                            });
                        }
                    }
                }
                Some(Kind::Command) | None => self.on_command_record(&rec, now),
            }
        }
        Ok(())
    }

    /// Decides one command read from the log (skipping those answered before).
    fn on_command_record(&mut self, rec: &StoredRecord, now: Timestamp) {
        if self.state.answered() >= Some(rec.position) {
            return;
        }
        let fallback = JsonFallback {
            task_id: derive_task_id(
                self.partition,
                self.partitions,
                rec.position,
                rec.record.timestamp,
            ),
            at: rec.record.timestamp,
        };
        let envelope = match codec::decode_any(
            rec.record.headers.content_type,
            &rec.record.payload,
            &fallback,
        ) {
            Ok(env) if matches!(env.body, Body::Command(_)) => env,
            Ok(env) => {
                self.reject(
                    rec.position,
                    env.task_id,
                    Rejection::new(
                        RejectReason::Malformed,
                        format!("a {} record in the command stream", env.record_type()),
                    ),
                    None,
                    now,
                );
                return;
            }
            Err(e) => {
                self.metrics.malformed_records.inc();
                let task = if rec.record.key.is_nil() {
                    TaskId::NIL
                } else {
                    rec.record.key
                };
                let reason = match e {
                    codec::DecodeError::UnsupportedSchema(_) => RejectReason::UnsupportedSchema,
                    _ => RejectReason::Malformed,
                };
                self.reject(
                    rec.position,
                    task,
                    Rejection::new(reason, format!("undecodable record: {e}")),
                    None,
                    now,
                );
                return;
            }
        };
        self.decide_command(rec.position, &envelope, now);
    }

    /// Decides a command at `position` (read from the log, or about to be appended
    /// at that position by this exclusive writer).
    fn decide_command(&mut self, position: Position, envelope: &Envelope, now: Timestamp) {
        let Body::Command(command) = &envelope.body else {
            return;
        };
        let task = envelope.task_id;
        let _span = tracing::info_span!(
            "command",
            r#type = command.record_type().name(),
            task_id = %task,
            correlation_id = %envelope.correlation_id,
            position = position.0,
        )
        .entered();
        if partition_for_task(task, self.partitions) != self.partition {
            let r = Rejection::new(
                RejectReason::WrongPartition,
                format!(
                    "task {task} belongs to partition {}, not {}",
                    partition_for_task(task, self.partitions),
                    self.partition
                ),
            );
            self.reject(position, task, r, Some(command.record_type()), now);
            return;
        }
        let resolution: Option<Resolution> = match command {
            Command::RequestTask(req) => Some(self.resolve(req)),
            _ => None,
        };
        let input = Input::Command {
            task,
            command,
            resolution: resolution.as_ref(),
        };
        match decide(&self.state, input, now) {
            Ok(events) => {
                let accepted = matches!(command, Command::RequestTask(_));
                let n = events.len();
                let corr = if accepted {
                    envelope.correlation_id
                } else {
                    self.correlation(task)
                };
                self.emit(task, corr, Some(position), events, now);
                let outcome = if accepted {
                    SubmitOutcome::Accepted {
                        task_id: task,
                        position,
                    }
                } else {
                    SubmitOutcome::Applied {
                        task_id: task,
                        position,
                        events: n,
                    }
                };
                self.round.replies.push((position, outcome));
            }
            Err(r) => self.reject(position, task, r, Some(command.record_type()), now),
        }
    }

    fn resolve(&self, req: &crate::record::RequestTask) -> Resolution {
        if req.context.len() > self.options.max_context_bytes {
            return Err(Rejection::new(
                RejectReason::ContextTooLarge,
                format!(
                    "context of {} bytes exceeds the {}-byte limit (engine.max_context_bytes)",
                    req.context.len(),
                    self.options.max_context_bytes
                ),
            ));
        }
        let template = self
            .registry
            .resolve(&req.namespace, &req.name, req.version.as_deref())?;
        template.validate_context(&req.context).map_err(|errors| {
            Rejection::new(
                RejectReason::InvalidContext,
                format!(
                    "context does not match the schema of {}",
                    template.snapshot().qualified_name()
                ),
            )
            .with_details(errors)
        })?;
        Ok(Arc::clone(template.dag()))
    }

    fn reject(
        &mut self,
        position: Position,
        task: TaskId,
        r: Rejection,
        command: Option<crate::record::RecordType>,
        now: Timestamp,
    ) {
        self.metrics.reject(r.reason.code());
        tracing::debug!(partition = %self.partition, position = %position, %task, reason = r.reason.code(), message = %r.message, "command rejected");
        let outcome = SubmitOutcome::Rejected {
            task_id: task,
            position,
            reason: r.reason.clone(),
            message: r.message.clone(),
            details: r.details.clone(),
        };
        let event = Event::TaskRejected(TaskRejected {
            command,
            reason: r.reason,
            message: r.message,
            details: r.details,
        });
        let corr = self.correlation(task);
        self.emit(task, corr, Some(position), vec![event], now);
        self.round.replies.push((position, outcome));
    }

    fn correlation(&self, task: TaskId) -> CorrelationId {
        self.state
            .task(&task)
            .map(|t| t.correlation_id)
            .unwrap_or_else(|| CorrelationId::from_uuid(*task.as_uuid()))
    }

    /// Wraps, applies and queues decided events, noting their side effects.
    fn emit(
        &mut self,
        task: TaskId,
        correlation_id: CorrelationId,
        source: Option<Position>,
        events: Vec<Event>,
        now: Timestamp,
    ) {
        for event in events {
            let env = Envelope {
                task_id: task,
                correlation_id,
                source_position: source,
                epoch: self.epoch,
                at: now,
                body: Body::Event(event),
            };
            match self.state.apply(&env) {
                Applied::Event => {}
                other => {
                    tracing::error!(partition = %self.partition, %task, ?other, "a decided event did not apply; not appended");
                    self.metrics.ignored_events.inc();
                    continue;
                }
            }
            if let Body::Event(e) = &env.body {
                self.round.counts.count(e);
                match e {
                    Event::TaskAccepted(_) => self.enqueue_ready(task, None),
                    Event::StepStarted(s) => self.round.dispatch.push((task, s.step, s.attempt)),
                    Event::StepCompleted(c) => self.enqueue_ready(task, Some(c.step)),
                    Event::StepResolvedManually(r) => self.enqueue_ready(task, Some(r.step)),
                    Event::StepRetryDue(r) => self.enqueue_step(task, r.step),
                    Event::StepFailed(f) => {
                        if let Some(at) = f.retry_at {
                            self.timers.push(at, task, f.step);
                        }
                    }
                    Event::TaskCompleted
                    | Event::TaskFailed(_)
                    | Event::TaskCancelled(_)
                    | Event::TaskResolvedManually => self.round.finished.push(task),
                    Event::TaskRejected(_)
                    | Event::TaskStarted
                    | Event::StepSkipped(_)
                    | Event::StepCancelled(_)
                    | Event::TaskRetried(_) => {}
                }
            }
            self.round.changed.insert(task);
            self.round.events.push(env);
        }
    }

    /// Queues the steps of `task` that became ready: the children of `after`, or
    /// every root when the task was just accepted.
    fn enqueue_ready(&mut self, task: TaskId, after: Option<StepId>) {
        let Some(t) = self.state.task(&task) else {
            return;
        };
        let candidates: Vec<StepId> = match after {
            Some(step) => t.dag.children(step).to_vec(),
            None => t
                .dag
                .step_ids()
                .filter(|s| t.dag.parents(*s).next().is_none())
                .collect(),
        };
        for step in candidates {
            self.enqueue_step(task, step);
        }
    }

    fn enqueue_step(&mut self, task: TaskId, step: StepId) {
        let Some(t) = self.state.task(&task) else {
            return;
        };
        let ready = t
            .step(step)
            .is_some_and(|s| s.status == StepStatus::Pending)
            && t.parents_satisfied(step);
        if ready && self.queued.insert((task, step)) {
            self.ready.push_back((task, step));
        }
    }

    /// How many attempts this partition may have with the executor: twice the
    /// executor's current (adaptive) limit, so it always has the next job waiting.
    fn step_budget(&self) -> usize {
        if self.jobs.is_none() {
            return usize::MAX;
        }
        (self.metrics.executor_limit.get().max(1) as usize).saturating_mul(2)
    }

    /// Starts ready steps, oldest first, while there is room in the executor.
    fn start_ready(&mut self) {
        let now = Timestamp::now();
        let budget = self.step_budget();
        while self.in_flight + self.pending_dispatch + self.round.dispatch.len() < budget {
            let Some((task, step)) = self.ready.pop_front() else {
                break;
            };
            self.queued.remove(&(task, step));
            match decide(&self.state, Input::StartStep { task, step }, now) {
                Ok(events) => {
                    let corr = self.correlation(task);
                    self.emit(task, corr, None, events, now);
                }
                Err(r) => {
                    tracing::debug!(%task, %step, reason = %r, "queued step no longer startable")
                }
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Timestamp::now();
        for (task, step) in self.timers.pop_due(now) {
            if let Ok(events) = decide(&self.state, Input::RetryDue { task, step }, now) {
                let corr = self.correlation(task);
                self.emit(task, corr, None, events, now);
            }
        }
    }

    fn namespace_of(&mut self, env: &Envelope) -> Option<Bytes> {
        let ns: &str = match &env.body {
            Body::Command(Command::RequestTask(r)) => &r.namespace,
            _ => &self.state.task(&env.task_id)?.request.namespace,
        };
        if let Some(b) = self.namespaces.get(ns) {
            return Some(b.clone());
        }
        let b = Bytes::from(ns.to_owned());
        self.namespaces.insert(ns.to_owned(), b.clone());
        Some(b)
    }
}

/// Forwards log records to a processor until it goes away.
pub(crate) fn run_reader(
    mut reader: Box<dyn LogReader>,
    tx: Sender<ReaderMsg>,
    max: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match reader.poll(max, Duration::from_millis(100)) {
            Ok(batch) if batch.is_empty() => {}
            Ok(batch) => {
                if tx.send(ReaderMsg::Records(batch)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(ReaderMsg::Failed(e));
                return;
            }
        }
    }
}
