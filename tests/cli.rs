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
    server.stop();
    // After a clean stop, status still answers from the log.
    let o = tasker(&data)
        .args(["--json", "status", &task])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}
