//! `tasker bench`: end-to-end throughput and latency of the embedded engine.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::Log;
use tasker_engine::log::file::{FileLog, FileLogConfig, FsyncPolicy};
use tasker_engine::log::kafka::{KafkaLog, KafkaLogConfig};
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

/// The report groups the slowest tasks by when they were due, in windows this long.
const TAIL_WINDOW: Duration = Duration::from_millis(100);

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
    let setup = crate::wiring::Setup::load(cli)?;
    let kafka = setup.config.log.backend == tasker_engine::config::Backend::Kafka;
    if !args.engines.is_empty() {
        if !kafka {
            return Err(anyhow::anyhow!("--engines needs the Kafka backend"))
                .hint("set TASKER_LOG__BACKEND=kafka and TASKER_KAFKA_BROKERS");
        }
        return scale_out(cli, args, &setup, &yaml, &template);
    }
    let mut ceiling = None;
    let log: Arc<dyn Log> = if kafka {
        // A fresh topic per run; the broker's raw ceiling is measured first with the
        // same producer settings and record sizes.
        let mut config = setup.kafka_config()?;
        config.topic = format!("tasker-bench-{}", uuid::Uuid::now_v7().simple());
        config.partitions = args.partitions;
        let records = args.tasks * events_per_task(&template);
        if !cli.json {
            eprintln!(
                "bench: measuring the broker's raw ceiling ({records} records of ~100 bytes, produce + consume)"
            );
        }
        ceiling = Some(kafka_ceiling(&config, records)?);
        let log = KafkaLog::open(config)?;
        // Ready before the engine appends its ownership claims.
        log.connect_writers(std::time::Duration::from_secs(10))?;
        Arc::new(log)
    } else {
        Arc::new(FileLog::open(
            dir.path().join("log"),
            FileLogConfig {
                partitions: args.partitions,
                fsync,
                segment_bytes: setup.config.log.segment_bytes,
                ..FileLogConfig::default()
            },
        )?)
    };
    let (observer, done) = drive::observer();
    // The configuration's engine settings (execution.*, engine.*) apply; the bench
    // owns where its data goes and how long finished tasks stay in memory.
    let options = EngineOptions {
        snapshot_dir: Some(dir.path().join("snapshots")),
        retention: *args.retention,
        ..EngineOptions::from_config(&setup.config, &setup.resolved)
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
    // Only paced runs have due times spread over the run.
    let tail = out.offered_rate.map(|_| {
        drive::tail_bursts(
            &out.due_and_latency_us,
            lat.value_at_quantile(0.99),
            TAIL_WINDOW,
        )
    });
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
        "submit_lag_ms": out.offered_rate.map(|_| out.max_submit_lag.as_secs_f64() * 1000.0),
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
        "append_us": {"p50": append.value_at_quantile(0.5), "p99": append.value_at_quantile(0.99), "max": append.max(), "slow": m.slow_appends.get()},
        "append_batch_records": {"p50": batch.value_at_quantile(0.5), "p99": batch.value_at_quantile(0.99), "max": batch.max()},
        "rss_kib": {"before": rss_before, "after_each_wave": rss_waves, "tasks_in_memory": m.tasks_in_memory.get()},
        "tail": tail.as_ref().map(|tail| json!({
            "window_ms": tail.window.as_millis(),
            "windows": tail.windows,
            "windows_over_p99": tail.windows_in_tail,
            "bursts_at_s": tail.bursts.starts.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "median_gap_s": tail.bursts.median_gap.map(|g| g.as_secs_f64()),
        })),
        "executor_limit": m.executor_limit.get(),
        "snapshots": {"written": m.snapshots_written.get(), "deltas": m.snapshot_deltas_written.get(), "bytes": m.snapshot_bytes_written.get()},
        "backend": if kafka { "kafka" } else { "file" },
        "broker_ceiling_records_per_s": ceiling,
        "fraction_of_ceiling": ceiling.map(|c| (events as f64 / secs) / c),
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
        println!(
            "offered        {r:>12.0} tasks/s   (latency counts from each task's due time; the generator ran at most {:.2} ms late)",
            out.max_submit_lag.as_secs_f64() * 1000.0
        );
    }
    if let Some(c) = ceiling {
        println!(
            "broker ceiling {c:>12.0} records/s (produce + consume, same settings): the engine used {:.0}% of it",
            100.0 * (events as f64 / secs) / c
        );
    }
    println!(
        "latency ms     p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}   (submit -> task terminal)",
        lat.value_at_quantile(0.5) as f64 / 1000.0,
        lat.value_at_quantile(0.9) as f64 / 1000.0,
        lat.value_at_quantile(0.99) as f64 / 1000.0,
        lat.max() as f64 / 1000.0
    );
    println!(
        "append         p50 {} µs  p99 {} µs  max {:.1} ms, batch p50 {} / p99 {} records",
        append.value_at_quantile(0.5),
        append.value_at_quantile(0.99),
        append.max() as f64 / 1000.0,
        batch.value_at_quantile(0.5),
        batch.value_at_quantile(0.99)
    );
    if let Some(tail) = tail.filter(|t| !t.bursts.starts.is_empty()) {
        let at: Vec<String> = tail
            .bursts
            .starts
            .iter()
            .take(8)
            .map(|b| format!("{:.1}", b.as_secs_f64()))
            .collect();
        println!(
            "tail           tasks over p99 were due in {} of {} {} ms windows, in {} burst(s){} at {}{} s",
            tail.windows_in_tail,
            tail.windows,
            tail.window.as_millis(),
            tail.bursts.starts.len(),
            tail.bursts
                .median_gap
                .map(|g| format!(" ~{:.2} s apart", g.as_secs_f64()))
                .unwrap_or_default(),
            at.join(", "),
            if tail.bursts.starts.len() > at.len() {
                ", ..."
            } else {
                ""
            },
        );
    }
    if m.slow_appends.get() > 0 {
        println!(
            "slow appends   {} over {} ms (write + fsync; each held every task of its partition)",
            m.slow_appends.get(),
            tasker_engine::runtime::metrics::SLOW_APPEND.as_millis()
        );
    }
    println!(
        "completed      {completed} of {} (last wave)   rss {} MiB before, after each wave: {:?} MiB, {} tasks in memory",
        args.tasks,
        rss_before / 1024,
        rss_waves.iter().map(|r| r / 1024).collect::<Vec<_>>(),
        m.tasks_in_memory.get()
    );
    println!(
        "snapshots      {} written while running ({} deltas), {:.1} MiB",
        m.snapshots_written.get(),
        m.snapshot_deltas_written.get(),
        m.snapshot_bytes_written.get() as f64 / (1 << 20) as f64
    );
    engine.shutdown();
    Ok(())
}

