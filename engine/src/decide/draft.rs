//! A scratch copy of one task that `decide` applies its own events to, so that
//! cascades (skips propagating, the task finishing) are computed with the same
//! appliers the fold uses.

use crate::record::{Event, StepId, StepSkipped, StepStarted, TaskFailed, Timestamp};
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

    /// Starts one step (and the task, if it is still pending). The step must be
    /// pending with every parent satisfied.
    pub(super) fn start(&mut self, step: StepId) -> Result<(), Rejection> {
        let startable = self
            .task
            .step(step)
            .is_some_and(|s| s.status == StepStatus::Pending)
            && self.task.parents_satisfied(step)
            && matches!(
                self.task.status,
                TaskStatus::Pending | TaskStatus::InProgress
            );
        if !startable {
            return Err(Rejection::new(
                RejectReason::StaleAttempt,
                format!(
                    "step `{}` of task {} is not ready to start",
                    self.task.step_name(step),
                    self.task.id
                ),
            ));
        }
        if self.task.status == TaskStatus::Pending {
            self.emit(Event::TaskStarted)?;
        }
        let attempt = self.task.steps[step.index()].attempts + 1;
        self.emit(Event::StepStarted(StepStarted { step, attempt }))
    }

    /// Skips pending steps with a skipped parent: they can never run.
    pub(super) fn propagate_skips(&mut self) -> Result<(), Rejection> {
        for id in self.task.dag.step_ids() {
            if self.task.steps[id.index()].status != StepStatus::Pending {
                continue;
            }
            let skipped_parent = self
                .task
                .dag
                .parents(id)
                .find(|p| self.task.steps[p.index()].status == StepStatus::Skipped);
            if let Some(parent) = skipped_parent {
                let reason = format!("parent `{}` was skipped", self.task.step_name(parent));
                self.emit(Event::StepSkipped(StepSkipped { step: id, reason }))?;
            }
        }
        Ok(())
    }

    /// Finishes the task if nothing is left to do: complete when every step is done,
    /// failed when a step failed terminally and nothing can run or retry.
    pub(super) fn settle(&mut self) -> Result<(), Rejection> {
        if self.task.status != TaskStatus::InProgress {
            return Ok(());
        }
        self.propagate_skips()?;
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

    pub(super) fn task(&self) -> &TaskState {
        &self.task
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
