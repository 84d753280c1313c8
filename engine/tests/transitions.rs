//! The task and step state machines, exhaustively: every allowed transition through
//! `decide` and the fold, every refused input with its `RejectReason`, every event
//! the fold must ignore (illegal or fenced), retries, readiness and settling.
//!
//! Tests read `given(events).when(input).then_events([...])` or
//! `.then_rejected(reason)`. `given` folds its events with `State::apply` (each
//! must be legal); `then_events` checks `decide`'s answer, folds it too (each event
//! must apply) and returns the new `Given`, so scenarios chain.
//!
//! `decide` never starts a step by itself: the runtime starts ready steps with
//! `Input::StartStep` when it has room, so scenarios start them explicitly
//! (`.when(start(step))`, or `.start_ready([...])` for every ready step). After
//! every batch, `StartStep` must be accepted exactly for the steps
//! `TaskState::is_step_ready` calls ready.

// Test code: clippy.toml's allow-*-in-tests covers `#[test]` functions only, not
// the helpers of an integration-test crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use tasker_engine::decide::{self, Input, Rejection, Resolution};
use tasker_engine::record::{
    Body, CancelTask, Command, Control, CorrelationId, Envelope, Epoch, Event, PartitionClaimed,
    Position, RawJson, RejectReason, ReportStepResult, RequestTask, ResolveStep, RetryTask,
    StepCancelled, StepCompleted, StepError, StepFailed, StepId, StepOutcome, StepResolvedManually,
    StepRetryDue, StepSkipped, StepStarted, TaskAccepted, TaskCancelled, TaskFailed, TaskId,
    TaskRetried, Timestamp,
};
use tasker_engine::state::{
    Applied, ApplyError, State, StepState, StepStatus, TaskState, TaskStatus,
};
use tasker_engine::template::Template;
use uuid::Uuid;

const TASK: TaskId = TaskId::from_uuid(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001));
const OTHER: TaskId = TaskId::from_uuid(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002));
const CORRELATION: CorrelationId =
    CorrelationId::from_uuid(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00c0));
const T0: u64 = 1_700_000_000_000;

/// `ms` after the start of every scenario.
fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(T0 + ms)
}

// ---- templates ----

/// One step with the default retry policy (3 attempts, 1 s backoff doubling to 300 s).
const SINGLE: &str = r#"
namespace: shop
name: single
version: 1.0.0
steps:
  - name: a
    handler: noop
"#;

/// a -> b -> c
const CHAIN: &str = r#"
namespace: shop
name: chain
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - { name: b, handler: noop, depends_on: [a] }
  - { name: c, handler: noop, depends_on: [b] }
"#;

/// a -> (b, c) -> d, declared out of order on purpose: topological order is
/// a, c, b, d (lowest declaration index first), so c starts before b.
const DIAMOND: &str = r#"
namespace: shop
name: diamond
version: 1.0.0
steps:
  - { name: d, handler: noop, depends_on: [b, c] }
  - { name: a, handler: noop }
  - { name: c, handler: noop, depends_on: [a] }
  - { name: b, handler: noop, depends_on: [a] }
"#;

/// a -> b -> c, and z on its own.
const FORK: &str = r#"
namespace: shop
name: fork
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - { name: b, handler: noop, depends_on: [a] }
  - { name: c, handler: noop, depends_on: [b] }
  - { name: z, handler: noop }
"#;

/// Two independent roots.
const PAIR: &str = r#"
namespace: shop
name: pair
version: 1.0.0
steps:
  - { name: x, handler: noop }
  - { name: y, handler: noop }
"#;

fn template(yaml: &str) -> Template {
    Template::from_yaml(yaml, "transitions.yaml").unwrap()
}

/// Step ids by name (the snapshot is in topological order, not declaration order).
fn ids<const N: usize>(t: &Template, names: [&str; N]) -> [StepId; N] {
    names.map(|n| t.snapshot().step_id(n).unwrap())
}

