//! The `tasker` binary as users run it: scaffolding, template checks, commands
//! recorded without an engine and decided by the next `tasker run`, and errors
//! that are one line plus a hint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use support::{Server, tasker};

#[path = "fixtures/scaffolded_handler.rs"]
mod scaffolded;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn scaffolds_templates_and_handlers_that_pass_checks() {
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("data");
    let tdir = dir.path().join("templates");
    let o = tasker(&data)
        .args(["new", "template", "billing/invoice", "--dir"])
        .arg(&tdir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = tasker(&data)
        .args(["templates", "check"])
        .arg(&tdir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("ok    billing/invoice@0.1.0"),
        "{}",
        text(&o)
    );

    let hdir = dir.path().join("handlers");
    let o = tasker(&data)
        .args(["new", "handler", "charge_card", "--dir"])
        .arg(&hdir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let written = std::fs::read_to_string(hdir.join("charge_card.rs")).unwrap();
    let fixture = include_str!("fixtures/scaffolded_handler.rs");
    assert_eq!(
        written, fixture,
        "the scaffold changed: update tests/fixtures/scaffolded_handler.rs"
    );
}

#[test]
fn the_scaffolded_handler_compiles_and_runs() {
    use tasker_engine::handler::{StepContext, StepHandler};
    use tasker_engine::record::{CorrelationId, RawJson, TaskId, Timestamp};
    let ctx = |context: &str| StepContext {
        task_id: TaskId::v7(Timestamp(1), 1),
        correlation_id: CorrelationId::NIL,
        namespace: "b".into(),
        task_name: "i".into(),
        version: "0.1.0".into(),
        step: "charge".into(),
        attempt: 2,
        context: RawJson::parse(context).unwrap(),
        parents: vec![],
        config: RawJson::empty_object(),
        timeout: Duration::from_secs(1),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ok = rt
        .block_on(scaffolded::ChargeCard.call(ctx(r#"{"id": 5}"#)))
        .unwrap();
    assert_eq!(ok["id"], 5);
    assert_eq!(ok["attempt"], 2);
    let err = rt
        .block_on(scaffolded::ChargeCard.call(ctx("{}")))
        .unwrap_err();
    assert!(!err.is_retryable());
}

#[test]
fn template_errors_name_file_and_field() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "namespace: a\nname: b\nversion: 1\nsteps:\n  - { name: x, handler: noop, depends_on: [y] }\n",
    )
    .unwrap();
    let o = tasker(dir.path())
        .args(["templates", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("bad.yaml: version"), "{out}");
    assert!(out.contains("bad.yaml: steps[0].depends_on[0]"), "{out}");
    assert!(out.contains("hint: "), "{out}");
    let o = tasker(dir.path())
        .args(["templates", "check", "templates/examples"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bundled examples must pass: {}",
        text(&o)
    );
}

#[test]
fn errors_are_one_line_with_a_hint() {
    let dir = tempfile::TempDir::new().unwrap();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["submit", "not-a-template"], &[], "namespace/name"),
        (
            &["submit", "shop/order", "--context", "{oops"],
            &[],
            "--context must be JSON",
        ),
        (&["status", "not-a-uuid"], &[], "UUID"),
        (
            &["status"],
            &[("TASKER_LOG__PARTITIONS", "0")],
            "log.partitions",
        ),
        (
            &["status", "01890000-0000-7000-8000-000000000000"],
            &[],
            "no log at",
        ),
    ];
    for (args, env, expected) in cases {
        let mut cmd = tasker(dir.path());
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let o = cmd.args(*args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines.len() == 2 && lines[0].starts_with("error: ") && lines[1].starts_with("hint: "),
            "{args:?}: {err}"
        );
        assert!(
            err.contains(expected),
            "{args:?}: {err} should mention {expected}"
        );
    }
}

#[test]
fn commands_recorded_without_an_engine_run_when_it_starts() {
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("data");
    let tdir = dir.path().join("templates");
    std::fs::create_dir_all(&tdir).unwrap();
    let ctx = r#"{"order_id": 42, "amount_cents": 999}"#;
    let o = tasker(&data)
        .args([
            "--json",
            "submit",
            "shop/order",
            "--context",
            ctx,
            "--idempotency-key",
            "k1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "recorded");
    let task = v["task_id"].as_str().unwrap().to_owned();

    // Offline status folds the log: the request is not decided yet.
    let o = tasker(&data).args(["status", &task]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("not in the log"), "{}", text(&o));

    let server = Server::start(&data, &tdir, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = tasker(&data)
            .args(["--json", "status", &task])
            .output()
            .unwrap();
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if v["status"] == "complete" {
                assert_eq!(v["context"]["order_id"], 42);
                assert_eq!(v["steps"].as_array().unwrap().len(), 5);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "task never completed: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Through the running engine: the same idempotency key answers with the first task.
    let o = tasker(&data)
        .args([
            "--json",
            "submit",
            "shop/order",
            "--context",
            ctx,
            "--idempotency-key",
            "k1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "duplicate");
    assert_eq!(v["task_id"], task.as_str());
    // A new task with --wait prints it when done.
    let o = tasker(&data)
        .args([
            "submit",
            "shop/order",
            "--context",
            r#"{"order_id": 7, "amount_cents": 1}"#,
            "--wait",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("complete"),
        "{}",
        text(&o)
    );
    // Cancelling a finished task is refused with the reason.
    let o = tasker(&data).args(["cancel", &task]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("cannot cancel"), "{}", text(&o));
    // The digest of the live engine, and the read model's lag, per partition.
    let o = tasker(&data).args(["status", "--digest"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        out.lines().filter(|l| l.starts_with("partition ")).count(),
        4,
        "{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("read model partition "))
            .count(),
        4,
        "{out}"
    );
    // `tasker run` with no configuration fills the SQLite read model, and
    // `tasker query` answers from it while the engine runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = tasker(&data)
            .args(["--json", "query", "slowest-tasks"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["task_id"].as_str())
            .collect();
        if ids.len() == 2 {
            assert!(ids.contains(&task.as_str()), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "read model never caught up: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
    // After a clean stop, status still answers from the log.
    let o = tasker(&data)
        .args(["--json", "status", &task])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn query_answers_from_the_read_model() {
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("data");
    let o = tasker(&data)
        .args(["demo", "--tasks", "30", "--keep"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = tasker(&data).args(["project", "--once"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("locked"), "{}", text(&o));
    let query = |args: &[&str]| -> serde_json::Value {
        let o = tasker(&data)
            .args(["--json", "query"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };

    // The demo's payment step fails at random, rarely past its retries: count
    // what the read model says rather than assume every order completed.
    let a = query(&["analytics", "--period", "1h"]);
    let h = query(&["health"]);
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert_eq!(n(&a, "task_throughput"), 30);
    assert_eq!(n(&a, "completion_count") + n(&a, "error_count"), 30);
    assert_eq!(n(&a, "active_tasks_count"), 0);
    assert_eq!(n(&h, "complete_tasks"), n(&a, "completion_count"));
    assert!(n(&h, "complete_tasks") > 0, "{h}");
    assert_eq!(n(&h, "total_steps"), 150);
    assert_eq!(
        n(&a, "step_throughput"),
        n(&h, "complete_steps") + n(&h, "error_steps")
    );

    let slow = query(&["slowest-tasks", "--limit", "3"]);
    let slow = slow.as_array().unwrap();
    assert_eq!(slow.len(), 3);
    let durations: Vec<i64> = slow
        .iter()
        .map(|t| t["duration_ms"].as_i64().unwrap())
        .collect();
    assert!(durations.windows(2).all(|w| w[0] >= w[1]), "{durations:?}");
    let steps = query(&["slowest-steps", "--namespace", "shop", "--limit", "5"]);
    assert_eq!(steps.as_array().unwrap().len(), 5);
    let none = query(&["slowest-steps", "--namespace", "nobody"]);
    assert_eq!(none.as_array().unwrap().len(), 0);

    let all = query(&["slowest-tasks", "--limit", "30"]);
    let task = all
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["status"] == "complete")
        .unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = task.as_str();
    let levels = query(&["levels", task]);
    let levels: Vec<(String, u64)> = levels
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_owned(),
                l["level"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        levels,
        [
            ("validate", 0),
            ("payment", 1),
            ("inventory", 1),
            ("ship", 2),
            ("notify", 3)
        ]
        .map(|(n, l)| (n.to_owned(), l))
    );
    let ready = query(&["readiness", task]);
    let ready = ready.as_array().unwrap();
    assert_eq!(ready.len(), 5);
    assert!(
        ready
            .iter()
            .all(|s| s["current_state"] == "complete" && s["ready_for_execution"] == false)
    );
    let c = query(&["context", task]);
    assert_eq!(c["execution_status"], "all_complete");
    assert_eq!(c["completion_percentage"], 100.0);

    // Text output, an unknown task and a bad time are clear.
    let o = tasker(&data)
        .args(["query", "slowest-tasks", "--limit", "1"])
        .output()
        .unwrap();
    let first = slow[0]["task_id"].as_str().unwrap();
    assert!(text(&o).contains(first), "{}", text(&o));
    let o = tasker(&data)
        .args(["query", "context", "01a217f4-1cdb-718e-ae39-351a347145b9"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("not in the read model"), "{}", text(&o));
    let o = tasker(&data)
        .args(["query", "health", "--as-of", "yesterday"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("RFC 3339"), "{}", text(&o));
}

#[test]
fn tasker_project_refuses_a_read_model_made_from_another_log() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("rm.db").display());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let run = |data: &std::path::Path, args: &[&str]| {
        tasker(data)
            .env("DATABASE_URL", &url)
            .args(args)
            .output()
            .unwrap()
    };
    for _ in 0..8 {
        assert!(run(&a, &["submit", "examples/hello"]).status.success());
    }
    let o = run(&a, &["project", "--once"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(run(&b, &["submit", "examples/hello"]).status.success());
    let o = run(&b, &["project", "--once"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("error: the projector stopped: partition")
            && text(&o).contains("projected from another log"),
        "{}",
        text(&o)
    );
    let o = run(&b, &["project", "--once", "--rebuild"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `tasker bench --engines` starts its engines with `--parent-pid`: killing
/// the bench with SIGKILL must not leave them running. The engine here is the
/// child of a shell that is killed; it stops as on SIGTERM (snapshots written,
/// `run.json` removed), not by being killed itself.
#[cfg(target_os = "linux")]
#[test]
fn an_engine_stops_cleanly_when_the_process_that_started_it_is_killed() {
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut shell = std::process::Command::new("sh");
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKER_") || k == "DATABASE_URL" {
            shell.env_remove(k);
        }
    }
    let mut shell = shell
        .arg("-c")
        .arg(r#""$0" --data-dir "$1" run --parent-pid $$ 2> "$1/run.log" & wait"#)
        .arg(support::bin())
        .arg(&data)
        .env("TASKER_API__BIND", "127.0.0.1:0")
        .spawn()
        .unwrap();
    let info = data.join("run.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let engine = loop {
        if let Ok(text) = std::fs::read_to_string(&info)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(pid) = v["pid"].as_u64()
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "tasker run did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    shell.kill().unwrap();
    shell.wait().unwrap();
    // Gone, or a zombie nobody has reaped yet.
    let running = || {
        std::fs::read_to_string(format!("/proc/{engine}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while running() {
        if Instant::now() > deadline {
            let _ = std::process::Command::new("kill")
                .args(["-9", &engine.to_string()])
                .status();
            panic!("the engine {engine} still ran 30 s after its parent was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(data.join("run.log")).unwrap();
    assert!(log.contains("stopping: finishing rounds"), "{log}");
    assert!(!info.exists(), "a clean stop removes run.json: {log}");
}
