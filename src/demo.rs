//! `tasker demo`: the bundled order workflow, a few thousand times, on the
//! embedded engine, with a summary of throughput, latency, retries and the
//! slowest steps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::record::{
    Command, CorrelationId, Envelope, RawJson, RequestTask, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineOptions};
use tasker_engine::state::TaskStatus;

use crate::cli::{Cli, DemoArgs};
use crate::drive::{self, Driver};
use crate::examples;

pub fn demo(cli: &Cli, args: &DemoArgs) -> anyhow::Result<()> {
    let temp = tempfile::TempDir::new()?;
    let dir = args.keep.clone().unwrap_or_else(|| temp.path().to_owned());
    let registry = Arc::new(TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        None,
    ));
    for (name, yaml) in examples::TEMPLATES {
        registry
            .add_yaml(yaml, name)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let log = Arc::new(FileLog::open(
        dir.join("log"),
        FileLogConfig {
            partitions: 2,
            ..FileLogConfig::default()
        },
    )?);
    let (observer, done) = drive::observer();
    let options = EngineOptions {
        snapshot_dir: Some(dir.join("snapshots")),
        ..EngineOptions::default()
    };
    let engine = Engine::start(log, Arc::clone(&registry), options, Some(observer))?;
    if !cli.json {
        eprintln!(
            "demo: {} orders through shop/order (validate -> payment || inventory -> ship -> notify; payment fails ~20% of attempts and retries)",
            args.tasks
        );
    }
    let tasks: Vec<Envelope> = (0..args.tasks)
        .map(|i| {
            let id = TaskId::generate();
            let context = format!(
                r#"{{"order_id": {}, "amount_cents": {}, "customer": "customer-{}"}}"#,
                i + 1,
                100 + (i * 37) % 10_000,
                i % 97
            );
            Envelope::command(
                id,
                CorrelationId::from_uuid(*id.as_uuid()),
                Timestamp::now(),
                Command::RequestTask(RequestTask {
                    namespace: "shop".into(),
                    name: "order".into(),
                    context: RawJson::parse(&context).unwrap_or_default(),
                    initiator: Some("demo".into()),
                    ..RequestTask::default()
                }),
            )
        })
        .collect();
    let out = Driver::new(&engine, done, args.tasks, cli.json).run(
        tasks,
        None,
        Duration::from_secs(300),
    )?;

    // Step durations from the tasks' own event times.
    let mut by_step: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut attempts = 0u64;
    for id in &out.finished {
        if let Some(task) = engine.task(*id) {
            for (spec, s) in task.dag.snapshot().steps.iter().zip(&task.steps) {
                attempts += u64::from(s.attempts);
                if let (Some(a), Some(b)) = (s.started_at, s.finished_at) {
                    by_step
                        .entry(spec.name.clone())
                        .or_default()
                        .push(b.millis_since(a));
                }
            }
        }
    }
    let m = engine.metrics();
    let secs = out.elapsed.as_secs_f64();
    let lat = &out.latency_us;
    let mut slowest: Vec<(String, u64, u64, u64)> = by_step
        .into_iter()
        .map(|(name, mut v)| {
            v.sort_unstable();
            let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
            (name, q(0.5), q(0.99), *v.last().unwrap_or(&0))
        })
        .collect();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.2));
    let completed = out
        .statuses
        .get(&TaskStatus::Complete)
        .copied()
        .unwrap_or(0);
    let failed = out.statuses.get(&TaskStatus::Error).copied().unwrap_or(0);
    let retries = m.steps_retried.get();
    if cli.json {
        let steps: Vec<_> = slowest
            .iter()
            .map(|(n, p50, p99, max)| serde_json::json!({"step": n, "p50_ms": p50, "p99_ms": p99, "max_ms": max}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "tasks": args.tasks, "completed": completed, "failed": failed,
                "elapsed_s": secs, "tasks_per_s": args.tasks as f64 / secs,
                "latency_ms": {"p50": lat.value_at_quantile(0.5) as f64 / 1000.0, "p99": lat.value_at_quantile(0.99) as f64 / 1000.0},
                "retries": retries, "attempts": attempts, "events": m.records_appended.get(),
                "slowest_steps": steps,
            }))?
        );
    } else {
        println!();
        println!(
            "orders          {} ({completed} complete, {failed} failed after exhausting retries)",
            args.tasks
        );
        println!(
            "throughput      {:.0} tasks/s, {:.0} events/s",
            args.tasks as f64 / secs,
            m.records_appended.get() as f64 / secs
        );
        println!(
            "latency         p50 {:.1} ms, p99 {:.1} ms (request -> task complete, all submitted at once)",
            lat.value_at_quantile(0.5) as f64 / 1000.0,
            lat.value_at_quantile(0.99) as f64 / 1000.0
        );
        println!(
            "retries         {retries} failed attempts retried with backoff ({attempts} attempts in all)"
        );
        println!("slowest steps   (by p99 of started -> finished, ms)");
        for (name, p50, p99, max) in &slowest {
            println!("  {name:12} p50 {p50:>5}  p99 {p99:>5}  max {max:>5}");
        }
        if let Some(keep) = &args.keep {
            println!("data kept in {}", keep.display());
        }
    }
    engine.shutdown();
    Ok(())
}
