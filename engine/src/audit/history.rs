//! A task's history and its state at any point: its records folded in log order
//! (with the partition's ownership claims, which decide fencing), each described
//! for people (who, what) and as JSON.
//!
//! A task's state depends only on its own events and the claims (the fold has no
//! other cross-task effect), so folding just those records gives exactly the
//! state the full fold has for it at the same position.

use std::path::Path;

use serde::Serialize;

use super::index::{LookupStats, read_positions, task_records};
use super::{AuditError, Bound};
use crate::codec::{self, JsonFallback};
use crate::log::{Log, StoredRecord};
use crate::record::{
    Body, Command, Control, Envelope, Event, Kind, PartitionId, Position, RecordType, StepId,
    StepOutcome, TaskId, Timestamp, record_json,
};
use crate::runtime::derive_task_id;
use crate::state::{Applied, State, TaskState};

/// One record of the task, described.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub position: Position,
    pub at: Timestamp,
    /// `None` when the record did not decode (garbage a client sent).
    #[serde(rename = "type", serialize_with = "type_name")]
    pub record_type: Option<RecordType>,
    #[serde(serialize_with = "kind_name")]
    pub kind: Option<Kind>,
    /// Who caused it: the initiator, requester or operator named in the record, or
    /// `engine` for events the engine decided on its own.
    pub who: Option<String>,
    pub summary: String,
    /// What the fold made of it when it did not simply apply: `fenced ...` or the
    /// anomaly.
    pub note: Option<String>,
    /// The record's JSON form (see `docs/events.md`).
    pub data: Option<serde_json::Value>,
}

fn type_name<S: serde::Serializer>(t: &Option<RecordType>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_some(&t.map(RecordType::name))
}

fn kind_name<S: serde::Serializer>(k: &Option<Kind>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_some(&k.map(Kind::as_str))
}

/// A task's records up to a point, and its state there.
#[derive(Debug, Clone)]
pub struct TaskHistory {
    pub task: TaskId,
    pub partition: PartitionId,
    /// The state is the fold of the partition's records before this position.
    pub as_of: Position,
    pub entries: Vec<HistoryEntry>,
    /// Records of the task after the point (not in `entries`).
    pub later: usize,
    /// `None`: the task did not exist yet (or never did).
    pub state: Option<TaskState>,
    pub lookup: LookupStats,
}

/// The history of `task` up to `at` (default: the whole log). `index_dir`: where
/// the task index lives (see [`super::index`]); `None` reads the whole partition.
pub fn task_history(
    log: &dyn Log,
    index_dir: Option<&Path>,
    task: TaskId,
    at: Option<Bound>,
) -> Result<TaskHistory, AuditError> {
    let (mut records, lookup) = task_records(log, index_dir, task)?;
    let (partition, end) = (lookup.partition, lookup.end);
    // Commands this task's events answer but that are keyed otherwise.
    let have: std::collections::HashSet<Position> = records.iter().map(|r| r.position).collect();
    let mut missing: Vec<Position> = records
        .iter()
        .filter(|r| r.record.key == task && r.record.headers.kind == Some(Kind::Event))
        .filter_map(|r| codec::decode(&r.record.payload).ok()?.source_position)
        .filter(|p| !have.contains(p) && *p < end)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    records.extend(read_positions(log, partition, &missing)?);
    records.sort_by_key(|r| r.position);
    Ok(fold_history(
        log.partitions(),
        partition,
        task,
        &records,
        at,
        end,
        lookup,
    ))
}