fn request(t: &Template) -> RequestTask {
    RequestTask {
        namespace: t.namespace().to_owned(),
        name: t.name().to_owned(),
        context: RawJson::parse(r#"{"order_id":7}"#).unwrap(),
        ..RequestTask::default()
    }
}

fn result() -> RawJson {
    RawJson::parse(r#"{"ok":true}"#).unwrap()
}

fn retryable() -> StepError {
    StepError::retryable("HTTP 503")
}

fn permanent() -> StepError {
    StepError::permanent("HTTP 400")
}

// ---- events ----

fn accepted(t: &Template) -> Event {
    accepted_with(t, request(t))
}

fn accepted_with(t: &Template, request: RequestTask) -> Event {
    Event::TaskAccepted(TaskAccepted {
        request,
        template: Arc::clone(t.dag().shared_snapshot()),
    })
}

fn started(step: StepId, attempt: u32) -> Event {
    Event::StepStarted(StepStarted { step, attempt })
}

fn completed(step: StepId, attempt: u32) -> Event {
    Event::StepCompleted(StepCompleted {
        step,
        attempt,
        result: result(),
    })
}

fn failed(step: StepId, attempt: u32, error: StepError, retry_at: Option<Timestamp>) -> Event {
    Event::StepFailed(StepFailed {
        step,
        attempt,
        error,
        retry_at,
    })
}

fn retry_due(step: StepId, reset_attempts: bool) -> Event {
    Event::StepRetryDue(StepRetryDue {
        step,
        reset_attempts,
    })
}

fn skipped(step: StepId, because: &str) -> Event {
    Event::StepSkipped(StepSkipped {
        step,
        reason: format!("`{because}` was resolved with skip_dependents"),
    })
}

/// `step.skipped` as skip propagation writes it.
fn skipped_after(step: StepId, parent: &str) -> Event {
    Event::StepSkipped(StepSkipped {
        step,
        reason: format!("parent `{parent}` was skipped"),
    })
}

fn step_cancelled(step: StepId) -> Event {
    Event::StepCancelled(StepCancelled { step })
}

fn resolved(step: StepId) -> Event {
    Event::StepResolvedManually(StepResolvedManually {
        step,
        result: RawJson::null(),
        resolved_by: Some("ops".into()),
        reason: Some("fixed by hand".into()),
    })
}

fn task_failed(steps: &[StepId]) -> Event {
    Event::TaskFailed(TaskFailed {
        failed_steps: steps.to_vec(),
    })
}

fn task_cancelled() -> Event {
    Event::TaskCancelled(TaskCancelled {
        requested_by: Some("ops".into()),
        reason: Some("no longer needed".into()),
    })
}

/// `task.retried` as an operator's retry writes it.
fn task_retried() -> Event {
    Event::TaskRetried(TaskRetried {
        requested_by: Some("ops".into()),
        reason: Some("try again".into()),
    })
}

/// `task.cancelled` as `Reconcile` writes it to finish a cut-short cancel.
fn task_cancelled_by_reconcile() -> Event {
    Event::TaskCancelled(TaskCancelled {
        requested_by: None,
        reason: Some("completing a cancellation interrupted by a crash".into()),
    })
}

/// `task.retried` as `Reconcile` writes it for a failed task whose failures were
/// all resolved.
fn task_retried_by_reconcile() -> Event {
    Event::TaskRetried(TaskRetried {
        requested_by: None,
        reason: Some("failed steps resolved".into()),
    })
}

/// `task.retried` as resolving step `name` writes it.
fn task_retried_by_resolving(name: &str) -> Event {
    Event::TaskRetried(TaskRetried {
        requested_by: Some("ops".into()),
        reason: Some(format!("step `{name}` resolved manually")),
    })
}

// ---- inputs ----

#[derive(Debug)]
enum When {
    Command(Box<Command>, Option<Resolution>),
    Finished {
        step: StepId,
        attempt: u32,
        outcome: StepOutcome,
    },
    RetryDue(StepId),
    Start(StepId),
    Reconcile,
}

fn start(step: StepId) -> When {
    When::Start(step)
}

fn command(command: Command, resolution: Option<Resolution>) -> When {
    When::Command(Box::new(command), resolution)
}

fn requested(t: &Template) -> When {
    requested_with(t, request(t))
}

fn requested_with(t: &Template, request: RequestTask) -> When {
    command(Command::RequestTask(request), Some(Ok(Arc::clone(t.dag()))))
}

fn cancel() -> When {
    command(
        Command::CancelTask(CancelTask {
            requested_by: Some("ops".into()),
            reason: Some("no longer needed".into()),
        }),
        None,
    )
}

fn retry() -> When {
    command(
        Command::RetryTask(RetryTask {
            requested_by: Some("ops".into()),
            reason: Some("try again".into()),
        }),
        None,
    )
}

fn resolve(name: &str, skip_dependents: bool) -> When {
    command(
        Command::ResolveStep(ResolveStep {
            step: name.into(),
            result: None,
            resolved_by: Some("ops".into()),
            reason: Some("fixed by hand".into()),
            skip_dependents,
        }),
        None,
    )
}

fn report(name: &str, attempt: u32, outcome: StepOutcome) -> When {
    command(
        Command::ReportStepResult(ReportStepResult {
            step: name.into(),
            attempt,
            outcome,
        }),
        None,
    )
}

fn succeeds(step: StepId, attempt: u32) -> When {
    When::Finished {
        step,
        attempt,
        outcome: StepOutcome::Completed { result: result() },
    }
}

fn fails(step: StepId, attempt: u32, error: StepError) -> When {
    When::Finished {
        step,
        attempt,
        outcome: StepOutcome::Failed(error),
    }
}

// ---- given / when / then ----

#[derive(Clone)]
struct Given {
    state: State,
    now: Timestamp,
    /// The next command position folded events claim to answer, so `answered` is
    /// live state that ignored events must not touch.
    command: u64,
}

fn given(events: impl IntoIterator<Item = Event>) -> Given {
    let mut g = Given {
        state: State::default(),
        now: ts(0),
        command: 0,
    };
    for (i, event) in events.into_iter().enumerate() {
        let applied = g.fold(&event);
        assert_eq!(
            applied,
            Applied::Event,
            "given event #{i} does not fold: {event:?}"
        );
    }
    assert_starts_exactly_the_ready_steps(&g);
    g
}

impl Given {
    /// Decide (and fold) from now on at `ms` after the scenario's start.
    fn at(self, ms: u64) -> Self {
        self.at_time(ts(ms))
    }

    fn at_time(mut self, now: Timestamp) -> Self {
        self.now = now;
        self
    }

    fn envelope(&self, event: Event) -> Envelope {
        self.envelope_for(TASK, event)
    }

    fn envelope_for(&self, task: TaskId, event: Event) -> Envelope {
        Envelope {
            task_id: task,
            correlation_id: CORRELATION,
            source_position: None,
            epoch: Epoch(0),
            at: self.now,
            body: Body::Event(event),
        }
    }

    fn fold_envelope(&mut self, env: &Envelope) -> Applied {
        self.state.apply(env)
    }

    /// Folds one event of `TASK`, written now in answer to the next command.
    fn fold(&mut self, event: &Event) -> Applied {
        self.fold_for(TASK, event)
    }

    /// Folds one event of `task`, written now in answer to the next command.
    fn fold_for(&mut self, task: TaskId, event: &Event) -> Applied {
        let env = Envelope {
            source_position: Some(Position(self.command)),
            ..self.envelope_for(task, event.clone())
        };
        self.command += 1;
        self.fold_envelope(&env)
    }

    fn task(&self) -> &TaskState {
        self.state.task(&TASK).unwrap()
    }

    fn step(&self, step: StepId) -> &StepState {
        self.task().step(step).unwrap()
    }

    fn when(self, input: When) -> Then {
        self.when_for(TASK, input)
    }

    fn when_for(self, task: TaskId, input: When) -> Then {
        let result = self.decide(task, &input);
        assert_eq!(
            result,
            self.decide(task, &input),
            "decide is not deterministic"
        );
        Then {
            given: self,
            task,
            result,
            starts: matches!(input, When::Start(_)),
            input: format!("{input:?}"),
        }
    }

    /// Starts every step `is_step_ready` calls ready, in step order, one
    /// `StartStep` each, after checking that they are exactly `expected`.
    #[track_caller]
    fn start_ready<const N: usize>(self, expected: [StepId; N]) -> Given {
        let task = self.task();
        let ready: Vec<StepId> = task
            .dag
            .step_ids()
            .filter(|s| task.is_step_ready(*s, self.now))
            .collect();
        assert_eq!(ready, expected, "the ready steps");
        let mut g = self;
        for step in ready {
            let mut events = Vec::new();
            if g.task().status == TaskStatus::Pending {
                events.push(Event::TaskStarted);
            }
            events.push(started(step, g.step(step).attempts + 1));
            g = g.when(start(step)).then_events(events);
        }
        g
    }

    fn decide(&self, task: TaskId, input: &When) -> Result<Vec<Event>, Rejection> {
        let input = match input {
            When::Command(command, resolution) => Input::Command {
                task,
                command,
                resolution: resolution.as_ref(),
            },
            When::Finished {
                step,
                attempt,
                outcome,
            } => Input::StepFinished {
                task,
                step: *step,
                attempt: *attempt,
                outcome,
            },
            When::RetryDue(step) => Input::RetryDue { task, step: *step },
            When::Start(step) => Input::StartStep { task, step: *step },
            When::Reconcile => Input::Reconcile { task },
        };
        decide::decide(&self.state, input, self.now)
    }
}

struct Then {
    given: Given,
    task: TaskId,
    result: Result<Vec<Event>, Rejection>,
    /// The input was `StartStep`, the only one that may start anything.
    starts: bool,
    input: String,
}

impl Then {
    /// `decide` answered exactly `expected`; they fold, and afterwards `StartStep`
    /// is accepted exactly for the steps `TaskState::is_step_ready` calls ready.
    #[track_caller]
    fn then_events(self, expected: impl IntoIterator<Item = Event>) -> Given {
        let expected: Vec<Event> = expected.into_iter().collect();
        let (events, given) = self.then_ok();
        assert_eq!(events, expected);
        given
    }

    /// `decide` accepted the input; returns its events (already folded) for
    /// assertions `then_events` cannot express.
    #[track_caller]
    fn then_ok(self) -> (Vec<Event>, Given) {
        let events = match self.result {
            Ok(events) => events,
            Err(r) => panic!("when {}: expected events, got rejection {r}", self.input),
        };
        if !self.starts {
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, Event::StepStarted(_) | Event::TaskStarted)),
                "when {}: decide started something by itself: {events:?}",
                self.input
            );
        }
        let mut given = self.given;
        for (i, event) in events.iter().enumerate() {
            let applied = given.fold_for(self.task, event);
            assert_eq!(
                applied,
                Applied::Event,
                "decided event #{i} does not fold: {event:?}"
            );
        }
        assert_starts_exactly_the_ready_steps(&given);
        (events, given)
    }

    #[track_caller]
    fn then_rejected(self, reason: RejectReason) -> Given {
        match self.result {
            Err(r) => assert_eq!(r.reason, reason, "when {}: {}", self.input, r.message),
            Ok(events) => panic!("when {}: expected {reason:?}, got {events:?}", self.input),
        }
        self.given
    }
}

/// Readiness as `StartStep` sees it equals readiness as `TaskState::is_step_ready`
/// sees it, for every step of every task: a ready pending step starts (deciding
/// exactly `[task.started if the task is pending, step.started(attempts + 1)]`,
/// which folds), every other step is refused as stale. A ready step in error (its
/// backoff elapsed) is not started directly: its `step.retry_due` comes first, then
/// it starts like any pending step.
#[track_caller]
fn assert_starts_exactly_the_ready_steps(g: &Given) {
    for task in g.state.tasks() {
        let id = task.id;
        for step in task.dag.step_ids() {
            let ready = task.is_step_ready(step, g.now);
            let s = task.step(step).unwrap();
            let decided = decide::decide(&g.state, Input::StartStep { task: id, step }, g.now);
            if ready && s.status == StepStatus::Error {
                assert_eq!(
                    decided.map_err(|r| r.reason),
                    Err(RejectReason::StaleAttempt),
                    "step {step} in error started before its retry was due"
                );
                let mut after = g.clone();
                let due = decide::decide(&after.state, Input::RetryDue { task: id, step }, g.now)
                    .unwrap_or_else(|r| panic!("ready step {step} in error: retry refused: {r}"));
                assert_eq!(due, [retry_due(step, false)]);
                assert_eq!(after.fold_for(id, &due[0]), Applied::Event);
                let start =
                    decide::decide(&after.state, Input::StartStep { task: id, step }, g.now);
                assert_eq!(start, Ok(vec![started(step, s.attempts + 1)]));
                continue;
            }
            match decided {
                Ok(events) => {
                    assert!(
                        ready,
                        "StartStep started step {step} ({}) of task {id} ({}), which \
                         is_step_ready calls not ready",
                        s.status.as_str(),
                        task.status.as_str()
                    );
                    let mut expected = Vec::new();
                    if task.status == TaskStatus::Pending {
                        expected.push(Event::TaskStarted);
                    }
                    expected.push(started(step, s.attempts + 1));
                    assert_eq!(events, expected, "StartStep of step {step}");
                    let mut after = g.clone();
                    for event in &events {
                        assert_eq!(after.fold_for(id, event), Applied::Event, "{event:?}");
                    }
                }
                Err(r) => {
                    assert!(
                        !ready,
                        "step {step} of task {id} is ready but StartStep refused it: {r}"
                    );
                    assert_eq!(r.reason, RejectReason::StaleAttempt, "{}", r.message);
                }
            }
        }
    }
}

