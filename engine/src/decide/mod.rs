//! `decide`: what should happen, given the state and one input. Pure: the only
//! time it knows is the `now` it is given, and it changes nothing; the events it
//! returns are applied by the caller, through the fold, like any other.

mod backoff;
mod draft;

use std::sync::Arc;

pub use backoff::retry_delay_ms;

use self::draft::Draft;
use crate::record::{
    CancelTask, Command, Event, RejectReason, RequestTask, ResolveStep, RetryTask, StepCancelled,
    StepCompleted, StepFailed, StepId, StepOutcome, StepResolvedManually, StepRetryDue,
    StepSkipped, TaskAccepted, TaskCancelled, TaskId, TaskRetried, Timestamp,
};
use crate::state::{Dag, State, StepStatus, TaskState, TaskStatus};

/// A refused input, with a stable reason. For commands the processor records it as
/// `task.rejected`; for the executor's and timers' inputs it is a metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason:?}: {message}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
    pub details: Vec<String>,
}

impl Rejection {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Rejection {
            reason,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }
}

/// The template a `task.requested` resolved to (the processor looks it up and
/// validates the context before deciding), or why it could not.
pub type Resolution = Result<Arc<Dag>, Rejection>;

/// One thing to decide about.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A command from the log. `resolution` is required for `task.requested`.
    Command {
        task: TaskId,
        command: &'a Command,
        resolution: Option<&'a Resolution>,
    },
    /// An attempt finished in this engine's executor.
    StepFinished {
        task: TaskId,
        step: StepId,
        attempt: u32,
        outcome: &'a StepOutcome,
    },
    /// A step's backoff elapsed (the processor's timer, derived from `retry_at`).
    RetryDue { task: TaskId, step: StepId },
    /// The runtime has capacity for a ready step: start it. `decide` never starts
    /// steps by itself, so the runtime bounds the work in flight and a step is
    /// `in_progress` only while a handler actually has it.
    StartStep { task: TaskId, step: StepId },
    /// After a restart: finish any cascade a crash cut short (start steps whose
    /// parents are done, finish a task with nothing left). Usually decides nothing.
    Reconcile { task: TaskId },
}

impl Input<'_> {
    pub fn task(&self) -> TaskId {
        match self {
            Input::Command { task, .. }
            | Input::StepFinished { task, .. }
            | Input::RetryDue { task, .. }
            | Input::StartStep { task, .. }
            | Input::Reconcile { task } => *task,
        }
    }
}

/// Decides one input. The events are for `input.task()`, in order; applying them
/// in order to `state` is always legal.
pub fn decide(state: &State, input: Input<'_>, now: Timestamp) -> Result<Vec<Event>, Rejection> {
    match input {
        Input::Command {
            task,
            command,
            resolution,
        } => match command {
            Command::RequestTask(request) => request_task(state, task, request, resolution),
            Command::CancelTask(cancel) => cancel_task(existing(state, task)?, cancel, now),
            Command::RetryTask(retry) => retry_task(existing(state, task)?, retry, now),
            Command::ResolveStep(resolve) => resolve_step(existing(state, task)?, resolve, now),
            Command::ReportStepResult(report) => {
                let t = existing(state, task)?;
                let step = step_named(t, &report.step)?;
                step_finished(t, step, report.attempt, &report.outcome, now)
            }
        },
        Input::StepFinished {
            task,
            step,
            attempt,
            outcome,
        } => step_finished(existing(state, task)?, step, attempt, outcome, now),
        Input::RetryDue { task, step } => retry_due(existing(state, task)?, step, now),
        Input::StartStep { task, step } => {
            let mut draft = Draft::new(existing(state, task)?, now);
            draft.start(step)?;
            Ok(draft.into_events())
        }
        Input::Reconcile { task } => reconcile(existing(state, task)?, now),
    }
}

/// Finishes what a batch cut short by a crash left half done (possible on logs
/// whose batches are not atomic, e.g. Kafka): a cancel that cancelled some steps
/// but not the task, skips that did not reach every dependent, a resolution that
/// did not settle its task.
fn reconcile(task: &TaskState, now: Timestamp) -> Result<Vec<Event>, Rejection> {
    let mut draft = Draft::new(task, now);
    match task.status {
        TaskStatus::Pending | TaskStatus::InProgress => {
            if task.steps.iter().any(|s| s.status == StepStatus::Cancelled) {
                for id in task.dag.step_ids() {
                    if task.steps[id.index()]
                        .status
                        .can_become(StepStatus::Cancelled)
                    {
                        draft.emit(Event::StepCancelled(StepCancelled { step: id }))?;
                    }
                }
                draft.emit(Event::TaskCancelled(TaskCancelled {
                    requested_by: None,
                    reason: Some("completing a cancellation interrupted by a crash".into()),
                }))?;
            } else {
                draft.settle()?;
            }
        }
        TaskStatus::Error => {
            if !task.steps.iter().any(|s| s.is_terminal_error()) {
                after_resolution(&mut draft, None, "failed steps resolved")?;
            }
        }
        TaskStatus::Complete | TaskStatus::Cancelled | TaskStatus::ResolvedManually => {}
    }
    Ok(draft.into_events())
}

