//! The PostgreSQL store: one transaction per batch, multi-row statements
//! (`UNNEST` of bound arrays), the checkpoint compared and moved in the same
//! transaction.
//!
//! Times cross the wire as milliseconds and are converted inline
//! (`TIMESTAMPTZ 'epoch' + ms * INTERVAL '1 millisecond'`, `EXTRACT(EPOCH ...)`),
//! not with `tasker_ms_to_ts` / `tasker_ts_to_ms`: those are declared IMMUTABLE
//! over STABLE operators, so PostgreSQL cannot inline them and runs each call as
//! a SQL function, which was an eighth of the server's time in a batch.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use tasker_engine::record::{Epoch, PartitionId, Position, TaskId};

use crate::batch::{Batch, Duration, Transition};
use crate::store::{Checkpoint, StoreError, last_record};

/// The read model in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

fn ms(t: tasker_engine::record::Timestamp) -> i64 {
    t.as_millis() as i64
}

impl PgStore {
    /// Connects (a small pool: the projector writes through one connection per
    /// partition; queries share the rest).
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        Ok(PgStore { pool })
    }

    pub fn from_pool(pool: PgPool) -> PgStore {
        PgStore { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies every migration under `migrations/`.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations")
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))
    }

    pub async fn checkpoint(
        &self,
        projector: &str,
        partition: PartitionId,
    ) -> Result<Checkpoint, StoreError> {
        let row = sqlx::query(
            "SELECT position, epoch, events, (EXTRACT(EPOCH FROM last_event_at) * 1000)::BIGINT AS last_event_at,
                    last_record, last_record_position
             FROM tasker_projection_checkpoints WHERE projector = $1 AND log_partition = $2",
        )
        .bind(projector)
        .bind(partition.0 as i32)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Checkpoint::default(),
            Some(r) => Checkpoint {
                position: Position(r.try_get::<i64, _>("position")? as u64),
                epoch: Epoch(r.try_get::<i64, _>("epoch")? as u64),
                events: r.try_get::<i64, _>("events")? as u64,
                last_event_at: r
                    .try_get::<Option<i64>, _>("last_event_at")?
                    .map(|m| tasker_engine::record::Timestamp::from_millis(m as u64)),
                last_record: last_record(
                    r.try_get("last_record")?,
                    r.try_get("last_record_position")?,
                ),
            },
        })
    }

    /// Deletes every projected row and this projector's checkpoints (for a rebuild).
    pub async fn reset(&self, projector: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "TRUNCATE tasker_workflow_step_transitions, tasker_task_transitions,
                      tasker_workflow_step_edges, tasker_workflow_steps, tasker_tasks,
                      tasker_named_tasks, tasker_task_namespaces, tasker_task_hourly,
                      tasker_step_hourly",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM tasker_projection_checkpoints WHERE projector = $1")
            .bind(projector)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Writes a batch and moves the checkpoint from `start` to `batch.end`, in one
    /// transaction. Fails with [`StoreError::CheckpointMoved`] (writing nothing) if
    /// the checkpoint is no longer at `start` (another projector got there first).
    pub async fn apply(
        &self,
        projector: &str,
        start: Position,
        batch: &Batch,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let partition = batch.partition.0 as i32;
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM tasker_projection_checkpoints
             WHERE projector = $1 AND log_partition = $2 FOR UPDATE",
        )
        .bind(projector)
        .bind(partition)
        .fetch_optional(&mut *tx)
        .await?;
        let at = current.unwrap_or(0) as u64;
        if at != start.0 {
            return Err(StoreError::CheckpointMoved {
                partition: batch.partition,
                expected: start,
                found: Position(at),
            });
        }
        write_rows(&mut tx, batch).await?;
        sqlx::query(
            "INSERT INTO tasker_projection_checkpoints
                 (projector, log_partition, position, epoch, events, last_event_at, last_record, last_record_position)
             VALUES ($1, $2, $3, $4, $5, (TIMESTAMPTZ 'epoch' + ($6)::BIGINT * INTERVAL '1 millisecond'), $7, $8)
             ON CONFLICT (projector, log_partition) DO UPDATE SET
                 position = EXCLUDED.position,
                 epoch = EXCLUDED.epoch,
                 events = tasker_projection_checkpoints.events + EXCLUDED.events,
                 last_event_at = COALESCE(EXCLUDED.last_event_at, tasker_projection_checkpoints.last_event_at),
                 last_record = EXCLUDED.last_record,
                 last_record_position = EXCLUDED.last_record_position",
        )
        .bind(projector)
        .bind(partition)
        .bind(batch.end.0 as i64)
        .bind(batch.epoch.0 as i64)
        .bind(batch.events as i64)
        .bind(batch.last_event_at.map(ms))
        .bind(batch.last_record.map(|(_, h)| h.to_vec()))
        .bind(batch.last_record.map(|(p, _)| p.0 as i64))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Writes the batch's rows, and the analytics summaries' change once at the end:
