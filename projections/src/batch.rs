//! Turning a run of events into row changes. Pure: the stores turn a [`Batch`] into
//! multi-row SQL. Every value comes from the events (log times, never the clock),
//! so projecting the same log always produces the same rows.

use std::collections::BTreeMap;

use tasker_engine::record::{
    Body, Control, Envelope, Epoch, Event, PartitionId, Position, RequestTask, StepId, TaskId,
    TemplateSnapshot, Timestamp,
};

/// A column change: keep what the row has, or set a value (possibly NULL).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Set<T> {
    #[default]
    Keep,
    To(Option<T>),
}

impl<T: Clone> Set<T> {
    /// The value to write, or `None` with `false` meaning keep.
    pub fn parts(&self) -> (bool, Option<T>) {
        match self {
            Set::Keep => (false, None),
            Set::To(v) => (true, v.clone()),
        }
    }

    pub(crate) fn or(self, newer: Set<T>) -> Set<T> {
        match newer {
            Set::Keep => self,
            to => to,
        }
    }

    /// The value a row created with NULL in this column ends up with.
    fn onto_null(&self) -> Option<T> {
        self.parts().1
    }
}

impl Set<Timestamp> {
    /// Milliseconds, the unit times cross the wire in.
    pub fn map_ms(self) -> Set<i64> {
        match self {
            Set::Keep => Set::Keep,
            Set::To(v) => Set::To(v.map(|t| t.as_millis() as i64)),
        }
    }
}

/// A task row as `task.accepted` creates it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub task_id: TaskId,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub context: String,
    pub requested_at: Timestamp,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    pub correlation_id: uuid::Uuid,
    pub log_position: Position,
}

/// A step row as `task.accepted` creates it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewStep {
    pub task_id: TaskId,
    pub step: u32,
    pub name: String,
    pub handler: String,
    pub retry_limit: u32,
    pub retryable: bool,
    pub at: Timestamp,
}

/// A step row created by this batch as the batch leaves it: its creation with
/// the batch's later changes applied, so a store inserts it once instead of
/// inserting it and updating it in the same transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRowInit {
    pub status: &'static str,
    pub attempts: u32,
    pub last_attempted_at: Option<Timestamp>,
    pub last_failure_at: Option<Timestamp>,
    pub next_retry_at: Option<Timestamp>,
    pub backoff_request_seconds: Option<i64>,
    pub results: Option<String>,
    pub error: Option<String>,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub duration_ms: Option<i64>,
    pub updated_at: Timestamp,
}

impl NewStep {
    /// The row as the batch leaves it, given the batch's changes to it.
    pub fn init(&self, patch: Option<&StepPatch>) -> StepRowInit {
        let Some(p) = patch else {
            return StepRowInit {
                status: "pending",
                attempts: 0,
                last_attempted_at: None,
                last_failure_at: None,
                next_retry_at: None,
                backoff_request_seconds: None,
                results: None,
                error: None,
                started_at: None,
                completed_at: None,
                duration_ms: None,
                updated_at: self.at,
            };
        };
        let started_at = p.started_at.onto_null();
        StepRowInit {
            status: p.status.unwrap_or("pending"),
            attempts: p.attempts.unwrap_or(0),
            last_attempted_at: p.last_attempted_at.onto_null(),
            last_failure_at: p.last_failure_at.onto_null(),
            next_retry_at: p.next_retry_at.onto_null(),
            backoff_request_seconds: p.backoff_request_seconds.onto_null(),
            results: p.results.onto_null(),
            error: p.error.onto_null(),
            started_at,
            completed_at: p.completed_at.onto_null(),
            // As the stores' update computes it against the row's `started_at`
            // before the update (NULL for a row created in this batch).
            duration_ms: match p.duration {
                Duration::Keep | Duration::Clear | Duration::EndedAt(_) => None,
                Duration::Millis(m) => Some(m),
            },
            updated_at: p.updated_at.unwrap_or(self.at),
        }
    }
}

/// A task row created by this batch as the batch leaves it (see [`StepRowInit`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRowInit {
    pub status: &'static str,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    pub updated_at: Timestamp,
}

impl NewTask {
    /// The row as the batch leaves it, given the batch's changes to it.
    pub fn init(&self, patch: Option<&TaskPatch>) -> TaskRowInit {
        TaskRowInit {
            status: patch.and_then(|p| p.status).unwrap_or("pending"),
            started_at: patch.and_then(|p| p.started_at.onto_null()),
            completed_at: patch.and_then(|p| p.completed_at.onto_null()),
            updated_at: patch
                .and_then(|p| p.updated_at)
                .unwrap_or(self.requested_at),
        }
    }
}

/// Column changes of an existing (or just inserted) task row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskPatch {
    pub status: Option<&'static str>,
    pub started_at: Set<Timestamp>,
    pub completed_at: Set<Timestamp>,
    pub updated_at: Option<Timestamp>,
}

