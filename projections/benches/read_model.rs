//! Read-model benchmarks against a real PostgreSQL (`DATABASE_URL`), each in a
//! fresh database that is dropped afterwards:
//!
//! - projection: a log of diamond tasks (A -> (B, C) -> D, 11 events each) made
//!   by `decide` and the fold, folded into batches of 10,000 records and written
//!   with `Store::apply`; events/s (also into SQLite, for reference);
//! - readiness of one 20-step task: 1,000 calls of `Store::readiness`, median and
//!   p99 (hdrhistogram), in a read model holding 1,000,000 step rows;
//! - slowest steps / tasks, analytics and health counts over those 1,000,000
//!   step rows (250,000 tasks over 30 days, bulk-generated with `generate_series`):
//!   `EXPLAIN (ANALYZE)` execution time of the SQL functions, and the median
//!   latency of the `Store` calls.
//!
//! `cargo bench -p tasker-projections --bench read_model`, optionally followed by
//! `-- --events <n>` (projection log size), `--only projection|queries`, `--plans`
//! (print the query plans) and `--keep` (keep the 1,000,000-row database and
//! print its URL, to explore plans with psql).
// A benchmark program: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sqlx::{Connection, Row};
use tasker_engine::decide::{Input, Resolution, decide};
use tasker_engine::record::{
    BackoffSpec, Body, Command, CorrelationId, Envelope, Epoch, Event, PartitionId, Position,
    RawJson, RequestTask, StepError, StepId, StepOutcome, StepSpec, TaskId, TemplateSnapshot,
    Timestamp,
};
use tasker_engine::state::{Applied, Dag, State};
use tasker_projections::batch::Batch;
use tasker_projections::{SlowestFilter, Store};

const BATCH: usize = 10_000;
const DEFAULT_EVENTS: usize = 220_000;
const READINESS_CALLS: usize = 1_000;
const BULK_TASKS: i64 = 250_000;
/// The end of the bulk data's 30 days (2026-01-31T00:00:00Z), the `as_of` of the queries.
const BULK_END_MS: u64 = 1_769_817_600_000;
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let events = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--events <n>"))
        .unwrap_or(DEFAULT_EVENTS);
    let plans = args.iter().any(|a| a == "--plans");
    let keep = args.iter().any(|a| a == "--keep");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let admin = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set. This benchmark needs PostgreSQL: export \
             DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres (scripts/test provisions one)"
        )
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if only.as_deref() != Some("queries") {
            projection(&admin, events).await;
        }
        if only.as_deref() != Some("projection") {
            queries(&admin, plans, keep).await;
        }
    });
}

// ---------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------

/// A fresh database on the server of `admin`, dropped by `drop_db`.
struct BenchDb {
    admin: String,
    name: String,
    url: String,
}

impl BenchDb {
    async fn new(admin: &str) -> BenchDb {
        let name = format!("tasker_bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL ({admin}): {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin, String::new()),
        };
        let base = match base.rfind('/') {
            Some(i) if base[..i].contains("://") && !base[i + 1..].contains('@') => &base[..i],
            _ => base.trim_end_matches('/'),
        };
        let url = format!("{base}/{name}{query}");
        BenchDb {
            admin: admin.to_owned(),
            name,
            url,
        }
    }