// ---- task transitions through decide ----

#[test]
fn request_accepts_the_task_and_starts_nothing() {
    let t = template(DIAMOND);
    let [a, b, c, d] = ids(&t, ["a", "b", "c", "d"]);
    let g = given([]).when(requested(&t)).then_events([accepted(&t)]);
    let task = g.task();
    assert_eq!(task.status, TaskStatus::Pending);
    assert_eq!(task.accepted_at, ts(0));
    assert_eq!(task.started_at, None);
    assert!(task.is_step_ready(a, ts(0)), "the root is ready");
    for s in [a, b, c, d] {
        assert_eq!(g.step(s).status, StepStatus::Pending);
        assert_eq!(g.step(s).attempts, 0);
    }
    for s in [b, c, d] {
        assert!(!task.is_step_ready(s, ts(0)));
    }
    // reconciling does not start it either: starting is the runtime's decision
    let g = g.when(When::Reconcile).then_events([]);
    assert_eq!(g.task().status, TaskStatus::Pending);
}

#[test]
fn starting_the_first_step_starts_the_task() {
    let t = template(PAIR);
    let [x, y] = ids(&t, ["x", "y"]);
    let g = given([])
        .when(requested(&t))
        .then_events([accepted(&t)])
        .at(5)
        .when(start(y))
        .then_events([Event::TaskStarted, started(y, 1)]);
    assert_eq!(g.task().status, TaskStatus::InProgress);
    assert_eq!(g.task().started_at, Some(ts(5)));
    assert_eq!(g.step(y).status, StepStatus::InProgress);
    assert_eq!(g.step(y).attempts, 1);
    assert_eq!(g.step(y).started_at, Some(ts(5)));
    // the second start finds the task running
    let g = g.at(8).when(start(x)).then_events([started(x, 1)]);
    assert_eq!(g.task().started_at, Some(ts(5)));
    assert_eq!(g.step(x).started_at, Some(ts(8)));
    // a step is started once
    for s in [x, y] {
        g.clone()
            .when(start(s))
            .then_rejected(RejectReason::StaleAttempt);
    }
}

#[test]
fn completing_every_step_completes_the_task() {
    let t = template(CHAIN);
    let [a, b, c] = ids(&t, ["a", "b", "c"]);
    let g = given([accepted(&t), Event::TaskStarted, started(a, 1)])
        .at(10)
        .when(succeeds(a, 1))
        .then_events([completed(a, 1)])
        .start_ready([b])
        .when(report("b", 1, StepOutcome::Completed { result: result() }))
        .then_events([completed(b, 1)])
        .when(start(c))
        .then_events([started(c, 1)])
        .at(20)
        .when(succeeds(c, 1))
        .then_events([completed(c, 1), Event::TaskCompleted]);
    assert_eq!(g.task().status, TaskStatus::Complete);
    assert_eq!(g.task().finished_at, Some(ts(20)));
    assert_eq!(g.step(c).result, Some(result()));
}

#[test]
fn a_terminal_step_failure_fails_the_task() {
    let t = template(CHAIN);
    let [a] = ids(&t, ["a"]);
    let g = given([accepted(&t), Event::TaskStarted, started(a, 1)])
        .when(fails(a, 1, permanent()))
        .then_events([failed(a, 1, permanent(), None), task_failed(&[a])]);
    assert_eq!(g.task().status, TaskStatus::Error);
    assert!(g.step(a).is_terminal_error());
}

#[test]
fn cancel_stops_a_pending_or_running_task_and_its_unfinished_steps() {
    let t = template(CHAIN);
    let [a, b, c] = ids(&t, ["a", "b", "c"]);
    // pending -> cancelled (steps pending -> cancelled)
    let g = given([accepted(&t)]).when(cancel()).then_events([
        step_cancelled(a),
        step_cancelled(b),
        step_cancelled(c),
        task_cancelled(),
    ]);
    assert_eq!(g.task().status, TaskStatus::Cancelled);
    // in_progress -> cancelled (a step in_progress -> cancelled, completed ones stay)
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        completed(a, 1),
        started(b, 1),
    ])
    .when(cancel())
    .then_events([step_cancelled(b), step_cancelled(c), task_cancelled()]);
    let statuses: Vec<StepStatus> = g.task().steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Complete,
            StepStatus::Cancelled,
            StepStatus::Cancelled
        ]
    );
    // the cancelled step's late result is stale
    g.when(succeeds(b, 1))
        .then_rejected(RejectReason::StaleAttempt);
}

#[test]
fn cancel_is_refused_for_complete_failed_cancelled_and_resolved_tasks() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let run = || vec![accepted(&t), Event::TaskStarted, started(a, 1)];
    let histories = [
        [run(), vec![completed(a, 1), Event::TaskCompleted]].concat(),
        [
            run(),
            vec![failed(a, 1, permanent(), None), task_failed(&[a])],
        ]
        .concat(),
        vec![accepted(&t), step_cancelled(a), task_cancelled()],
        [
            run(),
            vec![
                failed(a, 1, permanent(), None),
                task_failed(&[a]),
                resolved(a),
                Event::TaskResolvedManually,
            ],
        ]
        .concat(),
    ];
    for history in histories {
        let g = given(history);
        let status = g.task().status;
        assert!(!status.can_become(TaskStatus::Cancelled));
        g.when(cancel())
            .then_rejected(RejectReason::InvalidTransition);
    }
}

#[test]
fn retry_gives_terminally_failed_steps_fresh_attempts() {
    // error -> in_progress (task), error -> pending -> in_progress (step)
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        failed(a, 1, retryable(), Some(ts(1_000))),
        retry_due(a, false),
        started(a, 2),
        failed(a, 2, retryable(), Some(ts(3_000))),
        retry_due(a, false),
        started(a, 3),
        failed(a, 3, retryable(), None),
        task_failed(&[a]),
    ]);
    assert!(
        !g.task().is_step_ready(a, ts(1_000_000)),
        "no attempts left"
    );
    let g = g
        .at(60_000)
        .when(retry())
        .then_events([task_retried(), retry_due(a, true)]);
    assert_eq!(g.task().status, TaskStatus::InProgress);
    assert_eq!(g.task().finished_at, None);
    assert_eq!(g.step(a).status, StepStatus::Pending);
    assert_eq!(g.step(a).attempts, 0);
    let g = g.when(start(a)).then_events([started(a, 1)]);
    assert_eq!(g.step(a).attempts, 1);
    // and the fresh attempts obey the retry policy again
    g.when(fails(a, 1, retryable())).then_ok();
}

#[test]
fn retry_is_refused_unless_the_task_is_in_error() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let histories = [
        vec![accepted(&t)],
        vec![accepted(&t), Event::TaskStarted, started(a, 1)],
        vec![
            accepted(&t),
            Event::TaskStarted,
            started(a, 1),
            completed(a, 1),
            Event::TaskCompleted,
        ],
        vec![accepted(&t), step_cancelled(a), task_cancelled()],
        vec![
            accepted(&t),
            Event::TaskStarted,
            started(a, 1),
            failed(a, 1, permanent(), None),
            task_failed(&[a]),
            resolved(a),
            Event::TaskResolvedManually,
        ],
    ];
    let mut seen = BTreeSet::new();
    for history in histories {
        let g = given(history);
        seen.insert(g.task().status.as_str());
        g.when(retry())
            .then_rejected(RejectReason::InvalidTransition);
    }
    assert_eq!(
        seen.len(),
        TaskStatus::ALL.len() - 1,
        "every status but error: {seen:?}"
    );
}

#[test]
fn resolving_a_failed_step_runs_its_children_again() {
    // error -> in_progress via a resolved step
    let t = template(CHAIN);
    let [a, b] = ids(&t, ["a", "b"]);
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        failed(a, 1, permanent(), None),
        task_failed(&[a]),
    ])
    .when(resolve("a", false))
    .then_events([resolved(a), task_retried_by_resolving("a")]);
    assert_eq!(g.task().status, TaskStatus::InProgress);
    assert_eq!(g.step(a).status, StepStatus::ResolvedManually);
    assert_eq!(g.step(a).result, Some(RawJson::null()));
    assert_eq!(g.step(b).status, StepStatus::Pending);
    g.when(start(b)).then_events([started(b, 1)]);
}

#[test]
fn resolving_the_last_failure_resolves_the_task() {
    // error -> resolved_manually; other failures keep the task in error until resolved
    let t = template(PAIR);
    let [x, y] = ids(&t, ["x", "y"]);
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(x, 1),
        started(y, 1),
        failed(x, 1, permanent(), None),
        failed(y, 1, permanent(), None),
        task_failed(&[x, y]),
    ])
    .when(resolve("x", false))
    .then_events([resolved(x)]);
    assert_eq!(g.task().status, TaskStatus::Error);
    let g = g
        .when(resolve("y", false))
        .then_events([resolved(y), Event::TaskResolvedManually]);
    assert_eq!(g.task().status, TaskStatus::ResolvedManually);
    assert!(g.task().status.is_final());
}

