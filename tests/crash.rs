//! The crash matrix: `tasker run` (engine + projector) as a child process under
//! load, killed with SIGKILL at seeded random moments and restarted, on the
//! embedded log and on Kafka. After every restart and drain: every accepted task is
//! terminal, no event is applied twice per (task, step, attempt), and replaying the
//! log gives the live engine's digest and chain head. At the end the read model
//! equals a fresh rebuild from the log.
//!
//! `TASKER_CRASH_KILLS` (default 5 per backend), `TASKER_CRASH_BACKENDS` (default
//! `file,file-eager,kafka`; `file` runs with `execution.dispatch = "durable"`,
//! `file-eager` with the default `eager`),
//! `TASKER_CRASH_SEED` to replay a run. `scripts/soak` runs 100+.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Server;
use tasker_engine::codec;
use tasker_engine::log::Log;
use tasker_engine::record::{Event, PartitionId, Position};
use tasker_engine::state::{Applied, HashChain, State};

const TEMPLATE: &str = "
namespace: crash
name: work
version: 1.0.0
steps:
  - { name: a, handler: sleep, config: { ms: 2 } }
  - { name: b, handler: sleep, depends_on: [a], config: { ms: 3 } }
  - name: c
    handler: fail
    depends_on: [a]
    retry_limit: 4
    backoff: { initial: 5ms, max: 20ms }
    config: { rate: 0.15 }
  - { name: d, handler: noop, depends_on: [b, c] }
";

const PER_ROUND: usize = 200;

