//! Property tests of the pure core. A small simulated engine (random DAG templates,
//! random step outcomes, retry timers and operator commands, all derived from
//! proptest-generated values) drives `decide` and the fold; its log is checked
//! record by record against an independent model, then replayed from its bytes.
//! Like the runtime, the simulated engine starts ready steps itself with
//! `Input::StartStep`, some or all of them at a time, so ready steps sometimes wait.
//!
//! A failure prints the minimal failing `Scenario` (its `seed` drives everything
//! else) and proptest stores its seed in `properties.proptest-regressions`, so it
//! replays.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

use tasker_engine::codec;
use tasker_engine::decide::{Input, Rejection, Resolution, decide};
use tasker_engine::record::{
    BackoffSpec, Body, CancelTask, Command, CorrelationId, Envelope, Epoch, Event, PartitionId,
    Position, RawJson, RejectReason, ReportStepResult, RequestTask, ResolveStep, RetryTask,
    StepError, StepErrorKind, StepId, StepOutcome, StepSpec, TaskId, TaskRejected,
    TemplateSnapshot, Timestamp,
};
use tasker_engine::state::{
    Applied, DEFAULT_RETENTION_MS, Dag, Digest, HashChain, SnapshotCache, State, StateDelta,
    StateSnapshot, StepStatus, TaskStatus, Written,
};

const START_MS: u64 = 1_700_000_000_000;
/// Inputs one simulated run may decide before it must have settled.
const MAX_ITERATIONS: usize = 6_000;
const MAX_TASKS: usize = 8;

// ---------------------------------------------------------------------------
// Generated input
// ---------------------------------------------------------------------------

/// One step of a generated template.
#[derive(Debug, Clone)]
struct StepGen {
    /// Parents, as indexes into the steps before this one (dropped for step 0).
    parents: Vec<Index>,
    retryable: bool,
    retry_limit: u32,
    initial_ms: u64,
    jitter_pct: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Any outcome, any command (cancel included), at any time.
    Chaos,
    /// After `failures` failed attempts every outcome succeeds and nobody cancels:
    /// every task must end complete (or resolved by hand).
    Eventually { failures: u32 },
}

#[derive(Debug, Clone)]
struct Scenario {
    templates: Vec<Vec<StepGen>>,
    initial_tasks: usize,
    /// Drives every choice of the run (outcomes, timing, commands, ids).
    seed: u64,
    mode: Mode,
    /// Retention of the live state (replays use others too).
    live_retention_ms: u64,
    /// Sometimes only a prefix of a decided batch reaches the log (a crash between
    /// appends on a backend without atomic batches); the engine then restarts from
    /// the log and reconciles every task.
    crashes: bool,
}

fn step_gen() -> impl Strategy<Value = StepGen> {
    (
        vec(any::<Index>(), 0..=3),
        any::<bool>(),
        1..=4u32,
        1..=50u64,
        0..=20u8,
    )
        .prop_map(
            |(parents, retryable, retry_limit, initial_ms, jitter_pct)| StepGen {
                parents,
                retryable,
                retry_limit,
                initial_ms,
                jitter_pct,
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let mode = prop_oneof![
        Just(Mode::Chaos),
        (0..=30u32).prop_map(|failures| Mode::Eventually { failures }),
    ];
    let retention = prop_oneof![
        2 => Just(DEFAULT_RETENTION_MS),
        1 => 1..=200u64,
    ];
    (
        vec(vec(step_gen(), 1..=60), 1..=3),
        1..=4usize,
        any::<u64>(),
        mode,
        retention,
        any::<bool>(),
    )
        .prop_map(
            |(templates, initial_tasks, seed, mode, live_retention_ms, crashes)| Scenario {
                templates,
                initial_tasks,
                seed,
                mode,
                live_retention_ms,
                crashes,
            },
        )
}

fn snapshot(index: usize, steps: &[StepGen]) -> TemplateSnapshot {
    let steps = steps
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut depends_on: Vec<StepId> = if i == 0 {
                Vec::new()
            } else {
                g.parents
                    .iter()
                    .map(|p| StepId(p.index(i) as u32))
                    .collect()
            };
            depends_on.sort();
            depends_on.dedup();
            StepSpec {
                name: format!("s{i}"),
                handler: "noop".into(),
                depends_on,
                retryable: g.retryable,
                retry_limit: g.retry_limit,
                timeout_ms: 1_000,
                backoff: BackoffSpec {
                    initial_ms: g.initial_ms,
                    max_ms: g.initial_ms * 4,
                    jitter_pct: g.jitter_pct,
                },
                config: RawJson::empty_object(),
            }
        })
        .collect();
    TemplateSnapshot {
        namespace: "sim".into(),
        name: format!("t{index}"),
        version: "1.0.0".into(),
        steps,
    }
}

/// SplitMix64: the run's only source of randomness, seeded by the scenario.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())])
    }

    fn u128(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }
}

// ---------------------------------------------------------------------------
// An independent model of task and step status, fed the same events
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ModelStep {
    status: StepStatus,
    /// Attempts started since the task was accepted or last retried by an operator.
    attempts: u32,
    retry_at: Option<Timestamp>,
}

#[derive(Debug, Clone)]
struct ModelTask {
    template: usize,
    status: TaskStatus,
    steps: Vec<ModelStep>,
    /// An operator resolved a step of this task.
    resolved: bool,
    /// A step was resolved with `skip_dependents`.
    skipped_dependents: bool,
}

/// What the model knows of every task ever accepted (evicted or not).
#[derive(Debug, Default)]
struct Model {
    tasks: BTreeMap<TaskId, ModelTask>,
    /// The template of the request being decided, until its `task.accepted` is seen.
    pending_template: Option<usize>,
    /// When the last task reached a final status.
    last_final_at: Option<Timestamp>,
}