#[test]
fn skip_dependents_skips_pending_descendants_and_resolves_the_task() {
    let t = template(CHAIN);
    let [a, b, c] = ids(&t, ["a", "b", "c"]);
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        failed(a, 1, permanent(), None),
        task_failed(&[a]),
    ])
    .when(resolve("a", true))
    .then_events([
        resolved(a),
        skipped(b, "a"),
        skipped(c, "a"),
        Event::TaskResolvedManually,
    ]);
    assert_eq!(g.task().status, TaskStatus::ResolvedManually);

    // In a diamond, only the failed step's own pending descendants are skipped.
    let t = template(DIAMOND);
    let [a, b, c, d] = ids(&t, ["a", "b", "c", "d"]);
    let g = given([accepted(&t), Event::TaskStarted, started(a, 1)])
        .when(succeeds(a, 1))
        .then_events([completed(a, 1)])
        .start_ready([c, b])
        .when(fails(b, 1, permanent()))
        .then_events([failed(b, 1, permanent(), None)])
        .when(succeeds(c, 1))
        .then_events([completed(c, 1), task_failed(&[b])])
        .when(resolve("b", true))
        .then_events([resolved(b), skipped(d, "b"), Event::TaskResolvedManually]);
    let statuses: Vec<StepStatus> = [a, b, c, d].iter().map(|s| g.step(*s).status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Complete,
            StepStatus::ResolvedManually,
            StepStatus::Complete,
            StepStatus::Skipped
        ]
    );

    // Two failed parents: the second skip finds d already skipped and leaves it.
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        completed(a, 1),
        started(c, 1),
        started(b, 1),
        failed(b, 1, permanent(), None),
        failed(c, 1, permanent(), None),
        task_failed(&[c, b]),
    ])
    .when(resolve("b", true))
    .then_events([resolved(b), skipped(d, "b")]);
    assert_eq!(
        g.task().status,
        TaskStatus::Error,
        "c still blocks the task"
    );
    let g = g
        .when(resolve("c", true))
        .then_events([resolved(c), Event::TaskResolvedManually]);
    assert_eq!(g.step(d).status, StepStatus::Skipped);
}

#[test]
fn resolve_is_refused_for_steps_not_in_error_and_unknown_names() {
    let t = template(CHAIN);
    let [a, b] = ids(&t, ["a", "b"]);
    // a complete, b in progress, c pending
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        completed(a, 1),
        started(b, 1),
    ]);
    for name in ["a", "b", "c"] {
        g.clone()
            .when(resolve(name, false))
            .then_rejected(RejectReason::InvalidTransition);
    }
    g.when(resolve("nope", false))
        .then_rejected(RejectReason::UnknownStep);
    // a step left in error by a cancel cannot be resolved in the cancelled task
    given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        failed(a, 1, retryable(), Some(ts(1_000))),
        step_cancelled(b),
        step_cancelled(StepId(2)),
        task_cancelled(),
    ])
    .when(resolve("a", false))
    .then_rejected(RejectReason::InvalidTransition);
    // a step awaiting retry in a running task can be resolved; its timer then is stale
    given([accepted(&t), Event::TaskStarted, started(a, 1)])
        .when(fails(a, 1, retryable()))
        .then_ok()
        .1
        .when(resolve("a", false))
        .then_events([resolved(a)])
        .start_ready([b])
        .at(1_000_000)
        .when(When::RetryDue(a))
        .then_rejected(RejectReason::StaleAttempt);
}

#[test]
fn stale_or_unknown_step_results_are_refused() {
    let t = template(CHAIN);
    let [a, b] = ids(&t, ["a", "b"]);
    let g = given([accepted(&t), Event::TaskStarted, started(a, 1)]);
    let ok = || StepOutcome::Completed { result: result() };
    // wrong attempt, either way
    for attempt in [0, 2] {
        g.clone()
            .when(succeeds(a, attempt))
            .then_rejected(RejectReason::StaleAttempt);
        g.clone()
            .when(report("a", attempt, ok()))
            .then_rejected(RejectReason::StaleAttempt);
    }
    // a step that is not in progress: pending, or already complete (a duplicate)
    g.clone()
        .when(succeeds(b, 1))
        .then_rejected(RejectReason::StaleAttempt);
    g.clone()
        .when(fails(b, 0, permanent()))
        .then_rejected(RejectReason::StaleAttempt);
    let done = g
        .clone()
        .when(succeeds(a, 1))
        .then_events([completed(a, 1)])
        .start_ready([b]);
    done.clone()
        .when(succeeds(a, 1))
        .then_rejected(RejectReason::StaleAttempt);
    done.when(fails(a, 1, permanent()))
        .then_rejected(RejectReason::StaleAttempt);
    // unknown steps
    g.clone()
        .when(report("nope", 1, ok()))
        .then_rejected(RejectReason::UnknownStep);
    g.clone()
        .when(succeeds(StepId(99), 1))
        .then_rejected(RejectReason::UnknownStep);
    g.when(When::RetryDue(StepId(99)))
        .then_rejected(RejectReason::UnknownStep);
}

#[test]
fn a_retry_timer_before_retry_at_is_refused() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let (events, g) = given([accepted(&t), Event::TaskStarted, started(a, 1)])
        .when(fails(a, 1, retryable()))
        .then_ok();
    let [
        Event::StepFailed(StepFailed {
            retry_at: Some(at), ..
        }),
    ] = events.as_slice()
    else {
        panic!("expected one retryable step.failed: {events:?}")
    };
    let at = *at;
    let before = Timestamp::from_millis(at.as_millis() - 1);
    assert!(!g.task().is_step_ready(a, before));
    assert!(g.task().is_step_ready(a, at));
    let g = g
        .at_time(before)
        .when(When::RetryDue(a))
        .then_rejected(RejectReason::StaleAttempt)
        .at_time(at)
        .when(When::RetryDue(a))
        .then_events([retry_due(a, false)]);
    assert_eq!(g.step(a).retry_at, None);
    assert_eq!(g.step(a).status, StepStatus::Pending);
    // fired twice: the step is no longer waiting, whether or not it started again
    let g = g
        .when(When::RetryDue(a))
        .then_rejected(RejectReason::StaleAttempt)
        .when(start(a))
        .then_events([started(a, 2)]);
    g.when(When::RetryDue(a))
        .then_rejected(RejectReason::StaleAttempt);
}

#[test]
fn inputs_for_an_unknown_task_are_refused() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let g = given([accepted(&t), Event::TaskStarted, started(a, 1)]);
    for input in [
        cancel(),
        retry(),
        resolve("a", false),
        report("a", 1, StepOutcome::Failed(permanent())),
        succeeds(a, 1),
        When::RetryDue(a),
        start(a),
        When::Reconcile,
    ] {
        g.clone()
            .when_for(OTHER, input)
            .then_rejected(RejectReason::UnknownTask);
    }
}

#[test]
fn duplicate_task_ids_and_idempotency_keys_are_refused() {
    let t = template(SINGLE);
    let keyed = RequestTask {
        idempotency_key: Some("order-7".into()),
        ..request(&t)
    };
    let g = given([accepted_with(&t, keyed.clone())]);
    g.clone()
        .when(requested(&t))
        .then_rejected(RejectReason::DuplicateTask);
    g.clone()
        .when_for(OTHER, requested_with(&t, keyed))
        .then_rejected(RejectReason::DuplicateIdempotencyKey { existing: TASK });
    // the same key in another namespace is another request
    let billing = template(&SINGLE.replace("namespace: shop", "namespace: billing"));
    let elsewhere = RequestTask {
        idempotency_key: Some("order-7".into()),
        ..request(&billing)
    };
    let (events, accepted_elsewhere) = g
        .clone()
        .when_for(OTHER, requested_with(&billing, elsewhere))
        .then_ok();
    assert!(
        matches!(events.first(), Some(Event::TaskAccepted(_))),
        "{events:?}"
    );
    let state = &accepted_elsewhere.state;
    assert_eq!(state.idempotent_task("billing", "order-7"), Some(OTHER));
    assert_eq!(state.idempotent_task("shop", "order-7"), Some(TASK));
    // a request the processor could not resolve is refused with its reason
    let invalid = command(
        Command::RequestTask(request(&t)),
        Some(Err(Rejection::new(
            RejectReason::InvalidContext,
            "bad context",
        ))),
    );
    g.clone()
        .when_for(OTHER, invalid)
        .then_rejected(RejectReason::InvalidContext);
    g.when_for(OTHER, command(Command::RequestTask(request(&t)), None))
        .then_rejected(RejectReason::UnknownTemplate);
}