/// Column changes of a step row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepPatch {
    pub status: Option<&'static str>,
    pub attempts: Option<u32>,
    pub last_attempted_at: Set<Timestamp>,
    pub last_failure_at: Set<Timestamp>,
    pub next_retry_at: Set<Timestamp>,
    pub backoff_request_seconds: Set<i64>,
    pub results: Set<String>,
    pub error: Set<String>,
    pub started_at: Set<Timestamp>,
    pub completed_at: Set<Timestamp>,
    /// `completed_at - started_at`, with `started_at` from the row when this batch
    /// did not start the attempt.
    pub duration: Duration,
    pub updated_at: Option<Timestamp>,
}

/// How a batch changes `duration_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Duration {
    #[default]
    Keep,
    Clear,
    Millis(i64),
    /// Ended at this time; the start is the row's `started_at`.
    EndedAt(Timestamp),
}

/// One transition row.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub task_id: TaskId,
    /// `None` for task transitions.
    pub step: Option<u32>,
    /// `None` when this batch does not know it (a cancel): the store reads the row.
    pub from_state: Option<&'static str>,
    pub from_known: bool,
    pub to_state: &'static str,
    pub at: Timestamp,
    pub metadata: String,
    pub event_type: &'static str,
    pub position: Position,
}

/// Everything a run of records changes in the read model.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub partition: PartitionId,
    /// The position after the last record of the batch (the new checkpoint).
    pub end: Position,
    pub events: u64,
    pub last_event_at: Option<Timestamp>,
    /// The highest ownership epoch after the batch.
    pub epoch: Epoch,
    /// The position and BLAKE3 of the payload of the batch's last record (see
    /// [`Checkpoint`]).
    ///
    /// [`Checkpoint`]: crate::store::Checkpoint
    pub last_record: Option<(Position, [u8; 32])>,
    pub namespaces: BTreeMap<String, Timestamp>,
    /// `(namespace, name, version)` -> (template JSON, first seen).
    pub named_tasks: BTreeMap<(String, String, String), (String, Timestamp)>,
    pub new_tasks: Vec<NewTask>,
    pub new_steps: Vec<NewStep>,
    /// `(task, from, to)`.
    pub edges: Vec<(TaskId, u32, u32)>,
    pub task_patches: BTreeMap<TaskId, TaskPatch>,
    pub step_patches: BTreeMap<(TaskId, u32), StepPatch>,
    pub transitions: Vec<Transition>,
    /// Last known status per task / step within this batch.
    task_status: BTreeMap<TaskId, &'static str>,
    step_status: BTreeMap<(TaskId, u32), &'static str>,
}

/// The template snapshot as JSON, for `tasker_named_tasks.template`.
pub fn template_json(t: &TemplateSnapshot) -> String {
    let steps: Vec<serde_json::Value> = t
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "handler": s.handler,
                "depends_on": s.depends_on.iter().filter_map(|p| t.step(*p).map(|p| p.name.clone())).collect::<Vec<_>>(),
                "retryable": s.retryable,
                "retry_limit": s.retry_limit,
                "timeout_ms": s.timeout_ms,
                "backoff": {"initial_ms": s.backoff.initial_ms, "max_ms": s.backoff.max_ms, "jitter_pct": s.backoff.jitter_pct},
                "config": s.config.to_value(),
            })
        })
        .collect();
    serde_json::json!({
        "namespace": t.namespace, "name": t.name, "version": t.version, "steps": steps,
    })
    .to_string()
}

