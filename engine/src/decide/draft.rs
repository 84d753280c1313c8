//! A scratch copy of one task that `decide` applies its own events to, so that
//! cascades (children becoming ready, the task finishing) are computed with the
//! same appliers the fold uses.

use crate::record::{Event, StepId, StepStarted, TaskFailed, Timestamp};
use crate::state::{StepStatus, TaskState, TaskStatus};

use super::Rejection;
use crate::record::RejectReason;

pub(super) struct Draft {
    task: TaskState,
    events: Vec<Event>,
    now: Timestamp,
}

impl Draft {
    pub(super) fn new(task: &TaskState, now: Timestamp) -> Self {
        Draft {
            task: task.clone(),
            events: Vec::with_capacity(4),
            now,
        }
    }

    /// A draft for a task that does not exist yet (its `task.accepted` is `events[0]`).
    pub(super) fn with_events(task: TaskState, events: Vec<Event>, now: Timestamp) -> Self {
        Draft { task, events, now }
    }

    pub(super) fn into_events(self) -> Vec<Event> {
        self.events
    }

    /// Applies and records one event; an illegal one is a bug in `decide`, reported
    /// as a rejection rather than a panic.
    pub(super) fn emit(&mut self, event: Event) -> Result<(), Rejection> {
        self.task.apply(&event, self.now).map_err(|e| {
            Rejection::new(
                RejectReason::InvalidTransition,
                format!("internal: decided an illegal event: {e}"),
            )
        })?;
        self.events.push(event);
        Ok(())
    }

    /// Starts every pending step whose parents are satisfied (starting the task too
    /// if it is still pending), in step order.
    pub(super) fn start_ready(&mut self) -> Result<(), Rejection> {
        let ready: Vec<StepId> = self
            .task
            .dag
            .step_ids()
            .filter(|id| {
                self.task.steps[id.index()].status == StepStatus::Pending
                    && self.task.parents_satisfied(*id)
            })
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        if self.task.status == TaskStatus::Pending {
            self.emit(Event::TaskStarted)?;
        }
        for step in ready {
            let attempt = self.task.steps[step.index()].attempts + 1;
            self.emit(Event::StepStarted(StepStarted { step, attempt }))?;
        }
        Ok(())
    }

    /// Finishes the task if nothing is left to do: complete when every step is done,
    /// failed when a step failed terminally and nothing can run or retry.
    pub(super) fn settle(&mut self) -> Result<(), Rejection> {
        if self.task.status != TaskStatus::InProgress {
            return Ok(());
        }
        if self.all_steps_done() {
            return self.emit(Event::TaskCompleted);
        }
        let steps = &self.task.steps;
        let busy = steps
            .iter()
            .any(|s| s.status == StepStatus::InProgress || s.is_awaiting_retry());
        if busy || self.has_startable_steps() {
            return Ok(());
        }
        let failed_steps: Vec<StepId> = self
            .task
            .dag
            .step_ids()
            .filter(|id| steps[id.index()].is_terminal_error())
            .collect();
        if failed_steps.is_empty() {
            return Ok(());
        }
        self.emit(Event::TaskFailed(TaskFailed { failed_steps }))
    }

    pub(super) fn all_steps_done(&self) -> bool {
        self.task.steps.iter().all(|s| s.status.is_done_ok())
    }

    pub(super) fn has_startable_steps(&self) -> bool {
        self.task.dag.step_ids().any(|id| {
            self.task.steps[id.index()].status == StepStatus::Pending
                && self.task.parents_satisfied(id)
        })
    }

    /// Pending steps downstream of `step`, in step order.
    pub(super) fn pending_descendants(&self, step: StepId) -> Vec<StepId> {
        let n = self.task.dag.len();
        let mut downstream = vec![false; n];
        let mut stack = vec![step];
        while let Some(s) = stack.pop() {
            for child in self.task.dag.children(s) {
                if !downstream[child.index()] {
                    downstream[child.index()] = true;
                    stack.push(*child);
                }
            }
        }
        (0..n as u32)
            .map(StepId)
            .filter(|id| {
                downstream[id.index()] && self.task.steps[id.index()].status == StepStatus::Pending
            })
            .collect()
    }
}
