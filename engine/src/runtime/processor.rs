//! One partition's processor: the only owner of its state. It reads the log in
//! order, decides commands, executor results and due timers, appends the resulting
//! events in one batch per round (group commit), and only after the append is
//! durable dispatches steps, answers clients and publishes a read view.
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
use super::metrics::Metrics;
use super::snapshot::{SnapshotFile, SnapshotStore};
use super::timers::Timers;
use super::view::PartitionView;
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
use crate::state::{Applied, HashChain, State, StateSnapshot, StepStatus, TaskState};

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
    view_tasks: imbl::HashMap<TaskId, Arc<crate::state::TaskState>>,
    snapshots: Option<SnapshotStore>,
    snapshot_job: Option<std::thread::JoinHandle<()>>,
    events_since_snapshot: u64,
    last_snapshot: Instant,
    metrics: Arc<Metrics>,
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
    /// Takes the partition's writer, restores the newest snapshot and folds the rest
    /// of the log, claims the partition with a higher epoch, then finishes what the
    /// previous owner left: unanswered commands, interrupted steps, cut cascades.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn recover(
        partition: PartitionId,
        log: Arc<dyn Log>,
        registry: Arc<TemplateRegistry>,
        options: Arc<EngineOptions>,
        inbox: Receiver<Inbox>,
        self_tx: Sender<Inbox>,
        jobs: Option<Steps>,
        view: Arc<ArcSwap<PartitionView>>,
        metrics: Arc<Metrics>,
        observer: Option<TaskObserver>,
    ) -> Result<Processor, ProcessorError> {
        let log_err = |source| ProcessorError::Log { partition, source };
        let writer = log.writer(partition).map_err(log_err)?;
        let snapshots = options.snapshot_dir.as_ref().map(SnapshotStore::new);
        let (mut state, chain, read_pos) = match snapshots
            .as_ref()
            .and_then(|s| s.latest(partition))
        {
            Some((file, state)) => {
                tracing::info!(%partition, position = %file.position, tasks = state.task_count(), "restored snapshot");
                (state, file.chain, file.position)
            }
            None => (
                State::new(options.retention.as_millis() as u64),
                HashChain::genesis(partition),
                log.start(partition).map_err(log_err)?,
            ),
        };
        state.track_evictions();
        let mut p = Processor {
            partition,
            partitions: log.partitions(),
            log,
            writer: Some(writer),
            state,
            chain,
            read_pos,
            epoch: Epoch(0),
            exclusive: false,
            durable_end: read_pos,
            pipeline: None,
            commits: VecDeque::new(),
            pending_dispatch: 0,
            own: VecDeque::new(),
            appended_end: read_pos,
            registry,
            options,
            inbox,
            self_tx,
            jobs,
            timers: Timers::default(),
            view,
            view_tasks: imbl::HashMap::new(),
            snapshots,
            snapshot_job: None,
            events_since_snapshot: 0,
            last_snapshot: Instant::now(),
            metrics,
            observer,
            waiting: FxHashMap::default(),
            digest_waiters: Vec::new(),
            ready: VecDeque::new(),
            queued: FxHashSet::default(),
            in_flight: 0,
            namespaces: FxHashMap::default(),
            round: Round::default(),
            buf: Vec::with_capacity(4096),
            shutting_down: false,
        };
        let mut unanswered = p.catch_up(None)?;
        p.appended_end = p.read_pos;
        p.exclusive = p.writer.as_ref().is_some_and(|w| w.exclusive());
        // Claim the partition: every older writer is fenced from here on.
        p.epoch = Epoch(p.state.epoch().0 + 1);
        let claim = Envelope {
            task_id: TaskId::NIL,
            correlation_id: CorrelationId::NIL,
            source_position: None,
            epoch: p.epoch,
            at: Timestamp::now(),
            body: Body::Control(Control::PartitionClaimed(PartitionClaimed {
                epoch: p.epoch,
                owner: p.options.owner.clone(),
            })),
        };
        if p.exclusive {
            // Nothing can land before the claim: apply it as it is appended.
            p.state.apply(&claim);
            p.round.events.push(claim);
        } else {
            // Others may have appended since the catch-up: fold everything up to
            // and including the claim in log order, exactly as a replay will.
            let record = to_record(&claim, None, &mut Vec::new())
                .map_err(|source| ProcessorError::Encode { partition, source })?;
            let at = p.append_now(&[record])?;
            if let Some(claimed) = at.first() {
                unanswered.extend(p.catch_up(Some(claimed.next()))?);
            }
            let answered = p.state.answered();
            unanswered.retain(|r| Some(r.position) > answered);
            p.appended_end = p.read_pos;
            p.durable_end = p.read_pos;
            if p.state.epoch() != p.epoch {
                return Err(ProcessorError::Fenced {
                    partition,
                    epoch: p.state.epoch(),
                });
            }
        }
        let now = Timestamp::now();
        for record in unanswered {
            p.on_command_record(&record, now);
        }
        p.timers = Timers::from_state(&p.state);
        let ids: Vec<TaskId> = p.state.tasks().map(|t| t.id).collect();
        for id in ids {
            if let Ok(events) = decide(&p.state, Input::Reconcile { task: id }, now) {
                let corr = p.correlation(id);
                p.emit(id, corr, None, events, now);
            }
            p.round.changed.insert(id);
            let Some(task) = p.state.task(&id) else {
                continue;
            };
            if task.status.is_terminal() {
                continue;
            }
            let steps: Vec<(StepId, StepStatus, u32)> = task
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| (StepId(i as u32), s.status, s.attempts))
                .collect();
            for (step, status, attempts) in steps {
                match status {
                    // Interrupted attempts run again (handlers are at-least-once).
                    StepStatus::InProgress => p.round.dispatch.push((id, step, attempts)),
                    StepStatus::Pending => p.enqueue_step(id, step),
                    _ => {}
                }
            }
        }
        p.start_ready();
        p.flush()?;
        p.publish(true);
        if p.exclusive
            && let Some(writer) = p.writer.take()
        {
            let name = format!("tasker-w{}", p.partition.0);
            let pipe = WriterThread::start(writer, Arc::clone(&p.metrics), name).map_err(|e| {
                ProcessorError::Log {
                    partition,
                    source: LogError::Io {
                        op: "spawn the writer thread",
                        path: std::path::PathBuf::new(),
                        source: e,
                    },
                }
            })?;
            p.pipeline = Some(pipe);
        }
        tracing::info!(partition = %p.partition, epoch = %p.epoch, position = %p.read_pos, tasks = p.state.task_count(), "partition recovered");
        Ok(p)
    }

    /// Folds everything from `read_pos` to the end of the log; returns the commands
    /// no event answered yet, in log order.
    /// `until`: read at least up to this position (default: the log's end now).
    fn catch_up(&mut self, until: Option<Position>) -> Result<Vec<StoredRecord>, ProcessorError> {
        let partition = self.partition;
        let log_err = |source| ProcessorError::Log { partition, source };
        let mut reader = self.log.reader(partition, self.read_pos).map_err(log_err)?;
        let mut pending: VecDeque<StoredRecord> = VecDeque::new();
        loop {
            let end = match until {
                Some(u) => u,
                None => self.log.end(partition).map_err(log_err)?,
            };
            if self.read_pos >= end {
                break;
            }
            let batch = reader
                .poll(8192, Duration::from_millis(200))
                .map_err(log_err)?;
            for rec in batch {
                self.chain.push(&rec.record.payload);
                self.read_pos = rec.position.next();
                self.metrics.records_read.inc();
                match rec.record.headers.kind {
                    Some(Kind::Event) | Some(Kind::Control) => {
                        if let Ok(env) = codec::decode(&rec.record.payload) {
                            self.fold(&env);
                        } else {
                            self.metrics.ignored_events.inc();
                        }
                    }
                    Some(Kind::Command) | None => pending.push_back(rec),
                }
                let answered = self.state.answered();
                while pending
                    .front()
                    .is_some_and(|r| Some(r.position) <= answered)
                {
                    pending.pop_front();
                }
            }
        }
        let answered = self.state.answered();
        Ok(pending
            .into_iter()
            .filter(|r| Some(r.position) > answered)
            .collect())
    }

    fn fold(&mut self, env: &Envelope) {
        match self.state.apply(env) {
            Applied::Event | Applied::Control | Applied::Command => {}
            Applied::Fenced { .. } => self.metrics.ignored_events.inc(),
            Applied::Anomaly(e) => {
                self.metrics.ignored_events.inc();
                tracing::warn!(partition = %self.partition, error = %e, "event does not fit the state; ignored");
            }
        }
    }

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
            self.metrics.processor_inbox.set(self.inbox.len() as i64);
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
                match e {
                    Event::TaskAccepted(_) => {
                        self.metrics.tasks_accepted.inc();
                        self.enqueue_ready(task, None);
                    }
                    Event::StepStarted(s) => {
                        self.metrics.steps_started.inc();
                        self.round.dispatch.push((task, s.step, s.attempt));
                    }
                    Event::StepCompleted(c) => {
                        self.metrics.steps_completed.inc();
                        self.enqueue_ready(task, Some(c.step));
                    }
                    Event::StepResolvedManually(r) => self.enqueue_ready(task, Some(r.step)),
                    Event::StepRetryDue(r) => self.enqueue_step(task, r.step),
                    Event::StepFailed(f) => {
                        self.metrics.steps_failed.inc();
                        if let Some(at) = f.retry_at {
                            self.metrics.steps_retried.inc();
                            self.timers.push(at, task, f.step);
                        }
                    }
                    Event::TaskCompleted => {
                        self.metrics.tasks_completed.inc();
                        self.round.finished.push(task);
                    }
                    Event::TaskFailed(_) => {
                        self.metrics.tasks_failed.inc();
                        self.round.finished.push(task);
                    }
                    Event::TaskCancelled(_) => {
                        self.metrics.tasks_cancelled.inc();
                        self.round.finished.push(task);
                    }
                    Event::TaskResolvedManually => {
                        self.metrics.tasks_resolved.inc();
                        self.round.finished.push(task);
                    }
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

    /// Appends the round's commands and events in one batch, then releases its
    /// side effects: replies, dispatches, view, observers.
    fn flush(&mut self) -> Result<(), ProcessorError> {
        let round = std::mem::take(&mut self.round);
        if round.commands.is_empty() && round.events.is_empty() {
            let idle =
                round.dispatch.is_empty() && round.replies.is_empty() && round.changed.is_empty();
            if idle {
                self.round = round;
                return Ok(());
            }
            // Side effects without new records (re-dispatches after a restart): they
            // wait only for what was appended before them.
            let commit = Commit {
                end: self.appended_end,
                replies: round.replies,
                dispatch: round.dispatch,
                finished: round.finished,
                views: round
                    .changed
                    .iter()
                    .map(|id| (*id, self.state.task_shared(id).cloned()))
                    .collect(),
            };
            if self.durable_end >= self.appended_end {
                self.release(commit);
            } else {
                self.pending_dispatch += commit.dispatch.len();
                self.commits.push_back(commit);
            }
            return Ok(());
        }
        let mut records: Vec<Record> =
            Vec::with_capacity(round.commands.len() + round.events.len());
        let mut buf = std::mem::take(&mut self.buf);
        for env in round
            .commands
            .iter()
            .map(|(e, _)| e)
            .chain(round.events.iter())
        {
            let ns = self.namespace_of(env);
            let record = to_record(env, ns, &mut buf).map_err(|source| ProcessorError::Encode {
                partition: self.partition,
                source,
            })?;
            records.push(record);
        }
        self.buf = buf;
        let n_cmd = round.commands.len();
        let n = records.len() as u64;
        let positions: Vec<Position> = if self.exclusive {
            // Nobody else writes: the log is exactly what this processor appends, at
            // positions it knows in advance.
            for record in &records {
                self.chain.push(&record.payload);
            }
            self.metrics.records_read.add(n);
            (0..n).map(|i| Position(self.appended_end.0 + i)).collect()
        } else {
            self.append_now(&records)?
        };
        for ((_, reply), pos) in round.commands.into_iter().zip(&positions) {
            if let Some(reply) = reply {
                self.waiting.insert(*pos, reply);
            }
        }
        if !self.exclusive {
            self.own.extend(positions[n_cmd..].iter().copied());
        }
        if let Some(last) = positions.last() {
            self.appended_end = self.appended_end.max(last.next());
            if self.exclusive {
                self.read_pos = self.appended_end;
            }
        }
        self.events_since_snapshot += (positions.len() - n_cmd) as u64;
        let mut views: Vec<(TaskId, Option<Arc<TaskState>>)> = round
            .changed
            .iter()
            .map(|id| (*id, self.state.task_shared(id).cloned()))
            .collect();
        views.extend(self.state.take_evicted().into_iter().map(|id| (id, None)));
        let commit = Commit {
            end: self.appended_end,
            replies: round.replies,
            dispatch: round.dispatch,
            finished: round.finished,
            views,
        };
        let mut changed = round.changed;
        changed.clear();
        self.round = Round {
            changed,
            ..Round::default()
        };
        let mut commit = commit;
        if self.options.eager_dispatch && self.exclusive && self.pipeline.is_some() {
            // This batch is ordered before anything its steps cause: a result is
            // appended after the start, so it never becomes durable without it.
            let started = std::mem::take(&mut commit.dispatch);
            self.dispatch(&started);
        }
        match (&self.pipeline, self.exclusive) {
            (Some(pipe), true) => {
                if !pipe.submit(records, self.appended_end) {
                    return Err(ProcessorError::Log {
                        partition: self.partition,
                        source: LogError::Config("the log writer thread stopped".into()),
                    });
                }
                self.pending_dispatch += commit.dispatch.len();
                self.commits.push_back(commit);
            }
            (None, true) => {
                let appended = self.append_now(&records)?;
                if appended.first() != positions.first() || appended.len() != positions.len() {
                    return Err(ProcessorError::Log {
                        partition: self.partition,
                        source: LogError::Config(format!(
                            "the exclusive writer appended at {:?}.., expected {:?}",
                            appended.first(),
                            positions.first()
                        )),
                    });
                }
                self.durable_end = self.appended_end;
                self.release(commit);
            }
            (_, false) => {
                self.durable_end = self.appended_end;
                self.release(commit);
            }
        }
        Ok(())
    }

    /// Appends on this thread (recovery, shared logs) and records the timing.
    fn append_now(&mut self, records: &[Record]) -> Result<Vec<Position>, ProcessorError> {
        let writer = self.writer.as_mut().ok_or_else(|| ProcessorError::Log {
            partition: self.partition,
            source: LogError::Config("the writer moved to the writer thread".into()),
        })?;
        let started = Instant::now();
        let positions = writer
            .append(records)
            .map_err(|source| ProcessorError::Log {
                partition: self.partition,
                source,
            })?;
        self.metrics
            .append_latency_us
            .record(started.elapsed().as_micros() as u64);
        self.metrics
            .append_batch_records
            .record(records.len() as u64);
        self.metrics.records_appended.add(records.len() as u64);
        Ok(positions)
    }

    /// The writer thread made everything before `end` durable.
    fn on_durable(&mut self, end: Position) {
        self.durable_end = self.durable_end.max(end);
        while self
            .commits
            .front()
            .is_some_and(|c| c.end <= self.durable_end)
        {
            if let Some(commit) = self.commits.pop_front() {
                self.pending_dispatch = self.pending_dispatch.saturating_sub(commit.dispatch.len());
                self.release(commit);
            }
        }
    }

    /// Releases a durable batch's side effects. The view goes first, so a client
    /// that gets its answer also sees its effect.
    fn release(&mut self, commit: Commit) {
        for (id, view) in commit.views {
            match view {
                Some(t) => {
                    self.view_tasks.insert(id, t);
                }
                None => {
                    self.view_tasks.remove(&id);
                }
            }
        }
        // Exclusive writers run ahead of durability: the view describes the log up
        // to this batch's end, not up to what is appended after it.
        let position = if self.exclusive {
            commit.end
        } else {
            self.read_pos
        };
        self.publish_at(position, true);
        for (pos, outcome) in commit.replies {
            if let Some(reply) = self.waiting.remove(&pos) {
                let _ = reply.send(Ok(outcome));
            }
        }
        self.dispatch(&commit.dispatch);
        for id in &commit.finished {
            if let Some(t) = self.state.task(id) {
                let ms = t
                    .finished_at
                    .unwrap_or(t.accepted_at)
                    .millis_since(t.accepted_at);
                self.metrics.task_latency_ms.record(ms);
                if let Some(observer) = &self.observer {
                    observer(t);
                }
            }
        }
    }

    /// The state is exactly the fold of the durable log read so far.
    fn settled(&self) -> bool {
        self.read_pos >= self.appended_end && self.durable_end >= self.appended_end
    }

    /// Hands started attempts to the executor (after their `step.started` is durable).
    fn dispatch(&mut self, started: &[(TaskId, StepId, u32)]) {
        let Some(jobs) = &self.jobs else { return };
        let mut sent = 0;
        for &(task_id, step, attempt) in started {
            let Some(task) = self.state.task(&task_id) else {
                continue;
            };
            let Some(s) = task.step(step) else { continue };
            if s.status != StepStatus::InProgress || s.attempts != attempt {
                continue; // cancelled or finished within the same round
            }
            let Some(spec) = task.dag.snapshot().step(step) else {
                continue;
            };
            if spec.handler == REMOTE_HANDLER {
                continue;
            }
            let snapshot = task.dag.snapshot();
            let ctx = crate::handler::StepContext {
                task_id,
                correlation_id: task.correlation_id,
                namespace: snapshot.namespace.clone(),
                task_name: snapshot.name.clone(),
                version: snapshot.version.clone(),
                step: spec.name.clone(),
                attempt,
                context: task.request.context.clone(),
                parents: task
                    .dag
                    .parents(step)
                    .map(|p| {
                        (
                            task.step_name(p).to_owned(),
                            task.steps[p.index()].result.clone().unwrap_or_default(),
                        )
                    })
                    .collect(),
                config: spec.config.clone(),
                timeout: Duration::from_millis(spec.timeout_ms),
            };
            match self.registry.handlers().get(&spec.handler) {
                Some(handler) => {
                    jobs.send(Job {
                        task: task_id,
                        step,
                        attempt,
                        handler,
                        ctx,
                        reply: self.self_tx.clone(),
                    });
                    sent += 1;
                }
                None => {
                    let _ = self.self_tx.send(Inbox::StepDone {
                        task: task_id,
                        step,
                        attempt,
                        outcome: crate::record::StepOutcome::Failed(
                            crate::record::StepError::permanent(format!(
                                "handler `{}` is not registered in this engine",
                                spec.handler
                            )),
                        ),
                    });
                    sent += 1;
                }
            }
        }
        self.in_flight += sent;
    }

    fn publish(&mut self, live: bool) {
        self.publish_at(self.read_pos, live);
    }

    /// Publishes the view as the fold of the records before `position`.
    fn publish_at(&mut self, position: Position, live: bool) {
        self.metrics
            .tasks_in_memory
            .set(self.state.task_count() as i64);
        self.view.store(Arc::new(PartitionView {
            partition: self.partition,
            read_position: position,
            appended: self.appended_end,
            epoch: self.epoch,
            tasks: self.view_tasks.clone(),
            live,
        }));
    }

    fn snapshot_due(&self) -> bool {
        self.snapshots.is_some()
            && self.events_since_snapshot > 0
            && (self.events_since_snapshot >= self.options.snapshot_every_events
                || self.last_snapshot.elapsed() >= self.options.snapshot_interval)
    }

    fn maybe_snapshot(&mut self) {
        if self.snapshot_due() && self.settled() {
            self.snapshot(false);
        }
    }

    /// Snapshots the state if it is exactly the fold of the log read so far. The
    /// tasks come from the published view (a persistent map, so taking it is O(1))
    /// and are encoded and written on a background thread; `wait` writes in line.
    fn snapshot(&mut self, wait: bool) {
        let Some(store) = self.snapshots.clone() else {
            return;
        };
        // Waiting (at shutdown) includes a snapshot still being written.
        if wait && let Some(job) = self.snapshot_job.take() {
            let _ = job.join();
        }
        if !self.settled() || self.events_since_snapshot == 0 {
            return;
        }
        if let Some(job) = self.snapshot_job.take() {
            if !job.is_finished() && !wait {
                self.snapshot_job = Some(job);
                return;
            }
            let _ = job.join();
        }
        let (partition, position, chain) = (self.partition, self.read_pos, self.chain);
        let metrics = Arc::clone(&self.metrics);
        let write = move |file: SnapshotFile| match store.write(file) {
            Ok(path) => {
                metrics.snapshots_written.inc();
                tracing::debug!(%partition, file = %path.display(), "snapshot written");
            }
            Err(e) => tracing::error!(%partition, error = %e, "snapshot failed; will retry"),
        };
        let meta = self.state.snapshot_meta();
        if !wait && self.view_tasks.len() != self.state.task_count() {
            tracing::warn!(
                view = self.view_tasks.len(),
                state = self.state.task_count(),
                "view and state disagree; snapshotting in line"
            );
        }
        if wait || self.view_tasks.len() != self.state.task_count() {
            write(SnapshotFile {
                partition,
                position,
                chain,
                digest: self.state.digest(),
                state: self.state.to_snapshot(),
            });
        } else {
            let tasks = self.view_tasks.clone();
            let job = std::thread::Builder::new()
                .name(format!("tasker-snap{}", partition.0))
                .spawn(move || {
                    let digest = meta.digest(tasks.values().map(|t| &**t));
                    let state = StateSnapshot::from_tasks(tasks.values().map(|t| &**t), meta);
                    write(SnapshotFile {
                        partition,
                        position,
                        chain,
                        digest,
                        state,
                    });
                });
            match job {
                Ok(handle) => self.snapshot_job = Some(handle),
                Err(e) => {
                    tracing::error!(%partition, error = %e, "cannot start the snapshot thread")
                }
            }
        }
        self.events_since_snapshot = 0;
        self.last_snapshot = Instant::now();
    }

    /// Answers digest requests once the state is exactly the fold of the log prefix.
    fn answer_digests(&mut self) {
        if self.digest_waiters.is_empty() || !self.settled() {
            return;
        }
        let report = DigestReport {
            partition: self.partition,
            position: self.read_pos,
            digest: self.state.digest(),
            chain: self.chain.head(),
            records: self.chain.count(),
            tasks_in_memory: self.state.task_count(),
        };
        for w in self.digest_waiters.drain(..) {
            let _ = w.send(report.clone());
        }
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
