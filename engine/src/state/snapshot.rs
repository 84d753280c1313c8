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
use crate::codec::{self, EncodeError};
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
    /// The eviction queue's length, and its entries pushed since the cache
    /// the meta was taken for last saw it (the queue's last ones): copying
    /// the whole queue on the processor's thread cost one entry per task in
    /// memory at every snapshot.
    evictions_len: usize,
    evictions_new: Vec<(Timestamp, TaskId)>,
    evictions_pushed: u64,
    archived: DigestSum,
}

/// The changes from one [`StateSnapshot`] of a partition to a later one: the
/// tasks new or changed since, the tasks gone, the templates added, and the
/// scalars. Finished tasks stay in memory for the retention window and never
/// change, so a delta is what the partition did between two snapshots, not
/// everything it holds. Version 1; add a new struct for a new layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDelta {
    /// How many templates the earlier snapshot holds; `templates` follow them.
    templates_from: u32,
    templates: Vec<Arc<TemplateSnapshot>>,
    /// In id order.
    changed: Vec<TaskImage>,
    removed: Vec<TaskId>,
    epoch: Epoch,
    answered: Option<Position>,
    clock: Timestamp,
    retention_ms: u64,
    /// The eviction queue is first in, first out: the earlier snapshot's
    /// entries still queued (its last ones), then those added since.
    evictions_kept: u64,
    evictions_added: Vec<(Timestamp, TaskId)>,
    archived: DigestSum,
}

impl StateSnapshot {
    /// The later snapshot: this one with `delta` applied. `None` (and this
    /// snapshot unchanged) if the delta does not follow it: it expects more
    /// templates or evictions than it has.
    pub fn apply(&mut self, delta: StateDelta) -> Option<()> {
        let gone = self
            .evictions
            .len()
            .checked_sub(usize::try_from(delta.evictions_kept).ok()?)?;
        if self.templates.len() != delta.templates_from as usize {
            return None;
        }
        self.templates.extend(delta.templates);
        let removed: rustc_hash::FxHashSet<TaskId> = delta.removed.into_iter().collect();
        let old = std::mem::take(&mut self.tasks);
        let mut changed = delta.changed.into_iter().peekable();
        let mut tasks = Vec::with_capacity(old.len() + changed.len());
        for task in old.into_iter().filter(|t| !removed.contains(&t.id)) {
            while let Some(new) = changed.next_if(|c| c.id < task.id) {
                tasks.push(new);
            }
            tasks.push(changed.next_if(|c| c.id == task.id).unwrap_or(task));
        }
        tasks.extend(changed);
        self.evictions.drain(..gone);
        self.evictions.extend(delta.evictions_added);
        self.tasks = tasks;
        self.epoch = delta.epoch;
        self.answered = delta.answered;
        self.clock = delta.clock;
        self.retention_ms = delta.retention_ms;
        self.archived = delta.archived;
        Some(())
    }
}

/// What background snapshots carry from one to the next. Most tasks in memory
/// are finished ones kept for the retention window, and hashing and encoding
/// every task was most of a snapshot's CPU. A task whose `Arc` is the one seen
/// last time is unchanged: the cache holds a strong reference, so the fold's
/// copy-on-write (`Arc::make_mut`) cannot have changed that allocation in place,
/// and its hash and encoded image are reused; the others make the delta from the
/// last snapshot. (The cost: tasks evicted since the last snapshot stay
/// allocated until the next one, and each task's encoded image is kept.)
#[derive(Debug, Default)]
pub struct SnapshotCache {
    /// In id order.
    tasks: Vec<CachedTask>,
    /// Templates numbered in the order first seen; cached images refer to them
    /// by number, so numbers never change while the cache lives.
    templates: Vec<Arc<Dag>>,
    numbers: FxHashMap<usize, u32>,
    /// How many templates the last encoded snapshot held.
    templates_encoded: u32,
    /// The eviction queue as of the last encoded snapshot, and the pushes to
    /// it so far then (`None`: nothing encoded yet).
    evictions: VecDeque<(Timestamp, TaskId)>,
    evictions_encoded: Option<u64>,
    /// The file the cache's contents were written as, once that write succeeded.
    written: Option<Written>,
    /// Too many templates no task uses: start afresh next time.
    stale: bool,
}

/// A snapshot written from the cache, and the chain of deltas it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub position: Position,
    /// The chain's deltas so far, and their bytes.
    pub deltas: u32,
    pub delta_bytes: u64,
}

#[derive(Debug)]
struct CachedTask {
    task: Arc<TaskState>,
    hash: [u8; 32],
    image: Box<[u8]>,
    template: u32,
}

impl SnapshotCache {
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Records that the last [`SnapshotMeta::encode`] was written durably, so
    /// the next one may be a delta from it.
    pub fn written(&mut self, written: Written) {
        self.written = Some(written);
    }

