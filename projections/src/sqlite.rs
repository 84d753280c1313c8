//! The embedded SQLite store: the same read model with no server. One
//! transaction per batch; each table is written by one statement that reads its
//! rows from a bound JSON array (`json_each`), so batches are multi-row here too.

use std::str::FromStr;

use serde_json::{Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tasker_engine::record::{Epoch, PartitionId, Position, Timestamp};

use crate::batch::{Batch, Duration};
use crate::postgres::last_per_entity;
use crate::store::{Checkpoint, StoreError, last_record};

/// The read model in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis() as i64
}

/// Write transactions take SQLite's write lock up front: a deferred transaction
/// that reads (the checkpoint) and then writes cannot wait for another
/// partition's projector and fails with "database is locked"; an immediate one
/// waits (busy timeout) like any lock.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

impl SqliteStore {
    /// Opens (creating) `sqlite://path` or a plain path, in WAL mode.
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let options =
            SqliteConnectOptions::from_str(&url).map_err(|e| StoreError::Connect(e.to_string()))?;
        // The data directory exists only once something wrote there (the file
        // log does; a Kafka engine writes nothing else locally first). Private,
        // as the log's: the read model holds task contexts.
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            tasker_engine::log::file::create_private_dir(dir)
                .map_err(|e| StoreError::Connect(e.to_string()))?;
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/sqlite")
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
            "SELECT position, epoch, events, last_event_at, last_record, last_record_position FROM tasker_projection_checkpoints
             WHERE projector = ?1 AND log_partition = ?2",
        )
        .bind(projector)
        .bind(partition.0 as i64)
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
                    .map(|m| Timestamp::from_millis(m as u64)),
                last_record: last_record(
                    r.try_get("last_record")?,
                    r.try_get("last_record_position")?,
                ),
            },
        })
    }

    pub async fn reset(&self, projector: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        for statement in [
            "DELETE FROM tasker_workflow_step_transitions",
            "DELETE FROM tasker_task_transitions",
            "DELETE FROM tasker_workflow_step_edges",
            "DELETE FROM tasker_workflow_steps",
            "DELETE FROM tasker_tasks",
            "DELETE FROM tasker_named_tasks",
            "DELETE FROM tasker_task_namespaces",
        ] {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM tasker_projection_checkpoints WHERE projector = ?1")
            .bind(projector)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn apply(
        &self,
        projector: &str,
        start: Position,
        batch: &Batch,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let partition = batch.partition.0 as i64;
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM tasker_projection_checkpoints WHERE projector = ?1 AND log_partition = ?2",
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (projector, log_partition) DO UPDATE SET
                 position = excluded.position,
                 epoch = excluded.epoch,
                 events = tasker_projection_checkpoints.events + excluded.events,
                 last_event_at = COALESCE(excluded.last_event_at, tasker_projection_checkpoints.last_event_at),
                 last_record = excluded.last_record,
                 last_record_position = excluded.last_record_position",
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

async fn exec(
    tx: &mut Transaction<'_, Sqlite>,
    sql: &'static str,
    rows: Vec<Value>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(sql)
        .bind(Value::Array(rows).to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn set<T: serde::Serialize + Clone>(s: &crate::batch::Set<T>) -> (bool, Value) {
    let (is_set, v) = s.parts();
    (is_set, json!(v))
}

async fn write_rows(tx: &mut Transaction<'_, Sqlite>, b: &Batch) -> Result<(), StoreError> {
    let partition = b.partition.0 as i64;
    exec(
        tx,
        "INSERT INTO tasker_task_namespaces (name, created_at)
         SELECT value ->> '$.name', value ->> '$.at' FROM json_each(?1) WHERE true
         ON CONFLICT (name) DO NOTHING",
        b.namespaces
            .iter()
            .map(|(n, t)| json!({"name": n, "at": ms(*t)}))
            .collect(),
    )
    .await?;
    exec(
        tx,
        "INSERT INTO tasker_named_tasks (task_namespace_id, name, version, template, created_at)
         SELECT n.task_namespace_id, value ->> '$.name', value ->> '$.version', value ->> '$.template', value ->> '$.at'
         FROM json_each(?1) JOIN tasker_task_namespaces n ON n.name = value ->> '$.ns' WHERE true
         ON CONFLICT (task_namespace_id, name, version) DO NOTHING",
        b.named_tasks
            .iter()
            .map(|((ns, name, version), (template, at))| {
                json!({"ns": ns, "name": name, "version": version, "template": template, "at": ms(*at)})
            })
            .collect(),
    )
    .await?;
    exec(
        tx,
        "INSERT INTO tasker_tasks (task_id, named_task_id, status, context, requested_at,
             initiator, source_system, reason, tags, idempotency_key, correlation_id,
             log_partition, log_position, updated_at, started_at, completed_at)
         SELECT value ->> '$.task_id', nt.named_task_id, 'pending', value ->> '$.context', value ->> '$.at',
                value ->> '$.initiator', value ->> '$.source_system', value ->> '$.reason',
                value ->> '$.tags', value ->> '$.idem', value ->> '$.corr',
                value ->> '$.partition', value ->> '$.pos', value ->> '$.at', NULL, NULL
         FROM json_each(?1)
         JOIN tasker_task_namespaces n ON n.name = value ->> '$.ns'
         JOIN tasker_named_tasks nt ON nt.task_namespace_id = n.task_namespace_id
              AND nt.name = value ->> '$.name' AND nt.version = value ->> '$.version'
         WHERE true
         ON CONFLICT (task_id) DO UPDATE SET
             named_task_id = excluded.named_task_id, status = 'pending', context = excluded.context,
             requested_at = excluded.requested_at, started_at = NULL, completed_at = NULL,
             initiator = excluded.initiator, source_system = excluded.source_system,
             reason = excluded.reason, tags = excluded.tags, idempotency_key = excluded.idempotency_key,
             correlation_id = excluded.correlation_id, log_partition = excluded.log_partition,
             log_position = excluded.log_position, updated_at = excluded.updated_at",
        b.new_tasks
            .iter()
            .map(|t| {
                json!({
                    "task_id": t.task_id.to_string(), "ns": t.namespace, "name": t.name,
                    "version": t.version, "context": t.context, "at": ms(t.requested_at),
                    "initiator": t.initiator, "source_system": t.source_system, "reason": t.reason,
                    "tags": serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()),
                    "idem": t.idempotency_key, "corr": t.correlation_id.to_string(),
                    "partition": partition, "pos": t.log_position.0,
                })
            })
            .collect(),
    )
    .await?;
    exec(
        tx,
        "INSERT INTO tasker_workflow_steps (task_id, step_index, name, handler, status, attempts,
             retry_limit, retryable, updated_at)
         SELECT value ->> '$.task_id', value ->> '$.step', value ->> '$.name', value ->> '$.handler',
                'pending', 0, value ->> '$.retry_limit', value ->> '$.retryable', value ->> '$.at'
         FROM json_each(?1) WHERE true
         ON CONFLICT (task_id, step_index) DO UPDATE SET
             name = excluded.name, handler = excluded.handler, status = 'pending', attempts = 0,
             retry_limit = excluded.retry_limit, retryable = excluded.retryable,
             last_attempted_at = NULL, last_failure_at = NULL, next_retry_at = NULL,
             backoff_request_seconds = NULL, results = NULL, error = NULL, started_at = NULL,
             completed_at = NULL, duration_ms = NULL, updated_at = excluded.updated_at",
        b.new_steps
            .iter()
            .map(|s| {
                json!({
                    "task_id": s.task_id.to_string(), "step": s.step, "name": s.name,
                    "handler": s.handler, "retry_limit": s.retry_limit,
                    "retryable": i32::from(s.retryable), "at": ms(s.at),
                })
            })
            .collect(),
    )
    .await?;
    exec(
        tx,
        "INSERT INTO tasker_workflow_step_edges (task_id, from_step, to_step)
         SELECT value ->> '$.task_id', value ->> '$.from', value ->> '$.to' FROM json_each(?1) WHERE true
         ON CONFLICT DO NOTHING",
        b.edges
            .iter()
            .map(|(t, f, to)| json!({"task_id": t.to_string(), "from": f, "to": to}))
            .collect(),
    )
    .await?;
    write_transitions(tx, b, partition).await?;
    exec(
        tx,
        "UPDATE tasker_tasks AS t SET
             status = COALESCE(u.status, t.status),
             started_at = CASE WHEN u.set_started THEN u.started ELSE t.started_at END,
             completed_at = CASE WHEN u.set_completed THEN u.completed ELSE t.completed_at END,
             updated_at = COALESCE(u.updated, t.updated_at)
         FROM (SELECT value ->> '$.task_id' AS task_id, value ->> '$.status' AS status,
                      value ->> '$.set_started' AS set_started, value ->> '$.started' AS started,
                      value ->> '$.set_completed' AS set_completed, value ->> '$.completed' AS completed,
                      value ->> '$.updated' AS updated
               FROM json_each(?1)) AS u
         WHERE t.task_id = u.task_id",
        b.task_patches
            .iter()
            .map(|(id, p)| {
                let (ss, sv) = set(&p.started_at.clone().map_ms());
                let (cs, cv) = set(&p.completed_at.clone().map_ms());
                json!({
                    "task_id": id.to_string(), "status": p.status,
                    "set_started": ss, "started": sv, "set_completed": cs, "completed": cv,
                    "updated": p.updated_at.map(ms),
                })
            })
            .collect(),
    )
    .await?;
    exec(
        tx,
        "UPDATE tasker_workflow_steps AS s SET
             status = COALESCE(u.status, s.status),
             attempts = COALESCE(u.attempts, s.attempts),
             last_attempted_at = CASE WHEN u.s_att THEN u.t_att ELSE s.last_attempted_at END,
             last_failure_at = CASE WHEN u.s_fail THEN u.t_fail ELSE s.last_failure_at END,
             next_retry_at = CASE WHEN u.s_retry THEN u.t_retry ELSE s.next_retry_at END,
             started_at = CASE WHEN u.s_start THEN u.t_start ELSE s.started_at END,
             completed_at = CASE WHEN u.s_done THEN u.t_done ELSE s.completed_at END,
             backoff_request_seconds = CASE WHEN u.s_backoff THEN u.backoff ELSE s.backoff_request_seconds END,
             results = CASE WHEN u.s_results THEN u.results ELSE s.results END,
             error = CASE WHEN u.s_error THEN u.error ELSE s.error END,
             duration_ms = CASE u.dmode
                 WHEN 0 THEN s.duration_ms
                 WHEN 1 THEN NULL
                 WHEN 2 THEN u.dval
                 ELSE u.dval - s.started_at END,
             updated_at = COALESCE(u.updated, s.updated_at)
         FROM (SELECT value ->> '$.task_id' AS task_id, value ->> '$.step' AS step,
                      value ->> '$.status' AS status, value ->> '$.attempts' AS attempts,
                      value ->> '$.s_att' AS s_att, value ->> '$.t_att' AS t_att,
                      value ->> '$.s_fail' AS s_fail, value ->> '$.t_fail' AS t_fail,
                      value ->> '$.s_retry' AS s_retry, value ->> '$.t_retry' AS t_retry,
                      value ->> '$.s_start' AS s_start, value ->> '$.t_start' AS t_start,
                      value ->> '$.s_done' AS s_done, value ->> '$.t_done' AS t_done,
                      value ->> '$.s_backoff' AS s_backoff, value ->> '$.backoff' AS backoff,
                      value ->> '$.s_results' AS s_results, value ->> '$.results' AS results,
                      value ->> '$.s_error' AS s_error, value ->> '$.error' AS error,
                      value ->> '$.dmode' AS dmode, value ->> '$.dval' AS dval,
                      value ->> '$.updated' AS updated
               FROM json_each(?1)) AS u
         WHERE s.task_id = u.task_id AND s.step_index = u.step",
        b.step_patches
            .iter()
            .map(|((id, step), p)| {
                let (s_att, t_att) = set(&p.last_attempted_at.clone().map_ms());
                let (s_fail, t_fail) = set(&p.last_failure_at.clone().map_ms());
                let (s_retry, t_retry) = set(&p.next_retry_at.clone().map_ms());
                let (s_start, t_start) = set(&p.started_at.clone().map_ms());
                let (s_done, t_done) = set(&p.completed_at.clone().map_ms());
                let (s_backoff, backoff) = set(&p.backoff_request_seconds);
                let (s_results, results) = set(&p.results);
                let (s_error, error) = set(&p.error);
                let (dmode, dval) = match p.duration {
                    Duration::Keep => (0, None),
                    Duration::Clear => (1, None),
                    Duration::Millis(m) => (2, Some(m)),
                    Duration::EndedAt(t) => (3, Some(ms(t))),
                };
                json!({
                    "task_id": id.to_string(), "step": step, "status": p.status,
                    "attempts": p.attempts,
                    "s_att": s_att, "t_att": t_att, "s_fail": s_fail, "t_fail": t_fail,
                    "s_retry": s_retry, "t_retry": t_retry, "s_start": s_start, "t_start": t_start,
                    "s_done": s_done, "t_done": t_done, "s_backoff": s_backoff, "backoff": backoff,
                    "s_results": s_results, "results": results, "s_error": s_error, "error": error,
                    "dmode": dmode, "dval": dval, "updated": p.updated_at.map(ms),
                })
            })
            .collect(),
    )
    .await?;
    Ok(())
}

async fn write_transitions(
    tx: &mut Transaction<'_, Sqlite>,
    b: &Batch,
    partition: i64,
) -> Result<(), StoreError> {
    let (task_t, step_t): (Vec<_>, Vec<_>) = b.transitions.iter().partition(|t| t.step.is_none());
    if !task_t.is_empty() {
        let last = last_per_entity(task_t.iter().map(|t| (t.task_id, None::<u32>)));
        exec(
            tx,
            "UPDATE tasker_task_transitions SET most_recent = 0
             WHERE most_recent AND task_id IN (SELECT value ->> '$.task_id' FROM json_each(?1))",
            task_t
                .iter()
                .map(|t| json!({"task_id": t.task_id.to_string()}))
                .collect(),
        )
        .await?;
        exec(
            tx,
            "INSERT INTO tasker_task_transitions (task_id, sort_key, from_state, to_state,
                 most_recent, occurred_at, metadata, event_type, log_partition, log_position)
             SELECT value ->> '$.task_id', value ->> '$.pos',
                    CASE WHEN value ->> '$.known' THEN value ->> '$.from' ELSE t.status END,
                    value ->> '$.to', value ->> '$.last', value ->> '$.at', value ->> '$.meta',
                    value ->> '$.kind', value ->> '$.partition', value ->> '$.pos'
             FROM json_each(?1) LEFT JOIN tasker_tasks t ON t.task_id = value ->> '$.task_id'
             WHERE true
             ON CONFLICT DO NOTHING",
            task_t
                .iter()
                .zip(last)
                .map(|(t, last)| {
                    json!({
                        "task_id": t.task_id.to_string(), "pos": t.position.0, "from": t.from_state,
                        "known": i32::from(t.from_known), "to": t.to_state, "last": i32::from(last),
                        "at": ms(t.at), "meta": t.metadata, "kind": t.event_type, "partition": partition,
                    })
                })
                .collect(),
        )
        .await?;
    }
    if !step_t.is_empty() {
        let last = last_per_entity(step_t.iter().map(|t| (t.task_id, t.step)));
        exec(
            tx,
            "UPDATE tasker_workflow_step_transitions SET most_recent = 0
             WHERE most_recent AND (task_id, step_index) IN
                 (SELECT value ->> '$.task_id', value ->> '$.step' FROM json_each(?1))",
            step_t
                .iter()
                .map(|t| json!({"task_id": t.task_id.to_string(), "step": t.step}))
                .collect(),
        )
        .await?;
        exec(
            tx,
            "INSERT INTO tasker_workflow_step_transitions (task_id, step_index, sort_key, from_state,
                 to_state, most_recent, occurred_at, metadata, event_type, log_partition, log_position)
             SELECT value ->> '$.task_id', value ->> '$.step', value ->> '$.pos',
                    CASE WHEN value ->> '$.known' THEN value ->> '$.from' ELSE s.status END,
                    value ->> '$.to', value ->> '$.last', value ->> '$.at', value ->> '$.meta',
                    value ->> '$.kind', value ->> '$.partition', value ->> '$.pos'
             FROM json_each(?1) LEFT JOIN tasker_workflow_steps s
                  ON s.task_id = value ->> '$.task_id' AND s.step_index = value ->> '$.step'
             WHERE true
             ON CONFLICT DO NOTHING",
            step_t
                .iter()
                .zip(last)
                .map(|(t, last)| {
                    json!({
                        "task_id": t.task_id.to_string(), "step": t.step, "pos": t.position.0,
                        "from": t.from_state, "known": i32::from(t.from_known), "to": t.to_state,
                        "last": i32::from(last), "at": ms(t.at), "meta": t.metadata,
                        "kind": t.event_type, "partition": partition,
                    })
                })
                .collect(),
        )
        .await?;
    }
    Ok(())
}
