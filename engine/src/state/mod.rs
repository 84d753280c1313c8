//! The fold: a partition's state, changed only by [`State::apply`]. Pure: no I/O,
//! no clock (time comes from the records), no randomness.

mod chain;
mod dag;
mod digest;
mod fifo;
mod snapshot;
mod step;
mod task;
mod task_map;

use std::sync::Arc;

use rustc_hash::FxHashMap;

pub use chain::HashChain;
pub use dag::Dag;
pub use digest::{Digest, DigestSum};
pub use snapshot::{
    EncodedState, PACE_TASKS, SnapshotCache, SnapshotMeta, StateDelta, StateSnapshot, Written,
};
pub use step::{StepState, StepStatus};
pub use task::{TaskState, TaskStatus};
#[cfg(feature = "runtime")]
pub(crate) use task_map::SHARDS as TASK_SHARDS;

use crate::record::{
    Body, Control, Envelope, Epoch, Event, Position, StepId, TaskId, TemplateSnapshot, Timestamp,
};

/// Default time a final task stays in memory (for idempotency, retries, queries)
/// after it finished; it stays in the log forever.
pub const DEFAULT_RETENTION_MS: u64 = 15 * 60 * 1000;

/// An event that does not fit the state it is applied to. The fold leaves the
/// state unchanged and reports it; it never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("event for unknown task {0}")]
    UnknownTask(TaskId),
    #[error("task {0} accepted twice")]
    DuplicateTask(TaskId),
    #[error("task {task} has no step {step}")]
    UnknownStep { task: TaskId, step: StepId },
    #[error("task {task}: illegal transition {from:?} -> {to:?}")]
    IllegalTaskTransition {
        task: TaskId,
        from: TaskStatus,
        to: TaskStatus,
    },
    #[error("task {task} step {step}: illegal transition {from:?} -> {to:?}")]
    IllegalStepTransition {
        task: TaskId,
        step: StepId,
        from: StepStatus,
        to: StepStatus,
    },
    #[error("task {task} step {step}: attempt {got}, expected {expected}")]
    AttemptMismatch {
        task: TaskId,
        step: StepId,
        expected: u32,
        got: u32,
    },
}

/// What applying one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// An event changed the state.
    Event,
    /// A control record (ownership claim) was recorded.
    Control,
    /// Commands do not change state; the processor decides them.
    Command,
    /// An event from a writer whose epoch was superseded; ignored.
    Fenced { epoch: Epoch, current: Epoch },
    /// An event that does not fit the state; ignored.
    Anomaly(ApplyError),
}

/// Counters the fold keeps about itself (not part of the digest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldStats {
    pub events: u64,
    pub fenced: u64,
    pub anomalies: u64,
    pub evicted: u64,
}

type TemplateKey = (String, String, String);

/// One partition's state.
#[derive(Debug, Clone)]
pub struct State {
    /// Shared with the runtime's read views; mutated copy-on-write (`Arc::make_mut`),
    /// so a published view never changes and unchanged tasks are never copied.
    tasks: task_map::TaskMap<Arc<TaskState>>,
    /// `(namespace, idempotency key)` of tasks still in memory.
    idempotency: FxHashMap<(String, String), TaskId>,
    /// Interned templates, so tasks of one version share one [`Dag`].
    templates: FxHashMap<TemplateKey, Vec<Arc<Dag>>>,
    epoch: Epoch,
    answered: Option<Position>,
    /// The latest record time seen: the fold's only notion of "now".
    clock: Timestamp,
    retention_ms: u64,
    /// Finished tasks by finish time; chunked so growing never copies it all.
    evictions: fifo::ChunkedFifo<(Timestamp, TaskId)>,
    /// Entries ever pushed to `evictions` (a FIFO), so a snapshot delta can say
    /// which are new since the last one.
    evictions_pushed: u64,
    archived: DigestSum,
    stats: FoldStats,
    /// Ids evicted since the runtime last asked (only when tracking is on).
    evicted: Option<Vec<TaskId>>,
}