// ---- retries ----

fn retry_at_of(events: &[Event]) -> Option<Timestamp> {
    match events.first() {
        Some(Event::StepFailed(f)) => f.retry_at,
        other => panic!("expected step.failed first, got {other:?}"),
    }
}

#[test]
fn backoff_grows_exponentially_within_jitter_and_is_capped_until_the_last_attempt() {
    let t = template(&SINGLE.replace("handler: noop", "handler: noop\n    retry_limit: 12"));
    let [a] = ids(&t, ["a"]);
    let mut g = given([])
        .when(requested(&t))
        .then_events([accepted(&t)])
        .when(start(a))
        .then_events([Event::TaskStarted, started(a, 1)]);
    for attempt in 1..12u32 {
        let now = g.now;
        let (events, next) = g.when(fails(a, attempt, retryable())).then_ok();
        assert_eq!(
            events.len(),
            1,
            "attempt {attempt} must not fail the task: {events:?}"
        );
        let at = retry_at_of(&events).unwrap();
        let delay = at.millis_since(now);
        let base = (1_000u64 << (attempt - 1)).min(300_000);
        assert!(
            delay >= base - base / 10 && delay <= base + base / 10,
            "attempt {attempt}: delay {delay} ms, expected {base} ms ±10%"
        );
        assert!(
            delay <= 330_000,
            "attempt {attempt}: {delay} ms exceeds the cap"
        );
        assert!(next.step(a).is_awaiting_retry());
        g = next
            .at_time(at)
            .when(When::RetryDue(a))
            .then_events([retry_due(a, false)])
            .when(start(a))
            .then_events([started(a, attempt + 1)])
            .at_time(Timestamp::from_millis(at.as_millis() + 5));
    }
    // the 12th attempt is the last allowed one
    let g = g
        .when(fails(a, 12, retryable()))
        .then_events([failed(a, 12, retryable(), None), task_failed(&[a])]);
    assert_eq!(g.step(a).attempts, 12);
    assert!(!g.task().is_step_ready(a, ts(u64::MAX / 2)));
}

#[test]
fn the_last_allowed_attempt_fails_terminally() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let g = given([accepted(&t), Event::TaskStarted, started(a, 1)]);
    let (events, g) = g.when(fails(a, 1, StepError::timeout(30_000))).then_ok();
    let at = retry_at_of(&events).unwrap();
    let (events, g) = g
        .at_time(at)
        .when(When::RetryDue(a))
        .then_events([retry_due(a, false)])
        .start_ready([a])
        .when(fails(a, 2, retryable()))
        .then_ok();
    let at = retry_at_of(&events).unwrap();
    g.at_time(at)
        .when(When::RetryDue(a))
        .then_events([retry_due(a, false)])
        .when(start(a))
        .then_events([started(a, 3)])
        .when(fails(a, 3, retryable()))
        .then_events([failed(a, 3, retryable(), None), task_failed(&[a])]);
}

#[test]
fn a_permanent_error_is_terminal_on_the_first_attempt() {
    let t = template(&SINGLE.replace("handler: noop", "handler: noop\n    retry_limit: 5"));
    let [a] = ids(&t, ["a"]);
    let mut error = permanent();
    error.retry_after_ms = Some(1_000);
    given([accepted(&t), Event::TaskStarted, started(a, 1)])
        .when(fails(a, 1, error.clone()))
        .then_events([failed(a, 1, error, None), task_failed(&[a])]);
}

#[test]
fn a_non_retryable_step_is_terminal_whatever_the_error_says() {
    let t = template(&SINGLE.replace("handler: noop", "handler: noop\n    retryable: false"));
    let [a] = ids(&t, ["a"]);
    assert_eq!(t.snapshot().steps[0].retry_limit, 3);
    let mut with_retry_after = retryable();
    with_retry_after.retry_after_ms = Some(5_000);
    for error in [retryable(), StepError::timeout(10), with_retry_after] {
        given([accepted(&t), Event::TaskStarted, started(a, 1)])
            .when(fails(a, 1, error.clone()))
            .then_events([failed(a, 1, error, None), task_failed(&[a])]);
    }
}

#[test]
fn retry_after_from_the_error_wins_over_the_backoff() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    // shorter than, longer than and beyond the 300 s cap of the template's backoff
    for retry_after in [42_000u64, 50, 900_000] {
        let mut error = retryable();
        error.retry_after_ms = Some(retry_after);
        given([accepted(&t), Event::TaskStarted, started(a, 1)])
            .at(7)
            .when(fails(a, 1, error.clone()))
            .then_events([failed(a, 1, error, Some(ts(7 + retry_after)))]);
    }
}

// ---- readiness and settling ----

#[test]
fn a_child_starts_only_when_every_parent_is_complete_or_resolved() {
    let t = template(DIAMOND);
    let [a, b, c, d] = ids(&t, ["a", "b", "c", "d"]);
    let g = given([])
        .when(requested(&t))
        .then_events([accepted(&t)])
        .start_ready([a])
        .when(succeeds(a, 1))
        .then_events([completed(a, 1)])
        .start_ready([c, b])
        .when(succeeds(b, 1))
        .then_events([completed(b, 1)]);
    assert!(!g.task().is_step_ready(d, g.now), "c is still in progress");
    assert!(!g.task().parents_satisfied(d));
    // c fails terminally; b is done and nothing else can run, so the task fails
    let g = g
        .when(fails(c, 1, permanent()))
        .then_events([failed(c, 1, permanent(), None), task_failed(&[c])]);
    assert!(
        !g.task().is_step_ready(d, g.now),
        "an errored parent blocks"
    );
    // a resolved parent satisfies the child like a completed one
    let g = g
        .when(resolve("c", false))
        .then_events([resolved(c), task_retried_by_resolving("c")]);
    assert!(g.task().parents_satisfied(d));
    g.start_ready([d])
        .when(succeeds(d, 1))
        .then_events([completed(d, 1), Event::TaskCompleted]);
}

#[test]
fn a_step_resolved_in_a_running_task_waits_for_the_other_parents() {
    let t = template(DIAMOND);
    let [a, b, c, d] = ids(&t, ["a", "b", "c", "d"]);
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        completed(a, 1),
        started(b, 1),
        started(c, 1),
    ])
    .when(fails(b, 1, permanent()))
    .then_events([failed(b, 1, permanent(), None)])
    .when(resolve("b", false))
    .then_events([resolved(b)]);
    assert_eq!(g.task().status, TaskStatus::InProgress);
    assert!(!g.task().is_step_ready(d, g.now));
    g.when(start(d))
        .then_rejected(RejectReason::StaleAttempt)
        .when(succeeds(c, 1))
        .then_events([completed(c, 1)])
        .start_ready([d]);
}

#[test]
fn a_task_fails_only_when_nothing_runs_waits_for_a_retry_or_can_start() {
    let t = template(PAIR);
    let [x, y] = ids(&t, ["x", "y"]);
    let run = [
        accepted(&t),
        Event::TaskStarted,
        started(x, 1),
        started(y, 1),
    ];
    // y in progress: x's terminal failure does not fail the task yet
    let (events, g) = given(run.clone())
        .when(fails(x, 1, permanent()))
        .then_events([failed(x, 1, permanent(), None)])
        // y awaiting its retry: still not
        .when(fails(y, 1, retryable()))
        .then_ok();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(g.task().status, TaskStatus::InProgress);
    // y's last attempts run out: now nothing can happen, the task fails with both
    let at = retry_at_of(&events).unwrap();
    let (events, g) = g
        .at_time(at)
        .when(When::RetryDue(y))
        .then_events([retry_due(y, false)])
        .start_ready([y])
        .when(fails(y, 2, retryable()))
        .then_ok();
    let at = retry_at_of(&events).unwrap();
    g.at_time(at)
        .when(When::RetryDue(y))
        .then_events([retry_due(y, false)])
        .start_ready([y])
        .when(fails(y, 3, retryable()))
        .then_events([failed(y, 3, retryable(), None), task_failed(&[x, y])]);

    // y pending and startable (not yet started): the task does not fail either
    given([accepted(&t), Event::TaskStarted, started(x, 1)])
        .when(fails(x, 1, permanent()))
        .then_events([failed(x, 1, permanent(), None)]);
    // ... but once y completes and nothing else can run, it does
    given(run)
        .when(fails(x, 1, permanent()))
        .then_ok()
        .1
        .when(succeeds(y, 1))
        .then_events([completed(y, 1), task_failed(&[x])]);
}

// ---- starting steps ----

