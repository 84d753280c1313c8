//! Audit benchmarks on a generated embedded log: replay throughput (read + chain +
//! decode + fold, two threads per partition, partitions in parallel, as
//! `tasker replay` runs it) and `audit task` latency through the task index.
//!
//! ```text
//! cargo bench -p tasker-engine --bench audit                        # 3M records in a temp dir
//! cargo bench -p tasker-engine --bench audit -- generate DIR 10000000 4
//! cargo bench -p tasker-engine --bench audit -- replay DIR
//! cargo bench -p tasker-engine --bench audit -- task DIR [queries]
//! cargo bench -p tasker-engine --bench audit -- stages DIR   # per-stage cost, one thread
//! cargo bench -p tasker-engine --bench audit -- pipe DIR     # partition 0, one vs two threads
//! ```
//! `generate` writes `DIR/log` like the engine would (a request and its 11
//! events per diamond task, commands with their answers in one batch, tasks
//! interleaved, 10 ms of log time per task), so `tasker --data-dir DIR replay`
//! and `tasker --data-dir DIR audit task <id>` can be timed on it too;
//! `DIR/tasks.txt` lists some task ids to query.
// A benchmark program: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tasker_engine::audit::history::task_history;
use tasker_engine::audit::replay::{ReplayOptions, replay_partition};
use tasker_engine::decide::{Input, Resolution, decide};
use tasker_engine::log::file::{FileLog, FileLogConfig, FsyncPolicy};
use tasker_engine::log::{Log, Record, partition_for_task};
use tasker_engine::record::{
    BackoffSpec, Body, Command, CorrelationId, Envelope, Epoch, Event, PartitionId, Position,
    RawJson, RequestTask, StepId, StepOutcome, StepSpec, TaskId, TemplateSnapshot, Timestamp,
};
use tasker_engine::runtime::to_record;
use tasker_engine::state::{Dag, State};

const IN_FLIGHT: usize = 1_000;
const MS_PER_TASK: u64 = 10;

fn diamond() -> TemplateSnapshot {
    let step = |name: &str, parents: &[u32]| StepSpec {
        name: name.into(),
        handler: "noop".into(),
        depends_on: parents.iter().map(|&p| StepId(p)).collect(),
        retryable: true,
        retry_limit: 3,
        timeout_ms: 30_000,
        backoff: BackoffSpec::default(),
        config: RawJson::empty_object(),
    };
    TemplateSnapshot {
        namespace: "bench".into(),
        name: "diamond".into(),
        version: "1.0.0".into(),
        steps: vec![
            step("a", &[]),
            step("b", &[0]),
            step("c", &[0]),
            step("d", &[1, 2]),
        ],
    }
}