    async fn store(&self) -> Store {
        let store = Store::open(&self.url).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    async fn drop_db(self) {
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

// ---------------------------------------------------------------------------
// A log made by decide + the fold
// ---------------------------------------------------------------------------

fn spec(name: &str, parents: &[u32]) -> StepSpec {
    StepSpec {
        name: name.into(),
        handler: "noop".into(),
        depends_on: parents.iter().map(|&p| StepId(p)).collect(),
        retryable: true,
        retry_limit: 3,
        timeout_ms: 30_000,
        backoff: BackoffSpec::default(),
        config: RawJson::empty_object(),
    }
}

fn diamond() -> TemplateSnapshot {
    TemplateSnapshot {
        namespace: "bench".into(),
        name: "diamond".into(),
        version: "1.0.0".into(),
        steps: vec![
            spec("a", &[]),
            spec("b", &[0]),
            spec("c", &[0]),
            spec("d", &[1, 2]),
        ],
    }
}

/// 20 steps: a root, three fan-out layers and a join (parents of step i are two
/// earlier steps).
fn twenty() -> TemplateSnapshot {
    let mut steps = vec![spec("s0", &[])];
    for i in 1..20u32 {
        let parents: Vec<u32> = if i < 4 {
            vec![0]
        } else if i == 19 {
            vec![16, 17, 18]
        } else {
            vec![(i - 4) / 2 + 1, (i - 3) % i]
        };
        let mut p = parents;
        p.sort();
        p.dedup();
        steps.push(spec(&format!("s{i}"), &p));
    }
    TemplateSnapshot {
        namespace: "bench".into(),
        name: "twenty".into(),
        version: "1.0.0".into(),
        steps,
    }
}

/// Decides inputs and applies their events, keeping the events as the log.
struct Engine {
    state: State,
    log: Vec<Envelope>,
    now: u64,
}

impl Engine {
    fn new(now: u64) -> Engine {
        Engine {
            state: State::default(),
            log: Vec::new(),
            now,
        }
    }

    fn input(&mut self, input: Input<'_>) {
        let task = input.task();
        let events = decide(&self.state, input, Timestamp(self.now)).unwrap();
        for event in events {
            self.push(task, event);
        }
    }

    fn push(&mut self, task: TaskId, event: Event) {
        let env = Envelope {
            task_id: task,
            correlation_id: CorrelationId::from_uuid(*task.as_uuid()),
            source_position: None,
            epoch: Epoch(0),
            at: Timestamp(self.now),
            body: Body::Event(event),
        };
        assert_eq!(self.state.apply(&env), Applied::Event);
        self.log.push(env);
    }

    fn request(&mut self, dag: &Resolution, n: u64) -> TaskId {
        let id = TaskId::v7(Timestamp(self.now), u128::from(n));
        let Ok(d) = dag else { unreachable!() };
        let command = Command::RequestTask(RequestTask {
            namespace: d.snapshot().namespace.clone(),
            name: d.snapshot().name.clone(),
            context: RawJson::from_trusted(format!(r#"{{"order":{n}}}"#)),
            initiator: Some("bench".into()),
            ..RequestTask::default()
        });
        self.input(Input::Command {
            task: id,
            command: &command,
            resolution: Some(dag),
        });
        id
    }

    fn start(&mut self, task: TaskId, step: u32) {
        self.input(Input::StartStep {
            task,
            step: StepId(step),
        });
    }

    fn finish(&mut self, task: TaskId, step: u32, outcome: &StepOutcome) {
        let attempt = self.state.task(&task).unwrap().steps[step as usize].attempts;
        self.input(Input::StepFinished {
            task,
            step: StepId(step),
            attempt,
            outcome,
        });
    }
}

/// Diamond tasks, 1,000 in flight with interleaved events, until `target` events.
fn diamond_log(target: usize) -> Vec<Envelope> {
    let dag: Resolution = Ok(Arc::new(Dag::new(Arc::new(diamond()))));
    let done = StepOutcome::Completed {
        result: RawJson::from_trusted(r#"{"ok":true}"#.into()),
    };
    let mut e = Engine::new(1_700_000_000_000);
    e.log.reserve(target + 16);
    let mut flight: Vec<(TaskId, u8)> = Vec::new();
    let mut n = 0u64;
    let mut cursor = 0;
    while e.log.len() < target || !flight.is_empty() {
        e.now += 1;
        if flight.len() < 1_000 && e.log.len() < target {
            n += 1;
            flight.push((e.request(&dag, n), 0));
            continue;
        }
        cursor = (cursor + 1) % flight.len();
        let (task, phase) = flight[cursor];
        match phase {
            0 => e.start(task, 0),
            1 => e.finish(task, 0, &done),
            2 => {
                e.start(task, 1);
                e.start(task, 2);
            }
            3 => e.finish(task, 1, &done),
            4 => e.finish(task, 2, &done),
            5 => e.start(task, 3),
            _ => e.finish(task, 3, &done),
        }
        if phase == 6 {
            flight.swap_remove(cursor);
        } else {
            flight[cursor].1 += 1;
        }
    }
    e.log
}

/// Projects `log` into `store` in batches of `BATCH` records; returns the time.
async fn project(store: &Store, log: &[Envelope], start: u64) -> (Duration, Vec<Duration>) {
    let mut per_batch = Vec::new();
    let begin = Instant::now();
    let mut position = start;
    for chunk in log.chunks(BATCH) {
        let t = Instant::now();
        let first = Position(position);
        let mut batch = Batch::new(PartitionId(0), first, Epoch(0));
        for env in chunk {
            batch.add(Position(position), Some(env));
            position += 1;
        }
        store.apply("read_model", first, &batch).await.unwrap();
        per_batch.push(t.elapsed());
    }
    (begin.elapsed(), per_batch)
}

async fn projection(admin: &str, events: usize) {
    println!("== projection: diamond tasks, batches of {BATCH} records, Store::apply");
    let t = Instant::now();
    let log = diamond_log(events);
    println!(
        "generated {} events ({} tasks) with decide + apply in {:.1} s",
        log.len(),
        log.len() / 11,
        t.elapsed().as_secs_f64()
    );
    let db = BenchDb::new(admin).await;
    let store = db.store().await;
    println!(
        "(CPU: seconds used by the PostgreSQL backends serving the bench database and by this \
         process; events / their sum is the throughput the work allows on a machine with no \
         other load)"
    );
    for run in 1..=3 {
        store.reset("read_model").await.unwrap();
        let (pg_before, me_before) = (backend_cpu(&db.name), own_cpu());
        let (total, per_batch) = project(&store, &log, 0).await;
        let (pg_cpu, me_cpu) = (backend_cpu(&db.name) - pg_before, own_cpu() - me_before);
        let mut sorted = per_batch.clone();
        sorted.sort();
        println!(
            "postgres run {run}: {:>7.0} events/s  ({:.2} s; batch median {:.0} ms, max {:.0} ms; \
             CPU postgres {:.2} s + bench {:.2} s = {:.0} events per CPU-second)",
            log.len() as f64 / total.as_secs_f64(),
            total.as_secs_f64(),
            sorted[sorted.len() / 2].as_secs_f64() * 1e3,
            sorted[sorted.len() - 1].as_secs_f64() * 1e3,
            pg_cpu,
            me_cpu,
            log.len() as f64 / (pg_cpu + me_cpu),
        );
    }
    let dir = tempfile::TempDir::new().unwrap();
    let lite = Store::open(&format!("sqlite://{}", dir.path().join("rm.db").display()))
        .await
        .unwrap();
    lite.migrate().await.unwrap();
    let (total, _) = project(&lite, &log, 0).await;
    println!(
        "sqlite (reference):  {:>9.0} events/s  ({:.2} s)",
        log.len() as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
    drop(store);
    db.drop_db().await;
}

/// CPU seconds (user + system) of the PostgreSQL backends connected to `db`, from
/// /proc (their process title names the database); 0 where /proc is missing.
fn backend_cpu(db: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let title = String::from_utf8_lossy(&cmdline);
        if title.starts_with("postgres: ") && title.contains(db) {
            total += proc_cpu(&path.join("stat"));
        }
    }
    total
}

/// CPU seconds of this process.
fn own_cpu() -> f64 {
    proc_cpu(std::path::Path::new("/proc/self/stat"))
}

/// utime + stime of a /proc/<pid>/stat file, in seconds (USER_HZ = 100).
fn proc_cpu(stat: &std::path::Path) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return 0.0;
    };
    // Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

// ---------------------------------------------------------------------------
// Queries over 1,000,000 step rows
// ---------------------------------------------------------------------------

/// 5 namespaces x 4 task names (versions 1.0.0 / 1.0.1), 250,000 diamond tasks
/// requested over the 30 days before `BULK_END_MS` (newest last): 95 % complete,
/// 3 % error (second step failed), 1 % cancelled, the newest ~0.4 % pending or
/// in progress; 1,000,000 steps with execution times of 0-5 s; 1,000,000 edges.
/// Deterministic (hashes of the row number, no random()).
/// `$1` is `BULK_END_MS`, `$2` the number of tasks.
const BULK: &[&str] = &[
    "INSERT INTO tasker_task_namespaces (name, created_at)
     SELECT 'ns' || i, tasker_ms_to_ts($1::int8 - 2678400000) FROM generate_series(0, 4) i
     WHERE $2::int8 > 0",
    "INSERT INTO tasker_named_tasks (task_namespace_id, name, version, template, created_at)
     SELECT n.task_namespace_id, 'task' || j, '1.0.' || (j % 2), '{}', n.created_at
     FROM tasker_task_namespaces n, generate_series(0, 3) j
     WHERE $1::int8 > 0 AND $2::int8 > 0",
    "INSERT INTO tasker_tasks (task_id, named_task_id, status, context, requested_at, started_at,
         completed_at, initiator, correlation_id, log_partition, log_position, updated_at)
     SELECT id, nt, status, '{}', req, req + INTERVAL '5 ms',
            CASE WHEN status IN ('complete', 'error', 'cancelled')
                 THEN req + (1000 + h % 20000) * INTERVAL '1 ms' END,
            'bench', id, 0, i, req
     FROM (
         SELECT i, md5(i::text)::uuid AS id,
                (SELECT min(named_task_id) FROM tasker_named_tasks) + (i % 20) AS nt,
                tasker_ms_to_ts($1::int8 - ($2::int8 - i) * (2592000000 / $2::int8)) AS req,
                abs(hashint8(i)::int8) AS h,
                CASE WHEN i > $2::int8 - 1000
                         THEN (CASE WHEN i % 2 = 0 THEN 'pending' ELSE 'in_progress' END)
                     WHEN abs(hashint8(i)::int8) % 100 < 3 THEN 'error'
                     WHEN abs(hashint8(i)::int8) % 100 = 3 THEN 'cancelled'
                     ELSE 'complete' END AS status
         FROM generate_series(1, $2::int8) i
     ) g",
    "INSERT INTO tasker_workflow_steps (task_id, step_index, name, handler, status, attempts,
         retry_limit, retryable, last_attempted_at, last_failure_at, next_retry_at, started_at,
         completed_at, duration_ms, updated_at)
     SELECT t.task_id, k, 'step' || k, 'noop', st, CASE WHEN st IN ('pending', 'cancelled') THEN 0 ELSE 1 END,
            3, true,
            CASE WHEN st NOT IN ('pending', 'cancelled') THEN t.requested_at + k * INTERVAL '10 ms' END,
            CASE WHEN st = 'error' THEN t.completed_at END,
            NULL,
            CASE WHEN st NOT IN ('pending', 'cancelled') THEN t.requested_at + k * INTERVAL '10 ms' END,
            CASE WHEN st = 'complete' THEN t.requested_at + k * INTERVAL '10 ms' + d * INTERVAL '1 ms'
                 WHEN st = 'cancelled' THEN t.completed_at END,
            CASE WHEN st = 'complete' THEN d END,
            t.updated_at
     FROM tasker_tasks t
     CROSS JOIN generate_series(0, 3) k
     CROSS JOIN LATERAL (
         SELECT abs(hashint8(t.log_position * 4 + k)::int8) % 5000 AS d,
                CASE t.status
                    WHEN 'complete' THEN 'complete'
                    WHEN 'cancelled' THEN 'cancelled'
                    WHEN 'error' THEN (CASE WHEN k = 0 THEN 'complete' WHEN k = 1 THEN 'error'
                                            WHEN k = 2 THEN 'complete' ELSE 'pending' END)
                    WHEN 'in_progress' THEN (CASE WHEN k = 0 THEN 'complete'
                                                  WHEN k = 3 THEN 'pending' ELSE 'in_progress' END)
                    ELSE 'pending' END AS st
     ) x
     WHERE $1::int8 > 0 AND $2::int8 > 0",
    "INSERT INTO tasker_workflow_step_edges (task_id, from_step, to_step)
     SELECT t.task_id, e.f, e.t FROM tasker_tasks t
     CROSS JOIN (VALUES (0, 1), (0, 2), (1, 3), (2, 3)) AS e(f, t)
     WHERE $1::int8 > 0 AND $2::int8 > 0",
];

async fn queries(admin: &str, plans: bool, keep: bool) {
    println!();
    println!("== queries over 1,000,000 step rows");
    let db = BenchDb::new(admin).await;
    let store = db.store().await;
    let Store::Postgres(pg) = &store else {
        unreachable!()
    };
    let t = Instant::now();
    for sql in BULK {
        sqlx::query(sqlx::AssertSqlSafe(*sql))
            .bind(BULK_END_MS as i64)
            .bind(BULK_TASKS)
            .execute(pg.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
    }
    // Bulk rows bypass the projector, which keeps the analytics summaries.
    sqlx::query("SELECT tasker_rebuild_hourly_v01()")
        .execute(pg.pool())
        .await
        .unwrap();
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(pg.pool())
        .await
        .unwrap();
    let counts = sqlx::query(
        "SELECT (SELECT count(*) FROM tasker_tasks) AS tasks,
                (SELECT count(*) FROM tasker_workflow_steps) AS steps,
                (SELECT count(*) FROM tasker_workflow_step_edges) AS edges",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap();
    println!(
        "bulk-loaded {} tasks, {} steps, {} edges in {:.1} s (+ VACUUM ANALYZE)",
        counts.get::<i64, _>("tasks"),
        counts.get::<i64, _>("steps"),
        counts.get::<i64, _>("edges"),
        t.elapsed().as_secs_f64()
    );

    readiness(&store).await;

    let end = Timestamp(BULK_END_MS);
    let ago = |ms: u64| Timestamp(BULK_END_MS - ms);
    println!();
    println!("EXPLAIN (ANALYZE) execution time, best of 5 (and the Store call, median of 20):");
    let explained: &[(&str, &str)] = &[
        (
            "slowest steps (no filter, 10)",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_slowest_steps_v01()",
        ),
        (
            "slowest steps since 1 day",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_slowest_steps_v01(
                 tasker_ms_to_ts(1769817600000 - 86400000))",
        ),
        (
            "slowest steps ns2/task1/1.0.1",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_slowest_steps_v01(
                 NULL, 10, 'ns2', 'task1', '1.0.1')",
        ),
        (
            "slowest tasks (no filter, 10)",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_slowest_tasks_v01()",
        ),
        (
            "slowest tasks ns2/task1/1.0.1",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_slowest_tasks_v01(
                 NULL, 10, 'ns2', 'task1', '1.0.1')",
        ),
        (
            "analytics, last hour",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_analytics_metrics_v01(
                 tasker_ms_to_ts(1769817600000 - 3600000), tasker_ms_to_ts(1769817600000))",
        ),
        (
            "analytics, last 24 hours",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_analytics_metrics_v01(
                 tasker_ms_to_ts(1769817600000 - 86400000), tasker_ms_to_ts(1769817600000))",
        ),
        (
            "analytics, all 30 days",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_analytics_metrics_v01(
                 tasker_ms_to_ts(0), tasker_ms_to_ts(1769817600000))",
        ),
        (
            "health counts",
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_system_health_counts_v01(
                 tasker_ms_to_ts(1769817600000))",
        ),
    ];
    let mut explain_ms = Vec::new();
    for (name, sql) in explained {
        let mut best = f64::MAX;
        let mut plan = String::new();
        for _ in 0..5 {
            let json: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(*sql))
                .fetch_one(pg.pool())
                .await
                .unwrap();
            let ms = json[0]["Execution Time"].as_f64().unwrap();
            if ms < best {
                best = ms;
                plan = json.to_string();
            }
        }
        if plans {
            println!("--- plan of {name}:\n{}", summarize_plan(&plan));
        }
        explain_ms.push((*name, best));
    }
    let calls: Vec<(&str, u64)> = vec![
        (
            "slowest steps (no filter, 10)",
            median_us(20, || async {
                store
                    .slowest_steps(&SlowestFilter::default())
                    .await
                    .unwrap();
            })
            .await,
        ),
        (
            "slowest steps since 1 day",
            median_us(20, || async {
                store
                    .slowest_steps(&SlowestFilter {
                        since: Some(ago(DAY_MS)),
                        ..SlowestFilter::default()
                    })
                    .await
                    .unwrap();
            })
            .await,
        ),
        (
            "slowest steps ns2/task1/1.0.1",
            median_us(20, || async {
                store
                    .slowest_steps(&filter("ns2", "task1", "1.0.1"))
                    .await
                    .unwrap();
            })
            .await,
        ),
        (
            "slowest tasks (no filter, 10)",
            median_us(20, || async {
                store
                    .slowest_tasks(&SlowestFilter::default())
                    .await
                    .unwrap();
            })
            .await,
        ),
        (
            "slowest tasks ns2/task1/1.0.1",
            median_us(20, || async {
                store
                    .slowest_tasks(&filter("ns2", "task1", "1.0.1"))
                    .await
                    .unwrap();
            })
            .await,
        ),
        (
            "analytics, last hour",
            median_us(20, || async {
                store.analytics(ago(HOUR_MS), end).await.unwrap();
            })
            .await,
        ),
        (
            "analytics, last 24 hours",
            median_us(20, || async {
                store.analytics(ago(DAY_MS), end).await.unwrap();
            })
            .await,
        ),
        (
            "analytics, all 30 days",
            median_us(20, || async {
                store.analytics(Timestamp(0), end).await.unwrap();
            })
            .await,
        ),
        (
            "health counts",
            median_us(20, || async {
                store.health_counts(end).await.unwrap();
            })
            .await,
        ),
    ];
    for ((name, explain), (_, call)) in explain_ms.iter().zip(&calls) {
        println!(
            "  {name:<32} EXPLAIN ANALYZE {explain:>8.2} ms   Store call median {:>8.2} ms",
            *call as f64 / 1e3
        );
    }
    let a = store.analytics(ago(DAY_MS), end).await.unwrap();
    println!(
        "  (last 24 h: {} tasks, {} steps, health {}, completion {} %, avg step {:?} ms)",
        a.task_throughput,
        a.step_throughput,
        a.system_health_score,
        a.completion_rate,
        a.avg_step_duration_ms
    );
    drop(store);
    if keep {
        println!("kept the database: {}", db.url);
    } else {
        db.drop_db().await;
    }
}

fn filter(ns: &str, name: &str, version: &str) -> SlowestFilter {
    SlowestFilter {
        namespace: Some(ns.into()),
        task_name: Some(name.into()),
        version: Some(version.into()),
        ..SlowestFilter::default()
    }
}

/// The plan's node types, indented, with actual rows and time (for `--plans`).
fn summarize_plan(json: &str) -> String {
    fn walk(node: &serde_json::Value, depth: usize, out: &mut String) {
        out.push_str(&format!(
            "{:indent$}{} {} rows={} time={:.2}ms\n",
            "",
            node["Node Type"].as_str().unwrap_or("?"),
            node["Index Name"]
                .as_str()
                .or(node["Relation Name"].as_str())
                .unwrap_or(""),
            node["Actual Rows"],
            node["Actual Total Time"].as_f64().unwrap_or(0.0),
            indent = depth * 2
        ));
        if let Some(children) = node["Plans"].as_array() {
            for c in children {
                walk(c, depth + 1, out);
            }
        }
    }
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut out = String::new();
    walk(&v[0]["Plan"], 1, &mut out);
    out
}

async fn median_us<F, Fut>(n: usize, mut f: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f().await; // warm-up (prepares the statement)
    let mut times: Vec<u64> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        times.push(t.elapsed().as_micros() as u64);
    }
    times.sort_unstable();
    times[n / 2]
}

/// One 20-step task projected next to the bulk data, part-way through: the
/// root and the first layer done, one step failed and waiting for its retry.
async fn readiness(store: &Store) {
    let dag: Resolution = Ok(Arc::new(Dag::new(Arc::new(twenty()))));
    let done = StepOutcome::Completed {
        result: RawJson::from_trusted(r#"{"ok":true}"#.into()),
    };
    let mut e = Engine::new(BULK_END_MS - 60_000);
    let task = e.request(&dag, 1);
    e.start(task, 0);
    e.now += 100;
    e.finish(task, 0, &done);
    for s in 1..4 {
        e.start(task, s);
    }
    e.now += 100;
    e.finish(task, 1, &done);
    e.finish(task, 2, &done);
    e.finish(task, 3, &StepOutcome::Failed(StepError::retryable("flaky")));
    let checkpoint = store
        .checkpoint("read_model", PartitionId(0))
        .await
        .unwrap();
    project(store, &e.log, checkpoint.position.0).await;
    let as_of = Timestamp(BULK_END_MS);
    let rows = store.readiness(&[task], as_of).await.unwrap();
    assert_eq!(rows.len(), 20);
    let ready = rows.iter().filter(|r| r.ready_for_execution).count();
    println!();
    println!(
        "readiness of one 20-step task ({ready} ready, {READINESS_CALLS} calls of Store::readiness after 100 warm-up calls):"
    );
    for _ in 0..100 {
        store.readiness(&[task], as_of).await.unwrap();
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    for _ in 0..READINESS_CALLS {
        let t = Instant::now();
        let r = store.readiness(&[task], as_of).await.unwrap();
        h.record(t.elapsed().as_nanos() as u64).unwrap();
        assert_eq!(r.len(), 20);
    }
    println!(
        "  postgres: median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        h.value_at_quantile(0.5) as f64 / 1e6,
        h.value_at_quantile(0.99) as f64 / 1e6,
        h.max() as f64 / 1e6
    );
    let Store::Postgres(pg) = store else {
        unreachable!()
    };
    let json: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM get_step_readiness_status_v01($1, tasker_ms_to_ts($2))",
    )
    .bind(vec![*task.as_uuid()])
    .bind(BULK_END_MS as i64)
    .fetch_one(pg.pool())
    .await
    .unwrap();
    println!(
        "  EXPLAIN ANALYZE: planning {:.3} ms, execution {:.3} ms",
        json[0]["Planning Time"].as_f64().unwrap_or(0.0),
        json[0]["Execution Time"].as_f64().unwrap_or(0.0)
    );
    // The same task in SQLite, for reference.
    let dir = tempfile::TempDir::new().unwrap();
    let lite = Store::open(&format!("sqlite://{}", dir.path().join("rm.db").display()))
        .await
        .unwrap();
    lite.migrate().await.unwrap();
    project(&lite, &e.log, 0).await;
    assert_eq!(lite.readiness(&[task], as_of).await.unwrap(), rows);
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    for i in 0..READINESS_CALLS + 100 {
        let t = Instant::now();
        lite.readiness(&[task], as_of).await.unwrap();
        if i >= 100 {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    println!(
        "  sqlite (reference, 20 step rows): median {:.3} ms, p99 {:.3} ms",
        h.value_at_quantile(0.5) as f64 / 1e6,
        h.value_at_quantile(0.99) as f64 / 1e6
    );
}