impl Default for State {
    fn default() -> Self {
        State::new(DEFAULT_RETENTION_MS)
    }
}

impl State {
    /// An empty partition; final tasks leave memory `retention_ms` after they finish.
    pub fn new(retention_ms: u64) -> Self {
        State {
            tasks: task_map::TaskMap::default(),
            idempotency: FxHashMap::default(),
            templates: FxHashMap::default(),
            epoch: Epoch(0),
            answered: None,
            clock: Timestamp(0),
            retention_ms,
            evictions: fifo::ChunkedFifo::default(),
            evictions_pushed: 0,
            archived: DigestSum::default(),
            stats: FoldStats::default(),
            evicted: None,
        }
    }

    /// Makes the fold remember evicted task ids for [`State::take_evicted`] (the
    /// runtime drops them from its read views).
    pub fn track_evictions(&mut self) {
        self.evicted.get_or_insert_with(Vec::new);
    }

    pub fn take_evicted(&mut self) -> Vec<TaskId> {
        self.evicted
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Folds one record.
    pub fn apply(&mut self, env: &Envelope) -> Applied {
        match &env.body {
            Body::Command(_) => Applied::Command,
            Body::Control(Control::PartitionClaimed(claim)) => {
                self.epoch = self.epoch.max(claim.epoch);
                self.clock = self.clock.max(env.at);
                Applied::Control
            }
            Body::Event(event) => {
                if env.epoch < self.epoch {
                    self.stats.fenced += 1;
                    return Applied::Fenced {
                        epoch: env.epoch,
                        current: self.epoch,
                    };
                }
                if env.at > self.clock {
                    self.clock = env.at;
                    self.evict_due();
                }
                if let Some(src) = env.source_position {
                    self.answered = Some(self.answered.map_or(src, |a| a.max(src)));
                }
                match self.apply_event(env, event) {
                    Ok(()) => {
                        self.stats.events += 1;
                        Applied::Event
                    }
                    Err(e) => {
                        self.stats.anomalies += 1;
                        Applied::Anomaly(e)
                    }
                }
            }
        }
    }

    fn apply_event(&mut self, env: &Envelope, event: &Event) -> Result<(), ApplyError> {
        match event {
            Event::TaskAccepted(accepted) => {
                match self.tasks.get(&env.task_id).map(|t| t.status.is_final()) {
                    // A final task's id came back (the engine accepted it again because
                    // the old task had left memory): archive the old one exactly as
                    // eviction would, so the digest does not depend on retention.
                    Some(true) => self.archive(env.task_id),
                    Some(false) => return Err(ApplyError::DuplicateTask(env.task_id)),
                    None => {}
                }
                let dag = self.intern(&accepted.template);
                let request = Arc::new(accepted.request.clone());
                if let Some(key) = &request.idempotency_key {
                    self.idempotency
                        .insert((request.namespace.clone(), key.clone()), env.task_id);
                }
                let task =
                    TaskState::accepted(env.task_id, env.correlation_id, dag, request, env.at);
                self.tasks.insert(env.task_id, Arc::new(task));
                Ok(())
            }
            // Rejections may name tasks that never existed.
            Event::TaskRejected(_) => Ok(()),
            Event::TaskStarted
            | Event::StepStarted(_)
            | Event::StepCompleted(_)
            | Event::StepFailed(_)
            | Event::StepRetryDue(_)
            | Event::StepSkipped(_)
            | Event::StepCancelled(_)
            | Event::StepResolvedManually(_)
            | Event::TaskCompleted
            | Event::TaskFailed(_)
            | Event::TaskCancelled(_)
            | Event::TaskRetried(_)
            | Event::TaskResolvedManually => {
                let task = self
                    .tasks
                    .get_mut(&env.task_id)
                    .ok_or(ApplyError::UnknownTask(env.task_id))?;
                Arc::make_mut(task).apply(event, env.at)?;
                if task.status.is_final() {
                    self.evictions.push_back((self.clock, env.task_id));
                    self.evictions_pushed += 1;
                }
                Ok(())
            }
        }
    }

    /// Drops final tasks whose retention elapsed by the fold's clock; their hashes
    /// stay in the digest.
    fn evict_due(&mut self) {
        while let Some(&(at, id)) = self.evictions.front() {
            if at.saturating_add_ms(self.retention_ms) > self.clock {
                break;
            }
            self.evictions.pop_front();
            // The entry must still describe the task (not a later task with its id).
            let due = self
                .tasks
                .get(&id)
                .is_some_and(|t| t.status.is_final() && t.finished_at.is_some_and(|f| f <= at));
            if due {
                self.archive(id);
                self.stats.evicted += 1;
                if let Some(list) = &mut self.evicted {
                    list.push(id);
                }
            }
        }
    }

    /// Removes a task from memory, keeping its hash in the digest.
    fn archive(&mut self, id: TaskId) {
        if let Some(task) = self.tasks.remove(&id) {
            self.archived
                .add(&digest::task_hash(&task, task.dag.hash()));
            if let Some(key) = &task.request.idempotency_key {
                let k = (task.request.namespace.clone(), key.clone());
                if self.idempotency.get(&k) == Some(&id) {
                    self.idempotency.remove(&k);
                }
            }
        }
    }

    fn intern(&mut self, snapshot: &Arc<TemplateSnapshot>) -> Arc<Dag> {
        let key = (
            snapshot.namespace.clone(),
            snapshot.name.clone(),
            snapshot.version.clone(),
        );
        let versions = self.templates.entry(key).or_default();
        let same = |d: &&Arc<Dag>| {
            Arc::ptr_eq(d.shared_snapshot(), snapshot) || d.snapshot() == &**snapshot
        };
        if let Some(dag) = versions.iter().find(same) {
            return Arc::clone(dag);
        }
        let dag = Arc::new(Dag::new(Arc::clone(snapshot)));
        versions.push(Arc::clone(&dag));
        dag
    }

    pub fn task(&self, id: &TaskId) -> Option<&TaskState> {
        self.tasks.get(id).map(|t| &**t)
    }

    /// The shared handle of a task, for read views (cloning it copies nothing).
    pub fn task_shared(&self, id: &TaskId) -> Option<&Arc<TaskState>> {
        self.tasks.get(id)
    }

    /// Tasks in memory, in no particular order.
    pub fn tasks(&self) -> impl Iterator<Item = &TaskState> {
        self.tasks.values().map(|t| &**t)
    }

    /// Tasks in memory as their shared handles (snapshots key caches on them).
    pub fn tasks_shared(&self) -> impl Iterator<Item = &Arc<TaskState>> {
        self.tasks.values()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The task a `(namespace, idempotency key)` already created, if still in memory.
    pub fn idempotent_task(&self, namespace: &str, key: &str) -> Option<TaskId> {
        self.idempotency
            .get(&(namespace.to_owned(), key.to_owned()))
            .copied()
    }

    /// The highest epoch claimed on this partition.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The highest command position answered by an event: commands at or before it
    /// are not decided again after a restart.
    pub fn answered(&self) -> Option<Position> {
        self.answered
    }

    /// The latest record time the fold has seen.
    pub fn clock(&self) -> Timestamp {
        self.clock
    }

    pub fn retention_ms(&self) -> u64 {
        self.retention_ms
    }

    pub fn stats(&self) -> FoldStats {
        self.stats
    }

    /// The canonical digest of the state (see `digest`).
    pub fn digest(&self) -> Digest {
        let mut sum = self.archived;
        for task in self.tasks.values() {
            sum.add(&digest::task_hash(task, task.dag.hash()));
        }
        digest::finish(sum, self.epoch, self.answered)
    }
}