/// rows the batch creates are summed here (the batch knows them whole), updated
/// rows' changes come back from their update statements.
async fn write_rows(tx: &mut Transaction<'_, Postgres>, b: &Batch) -> Result<(), StoreError> {
    let partition = b.partition.0 as i32;
    let mut task_hours = TaskHours::default();
    let mut step_hours = StepHours::default();
    if !b.namespaces.is_empty() {
        let (names, ats): (Vec<String>, Vec<i64>) = b
            .namespaces
            .iter()
            .map(|(n, t)| (n.clone(), ms(*t)))
            .unzip();
        sqlx::query(
            "INSERT INTO tasker_task_namespaces (name, created_at)
             SELECT u.name, (TIMESTAMPTZ 'epoch' + (u.at)::BIGINT * INTERVAL '1 millisecond') FROM UNNEST($1::text[], $2::int8[]) AS u(name, at)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(names)
        .bind(ats)
        .execute(&mut **tx)
        .await?;
    }
    if !b.named_tasks.is_empty() {
        let mut ns = Vec::new();
        let mut names = Vec::new();
        let mut versions = Vec::new();
        let mut templates = Vec::new();
        let mut ats = Vec::new();
        for ((n, name, version), (template, at)) in &b.named_tasks {
            ns.push(n.clone());
            names.push(name.clone());
            versions.push(version.clone());
            templates.push(template.clone());
            ats.push(ms(*at));
        }
        sqlx::query(
            "INSERT INTO tasker_named_tasks (task_namespace_id, name, version, template, created_at)
             SELECT n.task_namespace_id, u.name, u.version, u.template::jsonb, (TIMESTAMPTZ 'epoch' + (u.at)::BIGINT * INTERVAL '1 millisecond')
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[])
                  AS u(ns, name, version, template, at)
             JOIN tasker_task_namespaces n ON n.name = u.ns
             ON CONFLICT (task_namespace_id, name, version) DO NOTHING",
        )
        .bind(ns)
        .bind(names)
        .bind(versions)
        .bind(templates)
        .bind(ats)
        .execute(&mut **tx)
        .await?;
    }
    if !b.new_tasks.is_empty() {
        // Inserted as the batch leaves them (their patches are not applied again).
        let t = &b.new_tasks;
        let init: Vec<_> = t
            .iter()
            .map(|r| r.init(b.task_patches.get(&r.task_id)))
            .collect();
        sqlx::query(
            "INSERT INTO tasker_tasks (task_id, named_task_id, status, context, requested_at,
                 initiator, source_system, reason, tags, idempotency_key, correlation_id,
                 log_partition, log_position, updated_at, started_at, completed_at)
             SELECT u.task_id, nt.named_task_id, u.status, u.context::jsonb, (TIMESTAMPTZ 'epoch' + (u.at)::BIGINT * INTERVAL '1 millisecond'),
                    u.initiator, u.source_system, u.reason, u.tags::jsonb, u.idem, u.corr,
                    $12, u.pos, (TIMESTAMPTZ 'epoch' + (u.updated)::BIGINT * INTERVAL '1 millisecond'), (TIMESTAMPTZ 'epoch' + (u.started)::BIGINT * INTERVAL '1 millisecond'),
                    (TIMESTAMPTZ 'epoch' + (u.completed)::BIGINT * INTERVAL '1 millisecond')
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                         $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                         $13::uuid[], $14::int8[], $15::text[], $16::int8[], $17::int8[],
                         $18::int8[])
                  AS u(task_id, ns, name, version, context, at, initiator, source_system, reason,
                       tags, idem, corr, pos, status, started, completed, updated)
             JOIN tasker_task_namespaces n ON n.name = u.ns
             JOIN tasker_named_tasks nt ON nt.task_namespace_id = n.task_namespace_id
                  AND nt.name = u.name AND nt.version = u.version
             ON CONFLICT (task_id) DO UPDATE SET
                 named_task_id = EXCLUDED.named_task_id, status = EXCLUDED.status,
                 context = EXCLUDED.context, requested_at = EXCLUDED.requested_at,
                 started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at,
                 initiator = EXCLUDED.initiator,
                 source_system = EXCLUDED.source_system, reason = EXCLUDED.reason,
                 tags = EXCLUDED.tags, idempotency_key = EXCLUDED.idempotency_key,
                 correlation_id = EXCLUDED.correlation_id, log_partition = EXCLUDED.log_partition,
                 log_position = EXCLUDED.log_position, updated_at = EXCLUDED.updated_at",
        )
        .bind(t.iter().map(|r| *r.task_id.as_uuid()).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.namespace.clone()).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.name.clone()).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.version.clone()).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.context.clone()).collect::<Vec<_>>())
        .bind(t.iter().map(|r| ms(r.requested_at)).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.initiator.clone()).collect::<Vec<_>>())
        .bind(
            t.iter()
                .map(|r| r.source_system.clone())
                .collect::<Vec<_>>(),
        )
        .bind(t.iter().map(|r| r.reason.clone()).collect::<Vec<_>>())
        .bind(
            t.iter()
                .map(|r| serde_json::to_string(&r.tags).unwrap_or_else(|_| "[]".into()))
                .collect::<Vec<_>>(),
        )
        .bind(
            t.iter()
                .map(|r| r.idempotency_key.clone())
                .collect::<Vec<_>>(),
        )
        .bind(partition)
        .bind(t.iter().map(|r| r.correlation_id).collect::<Vec<_>>())
        .bind(
            t.iter()
                .map(|r| r.log_position.0 as i64)
                .collect::<Vec<_>>(),
        )
        .bind(init.iter().map(|i| i.status).collect::<Vec<_>>())
        .bind(
            init.iter()
                .map(|i| i.started_at.map(ms))
                .collect::<Vec<_>>(),
        )
        .bind(
            init.iter()
                .map(|i| i.completed_at.map(ms))
                .collect::<Vec<_>>(),
        )
        .bind(init.iter().map(|i| ms(i.updated_at)).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        for (r, i) in t.iter().zip(&init) {
            task_hours.add(r.requested_at, i.status, i.completed_at);
        }
    }
    if !b.new_steps.is_empty() {
        // Inserted as the batch leaves them (their patches are not applied again).
        let s = &b.new_steps;
        let init: Vec<_> = s
            .iter()
            .map(|r| r.init(b.step_patches.get(&(r.task_id, r.step))))
            .collect();
        sqlx::query(
            "INSERT INTO tasker_workflow_steps (task_id, step_index, name, handler, status,
                 attempts, retry_limit, retryable, last_attempted_at, last_failure_at,
                 next_retry_at, backoff_request_seconds, results, error, started_at, completed_at,
                 duration_ms, updated_at)
             SELECT u.task_id, u.step, u.name, u.handler, u.status, u.attempts, u.retry_limit,
                    u.retryable, (TIMESTAMPTZ 'epoch' + (u.attempted)::BIGINT * INTERVAL '1 millisecond'), (TIMESTAMPTZ 'epoch' + (u.failed)::BIGINT * INTERVAL '1 millisecond'),
                    (TIMESTAMPTZ 'epoch' + (u.retry)::BIGINT * INTERVAL '1 millisecond'), u.backoff, u.results::jsonb, u.error::jsonb,
                    (TIMESTAMPTZ 'epoch' + (u.started)::BIGINT * INTERVAL '1 millisecond'), (TIMESTAMPTZ 'epoch' + (u.completed)::BIGINT * INTERVAL '1 millisecond'), u.duration,
                    (TIMESTAMPTZ 'epoch' + (u.updated)::BIGINT * INTERVAL '1 millisecond')
             FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::bool[],
                         $7::text[], $8::int4[], $9::int8[], $10::int8[], $11::int8[],
                         $12::int4[], $13::text[], $14::text[], $15::int8[], $16::int8[],
                         $17::int8[], $18::int8[])
                  AS u(task_id, step, name, handler, retry_limit, retryable, status, attempts,
                       attempted, failed, retry, backoff, results, error, started, completed,
                       duration, updated)
             ON CONFLICT (task_id, step_index) DO UPDATE SET
                 name = EXCLUDED.name, handler = EXCLUDED.handler, status = EXCLUDED.status,
                 attempts = EXCLUDED.attempts, retry_limit = EXCLUDED.retry_limit,
                 retryable = EXCLUDED.retryable, last_attempted_at = EXCLUDED.last_attempted_at,
                 last_failure_at = EXCLUDED.last_failure_at, next_retry_at = EXCLUDED.next_retry_at,
                 backoff_request_seconds = EXCLUDED.backoff_request_seconds,
                 results = EXCLUDED.results, error = EXCLUDED.error,
                 started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at,
                 duration_ms = EXCLUDED.duration_ms, updated_at = EXCLUDED.updated_at",
        )
        .bind(s.iter().map(|r| *r.task_id.as_uuid()).collect::<Vec<_>>())
        .bind(s.iter().map(|r| r.step as i32).collect::<Vec<_>>())
        .bind(s.iter().map(|r| r.name.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|r| r.handler.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|r| r.retry_limit as i32).collect::<Vec<_>>())
        .bind(s.iter().map(|r| r.retryable).collect::<Vec<_>>())
        .bind(init.iter().map(|i| i.status).collect::<Vec<_>>())
        .bind(init.iter().map(|i| i.attempts as i32).collect::<Vec<_>>())
        .bind(
            init.iter()
                .map(|i| i.last_attempted_at.map(ms))
                .collect::<Vec<_>>(),
        )
        .bind(
            init.iter()
                .map(|i| i.last_failure_at.map(ms))
                .collect::<Vec<_>>(),
        )
        .bind(
            init.iter()
                .map(|i| i.next_retry_at.map(ms))
                .collect::<Vec<_>>(),
        )
        .bind(
            init.iter()
                .map(|i| i.backoff_request_seconds.map(|b| b as i32))
                .collect::<Vec<_>>(),
        )
        .bind(init.iter().map(|i| i.results.clone()).collect::<Vec<_>>())
        .bind(init.iter().map(|i| i.error.clone()).collect::<Vec<_>>())
        .bind(
            init.iter()
                .map(|i| i.started_at.map(ms))
                .collect::<Vec<_>>(),
        )
        .bind(
            init.iter()
                .map(|i| i.completed_at.map(ms))
                .collect::<Vec<_>>(),
        )
        .bind(init.iter().map(|i| i.duration_ms).collect::<Vec<_>>())
        .bind(init.iter().map(|i| ms(i.updated_at)).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        for i in &init {
            step_hours.add(i.status, i.completed_at, i.duration_ms);
        }
    }
    if !b.edges.is_empty() {
        sqlx::query(
            "INSERT INTO tasker_workflow_step_edges (task_id, from_step, to_step)
             SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::int4[])
             ON CONFLICT DO NOTHING",
        )
        .bind(b.edges.iter().map(|e| *e.0.as_uuid()).collect::<Vec<_>>())
        .bind(b.edges.iter().map(|e| e.1 as i32).collect::<Vec<_>>())
        .bind(b.edges.iter().map(|e| e.2 as i32).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    write_transitions(tx, b, partition).await?;
    write_task_patches(tx, b, &mut task_hours).await?;
    write_step_patches(tx, b, &mut step_hours).await?;
    task_hours.write(tx).await?;
    step_hours.write(tx).await?;
    Ok(())
}

