//! `tasker query`: the read model's questions from the command line — analytics,
//! slowest steps and tasks, health counts, and one task's readiness, dependency
//! levels and execution context. Every answer comes from the typed
//! [`Store`](tasker_projections::Store) queries (the `*_v01` SQL functions on
//! PostgreSQL, the same SQL on SQLite), so the CLI, the HTTP API and the tests
//! ask the same question the same way.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;
use tasker_engine::record::{TaskId, Timestamp};
use tasker_projections::{SlowestFilter, Store};

use crate::cli::{Cli, QueryCommand, SlowestArgs, TimeArgs};
use crate::project::open_store;
use crate::wiring::Setup;

/// Runs one query against the configured read model and prints the answer.
pub fn query(cli: &Cli, cmd: &QueryCommand) -> anyhow::Result<()> {
    let setup = Setup::load(cli)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = open_store(&setup).await?;
        let answer = ask(&store, cmd).await?;
        println!("{}", if cli.json { answer.json() } else { answer.text });
        anyhow::Ok(())
    })
}

/// An answer: the typed value as JSON and its human rendering.
struct Answer {
    value: serde_json::Value,
    text: String,
}

impl Answer {
    fn new<T: Serialize>(value: &T, text: String) -> anyhow::Result<Answer> {
        Ok(Answer {
            value: serde_json::to_value(value)?,
            text,
        })
    }

