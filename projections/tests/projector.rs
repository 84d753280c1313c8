//! The projector against real databases: the read model matches the engine's
//! state, restarts continue exactly, a failed batch leaves nothing behind, and a
//! rebuild gives identical rows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::Row;
use tasker_engine::log::Log;
use tasker_engine::record::PartitionId;
use tasker_projections::{Progress, ProjectorOptions, Store, run_partition};

use common::{TestDb, fold, make_log};

/// Projects every partition until the checkpoint reaches the log's end.
async fn project_all(store: &Store, log: &Arc<dyn Log>, name: &str, max_records: usize) {
    let mut handles = Vec::new();
    for p in 0..log.partitions() {
        let partition = PartitionId(p);
        let end = log.end(partition).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let options = ProjectorOptions {
            name: name.into(),
            max_records,
            max_delay: Duration::from_millis(5),
        };
        let task = tokio::spawn(run_partition(
            store.clone(),
            Arc::clone(log),
            partition,
            options,
            Arc::clone(&progress),
            Arc::clone(&stop),
        ));
        handles.push((task, stop, progress, end));
    }
    for (task, stop, progress, end) in handles {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while progress.position.load(Ordering::Relaxed) < end.0 {
            assert!(std::time::Instant::now() < deadline, "projector stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        task.await.unwrap().unwrap();
    }
}

/// Task and step rows as comparable strings (status, attempts, times...).
async fn pg_rows(store: &Store) -> Vec<String> {
    let Store::Postgres(pg) = store else {
        unreachable!()
    };
    let mut out = Vec::new();
    for r in sqlx::query(
        "SELECT t.task_id::text AS id, t.status, tasker_ts_to_ms(t.started_at) AS s, tasker_ts_to_ms(t.completed_at) AS c,
                t.context::text AS ctx, t.tags::text AS tags, t.log_partition, t.log_position
         FROM tasker_tasks t ORDER BY 1",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap()
    {
        out.push(format!(
            "task {} {} {:?} {:?} {} {} {} {}",
            r.get::<String, _>("id"),
            r.get::<String, _>("status"),
            r.get::<Option<i64>, _>("s"),
            r.get::<Option<i64>, _>("c"),
            serde_json::from_str::<serde_json::Value>(&r.get::<String, _>("ctx")).unwrap(),
            serde_json::from_str::<serde_json::Value>(&r.get::<String, _>("tags")).unwrap(),
            r.get::<i32, _>("log_partition"),
            r.get::<i64, _>("log_position"),
        ));
    }
    for r in sqlx::query(
        "SELECT task_id::text AS id, step_index, status, attempts, tasker_ts_to_ms(next_retry_at) AS nr,
                tasker_ts_to_ms(started_at) AS s, tasker_ts_to_ms(completed_at) AS c, duration_ms,
                results::text AS res, error->>'message' AS err, backoff_request_seconds AS b
         FROM tasker_workflow_steps ORDER BY 1, 2",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap()
    {
        out.push(format!(
            "step {} {} {} {} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            r.get::<String, _>("id"),
            r.get::<i32, _>("step_index"),
            r.get::<String, _>("status"),
            r.get::<i32, _>("attempts"),
            r.get::<Option<i64>, _>("nr"),
            r.get::<Option<i64>, _>("s"),
            r.get::<Option<i64>, _>("c"),
            r.get::<Option<i64>, _>("duration_ms"),
            r.get::<Option<String>, _>("res").map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap()),
            r.get::<Option<String>, _>("err"),
            r.get::<Option<i32>, _>("b"),
        ));
    }
    for r in sqlx::query(
        "SELECT task_id::text AS id, step_index, sort_key, coalesce(from_state, '-') AS f, to_state, most_recent
         FROM tasker_workflow_step_transitions ORDER BY 1, 2, 3",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap()
    {
        out.push(format!(
            "st {} {} {} {} {} {}",
            r.get::<String, _>("id"),
            r.get::<i32, _>("step_index"),
            r.get::<i64, _>("sort_key"),
            r.get::<String, _>("f"),
            r.get::<String, _>("to_state"),
            r.get::<bool, _>("most_recent"),
        ));
    }
    for r in sqlx::query(
        "SELECT task_id::text AS id, sort_key, coalesce(from_state, '-') AS f, to_state, most_recent
         FROM tasker_task_transitions ORDER BY 1, 2",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap()
    {
        out.push(format!(
            "tt {} {} {} {} {}",
            r.get::<String, _>("id"),
            r.get::<i64, _>("sort_key"),
            r.get::<String, _>("f"),
            r.get::<String, _>("to_state"),
            r.get::<bool, _>("most_recent"),
        ));
    }
    // The analytics summaries the projector keeps in the same transactions.
    out.extend(common::summary_rows(&mut pg.pool().acquire().await.unwrap()).await);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_match_the_engine_and_rebuild_is_identical() {
    let dir = tempfile::TempDir::new().unwrap();
    let log = tokio::task::spawn_blocking({
        let p = dir.path().to_owned();
        move || make_log(&p, 2, 40)
    })
    .await
    .unwrap();
    let db = TestDb::new().await;
    let store = Store::open(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    // Small batches, so tasks span several batches.
    project_all(&store, &log, "read_model", 7).await;

    let Store::Postgres(pg) = &store else {
        unreachable!()
    };
    for p in 0..log.partitions() {
        let state = fold(&*log, PartitionId(p));
        for task in state.tasks() {
            let row = sqlx::query("SELECT status, (SELECT count(*) FROM tasker_workflow_steps s WHERE s.task_id = t.task_id) AS n FROM tasker_tasks t WHERE task_id = $1")
                .bind(*task.id.as_uuid())
                .fetch_one(pg.pool())
                .await
                .unwrap();
            assert_eq!(
                row.get::<String, _>("status"),
                task.status.as_str(),
                "task {}",
                task.id
            );
            assert_eq!(row.get::<i64, _>("n"), task.steps.len() as i64);
            for (i, step) in task.steps.iter().enumerate() {
                let r = sqlx::query(
                    "SELECT status, attempts, tasker_ts_to_ms(next_retry_at) AS nr, results::text AS res,
                            tasker_ts_to_ms(started_at) AS s, tasker_ts_to_ms(completed_at) AS c
                     FROM tasker_workflow_steps WHERE task_id = $1 AND step_index = $2",
                )
                .bind(*task.id.as_uuid())
                .bind(i as i32)
                .fetch_one(pg.pool())
                .await
                .unwrap();
                assert_eq!(
                    r.get::<String, _>("status"),
                    step.status.as_str(),
                    "{} step {i}",
                    task.id
                );
                assert_eq!(r.get::<i32, _>("attempts") as u32, step.attempts);
                assert_eq!(
                    r.get::<Option<i64>, _>("nr"),
                    step.retry_at.map(|t| t.as_millis() as i64)
                );
                assert_eq!(
                    r.get::<Option<String>, _>("res")
                        .map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap()),
                    step.result.as_ref().map(|r| r.to_value())
                );
                assert_eq!(
                    r.get::<Option<i64>, _>("s"),
                    step.started_at.map(|t| t.as_millis() as i64)
                );
                assert_eq!(
                    r.get::<Option<i64>, _>("c"),
                    step.finished_at.map(|t| t.as_millis() as i64)
                );
            }
        }
    }
    // Every step reached a terminal state through transitions that chain.
    let broken: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker_workflow_step_transitions a
         JOIN tasker_workflow_step_transitions b ON a.task_id = b.task_id AND a.step_index = b.step_index
              AND b.sort_key = (SELECT min(sort_key) FROM tasker_workflow_step_transitions c
                                WHERE c.task_id = a.task_id AND c.step_index = a.step_index AND c.sort_key > a.sort_key)
         WHERE a.to_state IS DISTINCT FROM b.from_state",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(
        broken, 0,
        "each step transition starts where the previous ended"
    );
    let most_recent_ok: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker_workflow_steps s JOIN tasker_workflow_step_transitions t
         ON t.task_id = s.task_id AND t.step_index = s.step_index AND t.most_recent
         WHERE t.to_state = s.status",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap();
    let touched: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT (task_id, step_index)) FROM tasker_workflow_step_transitions",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(
        most_recent_ok, touched,
        "most_recent transition ends in the step's status"
    );

    let before = pg_rows(&store).await;
    store.reset("read_model").await.unwrap();
    project_all(&store, &log, "read_model", 10_000).await;
    assert_eq!(
        pg_rows(&store).await,
        before,
        "a rebuild with other batch sizes gives identical rows"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_writes_nothing_and_the_restart_continues_exactly() {
    let dir = tempfile::TempDir::new().unwrap();
    let log = tokio::task::spawn_blocking({
        let p = dir.path().to_owned();
        move || make_log(&p, 1, 30)
    })
    .await
    .unwrap();
    let db = TestDb::new().await;
    let store = Store::open(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let Store::Postgres(pg) = &store else {
        unreachable!()
    };
    // A trigger that fails the transaction when the batch reaches a certain task,
    // as a crash mid-batch would (nothing of the batch may remain).
    sqlx::raw_sql(
        "CREATE TABLE fail_switch (on_ boolean NOT NULL);
         INSERT INTO fail_switch VALUES (true);
         CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF (SELECT on_ FROM fail_switch) AND (SELECT count(*) FROM tasker_tasks) >= 10 THEN
             RAISE EXCEPTION 'injected failure';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER fail_once BEFORE INSERT ON tasker_tasks FOR EACH ROW EXECUTE FUNCTION fail_once();",
    )
    .execute(pg.pool())
    .await
    .unwrap();
    let partition = PartitionId(0);
    let batch_size = 5;
    // First run: stops with an error when the trigger fires (not transient? it is a
    // database error, so the projector retries until we lift the switch).
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let run = tokio::spawn(run_partition(
        store.clone(),
        Arc::clone(&log),
        partition,
        ProjectorOptions {
            name: "read_model".into(),
            max_records: batch_size,
            max_delay: Duration::from_millis(5),
        },
        Arc::clone(&progress),
        Arc::clone(&stop),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while progress.retries.load(Ordering::Relaxed) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the injected failure never happened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The failing batch left nothing: tasks stop below the threshold and the
    // checkpoint sits at the end of the last good batch.
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasker_tasks")
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert!(tasks < 11, "{tasks}");
    let cp = store.checkpoint("read_model", partition).await.unwrap();
    assert_eq!(cp.position.0, progress.position.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    let _ = run.await.unwrap();
    // Lift the switch; a new projector continues from the checkpoint.
    sqlx::query("UPDATE fail_switch SET on_ = false")
        .execute(pg.pool())
        .await
        .unwrap();
    project_all(&store, &log, "read_model", batch_size).await;
    let after = pg_rows(&store).await;
    let db2 = TestDb::new().await;
    let fresh = Store::open(&db2.url).await.unwrap();
    fresh.migrate().await.unwrap();
    project_all(&fresh, &log, "read_model", 10_000).await;
    assert_eq!(
        pg_rows(&fresh).await,
        after,
        "restart after a failed batch equals a fresh rebuild"
    );
    db.drop_db().await;
    db2.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_hold_the_same_rows() {
    let dir = tempfile::TempDir::new().unwrap();
    let log = tokio::task::spawn_blocking({
        let p = dir.path().to_owned();
        move || make_log(&p, 2, 25)
    })
    .await
    .unwrap();
    let db = TestDb::new().await;
    let pg = Store::open(&db.url).await.unwrap();
    pg.migrate().await.unwrap();
    let lite = Store::open(&format!("sqlite://{}", dir.path().join("rm.db").display()))
        .await
        .unwrap();
    lite.migrate().await.unwrap();
    project_all(&pg, &log, "read_model", 9).await;
    project_all(&lite, &log, "read_model", 13).await;
    let Store::Sqlite(s) = &lite else {
        unreachable!()
    };
    let mut lite_rows = Vec::new();
    for r in sqlx::query(
        "SELECT task_id, step_index, status, attempts, next_retry_at, started_at, completed_at, duration_ms, results
         FROM tasker_workflow_steps ORDER BY 1, 2",
    )
    .fetch_all(s.pool())
    .await
    .unwrap()
    {
        lite_rows.push(format!(
            "{} {} {} {} {:?} {:?} {:?} {:?} {:?}",
            r.get::<String, _>("task_id"),
            r.get::<i64, _>("step_index"),
            r.get::<String, _>("status"),
            r.get::<i64, _>("attempts"),
            r.get::<Option<i64>, _>("next_retry_at"),
            r.get::<Option<i64>, _>("started_at"),
            r.get::<Option<i64>, _>("completed_at"),
            r.get::<Option<i64>, _>("duration_ms"),
            r.get::<Option<String>, _>("results").map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap()),
        ));
    }
    let Store::Postgres(p) = &pg else {
        unreachable!()
    };
    let mut pg_rows = Vec::new();
    for r in sqlx::query(
        "SELECT task_id::text AS task_id, step_index, status, attempts, tasker_ts_to_ms(next_retry_at) AS nr,
                tasker_ts_to_ms(started_at) AS s, tasker_ts_to_ms(completed_at) AS c, duration_ms, results::text AS res
         FROM tasker_workflow_steps ORDER BY 1, 2",
    )
    .fetch_all(p.pool())
    .await
    .unwrap()
    {
        pg_rows.push(format!(
            "{} {} {} {} {:?} {:?} {:?} {:?} {:?}",
            r.get::<String, _>("task_id"),
            r.get::<i32, _>("step_index"),
            r.get::<String, _>("status"),
            r.get::<i32, _>("attempts"),
            r.get::<Option<i64>, _>("nr"),
            r.get::<Option<i64>, _>("s"),
            r.get::<Option<i64>, _>("c"),
            r.get::<Option<i64>, _>("duration_ms"),
            r.get::<Option<String>, _>("res").map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap()),
        ));
    }
    assert!(!pg_rows.is_empty());
    assert_eq!(lite_rows, pg_rows);
    let lite_tt: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker_workflow_step_transitions WHERE most_recent",
    )
    .fetch_one(s.pool())
    .await
    .unwrap();
    let pg_tt: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasker_workflow_step_transitions WHERE most_recent",
    )
    .fetch_one(p.pool())
    .await
    .unwrap();
    assert_eq!(lite_tt, pg_tt);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_made_from_another_log_is_not_continued() {
    let dir = tempfile::TempDir::new().unwrap();
    let logs = |name: &'static str, diamonds: usize| {
        let p = dir.path().join(name);
        tokio::task::spawn_blocking(move || make_log(&p, 1, diamonds))
    };
    let (a, shorter, longer) = (
        logs("a", 20).await.unwrap(),
        logs("b", 2).await.unwrap(),
        logs("c", 40).await.unwrap(),
    );
    let partition = PartitionId(0);
    let end = a.end(partition).unwrap();
    assert!(shorter.end(partition).unwrap() < end && longer.end(partition).unwrap() > end);
    let db = TestDb::new().await;
    let sqlite = format!("sqlite://{}", dir.path().join("rm.db").display());
    for url in [db.url.as_str(), sqlite.as_str()] {
        let store = Store::open(url).await.unwrap();
        store.migrate().await.unwrap();
        project_all(&store, &a, "read_model", 7).await;
        let cp = store.checkpoint("read_model", partition).await.unwrap();
        assert_eq!(cp.position, end, "{url}");
        assert_eq!(cp.last_record.map(|(p, _)| p.0), Some(end.0 - 1), "{url}");
        for (other, why) in [(&shorter, "ends at"), (&longer, "is not the one")] {
            let progress = Arc::new(Progress::default());
            let run = run_partition(
                store.clone(),
                Arc::clone(other),
                partition,
                ProjectorOptions::default(),
                Arc::clone(&progress),
                Arc::new(AtomicBool::new(false)),
            );
            let err = tokio::time::timeout(Duration::from_secs(30), run)
                .await
                .expect("the projector went on with another log")
                .unwrap_err();
            assert!(
                matches!(err, tasker_projections::ProjectorError::OtherLog { .. })
                    && err.to_string().contains(why),
                "{url}: {err}"
            );
            let after = store.checkpoint("read_model", partition).await.unwrap();
            assert_eq!(after.position, end, "{url}: nothing projected");
            assert_eq!(progress.events.load(Ordering::Relaxed), 0);
        }
    }
    // The same log, grown, is continued by both (no false alarm), even while it
    // cannot be reached at first (the check is retried, not fatal).
    drop(a);
    let a = logs("a", 3).await.unwrap();
    assert!(a.end(partition).unwrap() > end);
    for url in [db.url.as_str(), sqlite.as_str()] {
        let store = Store::open(url).await.unwrap();
        let unreachable: Arc<dyn Log> = Arc::new(Unreachable {
            inner: Arc::clone(&a),
            failures: std::sync::atomic::AtomicU32::new(3),
        });
        let (progress, stop) = (
            Arc::new(Progress::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let run = tokio::spawn(run_partition(
            store.clone(),
            unreachable,
            partition,
            ProjectorOptions {
                name: "read_model".into(),
                max_records: 7,
                max_delay: Duration::from_millis(5),
            },
            Arc::clone(&progress),
            Arc::clone(&stop),
        ));
        let grown = a.end(partition).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while progress.position.load(Ordering::Relaxed) < grown.0 {
            assert!(!run.is_finished(), "{url}: {:?}", run.await);
            assert!(
                std::time::Instant::now() < deadline,
                "{url}: projector stalled at {} of {grown} after {} retries",
                progress.position.load(Ordering::Relaxed),
                progress.retries.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        run.await.unwrap().unwrap();
        assert!(progress.retries.load(Ordering::Relaxed) >= 3, "{url}");
        let cp = store.checkpoint("read_model", partition).await.unwrap();
        assert_eq!(cp.position, grown, "{url}");
    }
    db.drop_db().await;
}

/// A log whose `end` fails a few times first, as a broker that is restarting.
struct Unreachable {
    inner: Arc<dyn Log>,
    failures: std::sync::atomic::AtomicU32,
}

impl Log for Unreachable {
    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }
    fn writer(
        &self,
        p: PartitionId,
    ) -> Result<Box<dyn tasker_engine::log::LogWriter>, tasker_engine::log::LogError> {
        self.inner.writer(p)
    }
    fn reader(
        &self,
        p: PartitionId,
        from: tasker_engine::record::Position,
    ) -> Result<Box<dyn tasker_engine::log::LogReader>, tasker_engine::log::LogError> {
        self.inner.reader(p, from)
    }
    fn end(
        &self,
        p: PartitionId,
    ) -> Result<tasker_engine::record::Position, tasker_engine::log::LogError> {
        let left = self.failures.load(Ordering::Relaxed);
        if left > 0 {
            self.failures.store(left - 1, Ordering::Relaxed);
            return Err(tasker_engine::log::LogError::Kafka("broker down".into()));
        }
        self.inner.end(p)
    }
    fn start(
        &self,
        p: PartitionId,
    ) -> Result<tasker_engine::record::Position, tasker_engine::log::LogError> {
        self.inner.start(p)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}