/// Records a task of this template writes when it runs once: the request, its
/// acceptance, start and completion, and a start and completion per step.
fn events_per_task(template: &tasker_engine::template::Template) -> usize {
    4 + 2 * template.snapshot().steps.len()
}

/// The broker's raw ceiling: records/s when the same number of ~100-byte records
/// are produced (one producer per partition, batches of 500) and consumed back
/// concurrently (one reader per partition), as the engine does.
fn kafka_ceiling(config: &KafkaLogConfig, records: usize) -> anyhow::Result<f64> {
    use tasker_engine::log::{Headers, Record};
    use tasker_engine::record::{ContentType, Kind, PartitionId, RecordType};
    let mut config = config.clone();
    config.topic = format!("{}-ceiling", config.topic);
    let log = Arc::new(KafkaLog::open(config.clone())?);
    let partitions = config.partitions.max(1);
    let per_partition = records.div_ceil(partitions as usize);
    let record = Record {
        key: TaskId::generate(),
        headers: Headers {
            content_type: ContentType::Bincode,
            kind: Some(Kind::Event),
            record_type: Some(RecordType::StepCompleted),
            schema: 1,
            namespace: Some(bytes::Bytes::from_static(b"bench")),
        },
        timestamp: Timestamp::now(),
        payload: bytes::Bytes::from(vec![7u8; 100]),
    };
    // One record per partition before the clock starts: the producer's first
    // append waits for its producer id (up to ~500 ms), which is setup, not
    // throughput. The readers start after it.
    let mut warm = Vec::new();
    for p in 0..partitions {
        let mut w = log.writer(PartitionId(p))?;
        w.append(std::slice::from_ref(&record))?;
        warm.push((w, log.end(PartitionId(p))?));
    }
    let started = std::time::Instant::now();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (p, (mut w, from)) in (0..partitions).zip(warm) {
        let log_r = Arc::clone(&log);
        readers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut r = log_r.reader(PartitionId(p), from)?;
            let mut got = 0;
            while got < per_partition {
                got += r.poll(10_000, Duration::from_secs(5))?.len();
            }
            Ok(())
        }));
        let batch = vec![record.clone(); 500];
        writers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut sent = 0;
            while sent < per_partition {
                let n = (per_partition - sent).min(batch.len());
                w.append(&batch[..n])?;
                sent += n;
            }
            Ok(())
        }));
    }
    for w in writers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a ceiling writer panicked"))??;
    }
    for r in readers {
        r.join()
            .map_err(|_| anyhow::anyhow!("a ceiling reader panicked"))??;
    }
    Ok((per_partition * partitions as usize) as f64 / started.elapsed().as_secs_f64())
}

