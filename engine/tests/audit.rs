//! Replay and `audit task` against the live engine: a random workload runs on the
//! embedded engine, the test samples the digest and chain head the engine reports
//! (at many positions) and task states as readers saw them; the log is copied
//! mid-run (a crash image: snapshots first, then segments, possibly torn), a
//! second engine recovers the copy and runs more; then one replay of the copy
//! must give every sampled digest and chain head, `audit task --at` every sampled
//! task state, and `audit verify` must find nothing wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tasker_engine::audit::Bound;
use tasker_engine::audit::history::task_history;
use tasker_engine::audit::replay::{ReplayOptions, replay_partition};
use tasker_engine::audit::verify::{VerifyOptions, verify_partition};
use tasker_engine::codec;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::Log;
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::record::{
    Body, CancelTask, Command, CorrelationId, Envelope, Kind, PartitionId, Position, RawJson,
    RequestTask, ResolveStep, RetryTask, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{DigestReport, Engine, EngineOptions};
use tasker_engine::state::{StepState, StepStatus, TaskState, TaskStatus};

const TEMPLATES: &[(&str, &str)] = &[
    (
        "diamond",
        "
namespace: audit
name: diamond
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - { name: b, handler: noop, depends_on: [a] }
  - { name: c, handler: noop, depends_on: [a] }
  - { name: d, handler: noop, depends_on: [b, c] }
",
    ),
    (
        "flaky",
        "
namespace: audit
name: flaky
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - name: b
    handler: fail
    depends_on: [a]
    retry_limit: 3
    backoff: { initial: 5ms, max: 20ms }
    config: { times: 2 }
  - name: c
    handler: fail
    depends_on: [b]
    retry_limit: 2
    backoff: { initial: 5ms }
    config: { always: true }
  - { name: d, handler: noop, depends_on: [c] }
",
    ),
    (
        "slow",
        "
namespace: other
name: slow
version: 1.0.0
steps:
  - { name: a, handler: sleep, config: { ms: 5 } }
  - { name: b, handler: sleep, depends_on: [a], config: { ms: 10 } }
  - { name: c, handler: sleep, depends_on: [a], config: { ms: 5 } }
",
    ),
];

/// A deterministic stream of choices from the case's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a reader saw of a task: the view's position and the task there.
struct TaskSample {
    id: TaskId,
    position: Position,
    task: Arc<TaskState>,
}

#[derive(Default)]
struct Samples {
    digests: Vec<DigestReport>,
    tasks: Vec<TaskSample>,
}

fn engine(dir: &Path, partitions: u32, snapshot_every: u64, retention: Duration) -> Engine {
    let handlers = Arc::new(HandlerRegistry::with_builtins());
    let registry = Arc::new(TemplateRegistry::new(handlers, None));
    for (name, yaml) in TEMPLATES {
        registry.add_yaml(yaml, name).unwrap();
    }
    let log: Arc<dyn Log> = Arc::new(
        FileLog::open(
            dir.join("log"),
            FileLogConfig {
                partitions,
                ..FileLogConfig::default()
            },
        )
        .unwrap(),
    );
    let options = EngineOptions {
        snapshot_dir: Some(dir.join("snapshots")),
        snapshot_every_events: snapshot_every,
        retention,
        max_concurrent_steps: 16,
        ..EngineOptions::default()
    };
    Engine::start(log, registry, options, None).unwrap()
}

fn command(task: TaskId, command: Command) -> Envelope {
    Envelope::command(task, CorrelationId::generate(), Timestamp::now(), command)
}

fn request(rng: &mut Rng) -> Envelope {
    let (ns, name) = match rng.below(3) {
        0 => ("audit", "diamond"),
        1 => ("audit", "flaky"),
        _ => ("other", "slow"),
    };
    command(
        TaskId::generate(),
        Command::RequestTask(RequestTask {
            namespace: ns.into(),
            name: name.into(),
            context: RawJson::from_trusted(format!(r#"{{"n":{}}}"#, rng.below(1000))),
            initiator: Some(format!("user-{}", rng.below(5))),
            ..RequestTask::default()
        }),
    )
}

/// Submits `tasks` requests and operator commands in random order, sampling
/// digests and task views along the way.
fn workload(engine: &Engine, rng: &mut Rng, tasks: usize, ids: &mut Vec<TaskId>, s: &mut Samples) {
    let partitions = engine.log().partitions();
    for i in 0..tasks {
        let env = request(rng);
        ids.push(env.task_id);
        let _ = engine.submit(env);
        if rng.below(4) == 0 {
            let id = ids[rng.below(ids.len() as u64) as usize];
            operate(engine, rng, id);
        }
        if i % 7 == 0 {
            sample(engine, rng, ids, partitions, s);
        }
        if rng.below(3) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(4)));
        }
    }
}