/// After a step of a task in `error` was resolved: finish the task if nothing is
/// left, resume it if steps can now run, or leave it in error.
fn after_resolution(
    draft: &mut Draft,
    resolved_by: Option<String>,
    reason: &str,
) -> Result<(), Rejection> {
    draft.propagate_skips()?;
    if draft.all_steps_done() {
        return draft.emit(Event::TaskResolvedManually);
    }
    let blocked = draft.task().steps.iter().any(|s| s.is_terminal_error());
    if !blocked || draft.has_startable_steps() {
        draft.emit(Event::TaskRetried(TaskRetried {
            requested_by: resolved_by,
            reason: Some(reason.to_owned()),
        }))?;
        draft.settle()?;
    }
    Ok(())
}

fn existing(state: &State, task: TaskId) -> Result<&TaskState, Rejection> {
    state.task(&task).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownTask,
            format!("task {task} does not exist (or left memory after its retention)"),
        )
    })
}

fn step_named(task: &TaskState, name: &str) -> Result<StepId, Rejection> {
    task.dag.snapshot().step_id(name).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownStep,
            format!(
                "task {} ({}) has no step `{name}`",
                task.id,
                task.dag.snapshot().qualified_name()
            ),
        )
    })
}

fn illegal(task: &TaskState, what: &str) -> Rejection {
    Rejection::new(
        RejectReason::InvalidTransition,
        format!(
            "cannot {what} task {} in state {}",
            task.id,
            task.status.as_str()
        ),
    )
}

fn request_task(
    state: &State,
    task: TaskId,
    request: &RequestTask,
    resolution: Option<&Resolution>,
) -> Result<Vec<Event>, Rejection> {
    if state.task(&task).is_some() {
        return Err(Rejection::new(
            RejectReason::DuplicateTask,
            format!("task {task} already exists"),
        ));
    }
    if let Some(key) = &request.idempotency_key
        && let Some(existing) = state.idempotent_task(&request.namespace, key)
    {
        return Err(Rejection::new(
            RejectReason::DuplicateIdempotencyKey { existing },
            format!(
                "idempotency key `{key}` in namespace `{}` already created task {existing}",
                request.namespace
            ),
        ));
    }
    let dag = match resolution {
        Some(Ok(dag)) => dag,
        Some(Err(rejection)) => return Err(rejection.clone()),
        None => {
            return Err(Rejection::new(
                RejectReason::UnknownTemplate,
                format!(
                    "no template was resolved for {}/{}",
                    request.namespace, request.name
                ),
            ));
        }
    };
    // Steps start when the runtime has room for them (`Input::StartStep`).
    Ok(vec![Event::TaskAccepted(TaskAccepted {
        request: request.clone(),
        template: Arc::clone(dag.shared_snapshot()),
    })])
}

fn cancel_task(
    task: &TaskState,
    cancel: &CancelTask,
    now: Timestamp,
) -> Result<Vec<Event>, Rejection> {
    if !task.status.can_become(TaskStatus::Cancelled) {
        return Err(illegal(task, "cancel"));
    }
    let mut draft = Draft::new(task, now);
    for id in task.dag.step_ids() {
        let status = task.steps[id.index()].status;
        if status.can_become(StepStatus::Cancelled) {
            draft.emit(Event::StepCancelled(StepCancelled { step: id }))?;
        }
    }
    draft.emit(Event::TaskCancelled(TaskCancelled {
        requested_by: cancel.requested_by.clone(),
        reason: cancel.reason.clone(),
    }))?;
    Ok(draft.into_events())
}

