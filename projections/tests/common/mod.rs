//! Test support: fresh databases, and event logs made by the real engine.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::Log;
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::record::{
    CancelTask, Command, CorrelationId, Envelope, PartitionId, Position, RawJson, RequestTask,
    ResolveStep, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineOptions};
use tasker_engine::state::State;

/// The PostgreSQL server tests use: `DATABASE_URL`, or a clear failure.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set. These tests need PostgreSQL: run scripts/test (it provisions \
             one), or start PostgreSQL and export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"
        )
    })
}

/// A fresh, empty database on the test server; dropped by [`TestDb::drop`].
#[derive(Debug)]
pub struct TestDb {
    pub url: String,
    admin: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin = database_url();
        let name = format!("tasker_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("cannot connect to DATABASE_URL ({admin}): {e}. Is PostgreSQL running? scripts/test starts one.")
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = match admin.rfind('/') {
            Some(i)
                if admin[..i].contains("://")
                    && admin[i..].len() > 1
                    && !admin[i + 1..].contains('@') =>
            {
                let (base, rest) = admin.split_at(i);
                let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
                format!("{base}/{name}{query}")
            }
            _ => format!("{}/{name}", admin.trim_end_matches('/')),
        };
        TestDb { url, admin, name }
    }

    pub async fn drop_db(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

pub const TEMPLATES: &[&str] = &[
    "namespace: shop\nname: diamond\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n  - { name: c, handler: noop, depends_on: [a] }\n  - { name: d, handler: noop, depends_on: [b, c] }\n",
    "namespace: shop\nname: flaky\nversion: 2.1.0\nsteps:\n  - { name: a, handler: noop }\n  - name: b\n    handler: fail\n    depends_on: [a]\n    retry_limit: 3\n    backoff: { initial: 5ms, max: 10ms }\n    config: { times: 2, retry_after_ms: 3000 }\n  - { name: c, handler: fail, depends_on: [b], retry_limit: 2, backoff: { initial: 5ms }, config: { always: true } }\n  - { name: d, handler: noop, depends_on: [c] }\n",
    "namespace: ops\nname: slow\nversion: 1.0.0\nsteps:\n  - { name: wait, handler: sleep, config: { ms: 5000 } }\n  - { name: after, handler: noop, depends_on: [wait] }\n",
];

fn request(ns: &str, name: &str) -> Envelope {
    Envelope::command(
        TaskId::generate(),
        CorrelationId::generate(),
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: ns.into(),
            name: name.into(),
            context: RawJson::parse(r#"{"n": 1}"#).unwrap(),
            initiator: Some("test".into()),
            tags: vec!["t1".into()],
            ..RequestTask::default()
        }),
    )
}

/// Runs a mixed workload on the embedded engine: diamonds, retries that end in
/// error then get resolved, cancelled slow tasks. Returns the log and the
/// partition count.
pub fn make_log(dir: &std::path::Path, partitions: u32, diamonds: usize) -> Arc<dyn Log> {
    let registry = Arc::new(TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        None,
    ));
    for t in TEMPLATES {
        registry.add_yaml(t, "test.yaml").unwrap();
    }
    let open = || -> Arc<dyn Log> {
        Arc::new(
            FileLog::open(
                dir,
                FileLogConfig {
                    partitions,
                    ..FileLogConfig::default()
                },
            )
            .unwrap(),
        )
    };
    let engine = Engine::start(
        open(),
        Arc::clone(&registry),
        EngineOptions::default(),
        None,
    )
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..diamonds {
        let e = request("shop", "diamond");
        ids.push(e.task_id);
        engine.request_blocking(e).unwrap();
    }
    let mut flaky = Vec::new();
    for _ in 0..3 {
        let e = request("shop", "flaky");
        flaky.push(e.task_id);
        ids.push(e.task_id);
        engine.request_blocking(e).unwrap();
    }
    let mut slow = Vec::new();
    for _ in 0..2 {
        let e = request("ops", "slow");
        slow.push(e.task_id);
        engine.request_blocking(e).unwrap();
    }
    wait(&engine, &ids);
    // Resolve the failed step of one flaky task, so the task finishes by hand.
    let resolve = Envelope::command(
        flaky[0],
        CorrelationId::NIL,
        Timestamp::now(),
        Command::ResolveStep(ResolveStep {
            step: "c".into(),
            result: Some(RawJson::parse(r#"{"by": "hand"}"#).unwrap()),
            resolved_by: Some("ops".into()),
            reason: Some("fixed upstream".into()),
            skip_dependents: false,
        }),
    );
    engine.request_blocking(resolve).unwrap();
    for id in &slow {
        let cancel = Envelope::command(
            *id,
            CorrelationId::NIL,
            Timestamp::now(),
            Command::CancelTask(CancelTask::default()),
        );
        engine.request_blocking(cancel).unwrap();
    }
    wait(&engine, &[flaky[0]]);
    engine.shutdown();
    open()
}

fn wait(engine: &Engine, ids: &[TaskId]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ids
        .iter()
        .all(|id| engine.task(*id).is_some_and(|t| t.status.is_terminal()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "workload did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The engine's state of a partition, folded from the whole log (no retention).
pub fn fold(log: &dyn Log, partition: PartitionId) -> State {
    let mut state = State::new(u64::MAX);
    let end = log.end(partition).unwrap();
    let mut reader = log.reader(partition, Position(0)).unwrap();
    while reader.position() < end {
        for rec in reader.poll(10_000, Duration::from_millis(100)).unwrap() {
            if let Ok(env) = tasker_engine::codec::decode(&rec.record.payload) {
                state.apply(&env);
            }
        }
    }
    state
}

/// The analytics summaries (`tasker_task_hourly`, `tasker_step_hourly`) as
/// comparable lines: `task|step <hour> <counts...>`.
pub async fn summary_rows(conn: &mut sqlx::PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT 'task ' || hour || ' ' || requested || ' ' || complete || ' ' || error || ' ' || complete_span_us
         FROM tasker_task_hourly
         UNION ALL
         SELECT 'step ' || hour || ' ' || complete || ' ' || timed || ' ' || duration_ms
         FROM tasker_step_hourly
         ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}