const HOUR_MS: i64 = 3_600_000;

/// The UTC hour of a log time, in milliseconds (as `date_trunc('hour', t, 'UTC')`).
fn hour_of(t: tasker_engine::record::Timestamp) -> i64 {
    let m = ms(t);
    m - m.rem_euclid(HOUR_MS)
}

/// A batch's change to an hourly summary table: N counters per UTC hour.
struct Hours<const N: usize>(std::collections::BTreeMap<i64, [i64; N]>);

impl<const N: usize> Default for Hours<N> {
    fn default() -> Self {
        Hours(std::collections::BTreeMap::new())
    }
}

impl<const N: usize> Hours<N> {
    fn merge(&mut self, hour: i64, delta: [i64; N]) {
        let h = self.0.entry(hour).or_insert([0; N]);
        for (a, d) in h.iter_mut().zip(delta) {
            *a += d;
        }
    }

    /// The hours and each counter as a column, for `UNNEST`.
    fn columns(self) -> (Vec<i64>, [Vec<i64>; N]) {
        let mut cols: [Vec<i64>; N] = std::array::from_fn(|_| Vec::with_capacity(self.0.len()));
        let mut hours = Vec::with_capacity(self.0.len());
        for (hour, v) in self.0 {
            hours.push(hour);
            for (col, x) in cols.iter_mut().zip(v) {
                col.push(x);
            }
        }
        (hours, cols)
    }
}