    fn json(&self) -> String {
        serde_json::to_string_pretty(&self.value)
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

async fn ask(store: &Store, cmd: &QueryCommand) -> anyhow::Result<Answer> {
    match cmd {
        QueryCommand::Analytics { period, time } => {
            let as_of = as_of(time)?;
            let since = before(as_of, *period);
            let m = store.analytics(since, as_of).await?;
            let text = fields(&[
                ("period", format!("{since} .. {as_of}")),
                ("active tasks", m.active_tasks_count.to_string()),
                ("namespaces", m.total_namespaces_count.to_string()),
                ("task types", m.unique_task_types_count.to_string()),
                (
                    "health score (last hour)",
                    m.system_health_score.to_string(),
                ),
                ("tasks requested", m.task_throughput.to_string()),
                (
                    "  complete",
                    format!("{} ({}%)", m.completion_count, m.completion_rate),
                ),
                ("  error", format!("{} ({}%)", m.error_count, m.error_rate)),
                ("steps finished", m.step_throughput.to_string()),
                ("step success rate", m.step_success_rate.to_string()),
                ("avg task duration", opt_ms(m.avg_task_duration_ms)),
                ("avg step duration", opt_ms(m.avg_step_duration_ms)),
            ]);
            Answer::new(&m, text)
        }
        QueryCommand::SlowestSteps(args) => {
            let steps = store.slowest_steps(&filter(args)).await?;
            let rows = steps
                .iter()
                .map(|s| {
                    vec![
                        format!("{} ms", s.duration_ms),
                        s.step_name.clone(),
                        format!("{}/{}@{}", s.namespace, s.task_name, s.version),
                        format!("{}/{}", s.attempts, s.retry_limit),
                        s.task_id.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            let text = table(&["duration", "step", "template", "attempts", "task"], &rows);
            Answer::new(&steps, text)
        }
        QueryCommand::SlowestTasks(args) => {
            let tasks = store.slowest_tasks(&filter(args)).await?;
            let rows = tasks
                .iter()
                .map(|t| {
                    vec![
                        format!("{} ms", t.duration_ms),
                        format!("{}/{}@{}", t.namespace, t.task_name, t.version),
                        t.status.clone(),
                        format!("{}/{}", t.completed_steps, t.step_count),
                        t.task_id.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            let text = table(
                &["duration", "template", "status", "steps done", "task"],
                &rows,
            );
            Answer::new(&tasks, text)
        }
        QueryCommand::Health { time } => {
            let h = store.health_counts(as_of(time)?).await?;
            let text = fields(&[
                (
                    "tasks",
                    format!(
                        "{} (pending {}, in progress {}, complete {}, error {}, cancelled {}, resolved {})",
                        h.total_tasks,
                        h.pending_tasks,
                        h.in_progress_tasks,
                        h.complete_tasks,
                        h.error_tasks,
                        h.cancelled_tasks,
                        h.resolved_manually_tasks
                    ),
                ),
                (
                    "steps",
                    format!(
                        "{} (pending {}, in progress {}, complete {}, error {}, skipped {}, cancelled {}, resolved {})",
                        h.total_steps,
                        h.pending_steps,
                        h.in_progress_steps,
                        h.complete_steps,
                        h.error_steps,
                        h.skipped_steps,
                        h.cancelled_steps,
                        h.resolved_manually_steps
                    ),
                ),
                (
                    "steps awaiting a retry",
                    h.retryable_error_steps.to_string(),
                ),
                ("  of which in backoff", h.in_backoff_steps.to_string()),
                ("steps out of retries", h.exhausted_retry_steps.to_string()),
            ]);
            Answer::new(&h, text)
        }
        QueryCommand::Readiness { task, time } => {
            let id = task_id(task)?;
            let steps = store.readiness(&[id], as_of(time)?).await?;
            if steps.is_empty() {
                bail!(not_projected(id));
            }
            let rows = steps
                .iter()
                .map(|s| {
                    vec![
                        s.step_index.to_string(),
                        s.name.clone(),
                        s.current_state.clone(),
                        format!("{}/{}", s.completed_parents, s.total_parents),
                        format!("{}/{}", s.attempts, s.retry_limit),
                        s.next_retry_at.map(|t| t.to_string()).unwrap_or_default(),
                        yes(s.ready_for_execution),
                    ]
                })
                .collect::<Vec<_>>();
            let text = table(
                &[
                    "#",
                    "step",
                    "state",
                    "parents done",
                    "attempts",
                    "next retry",
                    "ready",
                ],
                &rows,
            );
            Answer::new(&steps, text)
        }
        QueryCommand::Levels { task } => {
            let id = task_id(task)?;
            let levels = store.dependency_levels(id).await?;
            if levels.is_empty() {
                bail!(not_projected(id));
            }
            let rows = levels
                .iter()
                .map(|l| {
                    vec![
                        l.level.to_string(),
                        l.step_index.to_string(),
                        l.name.clone(),
                    ]
                })
                .collect::<Vec<_>>();
            Answer::new(&levels, table(&["level", "#", "step"], &rows))
        }
        QueryCommand::Context { task, time } => {
            let id = task_id(task)?;
            let Some(c) = store.execution_context(id, as_of(time)?).await? else {
                bail!(not_projected(id));
            };
            let text = fields(&[
                (
                    "task",
                    format!("{} ({}/{})", c.task_id, c.namespace, c.task_name),
                ),
                ("status", c.status.clone()),
                (
                    "steps",
                    format!(
                        "{} (pending {}, in progress {}, done {}, failed {}, ready {})",
                        c.total_steps,
                        c.pending_steps,
                        c.in_progress_steps,
                        c.completed_steps,
                        c.failed_steps,
                        c.ready_steps
                    ),
                ),
                ("completion", format!("{}%", c.completion_percentage)),
                ("execution status", c.execution_status.clone()),
                ("recommended action", c.recommended_action.clone()),
                ("health", c.health_status.clone()),
            ]);
            Answer::new(&c, text)
        }
    }
}

/// The reference time: `--as-of`, else now (the only clock read; the SQL gets it
/// as a parameter).
fn as_of(t: &TimeArgs) -> anyhow::Result<Timestamp> {
    match t.as_of.as_deref() {
        None => Ok(Timestamp::now()),
        Some(s) => parse_time(s).with_context(|| format!("--as-of `{s}`")),
    }
}

fn parse_time(s: &str) -> anyhow::Result<Timestamp> {
    let t = humantime::parse_rfc3339_weak(s.trim())
        .context("expected an RFC 3339 time like 2026-11-26T12:00:00Z")?;
    let ms = t
        .duration_since(UNIX_EPOCH)
        .context("times before 1970 are not in any log")?
        .as_millis();
    Ok(Timestamp::from_millis(
        u64::try_from(ms).unwrap_or(u64::MAX),
    ))
}

fn before(t: Timestamp, d: Duration) -> Timestamp {
    Timestamp::from_millis(
        t.as_millis()
            .saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

fn filter(args: &SlowestArgs) -> SlowestFilter {
    SlowestFilter {
        since: args.period.map(|p| before(Timestamp::now(), p)),
        limit: args.limit,
        namespace: args.namespace.clone(),
        task_name: args.name.clone(),
        version: args.version.clone(),
    }
}

fn task_id(text: &str) -> anyhow::Result<TaskId> {
    text.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("`{text}` is not a task id (a UUID): {e}"))
}

fn not_projected(id: TaskId) -> String {
    format!(
        "task {id} is not in the read model: check the id, or run `tasker project --once` \
         if the projector is behind"
    )
}

fn yes(b: bool) -> String {
    (if b { "yes" } else { "no" }).to_owned()
}

fn opt_ms(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"))
}

/// `label: value` lines with the values aligned.
fn fields(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{:<w$}  {v}", format!("{k}:"), w = w + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A left-aligned text table; "(none)" when there are no rows.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "(none)".to_owned();
    }
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(head.to_vec())];
    out.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_say_none_when_empty() {
        let t = table(
            &["a", "bb"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "a    bb\nxxx  1\ny    22");
        assert_eq!(table(&["a"], &[]), "(none)");
    }

    #[test]
    fn times_parse_as_rfc3339_and_periods_count_back() {
        let t = parse_time("2026-11-26T12:00:00Z").expect("valid time");
        assert_eq!(t.as_millis(), 1_795_694_400_000);
        assert!(parse_time("yesterday").is_err());
        assert_eq!(
            before(t, Duration::from_secs(3600)).as_millis(),
            1_795_690_800_000
        );
        assert_eq!(
            before(Timestamp::from_millis(5), Duration::from_secs(1)).as_millis(),
            0
        );
    }
}
