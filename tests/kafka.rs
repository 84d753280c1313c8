//! The engine on a Kafka-protocol broker, as users run it: two `tasker run`
//! processes share a topic's partitions through a consumer group and a PostgreSQL
//! read model, and when one is killed with SIGKILL the other takes its partitions,
//! finishes its tasks and projects them; a broker that stops under load and comes
//! back loses and duplicates nothing; `tasker bench --engines` runs the same
//! workload on one and on two engine processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Server;
use tasker_engine::codec;
use tasker_engine::log::Log;
use tasker_engine::log::kafka::{KafkaLog, KafkaLogConfig};
use tasker_engine::record::{Event, PartitionId, Position};
use tasker_engine::state::{Applied, State, TaskStatus};

fn brokers() -> String {
    std::env::var("TASKER_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "TASKER_KAFKA_BROKERS is not set. These tests need a Kafka-protocol broker: run \
             scripts/test (it installs and starts Nisshi), or start one and export \
             TASKER_KAFKA_BROKERS=127.0.0.1:9092"
        )
    })
}

const TEMPLATE: &str = "namespace: k\nname: work\nversion: 1.0.0\nsteps:\n  - { name: a, handler: sleep, config: { ms: 20 } }\n  - { name: b, handler: sleep, depends_on: [a], config: { ms: 20 } }\n  - { name: c, handler: noop, depends_on: [b] }\n";

/// Folds every partition of the topic; checks nothing applied twice.
fn fold_all(log: &dyn Log) -> HashMap<String, TaskStatus> {
    let mut statuses = HashMap::new();
    for p in 0..log.partitions() {
        let partition = PartitionId(p);
        let end = log.end(partition).unwrap();
        let mut reader = log.reader(partition, Position(0)).unwrap();
        let mut state = State::default();
        let mut completed = HashSet::new();
        while reader.position() < end {
            for rec in reader.poll(10_000, Duration::from_secs(2)).unwrap() {
                let Ok(env) = codec::decode(&rec.record.payload) else {
                    continue;
                };
                if state.apply(&env) == Applied::Event
                    && let Some(Event::StepCompleted(c)) = env.as_event()
                {
                    assert!(
                        completed.insert((env.task_id, c.step, c.attempt)),
                        "applied twice: {env:?}"
                    );
                }
            }
        }
        for t in state.tasks() {
            statuses.insert(t.id.to_string(), t.status);
        }
    }
    statuses
}

/// The partitions an engine's API lists under `path` (`/v1/digests`: owned;
/// `/v1/projector`: projected), sorted.
async fn partitions(api: &str, path: &str) -> Vec<u64> {
    let mut out: Vec<u64> = match reqwest::get(format!("{api}{path}")).await {
        Ok(r) => r
            .json::<Vec<Value>>()
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|d| d["partition"].as_u64())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort_unstable();
    out
}

async fn owned(api: &str) -> Vec<u64> {
    partitions(api, "/v1/digests").await
}