/// A batch's change to `tasker_task_hourly` (migration 0005), per hour:
/// requested, complete, error, complete span (µs).
type TaskHours = Hours<4>;

impl TaskHours {
    fn add(
        &mut self,
        requested_at: tasker_engine::record::Timestamp,
        status: &str,
        completed_at: Option<tasker_engine::record::Timestamp>,
    ) {
        let delta = match status {
            "complete" => {
                let span_us = completed_at.map_or(0, |c| (ms(c) - ms(requested_at)) * 1_000);
                [1, 1, 0, span_us]
            }
            "error" => [1, 0, 1, 0],
            _ => [1, 0, 0, 0],
        };
        self.merge(hour_of(requested_at), delta);
    }

    async fn write(self, tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let (hours, [n, c, e, us]) = self.columns();
        sqlx::query(
            "INSERT INTO tasker_task_hourly AS h (hour, requested, complete, error, complete_span_us)
             SELECT TIMESTAMPTZ 'epoch' + u.hour * INTERVAL '1 millisecond', u.n, u.c, u.e, u.us
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
                  AS u(hour, n, c, e, us)
             ON CONFLICT (hour) DO UPDATE SET
                 requested = h.requested + EXCLUDED.requested,
                 complete = h.complete + EXCLUDED.complete,
                 error = h.error + EXCLUDED.error,
                 complete_span_us = h.complete_span_us + EXCLUDED.complete_span_us",
        )
        .bind(hours)
        .bind(n)
        .bind(c)
        .bind(e)
        .bind(us)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// A batch's change to `tasker_step_hourly`: complete steps per hour of
/// completed_at, how many have a duration, the durations' sum.
type StepHours = Hours<3>;

impl StepHours {
    fn add(
        &mut self,
        status: &str,
        completed_at: Option<tasker_engine::record::Timestamp>,
        duration_ms: Option<i64>,
    ) {
        let (Some(at), "complete") = (completed_at, status) else {
            return;
        };
        let timed = i64::from(duration_ms.is_some());
        self.merge(hour_of(at), [1, timed, duration_ms.unwrap_or(0)]);
    }

    async fn write(self, tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let (hours, [n, timed, duration]) = self.columns();
        sqlx::query(
            "INSERT INTO tasker_step_hourly AS h (hour, complete, timed, duration_ms)
             SELECT TIMESTAMPTZ 'epoch' + u.hour * INTERVAL '1 millisecond', u.n, u.t, u.ms
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[]) AS u(hour, n, t, ms)
             ON CONFLICT (hour) DO UPDATE SET
                 complete = h.complete + EXCLUDED.complete,
                 timed = h.timed + EXCLUDED.timed,
                 duration_ms = h.duration_ms + EXCLUDED.duration_ms",
        )
        .bind(hours)
        .bind(n)
        .bind(timed)
        .bind(duration)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Transitions go in before the rows change, so a `from_state` the batch does not
/// know is read from the row as it was (looked up only for those, not joined for
/// every transition). They are plain inserts: a transition's key is its event's
/// log position, which no other row can have (a batch is written once, after the
/// checkpoint check), so `ON CONFLICT` would only add a probe of every unique
/// index per row and hide a bug as a silently dropped row.
async fn write_transitions(
    tx: &mut Transaction<'_, Postgres>,
    b: &Batch,
    partition: i32,
) -> Result<(), StoreError> {
    let (task_t, step_t): (Vec<_>, Vec<_>) = b.transitions.iter().partition(|t| t.step.is_none());
    if !task_t.is_empty() {
        let last = last_per_entity(task_t.iter().map(|t| (t.task_id, None::<u32>)));
        let c = TransitionColumns::of(&task_t);
        // Each entity once (a batch holds several transitions of most of them).
        let ids: std::collections::BTreeSet<uuid::Uuid> = c.task_ids.iter().copied().collect();
        sqlx::query(
            "UPDATE tasker_task_transitions SET most_recent = false
             WHERE most_recent AND task_id = ANY($1::uuid[])",
        )
        .bind(ids.into_iter().collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO tasker_task_transitions (task_id, sort_key, from_state, to_state,
                 most_recent, occurred_at, metadata, event_type, log_partition, log_position)
             SELECT u.task_id, u.pos,
                    CASE WHEN u.known THEN u.from_state
                         ELSE (SELECT t.status FROM tasker_tasks t WHERE t.task_id = u.task_id) END,
                    u.to_state, u.last, (TIMESTAMPTZ 'epoch' + (u.at)::BIGINT * INTERVAL '1 millisecond'), u.meta::jsonb, u.kind, $9, u.pos
             FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::bool[], $5::text[], $6::bool[],
                         $7::int8[], $8::text[], $10::text[])
                  AS u(task_id, pos, from_state, known, to_state, last, at, meta, kind)",
        )
        .bind(c.task_ids)
        .bind(c.positions)
        .bind(c.from_states)
        .bind(c.from_known)
        .bind(c.to_states)
        .bind(last)
        .bind(c.at)
        .bind(c.metadata)
        .bind(partition)
        .bind(c.event_types)
        .execute(&mut **tx)
        .await?;
    }
    if !step_t.is_empty() {
        let last = last_per_entity(step_t.iter().map(|t| (t.task_id, t.step)));
        let c = TransitionColumns::of(&step_t);
        let keys: std::collections::BTreeSet<(uuid::Uuid, i32)> = c
            .task_ids
            .iter()
            .copied()
            .zip(c.steps.iter().copied())
            .collect();
        let (ids, steps): (Vec<uuid::Uuid>, Vec<i32>) = keys.into_iter().unzip();
        sqlx::query(
            "UPDATE tasker_workflow_step_transitions s SET most_recent = false
             FROM UNNEST($1::uuid[], $2::int4[]) AS u(task_id, step)
             WHERE s.most_recent AND s.task_id = u.task_id AND s.step_index = u.step",
        )
        .bind(ids)
        .bind(steps)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO tasker_workflow_step_transitions (task_id, step_index, sort_key,
                 from_state, to_state, most_recent, occurred_at, metadata, event_type,
                 log_partition, log_position)
             SELECT u.task_id, u.step, u.pos,
                    CASE WHEN u.known THEN u.from_state
                         ELSE (SELECT s.status FROM tasker_workflow_steps s
                               WHERE s.task_id = u.task_id AND s.step_index = u.step) END,
                    u.to_state, u.last, (TIMESTAMPTZ 'epoch' + (u.at)::BIGINT * INTERVAL '1 millisecond'), u.meta::jsonb, u.kind, $10, u.pos
             FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $4::text[], $5::bool[], $6::text[],
                         $7::bool[], $8::int8[], $9::text[], $11::text[])
                  AS u(task_id, step, pos, from_state, known, to_state, last, at, meta, kind)",
        )
        .bind(c.task_ids)
        .bind(c.steps)
        .bind(c.positions)
        .bind(c.from_states)
        .bind(c.from_known)
        .bind(c.to_states)
        .bind(last)
        .bind(c.at)
        .bind(c.metadata)
        .bind(partition)
        .bind(c.event_types)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Transitions as the column arrays `UNNEST` takes.
struct TransitionColumns {
    task_ids: Vec<uuid::Uuid>,
    /// 0 for task transitions (their query does not bind it).
    steps: Vec<i32>,
    positions: Vec<i64>,
    from_states: Vec<Option<String>>,
    from_known: Vec<bool>,
    to_states: Vec<String>,
    at: Vec<i64>,
    metadata: Vec<String>,
    event_types: Vec<String>,
}

impl TransitionColumns {
    fn of(ts: &[&Transition]) -> TransitionColumns {
        TransitionColumns {
            task_ids: ts.iter().map(|t| *t.task_id.as_uuid()).collect(),
            steps: ts.iter().map(|t| t.step.unwrap_or(0) as i32).collect(),
            positions: ts.iter().map(|t| t.position.0 as i64).collect(),
            from_states: ts.iter().map(|t| t.from_state.map(str::to_owned)).collect(),
            from_known: ts.iter().map(|t| t.from_known).collect(),
            to_states: ts.iter().map(|t| t.to_state.to_owned()).collect(),
            at: ts.iter().map(|t| ms(t.at)).collect(),
            metadata: ts.iter().map(|t| t.metadata.clone()).collect(),
            event_types: ts.iter().map(|t| t.event_type.to_owned()).collect(),
        }
    }
}

/// For each transition, whether it is the last of its entity in the batch.
pub(crate) fn last_per_entity<K: Ord + Copy>(keys: impl Iterator<Item = K> + Clone) -> Vec<bool> {
    let mut last_index = std::collections::BTreeMap::new();
    for (i, k) in keys.clone().enumerate() {
        last_index.insert(k, i);
    }
    keys.enumerate()
        .map(|(i, k)| last_index.get(&k) == Some(&i))
        .collect()
}

async fn write_task_patches(
    tx: &mut Transaction<'_, Postgres>,
    b: &Batch,
    hours: &mut TaskHours,
) -> Result<(), StoreError> {
    if b.task_patches.is_empty() {
        return Ok(());
    }
    let created: std::collections::BTreeSet<TaskId> =
        b.new_tasks.iter().map(|t| t.task_id).collect();
    let mut ids = Vec::new();
    let mut status = Vec::new();
    let (mut set_started, mut started) = (Vec::new(), Vec::new());
    let (mut set_completed, mut completed) = (Vec::new(), Vec::new());
    let mut updated = Vec::new();
    for (id, p) in b
        .task_patches
        .iter()
        .filter(|(id, _)| !created.contains(id))
    {
        ids.push(*id.as_uuid());
        status.push(p.status.map(str::to_owned));
        let (s, v) = p.started_at.parts();
        set_started.push(s);
        started.push(v.map(ms));
        let (s, v) = p.completed_at.parts();
        set_completed.push(s);
        completed.push(v.map(ms));
        updated.push(p.updated_at.map(ms));
    }
    if ids.is_empty() {
        return Ok(());
    }
    // Returns the updated tasks' change to `tasker_task_hourly`, per hour: `old`
    // holds them as they were, `new` as they are (a task can leave `error`).
    // `old` looks each key up in a `LATERAL (... OFFSET 0)`: a primary-key probe
    // per row whatever the statistics say (after `reset` they say the tables are
    // empty, and a plain join became a nested loop rescanning the keys for every
    // row: 30 s batches).
    let deltas = sqlx::query(
        "WITH old AS (SELECT o.* FROM UNNEST($1::uuid[]) AS k(task_id) CROSS JOIN LATERAL (
                          SELECT o.status, o.requested_at, o.completed_at FROM tasker_tasks o
                          WHERE o.task_id = k.task_id OFFSET 0) o),
         new AS (
         UPDATE tasker_tasks t SET
             status = COALESCE(u.status, t.status),
             started_at = CASE WHEN u.set_started THEN (TIMESTAMPTZ 'epoch' + (u.started)::BIGINT * INTERVAL '1 millisecond') ELSE t.started_at END,
             completed_at = CASE WHEN u.set_completed THEN (TIMESTAMPTZ 'epoch' + (u.completed)::BIGINT * INTERVAL '1 millisecond') ELSE t.completed_at END,
             updated_at = COALESCE((TIMESTAMPTZ 'epoch' + (u.updated)::BIGINT * INTERVAL '1 millisecond'), t.updated_at)
         FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::int8[], $5::bool[], $6::int8[], $7::int8[])
              AS u(task_id, status, set_started, started, set_completed, completed, updated)
         WHERE t.task_id = u.task_id
         RETURNING t.status, t.requested_at, t.completed_at)
         SELECT * FROM (
             SELECT (EXTRACT(EPOCH FROM date_trunc('hour', d.requested_at, 'UTC')) * 1000)::int8 AS hour,
                    sum(d.sign)::int8 AS n,
                    sum(d.sign * (d.status = 'complete')::int)::int8 AS c,
                    sum(d.sign * (d.status = 'error')::int)::int8 AS e,
                    COALESCE(sum(d.sign * (EXTRACT(EPOCH FROM d.completed_at - d.requested_at) * 1000000)::int8)
                             FILTER (WHERE d.status = 'complete'), 0)::int8 AS us
             FROM (SELECT 1 AS sign, n.status, n.requested_at, n.completed_at FROM new n
                   UNION ALL
                   SELECT -1, o.status, o.requested_at, o.completed_at FROM old o) d
             GROUP BY 1
         ) g
         WHERE g.n <> 0 OR g.c <> 0 OR g.e <> 0 OR g.us <> 0",
    )
    .bind(ids)
    .bind(status)
    .bind(set_started)
    .bind(started)
    .bind(set_completed)
    .bind(completed)
    .bind(updated)
    .fetch_all(&mut **tx)
    .await?;
    for r in deltas {
        hours.merge(
            r.try_get("hour")?,
            [
                r.try_get("n")?,
                r.try_get("c")?,
                r.try_get("e")?,
                r.try_get("us")?,
            ],
        );
    }
    Ok(())
}

