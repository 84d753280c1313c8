//! Kill -9 `tasker run` under load, restart it, and check that nothing accepted
//! is lost or done twice and that replaying the log gives the live digest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Server;
use tasker_engine::codec;
use tasker_engine::log::Log;
use tasker_engine::log::file::FileLog;
use tasker_engine::record::{Event, PartitionId, Position};
use tasker_engine::state::{HashChain, State};

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

const TASKS: usize = 2_000;

/// A deterministic stream from the seed (no RNG crate needed for one number).
fn splitmix(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn submit_all(
    api: &str,
    range: std::ops::Range<usize>,
    kill_after: Option<usize>,
    accepted: &mut Vec<String>,
) -> usize {
    let client = reqwest::Client::new();
    let mut sent = range.start;
    let mut inflight = tokio::task::JoinSet::new();
    for i in range {
        if kill_after.is_some_and(|k| accepted.len() >= k) {
            break;
        }
        let c = client.clone();
        let url = format!("{api}/v1/tasks");
        inflight.spawn(async move {
            let body = json!({"namespace": "crash", "name": "work", "context": {"i": i}});
            let resp = c.post(url).json(&body).send().await.ok()?;
            if resp.status() != 202 {
                return None;
            }
            let v: Value = resp.json().await.ok()?;
            v["task_id"].as_str().map(str::to_owned)
        });
        sent = i + 1;
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
    sent
}

async fn wait_all_terminal(
    api: &str,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    let mut done = HashMap::new();
    loop {
        for id in ids {
            if done.contains_key(id) {
                continue;
            }
            let resp = client
                .get(format!("{api}/v1/tasks/{id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.status(),
                200,
                "accepted task {id} is unknown after the restart"
            );
            let v: Value = resp.json().await.unwrap();
            let status = v["status"].as_str().unwrap().to_owned();
            if status != "pending" && status != "in_progress" {
                done.insert(id.clone(), status);
            }
        }
        if done.len() == ids.len() {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} accepted tasks are not terminal",
            ids.len() - done.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn crash_once(seed: u64) {
    println!("crash test seed {seed} (rerun: TASKER_CRASH_SEED={seed})");
    let mut rng = seed;
    let dir = tempfile::TempDir::new().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(templates.join("work.yaml"), TEMPLATE).unwrap();
    let data = dir.path().join("data");
    let env = [
        ("TASKER_ENGINE__SNAPSHOT_EVERY_EVENTS", "3000"),
        ("TASKER_LOG__PARTITIONS", "2"),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();

    let kill_after = 100 + (splitmix(&mut rng) % (TASKS as u64 - 400)) as usize;
    let server = Server::start(&data, &templates, &env);
    let mut accepted = Vec::new();
    let sent = rt.block_on(submit_all(
        &server.api,
        0..TASKS,
        Some(kill_after),
        &mut accepted,
    ));
    // Let some steps run, then pull the plug at a seeded moment.
    std::thread::sleep(Duration::from_millis(splitmix(&mut rng) % 150));
    server.kill9();

    let server = Server::start(&data, &templates, &env);
    rt.block_on(submit_all(&server.api, sent..TASKS, None, &mut accepted));
    let statuses = rt.block_on(wait_all_terminal(
        &server.api,
        &accepted,
        Duration::from_secs(120),
    ));
    assert!(
        accepted.len() >= TASKS - 64,
        "only {} accepted",
        accepted.len()
    );
    assert!(
        statuses.values().all(|s| s == "complete" || s == "error"),
        "{statuses:?}"
    );
    let digests: Vec<Value> = rt.block_on(async {
        reqwest::get(format!("{}/v1/digests", server.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    server.stop();

    // Replay every partition from the log and compare with the live report.
    let log = FileLog::open_existing(data.join("log")).unwrap();
    let accepted: HashSet<String> = accepted.into_iter().collect();
    let mut seen_tasks = 0;
    for d in &digests {
        let partition = PartitionId(d["partition"].as_u64().unwrap() as u32);
        let upto = Position(d["position"].as_u64().unwrap());
        let mut state = State::default();
        let mut chain = HashChain::genesis(partition);
        let mut completed = HashSet::new();
        let mut started = HashSet::new();
        let mut reader = log.reader(partition, Position(0)).unwrap();
        while reader.position() < upto {
            let batch = reader.poll(10_000, Duration::from_millis(100)).unwrap();
            assert!(!batch.is_empty(), "log ends before the reported position");
            for rec in batch.into_iter().filter(|r| r.position < upto) {
                chain.push(&rec.record.payload);
                let Ok(env) = codec::decode(&rec.record.payload) else {
                    continue;
                };
                state.apply(&env);
                match env.as_event() {
                    Some(Event::StepCompleted(c)) => {
                        assert!(
                            completed.insert((env.task_id, c.step, c.attempt)),
                            "step.completed twice: {env:?}"
                        );
                    }
                    Some(Event::StepStarted(s)) => {
                        assert!(
                            started.insert((env.task_id, s.step, s.attempt)),
                            "step.started twice: {env:?}"
                        );
                    }
                    _ => {}
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
        for t in state.tasks() {
            if accepted.contains(&t.id.to_string()) {
                seen_tasks += 1;
                assert!(t.status.is_terminal(), "task {} is {:?}", t.id, t.status);
            }
        }
    }
    assert_eq!(
        seen_tasks,
        accepted.len(),
        "every accepted task is in the log"
    );
}

#[test]
fn kill_9_under_load_loses_and_duplicates_nothing() {
    let seeds: Vec<u64> = match std::env::var("TASKER_CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("TASKER_CRASH_SEED must be a number")],
        Err(_) => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(7);
            (0..3)
                .map(|i| base.wrapping_mul(31).wrapping_add(i))
                .collect()
        }
    };
    for seed in seeds {
        crash_once(seed);
    }
}