/// Folds `records` (the task's, the claims, the commands it answered) up to `at`.
pub fn fold_history(
    partitions: u32,
    partition: PartitionId,
    task: TaskId,
    records: &[StoredRecord],
    at: Option<Bound>,
    end: Position,
    lookup: LookupStats,
) -> TaskHistory {
    let mut state = State::new(u64::MAX);
    let mut entries = Vec::new();
    let mut later = 0;
    let mut as_of = match at {
        Some(Bound::Position(p)) => p.min(end),
        _ => end,
    };
    let mut cut = false;
    for rec in records {
        let within = !cut && at.is_none_or(|b| b.admits(rec.position, rec.record.timestamp));
        if !within {
            if !cut {
                cut = true;
                if let Some(Bound::Time(_)) = at {
                    as_of = rec.position;
                }
            }
            if rec.record.headers.kind != Some(Kind::Control) {
                later += 1;
            }
            continue;
        }
        let decoded = match rec.record.headers.kind {
            Some(Kind::Event) | Some(Kind::Control) => codec::decode(&rec.record.payload).ok(),
            Some(Kind::Command) | None => {
                let fallback = JsonFallback {
                    task_id: derive_task_id(
                        partition,
                        partitions,
                        rec.position,
                        rec.record.timestamp,
                    ),
                    at: rec.record.timestamp,
                };
                codec::decode_any(
                    rec.record.headers.content_type,
                    &rec.record.payload,
                    &fallback,
                )
                .ok()
            }
        };
        let Some(env) = decoded else {
            entries.push(HistoryEntry {
                position: rec.position,
                at: rec.record.timestamp,
                record_type: rec.record.headers.record_type,
                kind: rec.record.headers.kind,
                who: None,
                summary: "undecodable record (the engine rejects it)".into(),
                note: None,
                data: None,
            });
            continue;
        };
        let applied = match &env.body {
            // As the engine folds: only records written as events or claims.
            Body::Event(_) | Body::Control(_)
                if matches!(
                    rec.record.headers.kind,
                    Some(Kind::Event) | Some(Kind::Control)
                ) =>
            {
                state.apply(&env)
            }
            Body::Event(_) | Body::Control(_) => Applied::Command,
            Body::Command(_) => Applied::Command,
        };
        if matches!(env.body, Body::Control(_)) || env.task_id != task {
            continue;
        }
        let note = match applied {
            Applied::Fenced { epoch, current } => Some(format!(
                "ignored: written by epoch {epoch} after epoch {current} claimed the partition"
            )),
            Applied::Anomaly(e) => Some(format!("ignored: {e}")),
            Applied::Event | Applied::Control | Applied::Command => None,
        };
        let (who, summary) = describe(&env, state.task(&task));
        entries.push(HistoryEntry {
            position: rec.position,
            at: env.at,
            record_type: Some(env.record_type()),
            kind: Some(env.kind()),
            who,
            summary,
            note,
            data: Some(record_json(&env)),
        });
    }
    TaskHistory {
        task,
        partition,
        as_of,
        entries,
        later,
        state: state.task(&task).cloned(),
        lookup,
    }
}

fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(max).collect();
    s.push('…');
    s
}

fn step_name(task: Option<&TaskState>, step: StepId) -> String {
    task.and_then(|t| t.dag.snapshot().step(step).map(|s| s.name.clone()))
        .unwrap_or_else(|| format!("step {}", step.0))
}

fn by(who: &Option<String>) -> Option<String> {
    who.clone()
}

fn because(reason: &Option<String>) -> String {
    reason
        .as_deref()
        .map(|r| format!(": {}", short(r, 80)))
        .unwrap_or_default()
}

