//! A serializable image of a partition's state, so restarts fold only the log
//! written after the image instead of the whole history.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::State;
use super::dag::Dag;
use super::digest::DigestSum;
use super::step::StepState;
use super::task::{TaskState, TaskStatus};
use crate::record::{
    CorrelationId, Epoch, Position, RequestTask, TaskId, TemplateSnapshot, Timestamp,
};

/// Everything [`State`] holds, with templates stored once. Version 1; add a new
/// struct for a new layout rather than changing this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    templates: Vec<Arc<TemplateSnapshot>>,
    tasks: Vec<TaskImage>,
    epoch: Epoch,
    answered: Option<Position>,
    clock: Timestamp,
    retention_ms: u64,
    evictions: Vec<(Timestamp, TaskId)>,
    archived: DigestSum,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TaskImage {
    id: TaskId,
    correlation_id: CorrelationId,
    status: TaskStatus,
    template: u32,
    request: RequestTask,
    steps: Vec<StepState>,
    accepted_at: Timestamp,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
}

impl StateSnapshot {
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }
}

impl State {
    /// The state as a snapshot (tasks sorted by id, so equal states give equal bytes).
    pub fn to_snapshot(&self) -> StateSnapshot {
        let mut templates: Vec<Arc<TemplateSnapshot>> = Vec::new();
        let mut index: FxHashMap<*const Dag, u32> = FxHashMap::default();
        let mut ids: Vec<&TaskId> = self.tasks.keys().collect();
        ids.sort();
        let tasks = ids
            .into_iter()
            .filter_map(|id| self.tasks.get(id))
            .map(|t| {
                let template = *index.entry(Arc::as_ptr(&t.dag)).or_insert_with(|| {
                    templates.push(Arc::clone(t.dag.shared_snapshot()));
                    (templates.len() - 1) as u32
                });
                TaskImage {
                    id: t.id,
                    correlation_id: t.correlation_id,
                    status: t.status,
                    template,
                    request: (*t.request).clone(),
                    steps: t.steps.clone(),
                    accepted_at: t.accepted_at,
                    started_at: t.started_at,
                    finished_at: t.finished_at,
                }
            })
            .collect();
        StateSnapshot {
            templates,
            tasks,
            epoch: self.epoch,
            answered: self.answered,
            clock: self.clock,
            retention_ms: self.retention_ms,
            evictions: self.evictions.iter().copied().collect(),
            archived: self.archived,
        }
    }

    /// Rebuilds a state from a snapshot; `None` if it is inconsistent (a task names
    /// a template the snapshot does not hold, or its step count differs).
    pub fn from_snapshot(snapshot: StateSnapshot) -> Option<State> {
        let mut state = State::new(snapshot.retention_ms);
        let dags: Vec<Arc<Dag>> = snapshot.templates.iter().map(|t| state.intern(t)).collect();
        for t in snapshot.tasks {
            let dag = Arc::clone(dags.get(t.template as usize)?);
            if dag.len() != t.steps.len() {
                return None;
            }
            let request = Arc::new(t.request);
            if let Some(key) = &request.idempotency_key {
                state
                    .idempotency
                    .insert((request.namespace.clone(), key.clone()), t.id);
            }
            let task = TaskState {
                id: t.id,
                correlation_id: t.correlation_id,
                status: t.status,
                dag,
                request,
                steps: t.steps,
                accepted_at: t.accepted_at,
                started_at: t.started_at,
                finished_at: t.finished_at,
            };
            state.tasks.insert(t.id, task);
        }
        state.epoch = snapshot.epoch;
        state.answered = snapshot.answered;
        state.clock = snapshot.clock;
        state.evictions = VecDeque::from(snapshot.evictions);
        state.archived = snapshot.archived;
        Some(state)
    }
}