/// Writes about `target` records to partition `p`: diamond tasks, interleaved.
fn generate_partition(
    log: &FileLog,
    p: PartitionId,
    partitions: u32,
    target: u64,
    ids: &mut Vec<TaskId>,
) {
    let resolution: Resolution = Ok(Arc::new(Dag::new(Arc::new(diamond()))));
    let mut writer = log.writer(p).unwrap();
    let mut state = State::new(15 * 60 * 1000);
    let mut next = 0u64;
    let mut batch: Vec<Record> = Vec::with_capacity(4096);
    let mut buf = Vec::new();
    let ns = Bytes::from_static(b"bench");
    let mut flight: Vec<(TaskId, CorrelationId, u32)> = Vec::new();
    let mut now = 1_700_000_000_000u64;
    let mut counter = u128::from(p.0) << 64;
    let mut cursor = 0usize;
    let done = StepOutcome::Completed {
        result: RawJson::from_trusted(r#"{"ok":true}"#.into()),
    };
    let mut push = |state: &mut State, batch: &mut Vec<Record>, next: &mut u64, env: Envelope| {
        state.apply(&env);
        batch.push(to_record(&env, Some(ns.clone()), &mut buf).unwrap());
        *next += 1;
    };
    while next < target || !flight.is_empty() {
        if flight.len() < IN_FLIGHT && next < target {
            now += MS_PER_TASK;
            let id = loop {
                counter += 1;
                let id = TaskId::v7(Timestamp(now), counter);
                if partition_for_task(id, partitions) == p {
                    break id;
                }
            };
            if ids.len() < 100_000 {
                ids.push(id);
            }
            let correlation = CorrelationId::from_uuid(*id.as_uuid());
            let command = Command::RequestTask(RequestTask {
                namespace: "bench".into(),
                name: "diamond".into(),
                context: RawJson::from_trusted(format!(r#"{{"order":{counter}}}"#)),
                initiator: Some("bench".into()),
                ..RequestTask::default()
            });
            let events = decide(
                &state,
                Input::Command {
                    task: id,
                    command: &command,
                    resolution: Some(&resolution),
                },
                Timestamp(now),
            )
            .unwrap();
            let source = Position(next);
            push(
                &mut state,
                &mut batch,
                &mut next,
                Envelope::command(id, correlation, Timestamp(now), command),
            );
            for event in events {
                let env = event_env(id, correlation, now, Some(source), event);
                push(&mut state, &mut batch, &mut next, env);
            }
            // The engine starts the root step once the task is accepted.
            let start = decide(
                &state,
                Input::StartStep {
                    task: id,
                    step: StepId(0),
                },
                Timestamp(now),
            )
            .unwrap();
            for event in start {
                push(
                    &mut state,
                    &mut batch,
                    &mut next,
                    event_env(id, correlation, now, None, event),
                );
            }
            flight.push((id, correlation, 0));
        } else {
            cursor = (cursor + 1) % flight.len();
            let (id, correlation, ref mut step) = flight[cursor];
            let s = StepId(*step);
            let mut events = decide(
                &state,
                Input::StepFinished {
                    task: id,
                    step: s,
                    attempt: 1,
                    outcome: &done,
                },
                Timestamp(now),
            )
            .unwrap();
            *step += 1;
            let finished = *step == 4;
            if finished {
                flight.swap_remove(cursor);
            }
            for event in events.drain(..) {
                push(
                    &mut state,
                    &mut batch,
                    &mut next,
                    event_env(id, correlation, now, None, event),
                );
            }
            if !finished {
                let step = StepId(if s.0 == 0 { 1 } else { s.0 + 1 });
                if let Ok(start) =
                    decide(&state, Input::StartStep { task: id, step }, Timestamp(now))
                {
                    for event in start {
                        push(
                            &mut state,
                            &mut batch,
                            &mut next,
                            event_env(id, correlation, now, None, event),
                        );
                    }
                }
            }
        }
        if batch.len() >= 2048 {
            writer.append(&batch).unwrap();
            batch.clear();
        }
    }
    if !batch.is_empty() {
        writer.append(&batch).unwrap();
    }
}

fn event_env(
    task: TaskId,
    correlation: CorrelationId,
    now: u64,
    source: Option<Position>,
    event: Event,
) -> Envelope {
    Envelope {
        task_id: task,
        correlation_id: correlation,
        source_position: source,
        epoch: Epoch(1),
        at: Timestamp(now),
        body: Body::Event(event),
    }
}

fn generate(dir: &Path, records: u64, partitions: u32) {
    let started = Instant::now();
    let log = FileLog::open(
        dir.join("log"),
        FileLogConfig {
            partitions,
            fsync: FsyncPolicy::Never,
            ..FileLogConfig::default()
        },
    )
    .unwrap();
    let mut ids = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..partitions)
            .map(|p| {
                let log = &log;
                s.spawn(move || {
                    let mut ids = Vec::new();
                    generate_partition(
                        log,
                        PartitionId(p),
                        partitions,
                        records / u64::from(partitions),
                        &mut ids,
                    );
                    ids
                })
            })
            .collect();
        for h in handles {
            ids.extend(h.join().unwrap());
        }
    });
    let list: Vec<String> = ids
        .iter()
        .step_by((ids.len() / 1000).max(1))
        .map(|i| i.to_string())
        .collect();
    std::fs::write(dir.join("tasks.txt"), list.join("\n")).unwrap();
    let total: u64 = (0..partitions)
        .map(|p| log.end(PartitionId(p)).unwrap().0)
        .sum();
    println!(
        "generated {total} records in {partitions} partitions under {} in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
}

/// As `tasker replay` runs it: partitions on as many threads as there are cores,
/// each partition on one thread (or two, read + chain and decode + fold, when
/// there are fewer partitions than cores).
fn replay(dir: &Path) {
    let log = FileLog::open_existing(dir.join("log")).unwrap();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let partitions = log.partitions() as usize;
    let options = ReplayOptions {
        pipeline: partitions < cores,
        ..ReplayOptions::default()
    };
    for round in 0..3 {
        let started = Instant::now();
        let progress = AtomicU64::new(0);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let reports = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..cores.min(partitions) {
                s.spawn(|| {
                    loop {
                        let p = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if p >= partitions {
                            break;
                        }
                        let r = replay_partition(&log, PartitionId(p as u32), &options, &progress)
                            .unwrap();
                        reports.lock().unwrap().push(r);
                    }
                });
            }
        });
        let secs = started.elapsed().as_secs_f64();
        let reports = reports.into_inner().unwrap();
        let records: u64 = reports.iter().map(|r| r.records).sum();
        let events: u64 = reports.iter().map(|r| r.events).sum();
        println!(
            "replay {round}: {records} records ({events} events) in {secs:.2} s: {:.0} records/s, {:.0} events/s",
            records as f64 / secs,
            events as f64 / secs
        );
    }
}