impl Batch {
    /// An empty batch continuing at `start` with the partition's current `epoch`.
    pub fn new(partition: PartitionId, start: Position, epoch: Epoch) -> Batch {
        Batch {
            partition,
            end: start,
            epoch,
            ..Batch::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Rows touched (for sizing batches).
    pub fn rows(&self) -> usize {
        self.new_tasks.len()
            + self.new_steps.len()
            + self.task_patches.len()
            + self.step_patches.len()
            + self.transitions.len()
    }

    /// Adds one record read at `position` (commands and undecodable records only
    /// move the checkpoint).
    pub fn add(&mut self, position: Position, env: Option<&Envelope>) {
        self.end = position.next();
        let Some(env) = env else { return };
        match &env.body {
            Body::Command(_) => {}
            Body::Control(Control::PartitionClaimed(c)) => self.epoch = self.epoch.max(c.epoch),
            Body::Event(event) => {
                // Events of a fenced writer are void, as in the engine's fold.
                if env.epoch < self.epoch {
                    return;
                }
                self.events += 1;
                self.last_event_at = Some(env.at);
                self.event(position, env, event);
            }
        }
    }

    fn event(&mut self, position: Position, env: &Envelope, event: &Event) {
        let task = env.task_id;
        let at = env.at;
        let kind = event.record_type().name();
        match event {
            Event::TaskAccepted(a) => self.accepted(position, env, &a.request, &a.template),
            Event::TaskRejected(_) => {}
            Event::TaskStarted => {
                self.task(task, at, "in_progress", kind, position, "{}", |p| {
                    p.started_at = Set::To(Some(at));
                });
            }
            Event::TaskCompleted => self.task(task, at, "complete", kind, position, "{}", |p| {
                p.completed_at = Set::To(Some(at));
            }),
            Event::TaskFailed(f) => {
                let meta = serde_json::json!({"failed_steps": f.failed_steps.iter().map(|s| s.0).collect::<Vec<_>>()}).to_string();
                self.task(task, at, "error", kind, position, &meta, |p| {
                    p.completed_at = Set::To(Some(at));
                })
            }
            Event::TaskCancelled(c) => {
                let meta = serde_json::json!({"requested_by": c.requested_by, "reason": c.reason})
                    .to_string();
                self.task(task, at, "cancelled", kind, position, &meta, |p| {
                    p.completed_at = Set::To(Some(at));
                })
            }
            Event::TaskRetried(r) => {
                let meta = serde_json::json!({"requested_by": r.requested_by, "reason": r.reason})
                    .to_string();
                self.task(task, at, "in_progress", kind, position, &meta, |p| {
                    p.completed_at = Set::To(None);
                })
            }
            Event::TaskResolvedManually => {
                self.task(task, at, "resolved_manually", kind, position, "{}", |p| {
                    p.completed_at = Set::To(Some(at));
                })
            }
            Event::StepStarted(s) => {
                let meta = serde_json::json!({"attempt": s.attempt}).to_string();
                self.step(
                    task,
                    s.step,
                    at,
                    "in_progress",
                    kind,
                    position,
                    &meta,
                    |p| {
                        p.attempts = Some(s.attempt);
                        p.last_attempted_at = Set::To(Some(at));
                        p.started_at = Set::To(Some(at));
                        p.next_retry_at = Set::To(None);
                        p.completed_at = Set::To(None);
                        p.duration = Duration::Clear;
                    },
                )
            }
            Event::StepCompleted(c) => {
                let meta = serde_json::json!({"attempt": c.attempt}).to_string();
                let result = c.result.as_str().to_owned();
                self.step(task, c.step, at, "complete", kind, position, &meta, |p| {
                    p.results = Set::To(Some(result));
                    p.completed_at = Set::To(Some(at));
                    p.duration = match p.started_at {
                        Set::To(Some(s)) => Duration::Millis(at.millis_since(s) as i64),
                        _ => Duration::EndedAt(at),
                    };
                })
            }
            Event::StepFailed(f) => {
                let error = serde_json::json!({
                    "kind": f.error.kind.as_str(), "message": f.error.message,
                    "retry_after_ms": f.error.retry_after_ms, "attempt": f.attempt,
                })
                .to_string();
                let meta = serde_json::json!({
                    "attempt": f.attempt,
                    "retry_at": f.retry_at.map(Timestamp::as_millis),
                    "kind": f.error.kind.as_str(),
                })
                .to_string();
                let backoff = f.error.retry_after_ms.map(|ms| ms.div_ceil(1000) as i64);
                self.step(task, f.step, at, "error", kind, position, &meta, |p| {
                    p.error = Set::To(Some(error));
                    p.last_failure_at = Set::To(Some(at));
                    p.next_retry_at = Set::To(f.retry_at);
                    p.backoff_request_seconds = Set::To(backoff);
                })
            }
            Event::StepRetryDue(r) => {
                let meta = serde_json::json!({"reset_attempts": r.reset_attempts}).to_string();
                self.step(task, r.step, at, "pending", kind, position, &meta, |p| {
                    p.next_retry_at = Set::To(None);
                    if r.reset_attempts {
                        p.attempts = Some(0);
                    }
                })
            }
            Event::StepSkipped(s) => {
                let meta = serde_json::json!({"reason": s.reason}).to_string();
                self.step(task, s.step, at, "skipped", kind, position, &meta, |p| {
                    p.completed_at = Set::To(Some(at));
                })
            }
            Event::StepCancelled(c) => {
                self.step(task, c.step, at, "cancelled", kind, position, "{}", |p| {
                    p.completed_at = Set::To(Some(at));
                })
            }
            Event::StepResolvedManually(r) => {
                let meta = serde_json::json!({"resolved_by": r.resolved_by, "reason": r.reason})
                    .to_string();
                let result = r.result.as_str().to_owned();
                self.step(
                    task,
                    r.step,
                    at,
                    "resolved_manually",
                    kind,
                    position,
                    &meta,
                    |p| {
                        p.results = Set::To(Some(result));
                        p.next_retry_at = Set::To(None);
                        p.completed_at = Set::To(Some(at));
                    },
                )
            }
        }
    }

    fn accepted(
        &mut self,
        position: Position,
        env: &Envelope,
        request: &RequestTask,
        template: &TemplateSnapshot,
    ) {
        let at = env.at;
        self.namespaces
            .entry(template.namespace.clone())
            .or_insert(at);
        self.named_tasks
            .entry((
                template.namespace.clone(),
                template.name.clone(),
                template.version.clone(),
            ))
            .or_insert_with(|| (template_json(template), at));
        self.new_tasks.push(NewTask {
            task_id: env.task_id,
            namespace: template.namespace.clone(),
            name: template.name.clone(),
            version: template.version.clone(),
            context: request.context.as_str().to_owned(),
            requested_at: at,
            initiator: request.initiator.clone(),
            source_system: request.source_system.clone(),
            reason: request.reason.clone(),
            tags: request.tags.clone(),
            idempotency_key: request.idempotency_key.clone(),
            correlation_id: *env.correlation_id.as_uuid(),
            log_position: position,
        });
        for (i, s) in template.steps.iter().enumerate() {
            self.new_steps.push(NewStep {
                task_id: env.task_id,
                step: i as u32,
                name: s.name.clone(),
                handler: s.handler.clone(),
                retry_limit: s.retry_limit,
                retryable: s.retryable,
                at,
            });
            self.step_status.insert((env.task_id, i as u32), "pending");
            for p in &s.depends_on {
                self.edges.push((env.task_id, p.0, i as u32));
            }
        }
        self.task_status.insert(env.task_id, "pending");
        self.transitions.push(Transition {
            task_id: env.task_id,
            step: None,
            from_state: None,
            from_known: true,
            to_state: "pending",
            at,
            metadata: "{}".into(),
            event_type: "task.accepted",
            position,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn task(
        &mut self,
        task: TaskId,
        at: Timestamp,
        to: &'static str,
        kind: &'static str,
        position: Position,
        metadata: &str,
        change: impl FnOnce(&mut TaskPatch),
    ) {
        let from = self.task_status.insert(task, to);
        let patch = self.task_patches.entry(task).or_default();
        patch.status = Some(to);
        patch.updated_at = Some(at);
        change(patch);
        self.transitions.push(Transition {
            task_id: task,
            step: None,
            from_state: from,
            from_known: from.is_some(),
            to_state: to,
            at,
            metadata: metadata.to_owned(),
            event_type: kind,
            position,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        task: TaskId,
        step: StepId,
        at: Timestamp,
        to: &'static str,
        kind: &'static str,
        position: Position,
        metadata: &str,
        change: impl FnOnce(&mut StepPatch),
    ) {
        let key = (task, step.0);
        let from = self.step_status.insert(key, to);
        let patch = self.step_patches.entry(key).or_default();
        patch.status = Some(to);
        patch.updated_at = Some(at);
        let mut fresh = StepPatch::default();
        change(&mut fresh);
        merge(patch, fresh);
        self.transitions.push(Transition {
            task_id: task,
            step: Some(step.0),
            from_state: from,
            from_known: from.is_some(),
            to_state: to,
            at,
            metadata: metadata.to_owned(),
            event_type: kind,
            position,
        });
    }
}

/// Later changes win column by column; a duration that needs the start uses a
/// start set earlier in the batch.
fn merge(into: &mut StepPatch, newer: StepPatch) {
    if newer.status.is_some() {
        into.status = newer.status;
    }
    if newer.attempts.is_some() {
        into.attempts = newer.attempts;
    }
    into.last_attempted_at =
        std::mem::take(&mut into.last_attempted_at).or(newer.last_attempted_at);
    into.last_failure_at = std::mem::take(&mut into.last_failure_at).or(newer.last_failure_at);
    into.next_retry_at = std::mem::take(&mut into.next_retry_at).or(newer.next_retry_at);
    into.backoff_request_seconds =
        std::mem::take(&mut into.backoff_request_seconds).or(newer.backoff_request_seconds);
    into.results = std::mem::take(&mut into.results).or(newer.results);
    into.error = std::mem::take(&mut into.error).or(newer.error);
    into.started_at = std::mem::take(&mut into.started_at).or(newer.started_at);
    into.completed_at = std::mem::take(&mut into.completed_at).or(newer.completed_at);
    into.duration = match newer.duration {
        Duration::Keep => into.duration,
        Duration::EndedAt(end) => match into.started_at {
            Set::To(Some(start)) => Duration::Millis(end.millis_since(start) as i64),
            _ => Duration::EndedAt(end),
        },
        other => other,
    };
    if newer.updated_at.is_some() {
        into.updated_at = newer.updated_at;
    }
}