/// Waits until the engine projects exactly the partitions it owns.
async fn projects_what_it_owns(api: &str, want: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (own, projected) = (owned(api).await, partitions(api, "/v1/projector").await);
        if own.len() == want && own == projected {
            return own;
        }
        assert!(
            Instant::now() < deadline,
            "{api} owns {own:?} but projects {projected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn two_engines_share_partitions_and_one_takes_over_after_kill_9() {
    let dir = tempfile::TempDir::new().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(templates.join("work.yaml"), TEMPLATE).unwrap();
    let topic = format!("tasker-cluster-{}", uuid::Uuid::now_v7().simple());
    let brokers = brokers();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(support::Database::create());
    let env = [
        ("TASKER_LOG__BACKEND", "kafka"),
        ("TASKER_KAFKA_BROKERS", brokers.as_str()),
        ("TASKER_LOG__TOPIC", topic.as_str()),
        ("TASKER_LOG__PARTITIONS", "6"),
        ("TASKER_KAFKA__GROUP_ID", topic.as_str()),
        ("DATABASE_URL", db.url.as_str()),
    ];
    let a = Server::start(&dir.path().join("a"), &templates, &env);
    let b = Server::start(&dir.path().join("b"), &templates, &env);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (pa, pb) = (owned(&a.api).await, owned(&b.api).await);
            if !pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == 6 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the group never split the partitions: {pa:?} {pb:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Each projects into the shared read model only the partitions it owns.
        let pa = projects_what_it_owns(&a.api, owned(&a.api).await.len()).await;
        let pb = projects_what_it_owns(&b.api, 6 - pa.len()).await;
        assert!(pa.iter().all(|p| !pb.contains(p)), "{pa:?} {pb:?}");
    });
    let client = reqwest::blocking::Client::new();
    let mut ids = Vec::new();
    for i in 0..300 {
        let resp = client
            .post(format!("{}/v1/tasks", a.api))
            .json(&json!({"namespace": "k", "name": "work", "context": {"i": i}}))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 202, "{:?}", resp.text());
        let v: Value = resp.json().unwrap();
        assert!(
            v["status"] == "accepted" || v["status"] == "recorded",
            "{v}"
        );
        ids.push(v["task_id"].as_str().unwrap().to_owned());
        if i == 150 {
            b.kill9();
            break;
        }
    }
    // A takes every partition (and its projection) and finishes all tasks, B's
    // included.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(90);
        while owned(&a.api).await.len() < 6 {
            assert!(Instant::now() < deadline, "A never took B's partitions");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        projects_what_it_owns(&a.api, 6).await;
    });
    let log = KafkaLog::open(KafkaLogConfig::new(&brokers, &topic, 6)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let statuses = fold_all(&log);
        let done = ids
            .iter()
            .filter(|id| statuses.get(*id) == Some(&TaskStatus::Complete))
            .count();
        if done == ids.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {} tasks complete",
            ids.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The read model, written by both engines, holds every task as complete.
    rt.block_on(async {
        use sqlx::Connection;
        let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse().unwrap()).collect();
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (complete,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM tasker_tasks WHERE task_id = ANY($1) AND status = 'complete'",
            )
            .bind(&uuids)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            if complete == uuids.len() as i64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the read model has {complete} of {} tasks complete",
                uuids.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    a.stop();
}

/// A broker with persistent storage on its own port, restartable.
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: Option<tempfile::TempDir>,
}

impl Broker {
    fn bin() -> String {
        std::env::var("TASKER_KAFKA_BROKER_BIN").unwrap_or_else(|_| "nisshi".into())
    }