/// Cancels, retries or resolves a task, depending on its state.
fn operate(engine: &Engine, rng: &mut Rng, id: TaskId) {
    let Some(task) = engine.task(id) else { return };
    let cmd = match task.status {
        TaskStatus::Error if rng.below(2) == 0 => Command::RetryTask(RetryTask {
            requested_by: Some("ops".into()),
            reason: Some("try again".into()),
        }),
        TaskStatus::Error => {
            let Some(i) = task
                .steps
                .iter()
                .position(|s| s.status == StepStatus::Error)
            else {
                return;
            };
            Command::ResolveStep(ResolveStep {
                step: task
                    .step_name(tasker_engine::record::StepId(i as u32))
                    .to_owned(),
                result: Some(RawJson::from_trusted(r#"{"by":"hand"}"#.into())),
                resolved_by: Some("ops".into()),
                reason: None,
                skip_dependents: rng.below(2) == 0,
            })
        }
        TaskStatus::Pending | TaskStatus::InProgress if rng.below(3) == 0 => {
            Command::CancelTask(CancelTask {
                requested_by: Some("ops".into()),
                reason: None,
            })
        }
        _ => return,
    };
    let _ = engine.submit(command(id, cmd));
}

fn sample(engine: &Engine, rng: &mut Rng, ids: &[TaskId], partitions: u32, s: &mut Samples) {
    let p = PartitionId(rng.below(u64::from(partitions)) as u32);
    if let Some(rx) = engine.digest(p)
        && let Ok(report) = rx.blocking_recv()
    {
        s.digests.push(report);
    }
    for _ in 0..3 {
        let id = ids[rng.below(ids.len() as u64) as usize];
        let Some(view) = engine.view(engine.partition_of(id)) else {
            continue;
        };
        if let Some((position, task)) = view.task_at(&id) {
            s.tasks.push(TaskSample { id, position, task });
        }
    }
}

fn wait_quiet(engine: &Engine, ids: &[TaskId], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let busy = ids
            .iter()
            .any(|id| engine.task(*id).is_some_and(|t| !t.status.is_terminal()));
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies a data directory while its engine runs, as a crash would leave it:
/// snapshots first (a snapshot never runs ahead of the durable log), then the log.
fn crash_copy(from: &Path, to: &Path) {
    copy_dir(&from.join("snapshots"), &to.join("snapshots"));
    copy_dir(&from.join("log"), &to.join("log"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for e in entries {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_name() != "LOCK" {
            // A file may vanish while copied (pruned snapshots, temporary files).
            let _ = std::fs::copy(e.path(), &target);
        }
    }
}

/// The position of the first claim of `epoch` or later: where the second engine
/// took over the copied log (everything before it is the first engine's).
fn takeover(log: &dyn Log, p: PartitionId, epoch: u64) -> Position {
    let mut reader = log.reader(p, Position(0)).unwrap();
    let end = log.end(p).unwrap();
    while reader.position() < end {
        for rec in reader.poll(10_000, Duration::from_millis(100)).unwrap() {
            if rec.record.headers.kind == Some(Kind::Control)
                && let Ok(env) = codec::decode(&rec.record.payload)
                && env.epoch.0 >= epoch
                && matches!(env.body, Body::Control(_))
            {
                return rec.position;
            }
        }
    }
    end
}

fn comparable(
    t: &TaskState,
) -> (
    TaskStatus,
    Vec<StepState>,
    Timestamp,
    Option<Timestamp>,
    Option<Timestamp>,
) {
    (
        t.status,
        t.steps.clone(),
        t.accepted_at,
        t.started_at,
        t.finished_at,
    )
}

fn run_case(seed: u64, partitions: u32, snapshot_every: u64, short_retention: bool) {
    println!(
        "audit property case: seed {seed}, {partitions} partitions, snapshots every {snapshot_every} events, short retention {short_retention}"
    );
    let mut rng = Rng(seed);
    let retention = if short_retention {
        Duration::from_millis(30)
    } else {
        Duration::from_secs(900)
    };
    let first = tempfile::TempDir::new().unwrap();
    let second = tempfile::TempDir::new().unwrap();
    let mut ids = Vec::new();
    let mut before = Samples::default();
    let mut after = Samples::default();

    // The first engine, crashed mid-run by copying its files.
    let a = engine(first.path(), partitions, snapshot_every, retention);
    let n = 60 + rng.below(60) as usize;
    workload(&a, &mut rng, n, &mut ids, &mut before);
    std::thread::sleep(Duration::from_millis(rng.below(30)));
    crash_copy(first.path(), second.path());
    a.shutdown();

    // The second engine recovers the copy and goes on.
    let b = engine(second.path(), partitions, snapshot_every, retention);
    for _ in 0..10 {
        let id = ids[rng.below(ids.len() as u64) as usize];
        operate(&b, &mut rng, id);
    }
    let n = 40 + rng.below(40) as usize;
    workload(&b, &mut rng, n, &mut ids, &mut after);
    wait_quiet(&b, &ids, Duration::from_secs(30));
    for _ in 0..10 {
        let id = ids[rng.below(ids.len() as u64) as usize];
        operate(&b, &mut rng, id);
    }
    sample(&b, &mut rng, &ids, partitions, &mut after);
    for p in 0..partitions {
        if let Some(rx) = b.digest(PartitionId(p)) {
            after.digests.push(rx.blocking_recv().unwrap());
        }
    }
    b.shutdown();

    let log = FileLog::open_existing(second.path().join("log")).unwrap();
    // The first engine's samples hold for the prefix the copy kept.
    let kept: Vec<Position> = (0..partitions)
        .map(|p| takeover(&log, PartitionId(p), 2))
        .collect();
    let valid = |p: PartitionId, at: Position| at <= kept[p.0 as usize];
    let digests: Vec<&DigestReport> = before
        .digests
        .iter()
        .filter(|d| valid(d.partition, d.position))
        .chain(after.digests.iter())
        .collect();
    assert!(
        digests.len() >= partitions as usize,
        "too few digest samples: {}",
        digests.len()
    );
    for p in 0..partitions {
        let p = PartitionId(p);
        let capture: Vec<Position> = digests
            .iter()
            .filter(|d| d.partition == p)
            .map(|d| d.position)
            .collect();
        let report = replay_partition(
            &log,
            p,
            &ReplayOptions {
                capture,
                retention_ms: 1_000,
                pipeline: seed.is_multiple_of(2),
                ..ReplayOptions::default()
            },
            &AtomicU64::new(0),
        )
        .unwrap();
        for d in digests.iter().filter(|d| d.partition == p) {
            let c = report
                .captures
                .iter()
                .find(|c| c.position == d.position)
                .unwrap_or_else(|| panic!("no capture at {} of partition {p}", d.position));
            assert_eq!(c.chain, d.chain, "chain at {} of partition {p}", d.position);
            assert_eq!(
                c.digest, d.digest,
                "digest at {} of partition {p}",
                d.position
            );
        }
        assert_eq!(report.stats.anomalies, 0, "partition {p}");
        // The same, bounded: replay --to gives the digest at that position.
        if let Some(d) = digests.iter().rfind(|d| d.partition == p) {
            let bounded = replay_partition(
                &log,
                p,
                &ReplayOptions {
                    to: Some(Bound::Position(d.position)),
                    pipeline: !seed.is_multiple_of(2),
                    ..ReplayOptions::default()
                },
                &AtomicU64::new(0),
            )
            .unwrap();
            assert_eq!(
                (bounded.end, bounded.digest, bounded.chain),
                (d.position, d.digest, d.chain)
            );
        }
    }

    // audit task --at: the state readers saw.
    let index = second.path().join("audit");
    let tasks: Vec<&TaskSample> = before
        .tasks
        .iter()
        .filter(|t| {
            let p = tasker_engine::log::partition_for_task(t.id, partitions);
            valid(p, t.position)
        })
        .chain(after.tasks.iter())
        .collect();
    assert!(!tasks.is_empty());
    for t in tasks {
        let h = task_history(&log, Some(&index), t.id, Some(Bound::Position(t.position))).unwrap();
        let state = h
            .state
            .unwrap_or_else(|| panic!("task {} has no state at {}", t.id, t.position));
        assert_eq!(
            comparable(&state),
            comparable(&t.task),
            "task {} at position {}",
            t.id,
            t.position
        );
        assert!(h.entries.iter().all(|e| e.position < t.position));
    }

    // Nothing wrong with the copy (its torn tail, if any, was repaired by the
    // second engine), and the second run seals nothing new.
    for p in 0..partitions {
        let options = VerifyOptions {
            file_root: Some(second.path().join("log")),
            snapshot_root: Some(second.path().join("snapshots")),
            audit_dir: second.path().join("audit"),
            retention_ms: 1_000,
            seal: true,
            clock_skew_ms: 5_000,
            now: Timestamp::now(),
        };
        for round in 0..2 {
            let v = verify_partition(&log, PartitionId(p), &options, &AtomicU64::new(0)).unwrap();
            assert_eq!(
                v.errors(),
                0,
                "partition {p} round {round}: {:#?}",
                v.findings
            );
            assert!(v.references_checked >= round, "{v:?}");
            assert_eq!(v.sealed_now, v.end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn replay_and_audit_task_match_the_live_engine_across_a_crash(
        seed in any::<u64>(),
        partitions in 1u32..=3,
        snapshot_every in prop::sample::select(vec![40u64, 150, 1_000_000]),
        short_retention in any::<bool>(),
    ) {
        run_case(seed, partitions, snapshot_every, short_retention);
    }
}