    /// The eviction queue's pushes this cache has seen (`None`: it starts
    /// afresh, so every entry is new to it).
    fn evictions_seen(&self) -> Option<u64> {
        self.evictions_encoded.filter(|_| !self.stale)
    }

    /// Makes the next snapshot a whole one (another was written meanwhile
    /// without the cache, so the last one it wrote may be pruned).
    pub fn reset_chain(&mut self) {
        self.written = None;
    }

    /// The number of a task's template (the `Arc` is held, so its address is
    /// not reused while the number stands for it).
    fn template(&mut self, dag: &Arc<Dag>) -> u32 {
        let next = self.templates.len() as u32;
        let number = *self
            .numbers
            .entry(Arc::as_ptr(dag) as usize)
            .or_insert(next);
        if number == next {
            self.templates.push(Arc::clone(dag));
        }
        number
    }
}

/// A state snapshot's bytes in parts, most of them borrowed from the cache, so
/// writing it copies no task: whole (exactly `codec::canonical_bytes` of the
/// [`StateSnapshot`] it stands for) and as a [`StateDelta`] from the last one
/// written, when there is one.
#[derive(Debug)]
pub struct EncodedState<'c> {
    pub digest: Digest,
    /// The snapshot the delta is from; `None`: only the whole state can be written.
    pub base: Option<Written>,
    head: Vec<u8>,
    images: Vec<&'c [u8]>,
    tail: Vec<u8>,
    delta_head: Vec<u8>,
    changed: Vec<&'c [u8]>,
    /// The removed ids, then `tail`.
    delta_tail: Vec<u8>,
}

impl EncodedState<'_> {
    /// The whole state.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> + Clone {
        std::iter::once(&*self.head)
            .chain(self.images.iter().copied())
            .chain(std::iter::once(&*self.tail))
    }

    /// The delta from `base`.
    pub fn delta_parts(&self) -> impl Iterator<Item = &[u8]> + Clone {
        std::iter::once(&*self.delta_head)
            .chain(self.changed.iter().copied())
            .chain(std::iter::once(&*self.delta_tail))
    }

    pub fn size(&self) -> u64 {
        self.parts().map(|p| p.len() as u64).sum()
    }

    pub fn delta_size(&self) -> u64 {
        self.delta_parts().map(|p| p.len() as u64).sum()
    }
}

/// [`TaskImage`]'s layout, borrowed, for encoding (same fields in the same
/// order; a slice encodes as a `Vec` does).
#[derive(Serialize)]
struct TaskImageRef<'a> {
    id: TaskId,
    correlation_id: CorrelationId,
    status: TaskStatus,
    template: u32,
    request: &'a RequestTask,
    steps: &'a [StepState],
    accepted_at: Timestamp,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
}

/// How many tasks [`SnapshotMeta::encode_paced`] visits between pauses (at most
/// ~0.5 ms of hashing and encoding when all of them changed).
pub const PACE_TASKS: usize = 256;