#[test]
fn start_step_is_refused_unless_the_step_is_pending() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    for status in StepStatus::ALL {
        let g = given(step_history(&t, a, status));
        assert_eq!(g.task().status, TaskStatus::InProgress);
        assert_eq!(g.step(a).status, status);
        if status == StepStatus::Pending {
            g.when(start(a)).then_events([started(a, 1)]);
        } else {
            g.when(start(a)).then_rejected(RejectReason::StaleAttempt);
        }
    }
    // in terminal error, in a task that has not failed yet
    given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        failed(a, 1, permanent(), None),
    ])
    .when(start(a))
    .then_rejected(RejectReason::StaleAttempt);
    // a step the task does not have
    given(step_history(&t, a, StepStatus::Pending))
        .when(start(StepId(7)))
        .then_rejected(RejectReason::StaleAttempt);
}

#[test]
fn a_step_whose_backoff_elapsed_is_ready_but_starts_only_after_its_retry_is_due() {
    let t = template(PAIR);
    let [x, y] = ids(&t, ["x", "y"]);
    let (events, g) = given([
        accepted(&t),
        Event::TaskStarted,
        started(x, 1),
        started(y, 1),
    ])
    .when(fails(x, 1, retryable()))
    .then_ok();
    let at = retry_at_of(&events).unwrap();
    // a batch decided after x's backoff elapsed: x is ready (in error)
    let g = g
        .at_time(at)
        .when(succeeds(y, 1))
        .then_events([completed(y, 1)]);
    assert!(g.task().is_step_ready(x, g.now));
    assert_eq!(g.step(x).status, StepStatus::Error);
    g.when(start(x))
        .then_rejected(RejectReason::StaleAttempt)
        .when(When::RetryDue(x))
        .then_events([retry_due(x, false)])
        .start_ready([x])
        .when(succeeds(x, 2))
        .then_events([completed(x, 2), Event::TaskCompleted]);
}

#[test]
fn start_step_waits_for_every_parent_to_be_complete_or_resolved() {
    let t = template(DIAMOND);
    let [a, b, c, d] = ids(&t, ["a", "b", "c", "d"]);
    // a running: nothing below it starts
    let g = given([accepted(&t), Event::TaskStarted, started(a, 1)]);
    for s in [b, c, d] {
        g.clone()
            .when(start(s))
            .then_rejected(RejectReason::StaleAttempt);
    }
    // b complete, c running: d waits
    let g = g
        .when(succeeds(a, 1))
        .then_events([completed(a, 1)])
        .start_ready([c, b])
        .when(succeeds(b, 1))
        .then_events([completed(b, 1)]);
    g.clone()
        .when(start(d))
        .then_rejected(RejectReason::StaleAttempt);
    // c awaiting its retry: d waits
    let (events, g) = g.when(fails(c, 1, retryable())).then_ok();
    assert_eq!(events.len(), 1, "{events:?}");
    g.clone()
        .when(start(d))
        .then_rejected(RejectReason::StaleAttempt);
    // c pending again: d still waits
    let g = g
        .at_time(retry_at_of(&events).unwrap())
        .when(When::RetryDue(c))
        .then_events([retry_due(c, false)]);
    g.clone()
        .when(start(d))
        .then_rejected(RejectReason::StaleAttempt);
    // c failed for good: the task fails, d cannot start
    let g = g
        .start_ready([c])
        .when(fails(c, 2, permanent()))
        .then_events([failed(c, 2, permanent(), None), task_failed(&[c])]);
    g.clone()
        .when(start(d))
        .then_rejected(RejectReason::StaleAttempt);
    // c resolved by hand: d starts
    g.when(resolve("c", false))
        .then_events([resolved(c), task_retried_by_resolving("c")])
        .when(start(d))
        .then_events([started(d, 1)]);
}

#[test]
fn start_step_is_refused_in_a_finished_or_failed_task() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    for status in TaskStatus::ALL {
        // the step is still pending in every one of these histories
        let g = given(task_history(&t, a, status));
        assert_eq!(g.task().status, status);
        assert_eq!(g.step(a).status, StepStatus::Pending);
        match status {
            TaskStatus::Pending => {
                g.when(start(a))
                    .then_events([Event::TaskStarted, started(a, 1)]);
            }
            TaskStatus::InProgress => {
                g.when(start(a)).then_events([started(a, 1)]);
            }
            _ => {
                assert!(!g.task().is_step_ready(a, g.now));
                g.when(start(a)).then_rejected(RejectReason::StaleAttempt);
            }
        }
    }
    // a start queued before a cancel arrives after it
    let t = template(CHAIN);
    let [a] = ids(&t, ["a"]);
    given([accepted(&t)])
        .when(cancel())
        .then_ok()
        .1
        .when(start(a))
        .then_rejected(RejectReason::StaleAttempt);
}

// ---- skip propagation ----

#[test]
fn settling_skips_the_pending_steps_below_a_skipped_one() {
    // A `skip_dependents` batch cut short by a crash left c pending below the
    // skipped b, while z still runs.
    let t = template(FORK);
    let [a, b, c, z] = ids(&t, ["a", "b", "c", "z"]);
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        started(z, 1),
        failed(a, 1, permanent(), None),
        resolved(a),
        skipped(b, "a"),
    ]);
    assert!(!g.task().is_step_ready(c, g.now));
    // the next batch that settles the task skips c, then finishes the task
    let done = g.clone().when(succeeds(z, 1)).then_events([
        completed(z, 1),
        skipped_after(c, "b"),
        Event::TaskCompleted,
    ]);
    assert_eq!(done.step(c).status, StepStatus::Skipped);
    assert_eq!(done.step(c).finished_at, Some(done.now));
    // a failure settles too: the skip comes before the verdict
    g.when(fails(z, 1, permanent())).then_events([
        failed(z, 1, permanent(), None),
        skipped_after(c, "b"),
        task_failed(&[z]),
    ]);
}

#[test]
fn skips_reach_every_level_in_one_batch_and_do_not_wait_for_other_parents() {
    // a skipped root: b, then c, in step order
    let t = template(CHAIN);
    let [a, b, c] = ids(&t, ["a", "b", "c"]);
    given([accepted(&t), Event::TaskStarted, skipped(a, "x")])
        .when(When::Reconcile)
        .then_events([
            skipped_after(b, "a"),
            skipped_after(c, "b"),
            Event::TaskCompleted,
        ]);
    // b skipped while c still runs: d can never run, so it is skipped at once and
    // the task waits for c
    let t = template(DIAMOND);
    let [a, b, c, d] = ids(&t, ["a", "b", "c", "d"]);
    let g = given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        completed(a, 1),
        started(c, 1),
        skipped(b, "x"),
    ])
    .when(When::Reconcile)
    .then_events([skipped_after(d, "b")]);
    assert_eq!(g.task().status, TaskStatus::InProgress);
    g.when(succeeds(c, 1))
        .then_events([completed(c, 1), Event::TaskCompleted]);
}

// ---- reconcile: finishing batches cut short by a crash ----

#[test]
fn reconcile_decides_nothing_when_no_batch_was_cut_short() {
    let t = template(CHAIN);
    let [a, b, c] = ids(&t, ["a", "b", "c"]);
    let run = || vec![accepted(&t), Event::TaskStarted, started(a, 1)];
    let failed_a = || {
        [
            run(),
            vec![failed(a, 1, permanent(), None), task_failed(&[a])],
        ]
        .concat()
    };
    let histories = [
        // pending with a ready root, running, with a ready step not started yet:
        // starting steps is the runtime's business, not reconcile's
        vec![accepted(&t)],
        run(),
        [run(), vec![completed(a, 1)]].concat(),
        // awaiting a retry (due or not: the timer fires it)
        [run(), vec![failed(a, 1, retryable(), Some(ts(3)))]].concat(),
        [
            run(),
            vec![
                completed(a, 1),
                started(b, 1),
                completed(b, 1),
                started(c, 1),
                completed(c, 1),
                Event::TaskCompleted,
            ],
        ]
        .concat(),
        failed_a(),
        vec![
            accepted(&t),
            step_cancelled(a),
            step_cancelled(b),
            step_cancelled(c),
            task_cancelled(),
        ],
        [
            failed_a(),
            vec![
                resolved(a),
                skipped(b, "a"),
                skipped(c, "a"),
                Event::TaskResolvedManually,
            ],
        ]
        .concat(),
    ];
    let mut seen = BTreeSet::new();
    for history in histories {
        for at in [0, 5] {
            let g = given(history.clone()).at(at);
            seen.insert(g.task().status.as_str());
            g.when(When::Reconcile).then_events([]);
        }
    }
    assert_eq!(seen.len(), TaskStatus::ALL.len(), "{seen:?}");
    // a failed task with another failure left unresolved stays in error
    let t = template(PAIR);
    let [x, y] = ids(&t, ["x", "y"]);
    given([
        accepted(&t),
        Event::TaskStarted,
        started(x, 1),
        started(y, 1),
        failed(x, 1, permanent(), None),
        failed(y, 1, permanent(), None),
        task_failed(&[x, y]),
        resolved(x),
    ])
    .when(When::Reconcile)
    .then_events([]);
}