/// A machine this busy through a run has no CPU to give another engine.
const SATURATED: f64 = 0.9;

/// `--engines`: the workload on N engine processes, for each N given.
fn scale_out(
    cli: &Cli,
    args: &BenchArgs,
    setup: &crate::wiring::Setup,
    yaml: &str,
    template: &tasker_engine::template::Template,
) -> anyhow::Result<()> {
    let config = setup.kafka_config()?;
    let workload = crate::scaleout::Workload {
        template_yaml: yaml,
        template,
        tasks: args.tasks,
        partitions: args.partitions,
        read_model: args.read_model.as_deref(),
    };
    let mut runs = Vec::new();
    for &n in &args.engines {
        if !cli.json {
            eprintln!(
                "bench: {} tasks on {n} engine process(es), {} partitions",
                args.tasks, args.partitions
            );
        }
        let run = crate::scaleout::run(&config, &workload, n, cli.json)?;
        if !cli.json {
            println!(
                "{n} engine(s)   {:>10.0} tasks/s   ({:.2} s)",
                run.tasks_per_s, run.seconds
            );
            if let Some(u) = &run.cpu {
                println!(
                    "               machine {:.0} % busy on {} CPUs; CPU-s used by the engines {:.1} ({:.2} CPUs), \
                     the bench's producer and readers {:.1}, the rest (broker) {:.1}",
                    u.machine_busy * 100.0,
                    u.cpus,
                    u.processes_seconds,
                    u.processes_seconds / u.wall_seconds,
                    u.own_seconds,
                    u.others_seconds()
                );
            }
            if let Some(p) = &run.projection {
                println!(
                    "               read model complete after {:.2} s; {} transactions committed, {} rolled back",
                    p.seconds, p.commits, p.rollbacks
                );
            }
        }
        runs.push(run);
    }
    let base = runs.first().map(|r| r.tasks_per_s).unwrap_or(1.0);
    if cli.json {
        let out: Vec<_> = runs
            .iter()
            .map(|r| json!({"engines": r.engines, "seconds": r.seconds, "tasks_per_s": r.tasks_per_s, "speedup": r.tasks_per_s / base,
                "read_model": r.projection.as_ref().map(|p| json!({"seconds": p.seconds, "commits": p.commits, "rollbacks": p.rollbacks})),
                "cpu": r.cpu.as_ref().map(|u| json!({"machine_busy": u.machine_busy, "cpus": u.cpus, "engines_cpu_seconds": u.processes_seconds,
                    "bench_cpu_seconds": u.own_seconds, "other_cpu_seconds": u.others_seconds()}))}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for r in &runs[1..] {
            println!(
                "speed-up of {} engines over {}: {:.2}x",
                r.engines,
                runs[0].engines,
                r.tasks_per_s / base
            );
        }
        if let Some(u) = runs.first().and_then(|r| r.cpu)
            && runs.len() > 1
            && u.machine_busy >= SATURATED
        {
            println!(
                "note: with {} engine(s) the machine was already {:.0} % busy: more engine processes on \
                 this machine share the same {} CPUs (scale out across machines)",
                runs[0].engines,
                u.machine_busy * 100.0,
                u.cpus
            );
        }
    }
    Ok(())
}
