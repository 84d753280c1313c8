//! The projector when PostgreSQL drops its connections mid-batch
//! (`pg_terminate_backend`): it retries with backoff and the read model stays
//! exact (equal to a fresh rebuild).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::Row;
use tasker_engine::log::Log;
use tasker_engine::record::PartitionId;
use tasker_projections::{Progress, ProjectorOptions, Store, run_partition};

use common::{TestDb, make_log};

async fn rows(store: &Store) -> Vec<String> {
    let Store::Postgres(pg) = store else {
        unreachable!()
    };
    sqlx::query(
        "SELECT s.task_id::text || ' ' || s.step_index || ' ' || s.status || ' ' || s.attempts || ' ' ||
                coalesce(tasker_ts_to_ms(s.completed_at)::text, '-') || ' ' || coalesce(s.duration_ms::text, '-') ||
                ' ' || (SELECT count(*) FROM tasker_workflow_step_transitions t
                        WHERE t.task_id = s.task_id AND t.step_index = s.step_index) AS r
         FROM tasker_workflow_steps s ORDER BY 1",
    )
    .fetch_all(pg.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>("r"))
    // The analytics summaries the projector keeps in the same transactions.
    .chain(common::summary_rows(&mut pg.pool().acquire().await.unwrap()).await)
    .collect()
}

async fn project(store: &Store, log: &Arc<dyn Log>, batch: usize, chaos: Option<&str>) -> u64 {
    let partition = PartitionId(0);
    let end = log.end(partition).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let task = tokio::spawn(run_partition(
        store.clone(),
        Arc::clone(log),
        partition,
        ProjectorOptions {
            name: "read_model".into(),
            max_records: batch,
            max_delay: Duration::from_millis(2),
        },
        Arc::clone(&progress),
        Arc::clone(&stop),
    ));
    let mut kills = 0;
    let mut round = 0u64;
    let admin = match chaos {
        Some(url) => Some(sqlx::PgPool::connect(url).await.unwrap()),
        None => None,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    // Where the projector stood at the last kill.
    let mut killed_at = None;
    while progress.position.load(Ordering::Relaxed) < end.0 {
        assert!(Instant::now() < deadline, "the projector did not catch up");
        if let (Some(admin), Some(url)) = (&admin, chaos) {
            // Kill again only once a batch got through since the last kill: on
            // a loaded machine kills at a fixed pace could starve it (a fresh
            // connection plans every statement again).
            let position = progress.position.load(Ordering::Relaxed);
            if killed_at == Some(position) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            killed_at = Some(position);
            let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
            let n: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> 'chaos'",
            )
            .bind(db)
            .fetch_one(admin)
            .await
            .unwrap();
            kills += n as u64;
            // 30-90 ms apart: a fresh connection plans every statement again,
            // and a fixed 30 ms left too few whole batches to make progress.
            round += 1;
            tokio::time::sleep(Duration::from_millis(30 + round * 7_919 % 61)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap().unwrap();
    assert!(
        chaos.is_none() || progress.retries.load(Ordering::Relaxed) > 0,
        "no write was interrupted"
    );
    kills
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_mid_batch_leave_the_read_model_exact() {
    let dir = tempfile::TempDir::new().unwrap();
    let log = tokio::task::spawn_blocking({
        let p = dir.path().to_owned();
        move || make_log(&p, 1, 60)
    })
    .await
    .unwrap();
    let db = TestDb::new().await;
    let store = Store::open(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let admin_url = format!(
        "{}{}application_name=chaos",
        db.url,
        if db.url.contains('?') { "&" } else { "?" }
    );
    let kills = project(&store, &log, 3, Some(&admin_url)).await;
    assert!(kills > 0, "no connection was dropped");
    let chaotic = rows(&store).await;

    let db2 = TestDb::new().await;
    let fresh = Store::open(&db2.url).await.unwrap();
    fresh.migrate().await.unwrap();
    project(&fresh, &log, 10_000, None).await;
    assert_eq!(chaotic, rows(&fresh).await, "equal to a fresh rebuild");
    db.drop_db().await;
    db2.drop_db().await;
}