#[test]
fn reconcile_finishes_a_cancel_cut_short_by_a_crash() {
    let t = template(CHAIN);
    let [a, b, c] = ids(&t, ["a", "b", "c"]);
    // a running task's cancel kept only its first event
    let running = [
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        completed(a, 1),
        started(b, 1),
    ];
    given(running.clone()).when(cancel()).then_events([
        step_cancelled(b),
        step_cancelled(c),
        task_cancelled(),
    ]);
    let g = given([running.to_vec(), vec![step_cancelled(b)]].concat())
        .when(When::Reconcile)
        .then_events([step_cancelled(c), task_cancelled_by_reconcile()]);
    assert_eq!(g.task().status, TaskStatus::Cancelled);
    let statuses: Vec<StepStatus> = [a, b, c].iter().map(|s| g.step(*s).status).collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Complete,
            StepStatus::Cancelled,
            StepStatus::Cancelled
        ]
    );
    g.clone()
        .when(succeeds(b, 1))
        .then_rejected(RejectReason::StaleAttempt);
    g.when(When::Reconcile).then_events([]);
    // a pending task's cancel kept two of its four events
    given([accepted(&t), step_cancelled(a), step_cancelled(b)])
        .when(When::Reconcile)
        .then_events([step_cancelled(c), task_cancelled_by_reconcile()]);
    // every step was cancelled, the task was not: only the task is left
    given([
        accepted(&t),
        step_cancelled(a),
        step_cancelled(b),
        step_cancelled(c),
    ])
    .when(When::Reconcile)
    .then_events([task_cancelled_by_reconcile()]);
    // a step in error cannot be cancelled: it stays in error, as in a whole cancel
    let t = template(PAIR);
    let [x, y] = ids(&t, ["x", "y"]);
    let waiting = [
        accepted(&t),
        Event::TaskStarted,
        started(x, 1),
        started(y, 1),
        failed(x, 1, retryable(), Some(ts(1_000))),
    ];
    given(waiting.clone())
        .when(cancel())
        .then_events([step_cancelled(y), task_cancelled()]);
    let g = given([waiting.to_vec(), vec![step_cancelled(y)]].concat())
        .when(When::Reconcile)
        .then_events([task_cancelled_by_reconcile()]);
    assert_eq!(g.step(x).status, StepStatus::Error);
    g.at(1_000)
        .when(When::RetryDue(x))
        .then_rejected(RejectReason::StaleAttempt);
}

#[test]
fn reconcile_finishes_a_skip_cut_short_by_a_crash() {
    // resolve a with skip_dependents in a running task; the batch kept
    // `step.resolved_manually` and the first `step.skipped` only
    let t = template(FORK);
    let [a, b, c, z] = ids(&t, ["a", "b", "c", "z"]);
    let waiting = [
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        started(z, 1),
        failed(a, 1, retryable(), Some(ts(1_000))),
    ];
    given(waiting.clone())
        .when(resolve("a", true))
        .then_events([resolved(a), skipped(b, "a"), skipped(c, "a")]);
    let g = given([waiting.to_vec(), vec![resolved(a), skipped(b, "a")]].concat())
        .when(When::Reconcile)
        .then_events([skipped_after(c, "b")]);
    assert_eq!(g.task().status, TaskStatus::InProgress);
    let g = g.when(When::Reconcile).then_events([]);
    g.when(succeeds(z, 1))
        .then_events([completed(z, 1), Event::TaskCompleted]);
}

#[test]
fn reconcile_settles_a_failed_task_whose_failures_were_all_resolved() {
    let t = template(CHAIN);
    let [a, b, c] = ids(&t, ["a", "b", "c"]);
    let failed_a = [
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        failed(a, 1, permanent(), None),
        task_failed(&[a]),
    ];
    // every step done (the skips half written): resolved_manually
    let g = given([failed_a.to_vec(), vec![resolved(a), skipped(b, "a")]].concat())
        .when(When::Reconcile)
        .then_events([skipped_after(c, "b"), Event::TaskResolvedManually]);
    assert_eq!(g.task().status, TaskStatus::ResolvedManually);
    g.when(When::Reconcile).then_events([]);
    // steps left to run: the task resumes and they become ready
    let g = given([failed_a.to_vec(), vec![resolved(a)]].concat())
        .when(When::Reconcile)
        .then_events([task_retried_by_reconcile()]);
    assert_eq!(g.task().status, TaskStatus::InProgress);
    assert_eq!(g.task().finished_at, None);
    let g = g.when(When::Reconcile).then_events([]).start_ready([b]);
    assert_eq!(g.step(b).status, StepStatus::InProgress);
    // a single step resolved: the task is resolved
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    given([
        accepted(&t),
        Event::TaskStarted,
        started(a, 1),
        failed(a, 1, permanent(), None),
        task_failed(&[a]),
        resolved(a),
    ])
    .when(When::Reconcile)
    .then_events([Event::TaskResolvedManually]);
}

// ---- the fold: illegal and fenced events change nothing ----

/// A legal history that leaves the single step of `SINGLE` in `status`.
fn step_history(t: &Template, a: StepId, status: StepStatus) -> Vec<Event> {
    let mut h = vec![accepted(t), Event::TaskStarted];
    h.extend(match status {
        StepStatus::Pending => vec![],
        StepStatus::InProgress => vec![started(a, 1)],
        StepStatus::Complete => vec![started(a, 1), completed(a, 1)],
        StepStatus::Error => vec![started(a, 1), failed(a, 1, retryable(), Some(ts(1_000)))],
        StepStatus::Skipped => vec![skipped(a, "x")],
        StepStatus::Cancelled => vec![step_cancelled(a)],
        StepStatus::ResolvedManually => {
            vec![started(a, 1), failed(a, 1, permanent(), None), resolved(a)]
        }
    });
    h
}

/// The event that would move `step` to `to` (with the attempt the fold expects).
fn step_event_to(a: StepId, step: &StepState, to: StepStatus) -> Event {
    match to {
        StepStatus::Pending => retry_due(a, false),
        StepStatus::InProgress => started(a, step.attempts + 1),
        StepStatus::Complete => completed(a, step.attempts),
        StepStatus::Error => failed(a, step.attempts, permanent(), None),
        StepStatus::Skipped => skipped(a, "x"),
        StepStatus::Cancelled => step_cancelled(a),
        StepStatus::ResolvedManually => resolved(a),
    }
}

/// Folds `event` (written a little later, answering no command) and checks that
/// the anomaly left everything as it was.
#[track_caller]
fn assert_ignored(g: &mut Given, event: &Event, expected: &ApplyError) {
    let digest = g.state.digest();
    let stats = g.state.stats();
    let answered = g.state.answered();
    assert!(answered.is_some());
    let (status, steps) = (g.task().status, g.task().steps.clone());
    let env = Envelope {
        at: Timestamp::from_millis(g.now.as_millis() + 1),
        ..g.envelope(event.clone())
    };
    let applied = g.fold_envelope(&env);
    assert_eq!(applied, Applied::Anomaly(expected.clone()), "{event:?}");
    assert_eq!(g.state.answered(), answered);
    assert_eq!(
        g.state.digest(),
        digest,
        "an ignored {event:?} changed the digest"
    );
    assert_eq!(g.task().status, status);
    assert_eq!(g.task().steps, steps);
    assert_eq!(g.state.stats().anomalies, stats.anomalies + 1);
    assert_eq!(g.state.stats().events, stats.events);
}

#[test]
fn the_fold_applies_every_legal_step_transition_and_ignores_every_illegal_one() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let (mut legal, mut illegal) = (0, 0);
    for from in StepStatus::ALL {
        for to in StepStatus::ALL {
            let mut g = given(step_history(&t, a, from));
            assert_eq!(g.step(a).status, from);
            let event = step_event_to(a, g.step(a), to);
            if from.can_become(to) {
                legal += 1;
                assert_eq!(g.fold(&event), Applied::Event, "{from:?} -> {to:?}");
                assert_eq!(g.step(a).status, to, "{from:?} -> {to:?}");
            } else {
                illegal += 1;
                let expected = ApplyError::IllegalStepTransition {
                    task: TASK,
                    step: a,
                    from,
                    to,
                };
                assert_ignored(&mut g, &event, &expected);
            }
        }
    }
    assert_eq!((legal, illegal), (8, 41));
}