/// Who and what, in a line.
pub fn describe(env: &Envelope, task: Option<&TaskState>) -> (Option<String>, String) {
    let engine = || Some(format!("engine (epoch {})", env.epoch));
    match &env.body {
        Body::Command(c) => match c {
            Command::RequestTask(r) => {
                let who = match (&r.initiator, &r.source_system) {
                    (Some(i), Some(s)) => Some(format!("{i} via {s}")),
                    (Some(i), None) => Some(i.clone()),
                    (None, Some(s)) => Some(s.clone()),
                    (None, None) => None,
                };
                let version = r
                    .version
                    .as_deref()
                    .map(|v| format!("@{v}"))
                    .unwrap_or_default();
                let key = r
                    .idempotency_key
                    .as_deref()
                    .map(|k| format!(", idempotency key {k}"))
                    .unwrap_or_default();
                (
                    who,
                    format!(
                        "request {}/{}{version} with context {}{key}{}",
                        r.namespace,
                        r.name,
                        short(r.context.as_str(), 80),
                        because(&r.reason)
                    ),
                )
            }
            Command::CancelTask(c) => {
                (by(&c.requested_by), format!("cancel{}", because(&c.reason)))
            }
            Command::RetryTask(c) => (by(&c.requested_by), format!("retry{}", because(&c.reason))),
            Command::ResolveStep(c) => (
                by(&c.resolved_by),
                format!(
                    "resolve {} with {}{}{}",
                    c.step,
                    c.result
                        .as_ref()
                        .map_or("null".into(), |r| short(r.as_str(), 60)),
                    if c.skip_dependents {
                        ", skipping dependents"
                    } else {
                        ""
                    },
                    because(&c.reason)
                ),
            ),
            Command::ReportStepResult(c) => (
                Some("remote worker".into()),
                match &c.outcome {
                    StepOutcome::Completed { result } => format!(
                        "report {} attempt {} completed: {}",
                        c.step,
                        c.attempt,
                        short(result.as_str(), 60)
                    ),
                    StepOutcome::Failed(e) => format!(
                        "report {} attempt {} failed ({}): {}",
                        c.step,
                        c.attempt,
                        e.kind.as_str(),
                        short(&e.message, 80)
                    ),
                },
            ),
        },
        Body::Event(e) => match e {
            Event::TaskAccepted(a) => (
                engine(),
                format!(
                    "accepted as {} ({} steps)",
                    a.template.qualified_name(),
                    a.template.steps.len()
                ),
            ),
            Event::TaskRejected(r) => (
                engine(),
                format!(
                    "rejected {}: {} ({})",
                    r.command
                        .map_or("an undecodable record".into(), |c| c.name().to_owned()),
                    short(&r.message, 100),
                    r.reason.code()
                ),
            ),
            Event::TaskStarted => (engine(), "started".into()),
            Event::StepStarted(s) => (
                engine(),
                format!("{} attempt {} started", step_name(task, s.step), s.attempt),
            ),
            Event::StepCompleted(s) => (
                engine(),
                format!(
                    "{} attempt {} completed: {}",
                    step_name(task, s.step),
                    s.attempt,
                    short(s.result.as_str(), 60)
                ),
            ),
            Event::StepFailed(f) => (
                engine(),
                format!(
                    "{} attempt {} failed ({}): {}; {}",
                    step_name(task, f.step),
                    f.attempt,
                    f.error.kind.as_str(),
                    short(&f.error.message, 80),
                    f.retry_at
                        .map_or("no retry".into(), |t| format!("retry at {t}"))
                ),
            ),
            Event::StepRetryDue(r) => (
                engine(),
                format!(
                    "{} pending again{}",
                    step_name(task, r.step),
                    if r.reset_attempts {
                        " (attempts reset)"
                    } else {
                        ""
                    }
                ),
            ),
            Event::StepSkipped(s) => (
                engine(),
                format!(
                    "{} skipped: {}",
                    step_name(task, s.step),
                    short(&s.reason, 80)
                ),
            ),
            Event::StepCancelled(s) => (engine(), format!("{} cancelled", step_name(task, s.step))),
            Event::StepResolvedManually(r) => (
                by(&r.resolved_by),
                format!(
                    "{} resolved by hand with {}{}",
                    step_name(task, r.step),
                    short(r.result.as_str(), 60),
                    because(&r.reason)
                ),
            ),
            Event::TaskCompleted => (engine(), "completed".into()),
            Event::TaskFailed(f) => (
                engine(),
                format!(
                    "failed ({})",
                    f.failed_steps
                        .iter()
                        .map(|s| step_name(task, *s))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Event::TaskCancelled(c) => (
                by(&c.requested_by).or_else(engine),
                format!("cancelled{}", because(&c.reason)),
            ),
            Event::TaskRetried(r) => (
                by(&r.requested_by).or_else(engine),
                format!("retried{}", because(&r.reason)),
            ),
            Event::TaskResolvedManually => (engine(), "resolved by hand".into()),
        },
        Body::Control(Control::PartitionClaimed(c)) => (
            Some(c.owner.clone()),
            format!("claimed the partition (epoch {})", c.epoch),
        ),
    }
}