fn splitmix(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Submits up to `count` tasks, 32 at a time, stopping after `stop_after`
/// acknowledgements; returns the acknowledged ids (accepted, or recorded for
/// another engine: either way durable in the log).
async fn submit(api: &str, count: usize, stop_after: usize, accepted: &mut Vec<String>) {
    let client = reqwest::Client::new();
    let mut inflight = tokio::task::JoinSet::new();
    let start = accepted.len();
    for i in 0..count {
        if accepted.len() - start >= stop_after {
            break;
        }
        let (c, url) = (client.clone(), format!("{api}/v1/tasks"));
        inflight.spawn(async move {
            let body = json!({"namespace": "crash", "name": "work", "context": {"i": i}});
            let resp = c.post(url).json(&body).send().await.ok()?;
            if resp.status() != 202 {
                return None;
            }
            let v: Value = resp.json().await.ok()?;
            v["task_id"].as_str().map(str::to_owned)
        });
        while inflight.len() >= 32 {
            if let Some(Ok(Some(id))) = inflight.join_next().await {
                accepted.push(id);
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        if let Ok(Some(id)) = r {
            accepted.push(id);
        }
    }
}

async fn wait_terminal(api: &str, ids: &[String], timeout: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    let mut left: Vec<&String> = ids.iter().collect();
    while !left.is_empty() {
        let mut still = Vec::new();
        for id in left {
            let done = match client.get(format!("{api}/v1/tasks/{id}")).send().await {
                Ok(r) if r.status() == 200 => {
                    let v: Value = r.json().await.unwrap_or_default();
                    !matches!(v["status"].as_str(), Some("pending" | "in_progress"))
                }
                _ => false, // not decided yet, or the partition is still being taken
            };
            if !done {
                still.push(id);
            }
        }
        left = still;
        assert!(
            Instant::now() < deadline || left.is_empty(),
            "{} acknowledged tasks are not terminal, e.g. {:?}",
            left.len(),
            left.first()
        );
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Replays each partition to the live report's position: the digest and chain
/// must match and no event may be applied twice. Returns the number of partitions
/// checked.
fn check_digests(log: &dyn Log, digests: &[Value]) -> usize {
    for d in digests {
        let partition = PartitionId(d["partition"].as_u64().unwrap() as u32);
        let upto = Position(d["position"].as_u64().unwrap());
        let mut state = State::default();
        let mut chain = HashChain::genesis(partition);
        let mut seen = HashSet::new();
        let mut reader = log.reader(partition, Position(0)).unwrap();
        while reader.position() < upto {
            let batch = reader.poll(10_000, Duration::from_secs(2)).unwrap();
            assert!(!batch.is_empty(), "the log ends before {upto}");
            for rec in batch.into_iter().filter(|r| r.position < upto) {
                chain.push(&rec.record.payload);
                let Ok(env) = codec::decode(&rec.record.payload) else {
                    continue;
                };
                if state.apply(&env) == Applied::Event {
                    let key = match env.as_event() {
                        Some(Event::StepCompleted(c)) => {
                            Some(("completed", env.task_id, c.step, c.attempt))
                        }
                        Some(Event::StepStarted(s)) => {
                            Some(("started", env.task_id, s.step, s.attempt))
                        }
                        _ => None,
                    };
                    if let Some(k) = key {
                        assert!(seen.insert(k), "applied twice: {env:?}");
                    }
                }
            }
        }
        assert_eq!(
            state.digest().to_hex(),
            d["digest"].as_str().unwrap(),
            "digest of partition {partition}"
        );
        assert_eq!(
            chain.head().to_hex(),
            d["chain"].as_str().unwrap(),
            "chain of partition {partition}"
        );
    }
    digests.len()
}

/// Task and step rows of a SQLite read model, comparable across rebuilds.
async fn read_model_rows(db: &Path) -> Vec<String> {
    let store = tasker_projections::Store::open(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let tasker_projections::Store::Sqlite(s) = &store else {
        unreachable!()
    };
    let mut out: Vec<String> = sqlx::query_scalar(
        "SELECT task_id || ' ' || status || ' ' || coalesce(started_at, '-') || ' ' || coalesce(completed_at, '-') FROM tasker_tasks",
    )
    .fetch_all(s.pool())
    .await
    .unwrap();
    out.extend(
        sqlx::query_scalar::<_, String>(
            "SELECT s.task_id || ' ' || s.step_index || ' ' || s.status || ' ' || s.attempts || ' ' ||
                    coalesce(s.duration_ms, '-') || ' ' || coalesce(s.completed_at, '-') || ' ' ||
                    (SELECT count(*) FROM tasker_workflow_step_transitions t
                     WHERE t.task_id = s.task_id AND t.step_index = s.step_index) FROM tasker_workflow_steps s",
        )
        .fetch_all(s.pool())
        .await
        .unwrap(),
    );
    out.sort();
    out
}

struct Backend {
    name: &'static str,
    env: Vec<(String, String)>,
}

fn backends() -> Vec<Backend> {
    let wanted =
        std::env::var("TASKER_CRASH_BACKENDS").unwrap_or_else(|_| "file,file-eager,kafka".into());
    let mut out = Vec::new();
    for name in wanted.split(',').map(str::trim) {
        let mut env = vec![
            (
                "TASKER_ENGINE__SNAPSHOT_EVERY_EVENTS".to_owned(),
                "3000".to_owned(),
            ),
            ("TASKER_LOG__PARTITIONS".to_owned(), "2".to_owned()),
        ];
        match name {
            "file" => {
                // Steps reach handlers once their batch is durable. Small
                // segments: the log rolls every few hundred tasks, so kills
                // also land around rolls (a spare renamed, an index not yet
                // written).
                env.extend([
                    (
                        "TASKER_EXECUTION__DISPATCH".to_owned(),
                        "durable".to_owned(),
                    ),
                    ("TASKER_LOG__SEGMENT_BYTES".to_owned(), "65536".to_owned()),
                ]);
                out.push(Backend { name: "file", env });
            }
            "file-eager" => {
                // Steps reach handlers before their batch is durable (the default).
                env.push(("TASKER_EXECUTION__DISPATCH".to_owned(), "eager".to_owned()));
                out.push(Backend {
                    name: "file-eager",
                    env,
                });
            }
            "kafka" => {
                let brokers = std::env::var("TASKER_KAFKA_BROKERS").unwrap_or_else(|_| {
                    panic!("TASKER_KAFKA_BROKERS is not set: run scripts/test (it starts a broker), or set TASKER_CRASH_BACKENDS=file")
                });
                let topic = format!("tasker-crash-{}", uuid::Uuid::now_v7().simple());
                env.extend([
                    ("TASKER_LOG__BACKEND".to_owned(), "kafka".to_owned()),
                    ("TASKER_KAFKA_BROKERS".to_owned(), brokers),
                    ("TASKER_LOG__TOPIC".to_owned(), topic.clone()),
                    ("TASKER_KAFKA__GROUP_ID".to_owned(), topic),
                ]);
                out.push(Backend { name: "kafka", env });
            }
            other => panic!("unknown backend {other} in TASKER_CRASH_BACKENDS"),
        }
    }
    out
}

fn open_log(backend: &Backend, data: &Path) -> Arc<dyn Log> {
    let get = |k: &str| {
        backend
            .env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    match backend.name {
        "kafka" => Arc::new(
            tasker_engine::log::kafka::KafkaLog::open(
                tasker_engine::log::kafka::KafkaLogConfig::new(
                    &get("TASKER_KAFKA_BROKERS").unwrap(),
                    &get("TASKER_LOG__TOPIC").unwrap(),
                    2,
                ),
            )
            .unwrap(),
        ),
        _ => Arc::new(tasker_engine::log::file::FileLog::open_existing(data.join("log")).unwrap()),
    }
}

/// One backend: `kills` SIGKILLs at seeded moments, each followed by a restart,
/// a drain and a digest check; then the read model against a rebuild.
fn run_matrix(backend: &Backend, kills: usize, seed: u64) -> (usize, usize, usize) {
    let mut rng = seed;
    let dir = tempfile::TempDir::new().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(templates.join("work.yaml"), TEMPLATE).unwrap();
    let data = dir.path().join("data");
    let env: Vec<(&str, &str)> = backend
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut accepted = Vec::new();
    let mut server = Server::start(&data, &templates, &env);
    let mut digest_matches = 0;
    for k in 0..kills {
        let stop_after = 10 + (splitmix(&mut rng) % (PER_ROUND as u64 - 10)) as usize;
        rt.block_on(submit(&server.api, PER_ROUND, stop_after, &mut accepted));
        std::thread::sleep(Duration::from_millis(splitmix(&mut rng) % 120));
        server.kill9();
        server = Server::start(&data, &templates, &env);
        rt.block_on(wait_terminal(
            &server.api,
            &accepted,
            Duration::from_secs(120),
        ));
        // On Kafka the group may still be rebalancing (the killed member's session
        // expires a few seconds later): wait until this engine owns both partitions.
        let digests: Vec<Value> = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let d: Vec<Value> = match reqwest::get(format!("{}/v1/digests", server.api)).await {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                if d.len() == 2 {
                    break d;
                }
                assert!(
                    Instant::now() < deadline,
                    "the restarted engine never owned both partitions: {d:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let log = open_log(backend, &data);
        check_digests(&*log, &digests);
        digest_matches += 1;
        println!(
            "{:6} kill {:3}: {:5} acknowledged, all terminal, digest and chain match, nothing applied twice",
            backend.name,
            k + 1,
            accepted.len()
        );
    }
    // The read model caught up equals a fresh rebuild from the log.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let p: Vec<Value> = reqwest::get(format!("{}/v1/projector", server.api))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let log = open_log(backend, &data);
            let caught_up = p.iter().all(|x| {
                let part = PartitionId(x["partition"].as_u64().unwrap() as u32);
                x["position"].as_u64() == Some(log.end(part).unwrap().0)
            });
            if caught_up && !p.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the projector did not catch up: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    server.stop();
    if backend.name == "file" {
        let segments = std::fs::read_dir(data.join("log").join("p00000"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
            })
            .count();
        assert!(
            segments > 2,
            "the file backend is meant to roll segments under the kills, but partition 0 has {segments}"
        );
    }
    let log = open_log(backend, &data);
    let live = rt.block_on(read_model_rows(&data.join("read-model.db")));
    let rebuilt_path = dir.path().join("rebuilt.db");
    rt.block_on(async {
        let store =
            tasker_projections::Store::open(&format!("sqlite://{}", rebuilt_path.display()))
                .await
                .unwrap();
        store.migrate().await.unwrap();
        for p in 0..log.partitions() {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let progress = Arc::new(tasker_projections::Progress::default());
            let end = log.end(PartitionId(p)).unwrap().0;
            let task = tokio::spawn(tasker_projections::run_partition(
                store.clone(),
                Arc::clone(&log),
                PartitionId(p),
                tasker_projections::ProjectorOptions::default(),
                Arc::clone(&progress),
                Arc::clone(&stop),
            ));
            while progress.position.load(std::sync::atomic::Ordering::Relaxed) < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            task.await.unwrap().unwrap();
        }
    });
    let rebuilt = rt.block_on(read_model_rows(&rebuilt_path));
    assert!(!live.is_empty());
    assert_eq!(
        live, rebuilt,
        "{} read model differs from a fresh rebuild",
        backend.name
    );
    println!(
        "{:6} read model equals a fresh rebuild ({} rows)",
        backend.name,
        live.len()
    );
    (kills, accepted.len(), digest_matches)
}

#[test]
fn kill_9_under_load_loses_and_duplicates_nothing() {
    let kills: usize = std::env::var("TASKER_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("TASKER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(7)
        });
    println!(
        "crash matrix seed {seed} (rerun: TASKER_CRASH_SEED={seed}), {kills} kills per backend"
    );
    let mut table = Vec::new();
    for backend in backends() {
        let (k, tasks, matches) = run_matrix(&backend, kills, seed);
        table.push((backend.name, k, tasks, matches));
    }
    println!("backend  kills  tasks  lost  duplicated  digest matches");
    for (name, k, tasks, matches) in table {
        println!(
            "{name:7}  {k:5}  {tasks:5}  {:4}  {:10}  {matches:14}",
            0, 0
        );
    }
}