/// A legal history that leaves the task of `SINGLE` in `status`.
fn task_history(t: &Template, a: StepId, status: TaskStatus) -> Vec<Event> {
    let mut h = vec![accepted(t)];
    h.extend(match status {
        TaskStatus::Pending => vec![],
        TaskStatus::InProgress => vec![Event::TaskStarted],
        TaskStatus::Complete => vec![Event::TaskStarted, Event::TaskCompleted],
        TaskStatus::Error => vec![Event::TaskStarted, task_failed(&[a])],
        TaskStatus::Cancelled => vec![task_cancelled()],
        TaskStatus::ResolvedManually => vec![
            Event::TaskStarted,
            task_failed(&[a]),
            Event::TaskResolvedManually,
        ],
    });
    h
}

/// Every event that moves a task to `to` (no event moves a task back to pending).
fn task_events_to(a: StepId, to: TaskStatus) -> Vec<Event> {
    match to {
        TaskStatus::Pending => vec![],
        TaskStatus::InProgress => vec![Event::TaskStarted, task_retried()],
        TaskStatus::Complete => vec![Event::TaskCompleted],
        TaskStatus::Error => vec![task_failed(&[a])],
        TaskStatus::Cancelled => vec![task_cancelled()],
        TaskStatus::ResolvedManually => vec![Event::TaskResolvedManually],
    }
}

#[test]
fn the_fold_applies_every_legal_task_transition_and_ignores_every_illegal_one() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let (mut legal, mut illegal) = (0, 0);
    for from in TaskStatus::ALL {
        assert!(
            !from.can_become(TaskStatus::Pending),
            "nothing returns to pending"
        );
        for to in TaskStatus::ALL {
            for event in task_events_to(a, to) {
                let mut g = given(task_history(&t, a, from));
                assert_eq!(g.task().status, from);
                if from.can_become(to) {
                    // Only the event that means this transition: task.started
                    // leaves pending, task.retried leaves error. (The fold checks
                    // the status pair only, so it also takes the other one;
                    // decide never writes it.)
                    let meant = !matches!(
                        (from, &event),
                        (TaskStatus::Pending, Event::TaskRetried(_))
                            | (TaskStatus::Error, Event::TaskStarted)
                    );
                    if meant {
                        legal += 1;
                        assert_eq!(g.fold(&event), Applied::Event, "{from:?} -> {to:?}");
                        assert_eq!(g.task().status, to);
                    }
                } else {
                    illegal += 1;
                    let expected = ApplyError::IllegalTaskTransition {
                        task: TASK,
                        from,
                        to,
                    };
                    assert_ignored(&mut g, &event, &expected);
                }
            }
        }
    }
    // 7 allowed transitions; 36 - 6 (to pending) - 7 illegal pairs, the 4 illegal
    // ones to in_progress tried with both events.
    assert_eq!((legal, illegal), (7, 27));
}

#[test]
fn the_fold_ignores_events_that_name_no_task_step_or_attempt() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let mut g = given([accepted(&t), Event::TaskStarted, started(a, 1)]);
    assert_ignored(&mut g, &accepted(&t), &ApplyError::DuplicateTask(TASK));
    let ghost = StepId(5);
    assert_ignored(
        &mut g,
        &completed(ghost, 1),
        &ApplyError::UnknownStep {
            task: TASK,
            step: ghost,
        },
    );
    for event in [completed(a, 2), failed(a, 0, permanent(), None)] {
        let got = match &event {
            Event::StepCompleted(e) => e.attempt,
            Event::StepFailed(e) => e.attempt,
            _ => unreachable!(),
        };
        let expected = ApplyError::AttemptMismatch {
            task: TASK,
            step: a,
            expected: 1,
            got,
        };
        assert_ignored(&mut g, &event, &expected);
    }
    // a start must be the next attempt
    let mut pending = given(step_history(&t, a, StepStatus::Pending));
    let expected = ApplyError::AttemptMismatch {
        task: TASK,
        step: a,
        expected: 1,
        got: 2,
    };
    assert_ignored(&mut pending, &started(a, 2), &expected);
    // an event for a task that does not exist
    let digest = g.state.digest();
    let env = Envelope {
        task_id: OTHER,
        ..g.envelope(Event::TaskStarted)
    };
    assert_eq!(
        g.fold_envelope(&env),
        Applied::Anomaly(ApplyError::UnknownTask(OTHER))
    );
    assert_eq!(g.state.digest(), digest);
    assert!(g.state.task(&OTHER).is_none());
}

#[test]
fn a_final_task_whose_id_is_accepted_again_is_archived_as_eviction_would() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let mut finals = 0;
    for status in TaskStatus::ALL {
        // final histories where the step ran too, so the old task's hash is its own
        let history = match status {
            TaskStatus::Complete => vec![
                accepted(&t),
                Event::TaskStarted,
                started(a, 1),
                completed(a, 1),
                Event::TaskCompleted,
            ],
            TaskStatus::ResolvedManually => vec![
                accepted(&t),
                Event::TaskStarted,
                started(a, 1),
                failed(a, 1, permanent(), None),
                task_failed(&[a]),
                resolved(a),
                Event::TaskResolvedManually,
            ],
            _ => task_history(&t, a, status),
        };
        let mut g = given(history.clone());
        if !status.is_final() {
            assert_ignored(&mut g, &accepted(&t), &ApplyError::DuplicateTask(TASK));
            continue;
        }
        finals += 1;
        // decide still refuses a request for an id in memory
        let g = g
            .when(requested(&t))
            .then_rejected(RejectReason::DuplicateTask);
        // the same history where the old task left memory before the new accept
        let mut evicting = Given {
            state: State::new(1),
            ..given([])
        };
        for event in &history {
            assert_eq!(evicting.fold(event), Applied::Event);
        }
        let mut g = g.at(10);
        let mut evicting = evicting.at(10);
        assert_eq!(g.fold(&accepted(&t)), Applied::Event, "{status:?}");
        assert_eq!(evicting.fold(&accepted(&t)), Applied::Event);
        assert_eq!(evicting.state.stats().evicted, 1);
        assert_eq!(g.state.stats().evicted, 0);
        assert_eq!(
            g.state.digest(),
            evicting.state.digest(),
            "{status:?}: the digest depends on retention"
        );
        assert_eq!(g.state.task_count(), 1);
        let task = g.task();
        assert_eq!(task.status, TaskStatus::Pending);
        assert_eq!(task.accepted_at, ts(10));
        assert_eq!(task.finished_at, None);
        assert_eq!(task.steps, vec![StepState::new()]);
        g.when(start(a))
            .then_events([Event::TaskStarted, started(a, 1)]);
    }
    assert_eq!(finals, 3);
}

#[test]
fn events_of_a_fenced_epoch_change_nothing() {
    let t = template(SINGLE);
    let [a] = ids(&t, ["a"]);
    let mut g = given([accepted(&t), Event::TaskStarted]);
    let claim = |epoch: u64, at: Timestamp| Envelope {
        task_id: TaskId::NIL,
        correlation_id: CorrelationId::NIL,
        source_position: None,
        epoch: Epoch(epoch),
        at,
        body: Body::Control(Control::PartitionClaimed(PartitionClaimed {
            epoch: Epoch(epoch),
            owner: format!("writer-{epoch}"),
        })),
    };
    assert_eq!(g.fold_envelope(&claim(2, ts(10))), Applied::Control);
    assert_eq!(g.state.epoch(), Epoch(2));

    let digest = g.state.digest();
    let (stats, clock, answered) = (g.state.stats(), g.state.clock(), g.state.answered());
    let stale = Envelope {
        epoch: Epoch(1),
        source_position: Some(Position(99)),
        at: ts(20),
        ..g.envelope(started(a, 1))
    };
    assert_eq!(
        g.fold_envelope(&stale),
        Applied::Fenced {
            epoch: Epoch(1),
            current: Epoch(2)
        }
    );
    assert_eq!(g.state.digest(), digest);
    assert_eq!(g.step(a).status, StepStatus::Pending);
    assert_eq!(g.state.clock(), clock);
    assert_eq!(g.state.answered(), answered);
    assert_eq!(g.state.stats().fenced, stats.fenced + 1);
    assert_eq!(g.state.stats().events, stats.events);

    // the current epoch's writer is heard
    let current = Envelope {
        epoch: Epoch(2),
        ..stale.clone()
    };
    assert_eq!(g.fold_envelope(&current), Applied::Event);
    assert_eq!(g.step(a).status, StepStatus::InProgress);
    assert_eq!(g.state.answered(), Some(Position(99)));

    // a late claim of an older epoch does not unfence the old writer
    assert_eq!(g.fold_envelope(&claim(1, ts(30))), Applied::Control);
    assert_eq!(g.state.epoch(), Epoch(2));
    let digest = g.state.digest();
    let old = Envelope {
        epoch: Epoch(1),
        ..g.envelope(completed(a, 1))
    };
    assert!(matches!(g.fold_envelope(&old), Applied::Fenced { .. }));
    assert_eq!(g.state.digest(), digest);
    assert_eq!(g.step(a).status, StepStatus::InProgress);
}
