//! `tasker replay`, `audit verify`, `audit task`, `tail` and `events` as a user
//! runs them, on the data directory of a real `tasker run`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Server, tasker};

const TEMPLATE: &str = "
namespace: cli
name: work
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - name: b
    handler: fail
    depends_on: [a]
    retry_limit: 3
    backoff: { initial: 5ms, max: 10ms }
    config: { times: 1 }
  - { name: c, handler: noop, depends_on: [b] }
";

fn run(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tasker(data).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_json(data: &Path, args: &[&str]) -> Value {
    let (ok, stdout, stderr) = run(data, args);
    assert!(ok, "tasker {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn replay_audit_tail_and_events_on_a_real_run() {
    let dir = tempfile::TempDir::new().unwrap();
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(templates.join("work.yaml"), TEMPLATE).unwrap();
    let data = dir.path().join("data");
    let env = [
        ("TASKER_ENGINE__SNAPSHOT_EVERY_EVENTS", "60"),
        ("TASKER_LOG__PARTITIONS", "2"),
        ("TASKER_PROJECTOR__ENABLED", "false"),
    ];
    let server = Server::start(&data, &templates, &env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..30 {
            let v: Value = client
                .post(format!("{}/v1/tasks", server.api))
                .json(&json!({"namespace": "cli", "name": "work", "context": {"i": i}, "initiator": "alice"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            ids.push(v["task_id"].as_str().unwrap().to_owned());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in &ids {
            loop {
                let v: Value = client
                    .get(format!("{}/v1/tasks/{id}", server.api))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if v["status"] == "complete" {
                    break;
                }
                assert!(Instant::now() < deadline, "{v}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        ids
    });
    let live: Vec<Value> = rt.block_on(async {
        client
            .get(format!("{}/v1/digests", server.api))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    server.stop();

    // replay --to the live position gives the live digest and chain head.
    for d in &live {
        let p = d["partition"].as_u64().unwrap().to_string();
        let pos = d["position"].as_u64().unwrap().to_string();
        let r = run_json(
            &data,
            &["--json", "replay", "--partition", &p, "--to", &pos],
        );
        let got = &r["partitions"][0];
        assert_eq!(got["position"], d["position"]);
        assert_eq!(got["digest"], d["digest"], "partition {p}");
        assert_eq!(got["chain"], d["chain"], "partition {p}");
    }
    // replay --verify agrees with every snapshot and checkpoint.
    let r = run_json(&data, &["--json", "replay", "--verify"]);
    for p in r["partitions"].as_array().unwrap() {
        let v = &p["verify"];
        assert!(v["first_disagreement"].is_null(), "{v}");
        assert!(!v["references"].as_array().unwrap().is_empty(), "{v}");
    }
    let (ok, text, _) = run(&data, &["replay"]);
    assert!(ok);
    assert!(
        text.contains("partition 0 position") && text.contains("records/s"),
        "{text}"
    );

    // audit verify: clean, and it seals.
    let v = run_json(&data, &["--json", "audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    for p in v["partitions"].as_array().unwrap() {
        assert_eq!(p["sealed_now"], p["end"]);
    }

    // audit task: the whole history, and the state at a past position.
    let id = &ids[7];
    let h = run_json(&data, &["--json", "audit", "task", id]);
    let types: Vec<&str> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"task.requested"));
    assert_eq!(types.last(), Some(&"task.completed"));
    assert!(
        types.contains(&"step.failed") && types.contains(&"step.retry_due"),
        "{types:?}"
    );
    assert_eq!(h["history"][0]["who"], "alice");
    assert_eq!(h["state"]["status"], "complete");
    let accepted = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "task.accepted")
        .unwrap()["position"]
        .as_u64()
        .unwrap();
    let at = (accepted + 1).to_string();
    let past = run_json(&data, &["--json", "audit", "task", id, "--at", &at]);
    assert_eq!(past["state"]["status"], "pending");
    assert_eq!(past["as_of"].as_u64(), Some(accepted + 1));
    assert!(past["later_records"].as_u64().unwrap() > 5);
    let (ok, text, _) = run(&data, &["audit", "task", id]);
    assert!(
        ok && text.contains("task.requested") && text.contains("alice"),
        "{text}"
    );

    // events: the catalog from code.
    let e = run_json(&data, &["--json", "events"]);
    assert_eq!(e.as_array().unwrap().len(), 21);
    assert!(
        e.as_array()
            .unwrap()
            .iter()
            .all(|t| !t["fields"].as_array().unwrap().is_empty())
    );

    // tail: every completion as a CloudEvent, then stop at the end.
    let (ok, out, err) = run(
        &data,
        &[
            "--json",
            "tail",
            "--from",
            "earliest",
            "--no-follow",
            "--type",
            "task.completed",
        ],
    );
    assert!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), ids.len());
    assert!(
        lines
            .iter()
            .all(|l| l["type"] == "task.completed" && l["specversion"] == "1.0")
    );
    // A named tail resumes after what it printed.
    let (ok, out, _) = run(
        &data,
        &[
            "--json",
            "tail",
            "--from",
            "earliest",
            "--name",
            "t",
            "--limit",
            "10",
            "--type",
            "task.completed",
        ],
    );
    assert!(ok);
    let first: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (ok, out, _) = run(
        &data,
        &[
            "--json",
            "tail",
            "--from",
            "earliest",
            "--name",
            "t",
            "--no-follow",
            "--type",
            "task.completed",
        ],
    );
    assert!(ok);
    let rest: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(first.len() + rest.len(), ids.len());
    let mut all: Vec<&str> = first
        .iter()
        .chain(&rest)
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), ids.len());

    // A flipped byte: audit verify fails and names the position.
    let seg = data.join("log/p00000/00000000000000000000.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (ok, out, err) = run(&data, &["audit", "verify", "--partition", "0"]);
    assert!(!ok, "{out}");
    assert!(out.contains("CHANGED: first wrong at position"), "{out}");
    assert!(err.contains("partition 0 position"), "{err}");
}