async fn write_step_patches(
    tx: &mut Transaction<'_, Postgres>,
    b: &Batch,
    hours: &mut StepHours,
) -> Result<(), StoreError> {
    if b.step_patches.is_empty() {
        return Ok(());
    }
    #[derive(Default)]
    struct Cols {
        ids: Vec<uuid::Uuid>,
        steps: Vec<i32>,
        status: Vec<Option<String>>,
        attempts: Vec<Option<i32>>,
        set: [Vec<bool>; 8],
        ts: [Vec<Option<i64>>; 5],
        backoff: Vec<Option<i64>>,
        results: Vec<Option<String>>,
        error: Vec<Option<String>>,
        duration_mode: Vec<i32>,
        duration: Vec<Option<i64>>,
        updated: Vec<Option<i64>>,
    }
    let created: std::collections::BTreeSet<(TaskId, u32)> =
        b.new_steps.iter().map(|s| (s.task_id, s.step)).collect();
    let mut c = Cols::default();
    for ((id, step), p) in b
        .step_patches
        .iter()
        .filter(|(key, _)| !created.contains(key))
    {
        c.ids.push(*id.as_uuid());
        c.steps.push(*step as i32);
        c.status.push(p.status.map(str::to_owned));
        c.attempts.push(p.attempts.map(|a| a as i32));
        let times = [
            &p.last_attempted_at,
            &p.last_failure_at,
            &p.next_retry_at,
            &p.started_at,
            &p.completed_at,
        ];
        for (i, t) in times.iter().enumerate() {
            let (s, v) = t.parts();
            c.set[i].push(s);
            c.ts[i].push(v.map(ms));
        }
        let (s, v) = p.backoff_request_seconds.parts();
        c.set[5].push(s);
        c.backoff.push(v);
        let (s, v) = p.results.parts();
        c.set[6].push(s);
        c.results.push(v);
        let (s, v) = p.error.parts();
        c.set[7].push(s);
        c.error.push(v);
        let (mode, value) = match p.duration {
            Duration::Keep => (0, None),
            Duration::Clear => (1, None),
            Duration::Millis(m) => (2, Some(m)),
            Duration::EndedAt(t) => (3, Some(ms(t))),
        };
        c.duration_mode.push(mode);
        c.duration.push(value);
        c.updated.push(p.updated_at.map(ms));
    }
    if c.ids.is_empty() {
        return Ok(());
    }
    let [
        s_att,
        s_fail,
        s_retry,
        s_start,
        s_done,
        s_backoff,
        s_results,
        s_error,
    ] = c.set;
    let [t_att, t_fail, t_retry, t_start, t_done] = c.ts;
    // Returns the steps this update made complete, per hour of completed_at.
    // Complete is terminal (no event changes a complete step), so nothing is
    // subtracted and no row is read as it was.
    let deltas = sqlx::query(
        "WITH new AS (
         UPDATE tasker_workflow_steps s SET
             status = COALESCE(u.status, s.status),
             attempts = COALESCE(u.attempts, s.attempts),
             last_attempted_at = CASE WHEN u.s_att THEN (TIMESTAMPTZ 'epoch' + (u.t_att)::BIGINT * INTERVAL '1 millisecond') ELSE s.last_attempted_at END,
             last_failure_at = CASE WHEN u.s_fail THEN (TIMESTAMPTZ 'epoch' + (u.t_fail)::BIGINT * INTERVAL '1 millisecond') ELSE s.last_failure_at END,
             next_retry_at = CASE WHEN u.s_retry THEN (TIMESTAMPTZ 'epoch' + (u.t_retry)::BIGINT * INTERVAL '1 millisecond') ELSE s.next_retry_at END,
             started_at = CASE WHEN u.s_start THEN (TIMESTAMPTZ 'epoch' + (u.t_start)::BIGINT * INTERVAL '1 millisecond') ELSE s.started_at END,
             completed_at = CASE WHEN u.s_done THEN (TIMESTAMPTZ 'epoch' + (u.t_done)::BIGINT * INTERVAL '1 millisecond') ELSE s.completed_at END,
             backoff_request_seconds = CASE WHEN u.s_backoff THEN u.backoff::int4 ELSE s.backoff_request_seconds END,
             results = CASE WHEN u.s_results THEN u.results::jsonb ELSE s.results END,
             error = CASE WHEN u.s_error THEN u.error::jsonb ELSE s.error END,
             duration_ms = CASE u.dmode
                 WHEN 0 THEN s.duration_ms
                 WHEN 1 THEN NULL
                 WHEN 2 THEN u.dval
                 ELSE u.dval - (EXTRACT(EPOCH FROM s.started_at) * 1000)::BIGINT END,
             updated_at = COALESCE((TIMESTAMPTZ 'epoch' + (u.updated)::BIGINT * INTERVAL '1 millisecond'), s.updated_at)
         FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::int4[],
                     $5::bool[], $6::int8[], $7::bool[], $8::int8[], $9::bool[], $10::int8[],
                     $11::bool[], $12::int8[], $13::bool[], $14::int8[],
                     $15::bool[], $16::int8[], $17::bool[], $18::text[], $19::bool[], $20::text[],
                     $21::int4[], $22::int8[], $23::int8[])
              AS u(task_id, step, status, attempts, s_att, t_att, s_fail, t_fail, s_retry, t_retry,
                   s_start, t_start, s_done, t_done, s_backoff, backoff, s_results, results,
                   s_error, error, dmode, dval, updated)
         WHERE s.task_id = u.task_id AND s.step_index = u.step
         RETURNING s.status, s.completed_at, s.duration_ms, u.status AS set_status)
         SELECT (EXTRACT(EPOCH FROM date_trunc('hour', n.completed_at, 'UTC')) * 1000)::int8 AS hour,
                count(*) AS n, count(n.duration_ms) AS t, COALESCE(sum(n.duration_ms), 0)::int8 AS ms
         FROM new n
         WHERE n.set_status = 'complete' AND n.status = 'complete' AND n.completed_at IS NOT NULL
         GROUP BY 1",
    )
    .bind(c.ids)
    .bind(c.steps)
    .bind(c.status)
    .bind(c.attempts)
    .bind(s_att)
    .bind(t_att)
    .bind(s_fail)
    .bind(t_fail)
    .bind(s_retry)
    .bind(t_retry)
    .bind(s_start)
    .bind(t_start)
    .bind(s_done)
    .bind(t_done)
    .bind(s_backoff)
    .bind(c.backoff)
    .bind(s_results)
    .bind(c.results)
    .bind(s_error)
    .bind(c.error)
    .bind(c.duration_mode)
    .bind(c.duration)
    .bind(c.updated)
    .fetch_all(&mut **tx)
    .await?;
    for r in deltas {
        hours.merge(
            r.try_get("hour")?,
            [r.try_get("n")?, r.try_get("t")?, r.try_get("ms")?],
        );
    }
    Ok(())
}