impl Model {
    /// Checks one event against the model, then applies it to the model.
    fn observe(
        &mut self,
        specs: &[TemplateSnapshot],
        env: &Envelope,
        event: &Event,
    ) -> Result<(), TestCaseError> {
        let id = env.task_id;
        if let Event::TaskAccepted(accepted) = event {
            let template = self
                .pending_template
                .take()
                .ok_or_else(|| TestCaseError::fail("task.accepted without a request"))?;
            prop_assert_eq!(&*accepted.template, &specs[template]);
            prop_assert!(!self.tasks.contains_key(&id), "task {} accepted twice", id);
            let n = specs[template].steps.len();
            self.tasks.insert(
                id,
                ModelTask {
                    template,
                    status: TaskStatus::Pending,
                    steps: vec![
                        ModelStep {
                            status: StepStatus::Pending,
                            attempts: 0,
                            retry_at: None,
                        };
                        n
                    ],
                    resolved: false,
                    skipped_dependents: false,
                },
            );
            return Ok(());
        }
        if let Event::TaskRejected(_) = event {
            return Ok(());
        }
        let Some(task) = self.tasks.get_mut(&id) else {
            return Err(TestCaseError::fail(format!(
                "{} for unknown task {id}",
                event.record_type()
            )));
        };
        let spec = &specs[task.template];
        let task_to = |to: TaskStatus, task: &mut ModelTask| -> Result<(), TestCaseError> {
            prop_assert!(
                task.status.can_become(to),
                "task {} {:?} -> {:?} by {}",
                id,
                task.status,
                to,
                event.record_type()
            );
            task.status = to;
            Ok(())
        };
        let step_to =
            |step: StepId, to: StepStatus, task: &mut ModelTask| -> Result<(), TestCaseError> {
                let s = &mut task.steps[step.index()];
                prop_assert!(
                    s.status.can_become(to),
                    "task {} step {} {:?} -> {:?} by {}",
                    id,
                    step,
                    s.status,
                    to,
                    event.record_type()
                );
                s.status = to;
                Ok(())
            };
        match event {
            Event::TaskAccepted(_) | Event::TaskRejected(_) => {}
            Event::TaskStarted | Event::TaskRetried(_) => task_to(TaskStatus::InProgress, task)?,
            Event::TaskCompleted => {
                prop_assert!(
                    task.steps.iter().all(|s| s.status.is_done_ok()),
                    "task {} completed with unfinished steps",
                    id
                );
                task_to(TaskStatus::Complete, task)?;
            }
            Event::TaskFailed(failed) => {
                for step in &failed.failed_steps {
                    let s = &task.steps[step.index()];
                    prop_assert!(
                        s.status == StepStatus::Error && s.retry_at.is_none(),
                        "task {} failed naming step {} which is {:?}",
                        id,
                        step,
                        s.status
                    );
                }
                prop_assert!(!failed.failed_steps.is_empty());
                prop_assert!(
                    !task
                        .steps
                        .iter()
                        .any(|s| s.status == StepStatus::InProgress),
                    "task {} failed with a step still running",
                    id
                );
                task_to(TaskStatus::Error, task)?;
            }
            Event::TaskCancelled(_) => task_to(TaskStatus::Cancelled, task)?,
            Event::TaskResolvedManually => task_to(TaskStatus::ResolvedManually, task)?,
            Event::StepStarted(e) => {
                // (b) parents first: every parent complete or resolved at this moment.
                for parent in &spec.steps[e.step.index()].depends_on {
                    let p = task.steps[parent.index()].status;
                    prop_assert!(
                        p.satisfies_dependents(),
                        "task {} step {} started while its parent {} is {:?}",
                        id,
                        e.step,
                        parent,
                        p
                    );
                }
                prop_assert_eq!(
                    task.status,
                    TaskStatus::InProgress,
                    "step started in a task not running"
                );
                step_to(e.step, StepStatus::InProgress, task)?;
                let s = &mut task.steps[e.step.index()];
                s.attempts += 1;
                s.retry_at = None;
                prop_assert_eq!(e.attempt, s.attempts, "attempt numbering of {}", e.step);
                // (c) attempts stay within the retry limit between operator retries.
                let st = &spec.steps[e.step.index()];
                let limit = if st.retryable {
                    st.retry_limit.max(1)
                } else {
                    1
                };
                prop_assert!(
                    s.attempts <= limit,
                    "task {} step {} attempt {} exceeds its limit {} (retryable {})",
                    id,
                    e.step,
                    s.attempts,
                    limit,
                    st.retryable
                );
            }
            Event::StepCompleted(e) => {
                prop_assert_eq!(e.attempt, task.steps[e.step.index()].attempts);
                step_to(e.step, StepStatus::Complete, task)?;
            }
            Event::StepFailed(e) => {
                let s = &task.steps[e.step.index()];
                prop_assert_eq!(e.attempt, s.attempts);
                let st = &spec.steps[e.step.index()];
                let may_retry =
                    st.retryable && e.error.is_retryable() && e.attempt < st.retry_limit.max(1);
                prop_assert_eq!(
                    e.retry_at.is_some(),
                    may_retry,
                    "retry decision for step {} attempt {} ({:?})",
                    e.step,
                    e.attempt,
                    e.error.kind
                );
                if let Some(at) = e.retry_at {
                    let delay = at.millis_since(env.at);
                    let (lo, hi) = match e.error.retry_after_ms {
                        Some(ms) => (ms, ms),
                        None => {
                            let b = &st.backoff;
                            let base = (b.initial_ms << (e.attempt - 1)).min(b.max_ms);
                            let span = base * u64::from(b.jitter_pct) / 100;
                            (base - span, base + span)
                        }
                    };
                    prop_assert!(
                        (lo..=hi).contains(&delay) && at >= env.at,
                        "step {} attempt {}: retry in {} ms, expected {}..={}",
                        e.step,
                        e.attempt,
                        delay,
                        lo,
                        hi
                    );
                }
                step_to(e.step, StepStatus::Error, task)?;
                task.steps[e.step.index()].retry_at = e.retry_at;
            }
            Event::StepRetryDue(e) => {
                let s = &task.steps[e.step.index()];
                if e.reset_attempts {
                    prop_assert!(
                        s.retry_at.is_none(),
                        "operator retry of a step awaiting its backoff"
                    );
                } else {
                    prop_assert!(
                        s.retry_at.is_some_and(|at| at <= env.at),
                        "retry of step {} due at {:?}, now {}",
                        e.step,
                        s.retry_at,
                        env.at.as_millis()
                    );
                }
                step_to(e.step, StepStatus::Pending, task)?;
                let s = &mut task.steps[e.step.index()];
                s.retry_at = None;
                if e.reset_attempts {
                    s.attempts = 0;
                }
            }
            Event::StepSkipped(e) => {
                step_to(e.step, StepStatus::Skipped, task)?;
                task.skipped_dependents = true;
            }
            Event::StepCancelled(e) => step_to(e.step, StepStatus::Cancelled, task)?,
            Event::StepResolvedManually(e) => {
                step_to(e.step, StepStatus::ResolvedManually, task)?;
                task.steps[e.step.index()].retry_at = None;
                task.resolved = true;
            }
        }
        if task.status.is_final() && event.step().is_none() {
            self.last_final_at = Some(env.at);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The simulated engine
// ---------------------------------------------------------------------------

/// How a run went, to check that it exercised what it should.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    events: usize,
    started: usize,
    failed: usize,
    retries_due: usize,
    cancels: usize,
    task_retries: usize,
    resolves: usize,
    rejections: usize,
    stale_rejected: usize,
    crashes: usize,
    reconciled: usize,
    /// `StartStep` batches, and ticks that left ready steps waiting.
    starts: usize,
    waited: usize,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    specs: Vec<TemplateSnapshot>,
    resolutions: Vec<Resolution>,
    rng: Rng,
    now: u64,
    state: State,
    model: Model,
    /// The encoded log, position = index.
    log: Vec<Vec<u8>>,
    /// The chain after each record.
    heads: Vec<HashChain>,
    chain: HashChain,
    /// (records in the log, live digest then): replays must agree at each.
    checkpoints: Vec<(usize, Digest)>,
    /// Carried from checkpoint to checkpoint, as snapshots carry it.
    snapshot_cache: SnapshotCache,
    /// The snapshot the last checkpoint "wrote", which the next delta follows.
    last_snapshot: Option<StateSnapshot>,
    /// Where that snapshot was taken (records in the log).
    last_written: usize,
    /// Every task requested, in order, with its correlation id.
    tasks: Vec<(TaskId, CorrelationId)>,
    failures: u32,
    /// The last batch lost its tail to a simulated crash.
    cut: bool,
    coverage: Coverage,
}

/// A command's result for the checks: accepted, or refused with this reason.
type Outcome = Result<(), RejectReason>;

impl<'a> Sim<'a> {
    fn new(scenario: &'a Scenario) -> Self {
        let specs: Vec<TemplateSnapshot> = scenario
            .templates
            .iter()
            .enumerate()
            .map(|(i, t)| snapshot(i, t))
            .collect();
        let resolutions = specs
            .iter()
            .map(|s| Ok(Arc::new(Dag::new(Arc::new(s.clone())))))
            .collect();
        Sim {
            scenario,
            specs,
            resolutions,
            rng: Rng(scenario.seed),
            now: START_MS,
            state: State::new(scenario.live_retention_ms),
            model: Model::default(),
            log: Vec::new(),
            heads: Vec::new(),
            chain: HashChain::genesis(PartitionId(0)),
            checkpoints: Vec::new(),
            snapshot_cache: SnapshotCache::default(),
            last_snapshot: None,
            last_written: 0,
            tasks: Vec::new(),
            failures: 0,
            cut: false,
            coverage: Coverage::default(),
        }
    }

    fn at(&self) -> Timestamp {
        Timestamp(self.now)
    }

    fn eventually(&self) -> bool {
        matches!(self.scenario.mode, Mode::Eventually { .. })
    }

    fn failures_left(&self) -> bool {
        match self.scenario.mode {
            Mode::Chaos => true,
            Mode::Eventually { failures } => self.failures < failures,
        }
    }

    /// Encodes, checks and folds one record; returns its position.
    fn append(&mut self, env: Envelope) -> Result<Position, TestCaseError> {
        let position = Position(self.log.len() as u64);
        let bytes = codec::encode(&env).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // (e) encode -> decode is the identity for every record.
        let back = codec::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &env, "record at {} does not round-trip", position);
        if let Body::Event(event) = &env.body {
            self.model.observe(&self.specs, &env, event)?;
        }
        let applied = self.state.apply(&env);
        let expected = match env.body {
            Body::Command(_) => Applied::Command,
            Body::Event(_) => Applied::Event,
            Body::Control(_) => Applied::Control,
        };
        prop_assert_eq!(
            applied,
            expected,
            "applying {} at {}",
            env.record_type(),
            position
        );
        self.chain.push(&bytes);
        self.heads.push(self.chain);
        self.log.push(bytes);
        if let Body::Event(event) = &env.body {
            self.coverage.events += 1;
            match event {
                Event::StepStarted(_) => self.coverage.started += 1,
                Event::StepFailed(_) => self.coverage.failed += 1,
                _ => {}
            }
        }
        Ok(position)
    }

    /// Appends the events `decide` returned for `task`, answering `source`; in crash
    /// scenarios sometimes only a prefix of them, followed by a restart. Only a
    /// `StartStep` (`starts`) may start anything.
    fn append_events(
        &mut self,
        task: TaskId,
        correlation_id: CorrelationId,
        source: Option<Position>,
        events: Vec<Event>,
        starts: bool,
    ) -> Result<(), TestCaseError> {
        prop_assert!(
            !events.is_empty(),
            "decide accepted an input and decided nothing"
        );
        if !starts {
            prop_assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, Event::StepStarted(_) | Event::TaskStarted)),
                "decide started something by itself: {:?}",
                events
            );
        }
        let total = events.len();
        let keep = if self.scenario.crashes && total > 1 && self.rng.chance(10) {
            1 + self.rng.below(total - 1)
        } else {
            total
        };
        self.cut = keep < total;
        for event in events.into_iter().take(keep) {
            self.append(Envelope {
                task_id: task,
                correlation_id,
                source_position: source,
                epoch: Epoch(0),
                at: self.at(),
                body: Body::Event(event),
            })?;
        }
        if self.cut {
            self.coverage.crashes += 1;
            return self.restart();
        }
        self.check_task(task)
    }

    /// A new processor: folds the log from scratch (it must reach the crashed one's
    /// state), then reconciles every task in memory, as the runtime does on start.
    fn restart(&mut self) -> Result<(), TestCaseError> {
        let mut state = State::new(self.scenario.live_retention_ms);
        for bytes in &self.log {
            let env = codec::decode(bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            state.apply(&env);
        }
        prop_assert_eq!(state.digest(), self.state.digest(), "restart digest");
        self.state = state;
        for (task, correlation_id) in self.tasks.clone() {
            self.reconcile(task, correlation_id)?;
        }
        Ok(())
    }

    /// Reconciles one task; a second reconcile must decide nothing.
    fn reconcile(
        &mut self,
        task: TaskId,
        correlation_id: CorrelationId,
    ) -> Result<(), TestCaseError> {
        if self.state.task(&task).is_none() {
            return Ok(());
        }
        let events = decide(&self.state, Input::Reconcile { task }, self.at())
            .map_err(|r| TestCaseError::fail(format!("reconcile of {task} refused: {r}")))?;
        if !events.is_empty() {
            self.coverage.reconciled += 1;
            prop_assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, Event::StepStarted(_) | Event::TaskStarted)),
                "reconcile of {} started something: {:?}",
                task,
                events
            );
            for event in events {
                self.append(Envelope {
                    task_id: task,
                    correlation_id,
                    source_position: None,
                    epoch: Epoch(0),
                    at: self.at(),
                    body: Body::Event(event),
                })?;
            }
        }
        let again = decide(&self.state, Input::Reconcile { task }, self.at())
            .map_err(|r| TestCaseError::fail(format!("reconcile of {task} refused: {r}")))?;
        prop_assert_eq!(
            again,
            Vec::<Event>::new(),
            "a second reconcile of {} decided more",
            task
        );
        self.check_task(task)
    }

    /// The task's records, one line each, for failure messages.
    fn history(&self, id: TaskId) -> String {
        let mut out = String::new();
        for (i, bytes) in self.log.iter().enumerate() {
            if let Ok(env) = codec::decode(bytes)
                && env.task_id == id
            {
                let body = match &env.body {
                    Body::Event(Event::TaskAccepted(_)) => "TaskAccepted".to_owned(),
                    other => format!("{other:?}"),
                };
                out.push_str(&format!(
                    "  {i} @{} {body}\n",
                    env.at.as_millis() - START_MS
                ));
            }
        }
        out
    }

    /// Invariants of one task after a batch: the model and the fold agree, a running
    /// task always has something in flight and never leaves a ready step unstarted.
    fn check_task(&self, id: TaskId) -> Result<(), TestCaseError> {
        let Some(model) = self.model.tasks.get(&id) else {
            return Ok(());
        };
        let Some(task) = self.state.task(&id) else {
            prop_assert!(
                model.status.is_final(),
                "task {} left memory while {:?}",
                id,
                model.status
            );
            return Ok(());
        };
        prop_assert_eq!(task.status, model.status, "task {} status", id);
        for (i, (s, m)) in task.steps.iter().zip(&model.steps).enumerate() {
            prop_assert_eq!(s.status, m.status, "task {} step {} status", id, i);
            prop_assert_eq!(s.attempts, m.attempts, "task {} step {} attempts", id, i);
            prop_assert_eq!(s.retry_at, m.retry_at, "task {} step {} retry_at", id, i);
        }
        if task.status == TaskStatus::Pending {
            prop_assert!(
                task.steps
                    .iter()
                    .all(|s| s.status == StepStatus::Pending && s.attempts == 0),
                "task {} is pending with steps that moved; its log:\n{}",
                id,
                self.history(id)
            );
        }
        if matches!(task.status, TaskStatus::Pending | TaskStatus::InProgress) {
            // Never stuck: something runs, waits for its retry, or can be started.
            let in_flight = task
                .steps
                .iter()
                .any(|s| s.status == StepStatus::InProgress || s.is_awaiting_retry());
            let startable = task.dag.step_ids().any(|s| {
                task.steps[s.index()].status == StepStatus::Pending && task.parents_satisfied(s)
            });
            prop_assert!(
                in_flight || startable,
                "task {} is {} with nothing running, waiting or ready; steps {:?}; its log:\n{}",
                id,
                task.status.as_str(),
                task.dag
                    .step_ids()
                    .map(|s| format!(
                        "{}:{}<-{:?}",
                        s.0,
                        task.steps[s.index()].status.as_str(),
                        task.dag.parents(s).map(|p| p.0).collect::<Vec<_>>()
                    ))
                    .collect::<Vec<_>>(),
                self.history(id)
            );
        }
        self.check_starts(id)?;
        if task.status == TaskStatus::Error {
            prop_assert!(
                task.steps.iter().any(|s| s.is_terminal_error()),
                "task {} is in error without a failed step; its log:\n{}",
                id,
                self.history(id)
            );
            prop_assert!(
                !task
                    .steps
                    .iter()
                    .any(|s| s.status == StepStatus::InProgress)
            );
        }
        Ok(())
    }

    /// `StartStep` is accepted exactly for the steps `TaskState::is_step_ready` calls
    /// ready (a ready step in error first needs its due `step.retry_due`), and a
    /// start decides exactly `[task.started if the task is pending, step.started]`
    /// with the next attempt.
    fn check_starts(&self, id: TaskId) -> Result<(), TestCaseError> {
        let Some(task) = self.state.task(&id) else {
            return Ok(());
        };
        let now = self.at();
        for step in task.dag.step_ids() {
            let ready = task.is_step_ready(step, now);
            let s = &task.steps[step.index()];
            let start = decide(&self.state, Input::StartStep { task: id, step }, now);
            if ready && s.status == StepStatus::Error {
                prop_assert_eq!(
                    start.map_err(|r| r.reason),
                    Err(RejectReason::StaleAttempt),
                    "task {} step {} started in error",
                    id,
                    step
                );
                let due = decide(&self.state, Input::RetryDue { task: id, step }, now);
                prop_assert!(
                    matches!(due.as_deref(), Ok([Event::StepRetryDue(r)]) if r.step == step && !r.reset_attempts),
                    "task {} step {} is ready in error but its retry is refused: {:?}",
                    id,
                    step,
                    due
                );
                continue;
            }
            match start {
                Ok(events) => {
                    prop_assert!(
                        ready,
                        "task {} ({}) step {} ({}) is not ready, yet StartStep started it",
                        id,
                        task.status.as_str(),
                        step,
                        s.status.as_str()
                    );
                    let mut expected = Vec::new();
                    if task.status == TaskStatus::Pending {
                        expected.push(Event::TaskStarted);
                    }
                    expected.push(Event::StepStarted(tasker_engine::record::StepStarted {
                        step,
                        attempt: s.attempts + 1,
                    }));
                    prop_assert_eq!(events, expected, "StartStep of task {} step {}", id, step);
                }
                Err(r) => {
                    prop_assert!(
                        !ready,
                        "task {} step {} is ready, yet StartStep refused it: {}",
                        id,
                        step,
                        r
                    );
                    prop_assert_eq!(r.reason, RejectReason::StaleAttempt);
                }
            }
        }
        Ok(())
    }

    /// Appends a command, decides it and appends its events or its rejection.
    fn command(
        &mut self,
        task: TaskId,
        correlation_id: CorrelationId,
        command: Command,
        resolution: Option<&Resolution>,
    ) -> Result<Outcome, TestCaseError> {
        let position = self.append(Envelope::command(
            task,
            correlation_id,
            self.at(),
            command.clone(),
        ))?;
        let input = Input::Command {
            task,
            command: &command,
            resolution,
        };
        match decide(&self.state, input, self.at()) {
            Ok(events) => {
                self.append_events(task, correlation_id, Some(position), events, false)?;
                Ok(Ok(()))
            }
            Err(Rejection {
                reason,
                message,
                details,
            }) => {
                self.coverage.rejections += 1;
                self.append(Envelope {
                    task_id: task,
                    correlation_id,
                    source_position: Some(position),
                    epoch: Epoch(0),
                    at: self.at(),
                    body: Body::Event(Event::TaskRejected(TaskRejected {
                        command: Some(command.record_type()),
                        reason: reason.clone(),
                        message,
                        details,
                    })),
                })?;
                Ok(Err(reason))
            }
        }
    }

    /// An executor or timer input (no command in the log): must be accepted.
    fn internal(&mut self, input: Input<'_>) -> Result<(), TestCaseError> {
        let task = input.task();
        let events = decide(&self.state, input, self.at())
            .map_err(|r| TestCaseError::fail(format!("valid {input:?} refused: {r}")))?;
        let correlation_id = self.correlation(task);
        let starts = matches!(input, Input::StartStep { .. });
        self.append_events(task, correlation_id, None, events, starts)
    }

    fn correlation(&self, task: TaskId) -> CorrelationId {
        self.tasks
            .iter()
            .find(|(t, _)| *t == task)
            .map_or(CorrelationId::NIL, |(_, c)| *c)
    }

    fn request(&mut self) -> Result<(), TestCaseError> {
        let template = self.rng.below(self.specs.len());
        let id = TaskId::v7(self.at(), self.rng.u128());
        let correlation_id = CorrelationId::from_uuid(uuid::Uuid::from_u128(self.rng.u128()));
        self.tasks.push((id, correlation_id));
        let request = RequestTask {
            namespace: "sim".into(),
            name: format!("t{template}"),
            version: Some("1.0.0".into()),
            context: RawJson::from_trusted(format!("{{\"n\":{}}}", self.tasks.len())),
            tags: vec![format!("seed-{}", self.scenario.seed % 1000)],
            ..RequestTask::default()
        };
        self.model.pending_template = Some(template);
        let resolution = self.resolutions[template].clone();
        let outcome = self.command(
            id,
            correlation_id,
            Command::RequestTask(request),
            Some(&resolution),
        )?;
        prop_assert_eq!(outcome, Ok(()), "a fresh task was refused");
        prop_assert!(self.model.pending_template.is_none());
        Ok(())
    }

    /// Steps of tasks in memory, in task then step order.
    fn steps_where(
        &self,
        f: impl Fn(TaskStatus, &tasker_engine::state::StepState) -> bool,
    ) -> Vec<(TaskId, StepId)> {
        let mut out = Vec::new();
        for (id, _) in &self.tasks {
            if let Some(task) = self.state.task(id) {
                for (i, s) in task.steps.iter().enumerate() {
                    if f(task.status, s) {
                        out.push((*id, StepId(i as u32)));
                    }
                }
            }
        }
        out
    }

    fn tasks_in(&self, status: TaskStatus) -> Vec<TaskId> {
        self.tasks
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.state.task(id).is_some_and(|t| t.status == status))
            .collect()
    }

    /// The runtime has room for some of the ready steps: starts a seed-chosen number
    /// of them (at least one), in a seed-chosen order.
    fn start_some(&mut self, mut ready: Vec<(TaskId, StepId)>) -> Result<(), TestCaseError> {
        for i in (1..ready.len()).rev() {
            let j = self.rng.below(i + 1);
            ready.swap(i, j);
        }
        let n = if self.rng.chance(40) {
            ready.len()
        } else {
            1 + self.rng.below(ready.len())
        };
        for (task, step) in ready.into_iter().take(n) {
            // Starting one step never makes another one unready.
            prop_assert!(
                self.state
                    .task(&task)
                    .is_some_and(|t| t.is_step_ready(step, self.at())),
                "task {} step {} stopped being ready when another step started",
                task,
                step
            );
            self.coverage.starts += 1;
            self.internal(Input::StartStep { task, step })?;
            if self.cut {
                // The restarted engine finds ready steps again on its next tick.
                break;
            }
        }
        Ok(())
    }

    /// Feeds the outcome of one running attempt.
    fn finish_step(&mut self, task: TaskId, step: StepId) -> Result<(), TestCaseError> {
        let (attempt, timeout_ms) = {
            let t = self
                .state
                .task(&task)
                .ok_or_else(|| TestCaseError::fail("gone"))?;
            (
                t.steps[step.index()].attempts,
                self.specs[self.model.tasks[&task].template].steps[step.index()].timeout_ms,
            )
        };
        let outcome = if !self.failures_left() {
            StepOutcome::Completed {
                result: RawJson::from_trusted(format!("{{\"attempt\":{attempt}}}")),
            }
        } else {
            match self.rng.below(100) {
                0..55 => StepOutcome::Completed {
                    result: RawJson::from_trusted(format!("{{\"attempt\":{attempt}}}")),
                },
                55..75 => StepOutcome::Failed(StepError {
                    retry_after_ms: self.rng.chance(20).then(|| self.rng.below(40) as u64),
                    ..StepError::retryable(format!("flaky {attempt}"))
                }),
                75..87 => StepOutcome::Failed(StepError::timeout(timeout_ms)),
                _ => StepOutcome::Failed(StepError::permanent("broken")),
            }
        };
        if matches!(outcome, StepOutcome::Failed(_)) {
            self.failures += 1;
        }
        if self.rng.chance(15) {
            // A remote worker reports the same outcome as a command.
            let name = self.specs[self.model.tasks[&task].template].steps[step.index()]
                .name
                .clone();
            let correlation_id = self.correlation(task);
            let outcome = self.command(
                task,
                correlation_id,
                Command::ReportStepResult(ReportStepResult {
                    step: name,
                    attempt,
                    outcome,
                }),
                None,
            )?;
            prop_assert_eq!(outcome, Ok(()), "a valid step.result_reported was refused");
            return Ok(());
        }
        self.internal(Input::StepFinished {
            task,
            step,
            attempt,
            outcome: &outcome,
        })
    }

    /// An outdated executor or timer input: refused, and nothing is appended.
    fn stale_input(&mut self) -> Result<(), TestCaseError> {
        let Some(&(task, _)) = self.tasks.get(self.rng.below(self.tasks.len())) else {
            return Ok(());
        };
        let Some(t) = self.state.task(&task) else {
            let outcome = StepOutcome::Completed {
                result: RawJson::null(),
            };
            let r = decide(
                &self.state,
                Input::StepFinished {
                    task,
                    step: StepId(0),
                    attempt: 1,
                    outcome: &outcome,
                },
                self.at(),
            );
            prop_assert_eq!(r.map_err(|r| r.reason), Err(RejectReason::UnknownTask));
            let r = decide(
                &self.state,
                Input::StartStep {
                    task,
                    step: StepId(0),
                },
                self.at(),
            );
            prop_assert_eq!(r.map_err(|r| r.reason), Err(RejectReason::UnknownTask));
            return Ok(());
        };
        let step = StepId(self.rng.below(t.steps.len()) as u32);
        let s = &t.steps[step.index()];
        let running = t.status == TaskStatus::InProgress && s.status == StepStatus::InProgress;
        let attempt = if running {
            // Any attempt but the current one.
            [s.attempts - 1, s.attempts + 1, u32::MAX][self.rng.below(3)]
        } else {
            s.attempts
        };
        let outcome = StepOutcome::Completed {
            result: RawJson::null(),
        };
        let r = decide(
            &self.state,
            Input::StepFinished {
                task,
                step,
                attempt,
                outcome: &outcome,
            },
            self.at(),
        );
        prop_assert_eq!(r.map_err(|r| r.reason), Err(RejectReason::StaleAttempt));
        let due = t.status == TaskStatus::InProgress
            && s.status == StepStatus::Error
            && s.retry_at.is_some_and(|at| at <= self.at());
        if !due {
            let r = decide(&self.state, Input::RetryDue { task, step }, self.at());
            prop_assert_eq!(r.map_err(|r| r.reason), Err(RejectReason::StaleAttempt));
        }
        // A start the runtime queued before the step moved on.
        let startable =
            !t.status.is_terminal() && s.status == StepStatus::Pending && t.parents_satisfied(step);
        if !startable {
            let r = decide(&self.state, Input::StartStep { task, step }, self.at());
            prop_assert_eq!(r.map_err(|r| r.reason), Err(RejectReason::StaleAttempt));
        }
        self.coverage.stale_rejected += 1;
        Ok(())
    }

    fn cancel(&mut self, task: TaskId) -> Result<(), TestCaseError> {
        let before = self.state.task(&task).map(|t| t.status);
        let correlation_id = self.correlation(task);
        let outcome = self.command(
            task,
            correlation_id,
            Command::CancelTask(CancelTask {
                requested_by: Some("sim".into()),
                reason: None,
            }),
            None,
        )?;
        match before {
            Some(TaskStatus::Pending | TaskStatus::InProgress) => {
                prop_assert_eq!(outcome, Ok(()), "cancel of a running task refused");
                self.coverage.cancels += 1;
                // A cancel cut short by a crash was finished by the restart's reconcile.
                let t = &self.model.tasks[&task];
                prop_assert_eq!(t.status, TaskStatus::Cancelled);
                prop_assert!(
                    !t.steps
                        .iter()
                        .any(|s| matches!(s.status, StepStatus::Pending | StepStatus::InProgress)),
                    "a cancelled task still has pending or running steps"
                );
            }
            Some(_) => prop_assert_eq!(outcome, Err(RejectReason::InvalidTransition)),
            None => prop_assert_eq!(outcome, Err(RejectReason::UnknownTask)),
        }
        Ok(())
    }

    fn retry(&mut self, task: TaskId) -> Result<(), TestCaseError> {
        let before = self.state.task(&task).map(|t| t.status);
        let correlation_id = self.correlation(task);
        let outcome = self.command(
            task,
            correlation_id,
            Command::RetryTask(RetryTask {
                requested_by: Some("sim".into()),
                reason: Some("again".into()),
            }),
            None,
        )?;
        match before {
            Some(TaskStatus::Error) => {
                prop_assert_eq!(outcome, Ok(()), "retry of a failed task refused");
                self.coverage.task_retries += 1;
            }
            Some(_) => prop_assert_eq!(outcome, Err(RejectReason::InvalidTransition)),
            None => prop_assert_eq!(outcome, Err(RejectReason::UnknownTask)),
        }
        Ok(())
    }

    fn resolve(&mut self, task: TaskId, step: StepId) -> Result<(), TestCaseError> {
        let before = self
            .state
            .task(&task)
            .map(|t| (t.status, t.steps[step.index()].status));
        let name = self.specs[self.model.tasks[&task].template].steps[step.index()]
            .name
            .clone();
        let correlation_id = self.correlation(task);
        let command = Command::ResolveStep(ResolveStep {
            step: name,
            result: self
                .rng
                .chance(50)
                .then(|| RawJson::from_trusted("{\"by\":\"hand\"}".into())),
            resolved_by: Some("operator".into()),
            reason: None,
            skip_dependents: self.rng.chance(40),
        });
        let outcome = self.command(task, correlation_id, command, None)?;
        match before {
            Some((TaskStatus::InProgress | TaskStatus::Error, StepStatus::Error)) => {
                prop_assert_eq!(outcome, Ok(()), "resolve of a failed step refused");
                prop_assert_eq!(
                    self.model.tasks[&task].steps[step.index()].status,
                    StepStatus::ResolvedManually
                );
                self.coverage.resolves += 1;
            }
            Some(_) => prop_assert_eq!(outcome, Err(RejectReason::InvalidTransition)),
            None => prop_assert_eq!(outcome, Err(RejectReason::UnknownTask)),
        }
        Ok(())
    }

    /// An operator does something, sometimes pointless (and refused).
    fn operator(&mut self) -> Result<(), TestCaseError> {
        let Some(&(task, _)) = self.tasks.get(self.rng.below(self.tasks.len())) else {
            return Ok(());
        };
        match self.rng.below(3) {
            0 if !self.eventually() => self.cancel(task),
            0 | 1 => self.retry(task),
            _ => {
                let n = self.specs[self.model.tasks[&task].template].steps.len();
                let failed: Vec<StepId> = self
                    .state
                    .task(&task)
                    .map(|t| {
                        t.dag
                            .step_ids()
                            .filter(|s| t.steps[s.index()].status == StepStatus::Error)
                            .collect()
                    })
                    .unwrap_or_default();
                let step = match self.rng.pick(&failed) {
                    Some(s) if self.rng.chance(80) => s,
                    _ => StepId(self.rng.below(n) as u32),
                };
                self.resolve(task, step)
            }
        }
    }

    fn checkpoint(&mut self) {
        let digest = self.state.digest();
        // A background snapshot reuses the hashes and encoded images of tasks
        // unchanged since the last one: its digest must equal the one computed
        // from scratch, and its bytes must decode to this state.
        let encoded = self
            .state
            .snapshot_meta(&self.snapshot_cache)
            .encode(self.state.tasks_shared(), &mut self.snapshot_cache)
            .unwrap();
        let at = self.log.len();
        assert_eq!(encoded.digest, digest, "cached snapshot digest at {at}");
        let bytes: Vec<u8> = encoded.parts().flatten().copied().collect();
        let decoded: StateSnapshot = tasker_engine::codec::from_canonical_bytes(&bytes).unwrap();
        let restored = State::from_snapshot(decoded.clone()).expect("a consistent snapshot");
        assert_eq!(
            restored.digest(),
            digest,
            "cached snapshot restored at {at}"
        );
        assert_eq!(
            restored.to_snapshot(),
            self.state.to_snapshot(),
            "cached snapshot restored at {at}"
        );
        // The delta from the last snapshot written, applied to it, is this one.
        if let Some(base) = encoded.base {
            assert_eq!(base.position.0, self.last_written as u64);
            let bytes: Vec<u8> = encoded.delta_parts().flatten().copied().collect();
            let delta: StateDelta = tasker_engine::codec::from_canonical_bytes(&bytes).unwrap();
            let mut next = self.last_snapshot.take().expect("the base snapshot");
            next.apply(delta).expect("a delta that follows its base");
            let next = State::from_snapshot(next).expect("a consistent snapshot");
            assert_eq!(next.digest(), digest, "delta at {at}");
            assert_eq!(
                next.to_snapshot(),
                self.state.to_snapshot(),
                "delta at {at}"
            );
        }
        // Every fifth "write" fails: the next snapshot must be whole.
        let written = !at.is_multiple_of(5);
        drop(encoded);
        self.last_snapshot = None;
        if written {
            self.snapshot_cache.written(Written {
                position: Position(at as u64),
                deltas: 0,
                delta_bytes: 0,
            });
            self.last_snapshot = Some(decoded);
            self.last_written = at;
        }
        assert_eq!(self.snapshot_cache.len(), self.state.task_count());
        // From a fresh cache, the very bytes of the snapshot made in one piece,
        // paused (as a background snapshot spreads its work) or not.
        let mut cache = SnapshotCache::default();
        let mut pauses = 0;
        let fresh = self
            .state
            .snapshot_meta(&cache)
            .encode_paced(self.state.tasks_shared(), &mut cache, &mut || pauses += 1)
            .unwrap();
        assert_eq!(
            pauses,
            self.state.task_count() / tasker_engine::state::PACE_TASKS,
            "pauses at {at}"
        );
        assert_eq!(
            fresh.parts().flatten().copied().collect::<Vec<u8>>(),
            tasker_engine::codec::canonical_bytes(&self.state.to_snapshot()).unwrap(),
            "snapshot bytes at {at}"
        );
        self.checkpoints.push((self.log.len(), digest));
    }

    fn run(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..self.scenario.initial_tasks {
            self.request()?;
        }
        for _ in 0..MAX_ITERATIONS {
            self.now += self.rng.below(20) as u64;
            if self.rng.chance(3) {
                self.checkpoint();
            }
            if self.rng.chance(4) {
                self.stale_input()?;
            }
            if self.tasks.len() < MAX_TASKS && self.rng.chance(2) {
                self.request()?;
                continue;
            }
            if self.rng.chance(2)
                && let Some(&(task, correlation_id)) =
                    self.tasks.get(self.rng.below(self.tasks.len()))
            {
                // Nothing was cut short: reconciling decides nothing.
                let before = self.log.len();
                self.reconcile(task, correlation_id)?;
                prop_assert_eq!(
                    self.log.len(),
                    before,
                    "reconcile of {} without a crash decided events",
                    task
                );
            }
            let operator_pct = if self.failures_left() { 5 } else { 0 };
            if self.rng.chance(operator_pct) {
                self.operator()?;
                continue;
            }
            let now = self.at();
            let running = self.steps_where(|t, s| {
                t == TaskStatus::InProgress && s.status == StepStatus::InProgress
            });
            let due = self.steps_where(|t, s| {
                t == TaskStatus::InProgress
                    && s.status == StepStatus::Error
                    && s.retry_at.is_some_and(|at| at <= now)
            });
            let ready = self.steps_where(|t, s| {
                matches!(t, TaskStatus::Pending | TaskStatus::InProgress)
                    && s.status == StepStatus::Pending
            });
            let ready: Vec<(TaskId, StepId)> = ready
                .into_iter()
                .filter(|(t, s)| self.state.task(t).is_some_and(|t| t.is_step_ready(*s, now)))
                .collect();
            if !ready.is_empty() {
                if (running.is_empty() && due.is_empty()) || self.rng.chance(35) {
                    self.start_some(ready)?;
                    continue;
                }
                self.coverage.waited += 1;
            }
            let (running_pick, due_pick) = (self.rng.pick(&running), self.rng.pick(&due));
            if let Some((task, step)) =
                due_pick.filter(|_| running.is_empty() || self.rng.chance(30))
            {
                self.coverage.retries_due += 1;
                self.internal(Input::RetryDue { task, step })?;
                continue;
            }
            if let Some((task, step)) = running_pick {
                self.finish_step(task, step)?;
                continue;
            }
            let next_retry = self
                .steps_where(|t, s| t == TaskStatus::InProgress && s.is_awaiting_retry())
                .iter()
                .filter_map(|(t, s)| self.state.task(t).and_then(|t| t.steps[s.index()].retry_at))
                .min();
            if let Some(at) = next_retry {
                self.now = self.now.max(at.as_millis());
                continue;
            }
            // Nothing runs: only tasks in error (or finished ones) are left.
            let failed = self.tasks_in(TaskStatus::Error);
            let Some(task) = self.rng.pick(&failed) else {
                self.checkpoint();
                return Ok(());
            };
            if self.eventually() {
                self.retry(task)?;
            } else if self.rng.chance(15) {
                self.checkpoint();
                return Ok(()); // leave the rest in error
            } else {
                self.operator()?;
            }
        }
        prop_assert!(
            !self.eventually(),
            "the run did not settle within {} inputs",
            MAX_ITERATIONS
        );
        self.checkpoint();
        Ok(())
    }

    /// (d) When failures stop and nobody cancels, every task finishes.
    fn check_eventually(&self) -> Result<(), TestCaseError> {
        for (id, task) in &self.model.tasks {
            let ok = match task.status {
                TaskStatus::Complete => true,
                TaskStatus::ResolvedManually => task.resolved,
                _ => false,
            };
            prop_assert!(
                ok,
                "task {} ended {:?} (resolved by hand: {})",
                id,
                task.status,
                task.resolved
            );
            prop_assert!(task.steps.iter().all(|s| s.status.is_done_ok()));
            if !task.skipped_dependents {
                prop_assert!(!task.steps.iter().any(|s| s.status == StepStatus::Skipped));
            }
            if !task.resolved {
                prop_assert!(task.steps.iter().all(|s| s.status == StepStatus::Complete));
            }
        }
        prop_assert_eq!(self.model.tasks.len(), self.tasks.len());
        Ok(())
    }

    /// (a) Folding the log's bytes again gives the live digest and chain, at every
    /// checkpoint and at the end, whatever the retention.
    fn check_replay(&self) -> Result<(), TestCaseError> {
        let live = self.state.digest();
        let mut retentions = vec![DEFAULT_RETENTION_MS, 1, 0, self.scenario.live_retention_ms];
        retentions.sort_unstable();
        retentions.dedup();
        for retention in retentions {
            let mut state = State::new(retention);
            let mut chain = HashChain::genesis(PartitionId(0));
            let mut checkpoints = self.checkpoints.iter().peekable();
            while let Some((0, digest)) = checkpoints.peek() {
                prop_assert_eq!(State::new(retention).digest(), *digest);
                checkpoints.next();
            }
            for (i, bytes) in self.log.iter().enumerate() {
                let env = codec::decode(bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let applied = state.apply(&env);
                prop_assert!(
                    matches!(applied, Applied::Event | Applied::Command),
                    "replay with retention {} at {}: {:?}",
                    retention,
                    i,
                    applied
                );
                chain.push(bytes);
                while let Some((n, digest)) = checkpoints.peek() {
                    if *n != i + 1 {
                        break;
                    }
                    prop_assert_eq!(
                        state.digest(),
                        *digest,
                        "digest after {} records, retention {}",
                        n,
                        retention
                    );
                    checkpoints.next();
                }
            }
            prop_assert_eq!(
                state.digest(),
                live,
                "final digest, retention {}",
                retention
            );
            prop_assert_eq!(chain, self.chain);
            prop_assert_eq!(state.answered(), self.state.answered());
            // Eviction really happened when a task finished before the last record.
            let last_at = self
                .log
                .last()
                .map(|b| codec::decode(b).map(|e| e.at))
                .transpose()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let (Some(done), Some(last)) = (self.model.last_final_at, last_at)
                && done.saturating_add_ms(retention) < last
                && retention <= 1
            {
                prop_assert!(
                    state.stats().evicted > 0,
                    "nothing evicted with retention {}",
                    retention
                );
            }
        }
        Ok(())
    }

    /// The chain is equal over equal records and changes when one record changes.
    fn check_chain(&mut self) -> Result<(), TestCaseError> {
        let n = self.log.len();
        for _ in 0..4 {
            let i = self.rng.below(n);
            let mut record = self.log[i].clone();
            let byte = self.rng.below(record.len());
            record[byte] ^= 1 << self.rng.below(8);
            let mut chain = if i == 0 {
                HashChain::genesis(PartitionId(0))
            } else {
                self.heads[i - 1]
            };
            let mut same = chain;
            same.push(&self.log[i]);
            prop_assert_eq!(same, self.heads[i]);
            chain.push(&record);
            prop_assert_ne!(
                chain.head(),
                self.heads[i].head(),
                "flipped record {} kept its head",
                i
            );
            for bytes in &self.log[i + 1..] {
                chain.push(bytes);
            }
            prop_assert_eq!(chain.count(), self.chain.count());
            prop_assert_ne!(
                chain.head(),
                self.chain.head(),
                "flipped record {} kept the final head",
                i
            );
        }
        Ok(())
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// The simulated engine's log: every record round-trips, every step waits for its
    /// parents and stays within its retry limit, and replay reproduces the live
    /// digest and hash chain at every checkpoint, with any retention.
    #[test]
    fn simulated_runs_replay_to_the_live_digest(scenario in scenario()) {
        let mut sim = Sim::new(&scenario);
        sim.run()?;
        if sim.eventually() {
            sim.check_eventually()?;
        }
        sim.check_replay()?;
        sim.check_chain()?;
        let c = sim.coverage;
        // Steps start when the engine gets to them, so a task may be cancelled first.
        let all_cancelled_before_starting = sim.model.tasks.values().all(|t| {
            t.status == TaskStatus::Cancelled && t.steps.iter().all(|s| s.attempts == 0)
        });
        prop_assert!(
            c.events > 0 && (c.started > 0 || all_cancelled_before_starting),
            "nothing happened: {:?}",
            c
        );
    }

}

proptest! {
    #![proptest_config(config(256))]

    /// Equal records give equal chains; flipping one bit of one record, dropping one
    /// or swapping two changes the head.
    #[test]
    fn hash_chain_changes_with_any_record(
        records in vec(vec(any::<u8>(), 0..48), 1..40),
        at in any::<Index>(),
        bit in 0..8u32,
        partition in 0..4u32,
    ) {
        let chain = |rs: &[Vec<u8>]| {
            let mut c = HashChain::genesis(PartitionId(partition));
            for r in rs {
                c.push(r);
            }
            c
        };
        let original = chain(&records);
        prop_assert_eq!(original, chain(&records));
        prop_assert_eq!(original.count(), records.len() as u64);
        let i = at.index(records.len());

        let mut flipped = records.clone();
        match flipped[i].len() {
            0 => flipped[i].push(0),
            len => flipped[i][(bit as usize * 7) % len] ^= 1 << bit,
        }
        prop_assert_ne!(chain(&flipped).head(), original.head());

        let mut dropped = records.clone();
        dropped.remove(i);
        prop_assert_ne!(chain(&dropped).head(), original.head());

        let j = (i + 1) % records.len();
        if records[i] != records[j] {
            let mut swapped = records.clone();
            swapped.swap(i, j);
            prop_assert_ne!(chain(&swapped).head(), original.head());
        }

        let mut other = HashChain::genesis(PartitionId(partition + 1));
        for r in &records {
            other.push(r);
        }
        prop_assert_ne!(other.head(), original.head());
    }

    /// Commands with arbitrary text round-trip through bincode and, as any client
    /// would publish them, through JSON.
    #[test]
    fn commands_round_trip_through_both_encodings(
        text in vec("\\PC{1,12}", 6),
        tags in vec("\\PC{0,8}", 0..4),
        attempt in 1..10u32,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let value = serde_json::json!({ "text": text[0], "n": seed, "list": tags });
        let commands = [
            Command::RequestTask(RequestTask {
                namespace: format!("ns{}", text[1].trim()),
                name: format!("n{}", text[2].trim()),
                version: rng.chance(50).then(|| "^1".to_owned()),
                context: RawJson::from_value(&value),
                idempotency_key: rng.chance(50).then(|| text[3].clone()),
                initiator: Some(text[4].clone()),
                source_system: None,
                reason: Some(text[5].clone()),
                tags,
            }),
            Command::CancelTask(CancelTask { requested_by: Some(text[0].clone()), reason: None }),
            Command::RetryTask(RetryTask { requested_by: None, reason: Some(text[1].clone()) }),
            Command::ResolveStep(ResolveStep {
                step: format!("s{}", text[2].trim()),
                result: rng.chance(50).then(|| RawJson::from_value(&value)),
                resolved_by: Some(text[3].clone()),
                reason: None,
                skip_dependents: rng.chance(50),
            }),
            Command::ReportStepResult(ReportStepResult {
                step: format!("s{}", text[4].trim()),
                attempt,
                outcome: StepOutcome::Completed { result: RawJson::from_value(&value) },
            }),
            Command::ReportStepResult(ReportStepResult {
                step: "s".into(),
                attempt,
                outcome: StepOutcome::Failed(StepError {
                    kind: [StepErrorKind::Retryable, StepErrorKind::Permanent, StepErrorKind::Timeout][rng.below(3)],
                    message: text[5].clone(),
                    retry_after_ms: rng.chance(50).then(|| rng.next() >> 12),
                }),
            }),
        ];
        for command in commands {
            let env = Envelope::command(
                TaskId::v7(Timestamp(START_MS), rng.u128()),
                CorrelationId::from_uuid(uuid::Uuid::from_u128(rng.u128())),
                Timestamp(rng.next() >> 20),
                command,
            );
            let bytes = codec::encode(&env).unwrap();
            prop_assert_eq!(&codec::decode(&bytes).unwrap(), &env);
            let json = codec::command_to_json(&env).unwrap();
            let back = codec::decode_json_command(json.as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{e}: {json}")))?;
            prop_assert_eq!(back.task_id, Some(env.task_id));
            prop_assert_eq!(back.correlation_id, Some(env.correlation_id));
            prop_assert_eq!(back.at, Some(env.at));
            prop_assert_eq!(Body::Command(back.command), env.body);
        }
    }
}

/// Decides `input` and applies what it decided (or its first `keep` events).
fn step(state: &mut State, task: TaskId, input: Input<'_>, keep: usize, now: u64) -> usize {
    let events = decide(state, input, Timestamp(START_MS + now)).unwrap();
    let n = events.len();
    for event in events.into_iter().take(keep) {
        let env = Envelope {
            task_id: task,
            correlation_id: CorrelationId::NIL,
            source_position: None,
            epoch: Epoch(0),
            at: Timestamp(START_MS + now),
            body: Body::Event(event),
        };
        assert_eq!(state.apply(&env), Applied::Event);
    }
    n
}

fn requested(state: &mut State, template: TemplateSnapshot) -> TaskId {
    let task = TaskId::v7(Timestamp(START_MS), 7);
    let dag: Resolution = Ok(Arc::new(Dag::new(Arc::new(template))));
    let command = Command::RequestTask(RequestTask::default());
    let input = Input::Command {
        task,
        command: &command,
        resolution: Some(&dag),
    };
    step(state, task, input, usize::MAX, 0);
    task
}

/// A template whose step `i` has the parents `parents[i]`.
fn fixed_template(index: usize, parents: &[&[u32]]) -> TemplateSnapshot {
    let step = StepGen {
        parents: Vec::new(),
        retryable: true,
        retry_limit: 3,
        initial_ms: 10,
        jitter_pct: 0,
    };
    let mut t = snapshot(index, &vec![step; parents.len()]);
    for (spec, ps) in t.steps.iter_mut().zip(parents) {
        spec.depends_on = ps.iter().map(|&p| StepId(p)).collect();
    }
    t
}

/// Starts `steps` of `task`, each in its own `StartStep` batch.
fn start(state: &mut State, task: TaskId, steps: &[u32], now: u64) {
    for &i in steps {
        let input = Input::StartStep {
            task,
            step: StepId(i),
        };
        step(state, task, input, usize::MAX, now);
    }
}

// A crash can cut a cancel or a `skip_dependents` resolve after its first events
// (wherever a batch is not atomic, e.g. on Kafka); the command then counts as
// answered, so only `Reconcile` can finish what it started.

#[test]
fn reconcile_finishes_a_cut_short_cancel() {
    // s0 and s1 both run; the cancel's batch loses all but its first event.
    let mut state = State::default();
    let task = requested(&mut state, fixed_template(0, &[&[], &[]]));
    start(&mut state, task, &[0, 1], 1);
    let cancel = Command::CancelTask(CancelTask::default());
    let input = Input::Command {
        task,
        command: &cancel,
        resolution: None,
    };
    assert_eq!(
        step(&mut state, task, input, 1, 5),
        3,
        "2 x step.cancelled, task.cancelled"
    );
    assert_eq!(
        step(&mut state, task, Input::Reconcile { task }, usize::MAX, 6),
        2,
        "step.cancelled, task.cancelled"
    );
    let t = state.task(&task).unwrap();
    let steps: Vec<StepStatus> = t.steps.iter().map(|s| s.status).collect();
    assert_eq!(t.status, TaskStatus::Cancelled, "steps {steps:?}");
    assert_eq!(steps, [StepStatus::Cancelled, StepStatus::Cancelled]);
    // s1's late result is stale, and there is nothing left to reconcile
    let done = StepOutcome::Completed {
        result: RawJson::null(),
    };
    let input = Input::StepFinished {
        task,
        step: StepId(1),
        attempt: 1,
        outcome: &done,
    };
    let late = decide(&state, input, Timestamp(START_MS + 7)).map_err(|r| r.reason);
    assert_eq!(late, Err(RejectReason::StaleAttempt));
    assert_eq!(
        step(&mut state, task, Input::Reconcile { task }, usize::MAX, 8),
        0
    );
}

#[test]
fn reconcile_finishes_a_cut_short_skip() {
    // s2 <- s0, s3 <- s2; s1 runs on. s0 fails and is resolved with skip_dependents;
    // the batch keeps `step.resolved_manually(s0)` and `step.skipped(s2)` only.
    let mut state = State::default();
    let task = requested(&mut state, fixed_template(1, &[&[], &[], &[0], &[2]]));
    start(&mut state, task, &[0, 1], 1);
    let flaky = StepOutcome::Failed(StepError::retryable("flaky"));
    let input = Input::StepFinished {
        task,
        step: StepId(0),
        attempt: 1,
        outcome: &flaky,
    };
    step(&mut state, task, input, usize::MAX, 1);
    let resolve = Command::ResolveStep(ResolveStep {
        step: "s0".into(),
        skip_dependents: true,
        ..ResolveStep::default()
    });
    let input = Input::Command {
        task,
        command: &resolve,
        resolution: None,
    };
    assert_eq!(
        step(&mut state, task, input, 2, 2),
        3,
        "resolved, 2 x skipped"
    );
    assert_eq!(
        step(&mut state, task, Input::Reconcile { task }, usize::MAX, 3),
        1,
        "step.skipped(s3)"
    );
    let done = StepOutcome::Completed {
        result: RawJson::null(),
    };
    let input = Input::StepFinished {
        task,
        step: StepId(1),
        attempt: 1,
        outcome: &done,
    };
    step(&mut state, task, input, usize::MAX, 4);
    assert_eq!(
        step(&mut state, task, Input::Reconcile { task }, usize::MAX, 5),
        0
    );
    let t = state.task(&task).unwrap();
    let steps: Vec<StepStatus> = t.steps.iter().map(|s| s.status).collect();
    assert_eq!(t.status, TaskStatus::Complete, "steps {steps:?}");
    assert_eq!(
        steps,
        [
            StepStatus::ResolvedManually,
            StepStatus::Complete,
            StepStatus::Skipped,
            StepStatus::Skipped
        ]
    );
}

#[test]
fn digest_does_not_depend_on_retention_when_a_task_id_comes_back() {
    // Live engine with 1 ms retention: the task finishes, leaves memory, and a
    // client sends `task.requested` with the same id again.
    let template = fixed_template(0, &[&[]]);
    let dag: Resolution = Ok(Arc::new(Dag::new(Arc::new(template))));
    let request = Command::RequestTask(RequestTask::default());
    let done = StepOutcome::Completed {
        result: RawJson::null(),
    };
    let (task, other) = (
        TaskId::v7(Timestamp(START_MS), 7),
        TaskId::v7(Timestamp(START_MS), 8),
    );
    let mut live = State::new(1);
    let mut log = Vec::new();
    let inputs = [
        (
            task,
            Input::Command {
                task,
                command: &request,
                resolution: Some(&dag),
            },
        ),
        (
            task,
            Input::StartStep {
                task,
                step: StepId(0),
            },
        ),
        (
            task,
            Input::StepFinished {
                task,
                step: StepId(0),
                attempt: 1,
                outcome: &done,
            },
        ),
        (
            other,
            Input::Command {
                task: other,
                command: &request,
                resolution: Some(&dag),
            },
        ),
        (
            task,
            Input::Command {
                task,
                command: &request,
                resolution: Some(&dag),
            },
        ),
    ];
    for (now, (id, input)) in inputs.into_iter().enumerate() {
        let at = Timestamp(START_MS + 10 * now as u64);
        for event in decide(&live, input, at).unwrap() {
            let env = Envelope {
                task_id: id,
                correlation_id: CorrelationId::NIL,
                source_position: None,
                epoch: Epoch(0),
                at,
                body: Body::Event(event),
            };
            assert_eq!(live.apply(&env), Applied::Event);
            log.push(codec::encode(&env).unwrap());
        }
    }
    assert_eq!(live.stats().evicted, 1, "the first task left memory");
    let mut replay = State::default();
    for bytes in &log {
        let applied = replay.apply(&codec::decode(bytes).unwrap());
        assert_eq!(applied, Applied::Event);
    }
    assert_eq!(
        replay.stats().evicted,
        0,
        "nothing left memory by retention"
    );
    assert_eq!(replay.digest(), live.digest());
    assert_eq!(replay.task_count(), live.task_count());
}
