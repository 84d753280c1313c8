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
            Command::RequestTask(request) => request_task(state, task, request, resolution, now),
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
        Input::Reconcile { task } => reconcile(existing(state, task)?, now),
    }
}

fn reconcile(task: &TaskState, now: Timestamp) -> Result<Vec<Event>, Rejection> {
    if task.status.is_terminal() {
        return Ok(Vec::new());
    }
    let mut draft = Draft::new(task, now);
    draft.start_ready()?;
    draft.settle()?;
    Ok(draft.into_events())
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
    now: Timestamp,
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
    let accepted = Event::TaskAccepted(TaskAccepted {
        request: request.clone(),
        template: Arc::clone(dag.shared_snapshot()),
    });
    let state = TaskState::accepted(
        task,
        crate::record::CorrelationId::NIL,
        Arc::clone(dag),
        Arc::new(request.clone()),
        now,
    );
    let mut draft = Draft::with_events(state, vec![accepted], now);
    draft.start_ready()?;
    draft.settle()?;
    Ok(draft.into_events())
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
    draft.start_ready()?;
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
        if draft.all_steps_done() {
            draft.emit(Event::TaskResolvedManually)?;
            return Ok(draft.into_events());
        }
        if !draft.has_startable_steps() {
            // Other failures still block the task: it stays in error.
            return Ok(draft.into_events());
        }
        draft.emit(Event::TaskRetried(TaskRetried {
            requested_by: resolve.resolved_by.clone(),
            reason: Some(format!("step `{}` resolved manually", resolve.step)),
        }))?;
    }
    draft.start_ready()?;
    draft.settle()?;
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
            draft.start_ready()?;
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
    draft.start_ready()?;
    draft.settle()?;
    Ok(draft.into_events())
}
