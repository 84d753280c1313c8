//! Due times derived from state (retry backoff), so replay needs no clock: the
//! processor turns a due timer into a `step.retry_due` event.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::record::{StepId, TaskId, Timestamp};
use crate::state::State;

/// Retry timers of one partition, earliest first. Entries may be stale (the step
/// was cancelled or resolved); `decide` rejects those and the processor drops them.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Timestamp, TaskId, StepId)>>,
}

impl Timers {
    /// Every step waiting for a retry in `state`.
    pub fn from_state(state: &State) -> Self {
        let mut t = Timers::default();
        for task in state.tasks() {
            for (i, step) in task.steps.iter().enumerate() {
                if let (true, Some(at)) = (step.is_awaiting_retry(), step.retry_at) {
                    t.push(at, task.id, StepId(i as u32));
                }
            }
        }
        t
    }

    pub fn push(&mut self, at: Timestamp, task: TaskId, step: StepId) {
        self.heap.push(Reverse((at, task, step)));
    }

    pub fn next_due(&self) -> Option<Timestamp> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Removes and returns every timer due at `now`.
    pub fn pop_due(&mut self, now: Timestamp) -> Vec<(TaskId, StepId)> {
        let mut due = Vec::new();
        while let Some(Reverse((at, task, step))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            due.push((task, step));
        }
        due
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}