    fn start(port: u16, dir: tempfile::TempDir) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(Self::bin())
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--storage-engine",
                "sqlite://broker.db",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (set TASKER_KAFKA_BROKER_BIN): {e}",
                    Self::bin()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            child: Some(child),
            port,
            dir: Some(dir),
        }
    }

    fn kill(mut self) -> (u16, tempfile::TempDir) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        let dir = self.dir.take().expect("the broker's directory");
        (self.port, dir)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_broker_restart_under_load_loses_and_duplicates_nothing() {
    use tasker_engine::handler::HandlerRegistry;
    use tasker_engine::record::{
        Command as Cmd, CorrelationId, Envelope, RawJson, RequestTask, TaskId, Timestamp,
    };
    use tasker_engine::registry::TemplateRegistry;
    use tasker_engine::runtime::{Engine, EngineOptions};

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = Broker::start(port, tempfile::TempDir::new().unwrap());
    let brokers = format!("127.0.0.1:{port}");
    let mut config = KafkaLogConfig::new(&brokers, "tasker-restart", 2);
    config.linger_ms = 1;
    let log: Arc<dyn Log> = Arc::new(KafkaLog::open(config.clone()).unwrap());
    let registry = Arc::new(TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        None,
    ));
    registry.add_yaml(TEMPLATE, "work.yaml").unwrap();
    let engine = Arc::new(
        Engine::start(Arc::clone(&log), registry, EngineOptions::default(), None).unwrap(),
    );
    let submit = |i: usize| {
        let id = TaskId::generate();
        let env = Envelope::command(
            id,
            CorrelationId::NIL,
            Timestamp::now(),
            Cmd::RequestTask(RequestTask {
                namespace: "k".into(),
                name: "work".into(),
                context: RawJson::parse(&format!(r#"{{"i": {i}}}"#)).unwrap(),
                ..RequestTask::default()
            }),
        );
        engine.request_blocking(env).map(|_| id.to_string())
    };
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(submit(i).unwrap());
    }
    // Stop the broker while steps are running; a submission made during the
    // outage stalls, then goes through once the broker is back.
    let (port, dir) = broker.kill();
    let during = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || {
            let id = TaskId::generate();
            let env = Envelope::command(
                id,
                CorrelationId::NIL,
                Timestamp::now(),
                Cmd::RequestTask(RequestTask {
                    namespace: "k".into(),
                    name: "work".into(),
                    context: RawJson::empty_object(),
                    ..RequestTask::default()
                }),
            );
            engine.request_blocking(env).map(|_| id.to_string())
        })
    };
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !during.is_finished(),
        "a submission during the outage must wait, not fail"
    );
    let broker = Broker::start(port, dir);
    ids.push(
        during
            .join()
            .unwrap()
            .expect("the stalled submission completes"),
    );
    for i in 60..120 {
        ids.push(submit(i).expect("submissions resume after the broker is back"));
    }
    let fresh = KafkaLog::open(config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let statuses = fold_all(&fresh);
        let done = ids
            .iter()
            .filter(|id| statuses.get(*id) == Some(&TaskStatus::Complete))
            .count();
        if done == ids.len() {
            assert_eq!(statuses.len(), ids.len(), "no extra tasks");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {} tasks complete",
            ids.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    match Arc::try_unwrap(engine) {
        Ok(e) => e.shutdown(),
        Err(_) => panic!("engine still shared"),
    }
    drop(broker);
}

#[test]
fn tasker_run_on_kafka_without_a_read_model_starts_in_a_new_data_dir() {
    // Nothing but run.json goes in the data directory before the first
    // snapshot here (no file log, no SQLite read model): `tasker run` exited
    // with "No such file or directory" when it did not exist yet.
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("new").join("data");
    let topic = format!("tasker-nodir-{}", uuid::Uuid::now_v7().simple());
    let brokers = brokers();
    let mut child = support::tasker(&data)
        .arg("run")
        .env("TASKER_LOG__BACKEND", "kafka")
        .env("TASKER_KAFKA_BROKERS", &brokers)
        .env("TASKER_LOG__TOPIC", &topic)
        .env("TASKER_KAFKA__GROUP_ID", &topic)
        .env("TASKER_PROJECTOR__ENABLED", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let info = data.join("run.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !info.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("tasker run exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "no run.json after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let api: Value = serde_json::from_str(&std::fs::read_to_string(&info).unwrap()).unwrap();
    let api = api["api"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ready = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = reqwest::get(format!("{api}/health/ready")).await.unwrap();
            let (status, body) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
            if status == 200 || Instant::now() > deadline {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_eq!(ready.0, 200, "{}", ready.1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn bench_engines_runs_each_engine_count_and_reports_its_cpu() {
    // `tasker bench --engines` is how the scale-out claim is measured: every
    // run must finish every task on its engine processes, and say how busy the
    // machine was, so a ratio near 1 on a saturated host reads as such.
    let dir = tempfile::TempDir::new().unwrap();
    let out = support::tasker(dir.path())
        .args(["--json", "bench", "--workload", "diamond", "--tasks", "300"])
        .args(["--partitions", "2", "--engines", "1,2"])
        .env("TASKER_LOG__BACKEND", "kafka")
        .env("TASKER_KAFKA_BROKERS", brokers())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tasker bench failed: {stderr}");
    let runs: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(runs.len(), 2, "{runs:?}");
    for (run, engines) in runs.iter().zip([1, 2]) {
        assert_eq!(run["engines"], engines, "{run}");
        let rate = run["tasks_per_s"].as_f64().unwrap();
        let seconds = run["seconds"].as_f64().unwrap();
        assert!(rate > 0.0 && (rate * seconds - 300.0).abs() < 1.0, "{run}");
        let busy = run["cpu"]["machine_busy"].as_f64().unwrap();
        assert!(busy > 0.0 && busy <= 1.0, "{run}");
        assert!(
            run["cpu"]["engines_cpu_seconds"].as_f64().unwrap() > 0.0,
            "{run}"
        );
        // Too short a run for /proc's 10 ms ticks to see the bench's own part
        // (src/cpu.rs tests that it counts); here the report must carry it.
        for part in ["bench_cpu_seconds", "other_cpu_seconds"] {
            assert!(run["cpu"][part].as_f64().unwrap() >= 0.0, "{part}: {run}");
        }
        assert!(run["cpu"]["cpus"].as_u64().unwrap() >= 1, "{run}");
    }
    assert_eq!(runs[0]["speedup"], 1.0);
    let ratio = runs[1]["tasks_per_s"].as_f64().unwrap() / runs[0]["tasks_per_s"].as_f64().unwrap();
    assert!((runs[1]["speedup"].as_f64().unwrap() - ratio).abs() < 1e-9);
}