fn tasks(dir: &Path, queries: usize) {
    let log = FileLog::open_existing(dir.join("log")).unwrap();
    let ids: Vec<TaskId> = std::fs::read_to_string(dir.join("tasks.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let index = dir.join("audit");
    let _ = std::fs::remove_dir_all(&index);
    let first = Instant::now();
    let h = task_history(&log, Some(&index), ids[0], None).unwrap();
    println!(
        "audit task, first query (indexes {} records of partition {}): {:.3} s, {} records of the task",
        h.lookup.records_indexed,
        h.lookup.partition,
        first.elapsed().as_secs_f64(),
        h.entries.len()
    );
    for p in 1..log.partitions() {
        let id = ids
            .iter()
            .find(|i| partition_for_task(**i, log.partitions()) == PartitionId(p))
            .unwrap();
        task_history(&log, Some(&index), *id, None).unwrap();
    }
    let mut times = Vec::new();
    for (i, id) in ids.iter().cycle().skip(1).take(queries).enumerate() {
        let t = Instant::now();
        let h = task_history(&log, Some(&index), *id, None).unwrap();
        times.push(t.elapsed());
        assert_eq!(h.entries.len(), 12, "query {i}: task {id}");
        assert!(h.state.is_some());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "audit task, {queries} queries with the index: median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(times[times.len() / 2]),
        ms(times[times.len() * 99 / 100]),
        ms(times[times.len() - 1])
    );
    let t = Instant::now();
    task_history(&log, None, ids[ids.len() / 2], None).unwrap();
    println!(
        "audit task without the index (scans the partition): {:.2} s",
        t.elapsed().as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.first().map(String::as_str) {
        Some("generate") => generate(
            &PathBuf::from(&args[1]),
            args.get(2).map_or(3_000_000, |n| n.parse().unwrap()),
            args.get(3).map_or(4, |n| n.parse().unwrap()),
        ),
        Some("replay") => replay(&PathBuf::from(&args[1])),
        Some("stages") => stages(&PathBuf::from(&args[1])),
        Some("pipe") => {
            let log = FileLog::open_existing(PathBuf::from(&args[1]).join("log")).unwrap();
            for pipeline in [false, true] {
                let t = Instant::now();
                let options = ReplayOptions {
                    pipeline,
                    ..ReplayOptions::default()
                };
                let r =
                    replay_partition(&log, PartitionId(0), &options, &AtomicU64::new(0)).unwrap();
                println!(
                    "partition 0, pipeline {pipeline}: {:.0} ns/record",
                    t.elapsed().as_nanos() as f64 / r.records as f64
                );
            }
        }
        Some("task") => tasks(
            &PathBuf::from(&args[1]),
            args.get(2).map_or(200, |n| n.parse().unwrap()),
        ),
        _ => {
            let dir = tempfile::TempDir::new().unwrap();
            generate(dir.path(), 3_000_000, 4);
            replay(dir.path());
            tasks(dir.path(), 200);
        }
    }
}

/// Single-thread cost of each stage over partition 0 (for tuning).
fn stages(dir: &Path) {
    use tasker_engine::codec;
    use tasker_engine::state::HashChain;
    let log = FileLog::open_existing(dir.join("log")).unwrap();
    let p = PartitionId(0);
    let end = log.end(p).unwrap();
    let read = || {
        let mut reader = log.reader(p, Position(0)).unwrap();
        let mut all = Vec::new();
        while reader.position() < end {
            all.extend(reader.poll(16_384, Duration::from_millis(100)).unwrap());
        }
        all
    };
    let t = Instant::now();
    let all = read();
    let n = all.len() as f64;
    println!("read: {:.0} ns/record", t.elapsed().as_nanos() as f64 / n);
    let t = Instant::now();
    let mut chain = HashChain::genesis(p);
    for r in &all {
        chain.push(&r.record.payload);
    }
    println!("chain: {:.0} ns/record", t.elapsed().as_nanos() as f64 / n);
    let t = Instant::now();
    let envs: Vec<_> = all
        .iter()
        .map(|r| codec::decode(&r.record.payload).unwrap())
        .collect();
    println!("decode: {:.0} ns/record", t.elapsed().as_nanos() as f64 / n);
    let t = Instant::now();
    let mut state = State::new(15 * 60 * 1000);
    for e in &envs {
        state.apply(e);
    }
    println!("apply: {:.0} ns/record", t.elapsed().as_nanos() as f64 / n);
    drop(envs);
    drop(all);
    let t = Instant::now();
    let mut reader = log.reader(p, Position(0)).unwrap();
    let mut chain = HashChain::genesis(p);
    let mut state = State::new(15 * 60 * 1000);
    while reader.position() < end {
        for r in reader.poll(16_384, Duration::from_millis(100)).unwrap() {
            chain.push(&r.record.payload);
            if r.record.headers.kind != Some(tasker_engine::record::Kind::Command) {
                state.apply(&codec::decode(&r.record.payload).unwrap());
            }
        }
    }
    println!(
        "inline read+chain+decode+apply: {:.0} ns/record",
        t.elapsed().as_nanos() as f64 / n
    );
    let t = Instant::now();
    std::hint::black_box(state.digest());
    println!("final digest: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    let t = Instant::now();
    drop(state);
    println!("drop state: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
}
