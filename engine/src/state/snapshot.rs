//! A serializable image of a partition's state, so restarts fold only the log
//! written after the image instead of the whole history.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::State;
use super::dag::Dag;
use super::digest::{Digest, DigestSum};
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

/// A partition's scalars, taken cheaply so the (expensive) snapshot of the tasks
/// can be built elsewhere from a persistent copy of them.
#[derive(Clone, Debug)]
pub struct SnapshotMeta {
    epoch: Epoch,
    answered: Option<Position>,
    clock: Timestamp,
    retention_ms: u64,
    evictions: Vec<(Timestamp, TaskId)>,
    archived: DigestSum,
}

impl SnapshotMeta {
    /// The digest of a state with these scalars and these tasks (equal to
    /// [`State::digest`] when `tasks` are the state's tasks), reusing the hashes
    /// of tasks unchanged since `cache` was filled, and refilling it with these.
    pub fn digest<'a>(
        &self,
        tasks: impl Iterator<Item = &'a Arc<TaskState>>,
        cache: &mut TaskHashCache,
    ) -> Digest {
        let mut next = FxHashMap::with_capacity_and_hasher(cache.0.len(), Default::default());
        let mut sum = self.archived;
        for task in tasks {
            let hash = match cache.0.get(&task.id) {
                Some((seen, hash)) if Arc::ptr_eq(seen, task) => *hash,
                _ => super::digest::task_hash(task, task.dag.hash()),
            };
            sum.add(&hash);
            next.insert(task.id, (Arc::clone(task), hash));
        }
        cache.0 = next;
        super::digest::finish(sum, self.epoch, self.answered)
    }
}

/// Task hashes kept from one snapshot to the next. Most tasks in memory are
/// finished ones kept for the retention window, and hashing every task was most
/// of a snapshot's CPU. A task whose `Arc` is the one hashed last time is
/// unchanged: the cache holds a strong reference, so the fold's copy-on-write
/// (`Arc::make_mut`) cannot have changed that allocation in place. (The cost: tasks
/// evicted since the last snapshot stay allocated until the next one.)
#[derive(Debug, Default)]
pub struct TaskHashCache(FxHashMap<TaskId, (Arc<TaskState>, [u8; 32])>);

impl TaskHashCache {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl StateSnapshot {
    /// Builds a snapshot from tasks and scalars (tasks sorted by id, so equal states
    /// give equal bytes).
    pub fn from_tasks<'a>(tasks: impl Iterator<Item = &'a TaskState>, meta: SnapshotMeta) -> Self {
        let mut templates: Vec<Arc<TemplateSnapshot>> = Vec::new();
        let mut index: FxHashMap<*const Dag, u32> = FxHashMap::default();
        let mut tasks: Vec<&TaskState> = tasks.collect();
        tasks.sort_by_key(|t| t.id);
        let tasks = tasks
            .into_iter()
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
            epoch: meta.epoch,
            answered: meta.answered,
            clock: meta.clock,
            retention_ms: meta.retention_ms,
            evictions: meta.evictions,
            archived: meta.archived,
        }
    }
}

impl State {
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            epoch: self.epoch,
            answered: self.answered,
            clock: self.clock,
            retention_ms: self.retention_ms,
            evictions: self.evictions.iter().copied().collect(),
            archived: self.archived,
        }
    }

    /// The state as a snapshot.
    pub fn to_snapshot(&self) -> StateSnapshot {
        StateSnapshot::from_tasks(self.tasks(), self.snapshot_meta())
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
            state.tasks.insert(t.id, Arc::new(task));
        }
        state.epoch = snapshot.epoch;
        state.answered = snapshot.answered;
        state.clock = snapshot.clock;
        state.evictions = VecDeque::from(snapshot.evictions);
        state.archived = snapshot.archived;
        Some(state)
    }
}