impl SnapshotMeta {
    /// The digest of a state with these scalars and these tasks (equal to
    /// [`State::digest`] when `tasks` are the state's tasks) and its snapshot
    /// encoded, reusing the hash and the encoded image of every task unchanged
    /// since `cache` was filled, and refilling it with these.
    pub fn encode<'c, 'a>(
        self,
        tasks: impl Iterator<Item = &'a Arc<TaskState>>,
        cache: &'c mut SnapshotCache,
    ) -> Result<EncodedState<'c>, EncodeError> {
        self.encode_paced(tasks, cache, &mut || {})
    }

    /// [`Self::encode`], calling `pause` after every [`PACE_TASKS`] tasks, so a
    /// background caller can spread the work (the core itself reads no clock).
    pub fn encode_paced<'c, 'a>(
        self,
        tasks: impl Iterator<Item = &'a Arc<TaskState>>,
        cache: &'c mut SnapshotCache,
        pause: &mut dyn FnMut(),
    ) -> Result<EncodedState<'c>, EncodeError> {
        if cache.stale {
            *cache = SnapshotCache::default();
        }
        let base = cache.written.take();
        // In id order, so a fresh cache numbers templates as `from_tasks` does
        // and gives the same bytes.
        let mut tasks: Vec<&Arc<TaskState>> = tasks.collect();
        tasks.sort_unstable_by_key(|t| t.id);
        // The cache is in id order too: one merge finds what is unchanged,
        // changed, new and gone, without hashing ids.
        let mut old = std::mem::take(&mut cache.tasks).into_iter().peekable();
        let mut next = Vec::with_capacity(tasks.len());
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let mut sum = self.archived;
        for (i, task) in tasks.iter().enumerate() {
            if i % PACE_TASKS == PACE_TASKS - 1 {
                pause();
            }
            while let Some(gone) = old.next_if(|c| c.task.id < task.id) {
                removed.push(gone.task.id);
            }
            let cached = match old.next_if(|c| c.task.id == task.id) {
                Some(c) if Arc::ptr_eq(&c.task, task) => c,
                _ => {
                    changed.push(next.len());
                    let template = cache.template(&task.dag);
                    CachedTask {
                        task: Arc::clone(task),
                        hash: super::digest::task_hash(task, task.dag.hash()),
                        image: codec::canonical_bytes(&TaskImageRef {
                            id: task.id,
                            correlation_id: task.correlation_id,
                            status: task.status,
                            template,
                            request: &task.request,
                            steps: &task.steps,
                            accepted_at: task.accepted_at,
                            started_at: task.started_at,
                            finished_at: task.finished_at,
                        })?
                        .into_boxed_slice(),
                        template,
                    }
                }
            };
            sum.add(&cached.hash);
            next.push(cached);
        }
        removed.extend(old.map(|gone| gone.task.id));
        cache.tasks = next;
        let digest = super::digest::finish(sum, self.epoch, self.answered);
        let templates: Vec<&Arc<TemplateSnapshot>> = cache
            .templates
            .iter()
            .map(|d| d.shared_snapshot())
            .collect();
        let mut head = codec::canonical_bytes(&templates)?;
        head.extend(codec::canonical_bytes(&(tasks.len() as u64))?);
        let templates_from = cache.templates_encoded;
        let mut delta_head = codec::canonical_bytes(&(
            templates_from,
            &templates[(templates_from as usize).min(templates.len())..],
        ))?;
        delta_head.extend(codec::canonical_bytes(&(changed.len() as u64))?);
        cache.templates_encoded = templates.len() as u32;
        // The queue now: the last snapshot's last entries, then the new ones.
        let kept = self.evictions_len - self.evictions_new.len();
        let Some(gone) = cache.evictions.len().checked_sub(kept) else {
            *cache = SnapshotCache::default();
            return Err(EncodeError::Bincode(
                "snapshot scalars taken for another cache".into(),
            ));
        };
        cache.evictions.drain(..gone);
        cache.evictions.extend(self.evictions_new.iter().copied());
        cache.evictions_encoded = Some(self.evictions_pushed);
        let tail = codec::canonical_bytes(&(
            self.epoch,
            self.answered,
            self.clock,
            self.retention_ms,
            &cache.evictions,
            self.archived,
        ))?;
        let mut delta_tail = codec::canonical_bytes(&removed)?;
        delta_tail.extend(codec::canonical_bytes(&(
            self.epoch,
            self.answered,
            self.clock,
            self.retention_ms,
            kept as u64,
            &self.evictions_new,
            self.archived,
        ))?);
        // Templates no task uses any more stay numbered while the cache lives;
        // when they outnumber the used ones, the next snapshot starts afresh.
        let mut used = vec![false; cache.templates.len()];
        for c in &cache.tasks {
            used[c.template as usize] = true;
        }
        let used = used.into_iter().filter(|u| *u).count();
        cache.stale = cache.templates.len() > 2 * used + 8;
        let tasks = &cache.tasks;
        Ok(EncodedState {
            digest,
            base,
            head,
            images: tasks.iter().map(|c| &*c.image).collect(),
            tail,
            delta_head,
            changed: changed.into_iter().map(|i| &*tasks[i].image).collect(),
            delta_tail,
        })
    }
}

impl StateSnapshot {
    /// Builds a snapshot from tasks and scalars taken for an empty cache (so
    /// the queue's new entries are all of it), tasks sorted by id, so equal
    /// states give equal bytes.
    fn from_tasks<'a>(tasks: impl Iterator<Item = &'a TaskState>, meta: SnapshotMeta) -> Self {
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
            evictions: meta.evictions_new,
            archived: meta.archived,
        }
    }
}

impl State {
    /// The scalars for a snapshot encoded with `cache` (see
    /// [`SnapshotMeta::encode`]); taking them copies only the eviction entries
    /// pushed since the cache last saw the queue.
    pub fn snapshot_meta(&self, cache: &SnapshotCache) -> SnapshotMeta {
        // The pushes since are the queue's last ones (those not evicted yet).
        let len = self.evictions.len();
        let new = (cache.evictions_seen())
            .and_then(|seen| self.evictions_pushed.checked_sub(seen))
            .and_then(|n| usize::try_from(n).ok())
            .map_or(len, |n| n.min(len));
        SnapshotMeta {
            epoch: self.epoch,
            answered: self.answered,
            clock: self.clock,
            retention_ms: self.retention_ms,
            evictions_len: len,
            evictions_new: self.evictions.iter_from(len - new).collect(),
            evictions_pushed: self.evictions_pushed,
            archived: self.archived,
        }
    }

    /// The state as a snapshot.
    pub fn to_snapshot(&self) -> StateSnapshot {
        let meta = self.snapshot_meta(&SnapshotCache::default());
        StateSnapshot::from_tasks(self.tasks(), meta)
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
        state.evictions = snapshot.evictions.into_iter().collect();
        state.archived = snapshot.archived;
        Some(state)
    }
}
