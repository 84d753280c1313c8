//! `tasker bench`: end-to-end throughput and latency of the embedded engine.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::file::{FileLog, FileLogConfig, FsyncPolicy};
use tasker_engine::record::{
    Command, CorrelationId, Envelope, RawJson, RequestTask, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineOptions};
use tasker_engine::state::TaskStatus;

use crate::cli::{BenchArgs, Cli};
use crate::drive::{self, Driver};
use crate::failure::WithHint;
use crate::workloads;

pub fn bench(cli: &Cli, args: &BenchArgs) -> anyhow::Result<()> {
    let fsync: FsyncPolicy = args
        .fsync
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--fsync {e}"))
        .hint("use batch, always, never or interval:10ms")?;
    let (yaml, origin) = match &args.template {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            workloads::yaml(args.workload),
            format!("{:?}", args.workload),
        ),
    };
    let context = RawJson::parse(&args.context).hint("--context must be JSON")?;
    let dir = tempfile::TempDir::new()?;
    let registry = Arc::new(TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        None,
    ));
    let template = registry
        .add_yaml(&yaml, &origin)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .hint("check the template with `tasker templates check <dir>`")?;
    let log = Arc::new(FileLog::open(
        dir.path().join("log"),
        FileLogConfig {
            partitions: args.partitions,
            fsync,
            ..FileLogConfig::default()
        },
    )?);
    let (observer, done) = drive::observer();
    let options = EngineOptions {
        snapshot_dir: Some(dir.path().join("snapshots")),
        retention: *args.retention,
        ..EngineOptions::default()
    };
    let rss_before = drive::rss_kib();
    let engine = Engine::start(log, Arc::clone(&registry), options, Some(observer))?;
    let snapshot = template.snapshot();
    let make_tasks = || -> Vec<Envelope> {
        (0..args.tasks)
            .map(|_| {
                let id = TaskId::generate();
                Envelope::command(
                    id,
                    CorrelationId::from_uuid(*id.as_uuid()),
                    Timestamp::now(),
                    Command::RequestTask(RequestTask {
                        namespace: snapshot.namespace.clone(),
                        name: snapshot.name.clone(),
                        version: Some(snapshot.version.clone()),
                        context: context.clone(),
                        ..RequestTask::default()
                    }),
                )
            })
            .collect()
    };
    let steps = snapshot.steps.len();
    if !cli.json {
        eprintln!(
            "bench: {} x {} ({} steps), {} partitions, fsync={}, {}",
            args.tasks,
            snapshot.qualified_name(),
            steps,
            args.partitions,
            args.fsync,
            args.rate
                .map(|r| format!("offered at {r}/s"))
                .unwrap_or_else(|| "all at once".into())
        );
    }
    let mut rss_waves = Vec::new();
    let mut out = None;
    let mut events_before = 0;
    for wave in 0..args.waves.max(1) {
        if wave > 0 {
            // Let the previous wave outlive its retention before the next one starts.
            std::thread::sleep(*args.retention);
        }
        events_before = engine.metrics().records_appended.get();
        let driver = Driver::new(&engine, done.clone(), args.tasks, cli.json);
        out = Some(driver.run(make_tasks(), args.rate, Duration::from_secs(600))?);
        rss_waves.push(drive::rss_kib());
    }
    let out = out.ok_or_else(|| anyhow::anyhow!("no wave ran"))?;
    let m = engine.metrics();
    let secs = out.elapsed.as_secs_f64();
    let events = m.records_appended.get() - events_before;
    let append = m.append_latency_us.snapshot();
    let batch = m.append_batch_records.snapshot();
    let lat = &out.latency_us;
    let completed = out
        .statuses
        .get(&TaskStatus::Complete)
        .copied()
        .unwrap_or(0);
    let report = json!({
        "workload": origin,
        "steps_per_task": steps,
        "tasks": args.tasks,
        "partitions": args.partitions,
        "fsync": args.fsync,
        "offered_rate": out.offered_rate,
        "elapsed_s": secs,
        "tasks_per_s": args.tasks as f64 / secs,
        "events_per_s": events as f64 / secs,
        "records_appended": events,
        "completed": completed,
        "not_completed": args.tasks - completed,
        "latency_ms": {
            "p50": lat.value_at_quantile(0.50) as f64 / 1000.0,
            "p90": lat.value_at_quantile(0.90) as f64 / 1000.0,
            "p99": lat.value_at_quantile(0.99) as f64 / 1000.0,
            "max": lat.max() as f64 / 1000.0,
        },
        "append_us": {"p50": append.value_at_quantile(0.5), "p99": append.value_at_quantile(0.99), "max": append.max()},
        "append_batch_records": {"p50": batch.value_at_quantile(0.5), "p99": batch.value_at_quantile(0.99), "max": batch.max()},
        "rss_kib": {"before": rss_before, "after_each_wave": rss_waves, "tasks_in_memory": m.tasks_in_memory.get()},
        "executor_limit": m.executor_limit.get(),
    });
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        engine.shutdown();
        return Ok(());
    }
    println!("tasks/s        {:>12.0}", args.tasks as f64 / secs);
    println!(
        "events/s       {:>12.0}   ({events} records in {secs:.2} s)",
        events as f64 / secs
    );
    if let Some(r) = out.offered_rate {
        println!("offered        {r:>12.0} tasks/s");
    }
    println!(
        "latency ms     p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}   (submit -> task terminal)",
        lat.value_at_quantile(0.5) as f64 / 1000.0,
        lat.value_at_quantile(0.9) as f64 / 1000.0,
        lat.value_at_quantile(0.99) as f64 / 1000.0,
        lat.max() as f64 / 1000.0
    );
    println!(
        "append         p50 {} µs  p99 {} µs, batch p50 {} / p99 {} records",
        append.value_at_quantile(0.5),
        append.value_at_quantile(0.99),
        batch.value_at_quantile(0.5),
        batch.value_at_quantile(0.99)
    );
    println!(
        "completed      {completed} of {} (last wave)   rss {} MiB before, after each wave: {:?} MiB, {} tasks in memory",
        args.tasks,
        rss_before / 1024,
        rss_waves.iter().map(|r| r / 1024).collect::<Vec<_>>(),
        m.tasks_in_memory.get()
    );
    engine.shutdown();
    Ok(())
}