fn retry_task(
    task: &TaskState,
    retry: &RetryTask,
    now: Timestamp,
) -> Result<Vec<Event>, Rejection> {
    if task.status != TaskStatus::Error {
        return Err(illegal(task, "retry"));
    }
    let mut draft = Draft::new(task, now);
    draft.emit(Event::TaskRetried(TaskRetried {
        requested_by: retry.requested_by.clone(),
        reason: retry.reason.clone(),
    }))?;
    for id in task.dag.step_ids() {
        if task.steps[id.index()].is_terminal_error() {
            draft.emit(Event::StepRetryDue(StepRetryDue {
                step: id,
                reset_attempts: true,
            }))?;
        }
    }
    draft.settle()?;
    Ok(draft.into_events())
}

fn resolve_step(
    task: &TaskState,
    resolve: &ResolveStep,
    now: Timestamp,
) -> Result<Vec<Event>, Rejection> {
    let step = step_named(task, &resolve.step)?;
    if !matches!(task.status, TaskStatus::InProgress | TaskStatus::Error) {
        return Err(illegal(task, "resolve a step of"));
    }
    let status = task.steps[step.index()].status;
    if !status.can_become(StepStatus::ResolvedManually) {
        return Err(Rejection::new(
            RejectReason::InvalidTransition,
            format!(
                "step `{}` of task {} is {}; only a step in error can be resolved",
                resolve.step,
                task.id,
                status.as_str()
            ),
        ));
    }
    let mut draft = Draft::new(task, now);
    draft.emit(Event::StepResolvedManually(StepResolvedManually {
        step,
        result: resolve.result.clone().unwrap_or_default(),
        resolved_by: resolve.resolved_by.clone(),
        reason: resolve.reason.clone(),
    }))?;
    if resolve.skip_dependents {
        for id in draft.pending_descendants(step) {
            draft.emit(Event::StepSkipped(StepSkipped {
                step: id,
                reason: format!("`{}` was resolved with skip_dependents", resolve.step),
            }))?;
        }
    }
    if task.status == TaskStatus::Error {
        let reason = format!("step `{}` resolved manually", resolve.step);
        after_resolution(&mut draft, resolve.resolved_by.clone(), &reason)?;
    } else {
        draft.settle()?;
    }
    Ok(draft.into_events())
}

fn step_finished(
    task: &TaskState,
    step: StepId,
    attempt: u32,
    outcome: &StepOutcome,
    now: Timestamp,
) -> Result<Vec<Event>, Rejection> {
    let current = task.step(step).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownStep,
            format!("task {} has no step {step}", task.id),
        )
    })?;
    if task.status != TaskStatus::InProgress
        || current.status != StepStatus::InProgress
        || current.attempts != attempt
    {
        return Err(Rejection::new(
            RejectReason::StaleAttempt,
            format!(
                "task {} step `{}` attempt {attempt}: step is {} at attempt {} (task {})",
                task.id,
                task.step_name(step),
                current.status.as_str(),
                current.attempts,
                task.status.as_str()
            ),
        ));
    }
    let mut draft = Draft::new(task, now);
    match outcome {
        StepOutcome::Completed { result } => {
            draft.emit(Event::StepCompleted(StepCompleted {
                step,
                attempt,
                result: result.clone(),
            }))?;
        }
        StepOutcome::Failed(error) => {
            let retry_at = task.dag.snapshot().step(step).and_then(|spec| {
                let retry =
                    error.is_retryable() && spec.retryable && attempt < spec.retry_limit.max(1);
                retry.then(|| {
                    let delay =
                        retry_delay_ms(&spec.backoff, error.retry_after_ms, task.id, step, attempt);
                    now.saturating_add_ms(delay)
                })
            });
            draft.emit(Event::StepFailed(StepFailed {
                step,
                attempt,
                error: error.clone(),
                retry_at,
            }))?;
        }
    }
    draft.settle()?;
    Ok(draft.into_events())
}

fn retry_due(task: &TaskState, step: StepId, now: Timestamp) -> Result<Vec<Event>, Rejection> {
    let current = task.step(step).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownStep,
            format!("task {} has no step {step}", task.id),
        )
    })?;
    let due = current.retry_at.is_some_and(|at| at <= now);
    if task.status != TaskStatus::InProgress || current.status != StepStatus::Error || !due {
        return Err(Rejection::new(
            RejectReason::StaleAttempt,
            format!(
                "task {} step `{}` is not awaiting a due retry (step {}, task {})",
                task.id,
                task.step_name(step),
                current.status.as_str(),
                task.status.as_str()
            ),
        ));
    }
    let mut draft = Draft::new(task, now);
    draft.emit(Event::StepRetryDue(StepRetryDue {
        step,
        reset_attempts: false,
    }))?;
    Ok(draft.into_events())
}
