//! The running engine on the embedded log: end to end, restart, idempotency,
//! timers, handlers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::sync::Arc;
use std::time::{Duration, Instant};

use tasker_engine::codec;
use tasker_engine::handler::{HandlerRegistry, StepContext, StepHandler};
use tasker_engine::log::Log;
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::record::{
    CancelTask, Command, CorrelationId, Envelope, Event, PartitionId, Position, RawJson,
    RejectReason, RequestTask, StepError, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::snapshot::{SnapshotKind, SnapshotStore};
use tasker_engine::runtime::{Engine, EngineOptions, SubmitOutcome};
use tasker_engine::state::{HashChain, State, StepStatus, TaskStatus};
use tempfile::TempDir;

const DIAMOND: &str = "
namespace: test
name: diamond
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - { name: b, handler: noop, depends_on: [a] }
  - { name: c, handler: noop, depends_on: [a] }
  - { name: d, handler: noop, depends_on: [b, c] }
";

const FLAKY: &str = "
namespace: test
name: flaky
version: 1.0.0
context_schema: { type: object, required: [n], properties: { n: { type: integer } } }
steps:
  - { name: a, handler: noop }
  - name: b
    handler: fail
    depends_on: [a]
    retry_limit: 3
    backoff: { initial: 20ms, max: 50ms }
    config: { times: 2 }
  - name: c
    handler: fail
    depends_on: [b]
    retry_limit: 2
    backoff: { initial: 10ms }
    config: { always: true }
";

struct Harness {
    dir: TempDir,
    partitions: u32,
    handlers: Arc<HandlerRegistry>,
    eager_dispatch: bool,
}

impl Harness {
    fn new(partitions: u32) -> Self {
        Harness {
            dir: TempDir::new().unwrap(),
            partitions,
            handlers: Arc::new(HandlerRegistry::with_builtins()),
            eager_dispatch: false,
        }
    }

    /// Steps go to their handlers before their batch is durable.
    fn eager(mut self) -> Self {
        self.eager_dispatch = true;
        self
    }

    fn log(&self) -> Arc<dyn Log> {
        Arc::new(
            FileLog::open(
                self.dir.path().join("log"),
                FileLogConfig {
                    partitions: self.partitions,
                    ..FileLogConfig::default()
                },
            )
            .unwrap(),
        )
    }

    fn engine(&self) -> Engine {
        let registry = Arc::new(TemplateRegistry::new(Arc::clone(&self.handlers), None));
        registry.add_yaml(DIAMOND, "diamond.yaml").unwrap();
        registry.add_yaml(FLAKY, "flaky.yaml").unwrap();
        let options = EngineOptions {
            snapshot_dir: Some(self.dir.path().join("snapshots")),
            snapshot_every_events: 500,
            eager_dispatch: self.eager_dispatch,
            ..EngineOptions::default()
        };
        Engine::start(self.log(), registry, options, None).unwrap()
    }
}

fn request(name: &str, context: &str, key: Option<&str>) -> Envelope {
    let id = TaskId::generate();
    Envelope::command(
        id,
        CorrelationId::generate(),
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: "test".into(),
            name: name.into(),
            context: RawJson::parse(context).unwrap(),
            idempotency_key: key.map(str::to_owned),
            ..RequestTask::default()
        }),
    )
}

fn wait_terminal(engine: &Engine, ids: &[TaskId], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let pending: Vec<&TaskId> = ids
            .iter()
            .filter(|id| !engine.task(**id).is_some_and(|t| t.status.is_terminal()))
            .collect();
        if pending.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} tasks not terminal, e.g. {:?}",
            pending.len(),
            engine.task(*pending[0])
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Folds the whole log of a partition from scratch.
fn replay(log: &dyn Log, partition: PartitionId) -> (State, HashChain, Vec<Envelope>) {
    let mut state = State::default();
    let mut chain = HashChain::genesis(partition);
    let mut reader = log.reader(partition, Position(0)).unwrap();
    let end = log.end(partition).unwrap();
    let mut all = Vec::new();
    while reader.position() < end {
        for rec in reader.poll(10_000, Duration::from_millis(100)).unwrap() {
            chain.push(&rec.record.payload);
            if let Ok(env) = codec::decode(&rec.record.payload) {
                state.apply(&env);
                all.push(env);
            }
        }
    }
    (state, chain, all)
}

#[test]
fn runs_diamonds_to_completion_and_replay_matches_live_digest() {
    diamonds_complete_exactly_once(Harness::new(2));
}

#[test]
fn eager_dispatch_runs_diamonds_exactly_once_and_replay_matches_live_digest() {
    diamonds_complete_exactly_once(Harness::new(2).eager());
}

fn diamonds_complete_exactly_once(h: Harness) {
    let engine = h.engine();
    let mut ids = Vec::new();
    for _ in 0..300 {
        let env = request("diamond", "{}", None);
        ids.push(env.task_id);
        match engine.request_blocking(env).unwrap() {
            SubmitOutcome::Accepted { .. } => {}
            other => panic!("not accepted: {other:?}"),
        }
        // Read your writes: the view has the task once the answer is out.
        let id = *ids.last().unwrap();
        let (position, task) = engine
            .view(engine.partition_of(id))
            .and_then(|v| v.task_at(&id))
            .unwrap_or_else(|| panic!("task {id} answered but not in the view"));
        assert_eq!(task.id, id);
        assert!(position > Position(0));
    }
    wait_terminal(&engine, &ids, Duration::from_secs(30));
    // The engine-wide gauge is the sum over partitions (all kept: retention).
    let in_views: usize = (0..2)
        .map(|p| engine.view(PartitionId(p)).unwrap().task_count())
        .sum();
    assert_eq!(in_views, ids.len());
    assert_eq!(engine.metrics().tasks_in_memory.get(), ids.len() as i64);
    for id in &ids {
        let t = engine.task(*id).unwrap();
        assert_eq!(t.status, TaskStatus::Complete);
        assert!(
            t.steps
                .iter()
                .all(|s| s.status == StepStatus::Complete && s.attempts == 1)
        );
    }
    let mut live = Vec::new();
    for p in 0..2 {
        live.push(
            engine
                .digest(PartitionId(p))
                .unwrap()
                .blocking_recv()
                .unwrap(),
        );
    }
    engine.shutdown();
    // Every snapshot kept (full ones and deltas, written in the background
    // while the tasks ran and at shutdown) reads back whole and restores to
    // its own digest.
    let store = SnapshotStore::new(h.dir.path().join("snapshots"));
    for p in (0..2).map(PartitionId) {
        let files = store.all_files(p);
        assert!(files.len() >= 2, "partition {p}: snapshots {files:?}");
        for (position, kind, path) in files {
            let file = store.load(p, kind, &path).unwrap();
            assert_eq!(file.position, position);
            let state = State::from_snapshot(file.state).expect("a consistent snapshot");
            assert_eq!(state.digest(), file.digest, "{}", path.display());
        }
    }
    let log = h.log();
    for report in live {
        let (state, chain, events) = replay(&*log, report.partition);
        assert_eq!(
            state.digest(),
            report.digest,
            "partition {}",
            report.partition
        );
        assert_eq!(chain.head(), report.chain, "partition {}", report.partition);
        assert_eq!(chain.count(), report.position.0);
        // exactly one step.completed per (task, step, attempt)
        let mut seen = std::collections::HashSet::new();
        for e in &events {
            if let Some(Event::StepCompleted(c)) = e.as_event() {
                assert!(
                    seen.insert((e.task_id, c.step, c.attempt)),
                    "duplicate {e:?}"
                );
            }
        }
    }
}

/// The digest of a partition's log folded up to (not including) `end`.
fn digest_at(log: &dyn Log, partition: PartitionId, end: Position) -> tasker_engine::state::Digest {
    let mut state = State::default();
    let mut reader = log.reader(partition, Position(0)).unwrap();
    while reader.position() < end {
        for rec in reader.poll(10_000, Duration::from_millis(100)).unwrap() {
            if rec.position < end
                && let Ok(env) = codec::decode(&rec.record.payload)
            {
                state.apply(&env);
            }
        }
    }
    state.digest()
}

#[test]
fn snapshots_write_deltas_and_a_restart_restores_from_one() {
    let h = Harness::new(1);
    // A temporary file a crash left mid-write is cleared by the next snapshot.
    let partition_dir = h.dir.path().join("snapshots").join("p00000");
    std::fs::create_dir_all(&partition_dir).unwrap();
    let torn = partition_dir.join("00000000000000000007.snap.tmp");
    std::fs::write(&torn, b"torn").unwrap();
    let engine = h.engine();
    // Waves of tasks: once the first ones are finished (and kept for the
    // retention window), a snapshot's changes are a fraction of the state.
    let mut ids = Vec::new();
    for _ in 0..8 {
        let wave: Vec<TaskId> = (0..60)
            .map(|_| {
                let env = request("diamond", "{}", None);
                let id = env.task_id;
                assert!(matches!(
                    engine.request_blocking(env).unwrap(),
                    SubmitOutcome::Accepted { .. }
                ));
                id
            })
            .collect();
        wait_terminal(&engine, &wave, Duration::from_secs(30));
        ids.extend(wave);
    }
    let metrics = Arc::clone(engine.metrics());
    engine.shutdown();
    assert!(!torn.exists());
    let p = PartitionId(0);
    let store = SnapshotStore::new(h.dir.path().join("snapshots"));
    let deltas = store.files(p, SnapshotKind::Delta);
    assert!(!deltas.is_empty(), "no delta among {:?}", store.list(p));
    // The metrics count them (some may have been pruned since).
    let kept: u64 = (store.list(p).iter().chain(&deltas))
        .map(|(_, path)| std::fs::metadata(path).unwrap().len())
        .sum();
    assert!(metrics.snapshot_deltas_written.get() >= deltas.len() as u64);
    assert!(metrics.snapshot_bytes_written.get() >= kept);
    let log = h.log();
    // Each delta, applied to its chain, is the fold of the log before it.
    for (position, path) in &deltas {
        let file = store.load(p, SnapshotKind::Delta, path).unwrap();
        assert_eq!(file.position, *position);
        let state = State::from_snapshot(file.state).expect("a consistent snapshot");
        assert_eq!(state.digest(), file.digest, "{}", path.display());
        assert_eq!(
            file.digest,
            digest_at(&*log, p, *position),
            "{}",
            path.display()
        );
    }
    // Without the files written after the newest delta, a restart starts there.
    let (newest, _) = deltas.last().unwrap().clone();
    for (position, path) in store.list(p) {
        if position > newest {
            std::fs::remove_file(path).unwrap();
        }
    }
    let (restored, _) = store.latest(p).unwrap();
    assert_eq!(restored.position, newest);
    // A damaged delta is passed over for the link before it.
    let path = &deltas.last().unwrap().1;
    let good = std::fs::read(path).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1;
    std::fs::write(path, &bad).unwrap();
    let (older, _) = store.latest(p).unwrap();
    assert!(older.position < newest, "{:?}", older.position);
    std::fs::write(path, &good).unwrap();
    let engine = h.engine();
    for id in &ids {
        assert_eq!(engine.task(*id).unwrap().status, TaskStatus::Complete);
    }
    let live = engine.digest(p).unwrap().blocking_recv().unwrap();
    engine.shutdown();
    assert_eq!(replay(&*h.log(), p).0.digest(), live.digest);
}

#[test]
fn retries_with_backoff_then_fails_terminally_and_restart_resumes() {
    retries_then_restart(Harness::new(1));
}

#[test]
fn eager_dispatch_retries_with_backoff_and_restart_resumes() {
    retries_then_restart(Harness::new(1).eager());
}

fn retries_then_restart(h: Harness) {
    let engine = h.engine();
    let env = request("flaky", r#"{"n": 1}"#, None);
    let id = env.task_id;
    assert!(matches!(
        engine.request_blocking(env).unwrap(),
        SubmitOutcome::Accepted { .. }
    ));
    wait_terminal(&engine, &[id], Duration::from_secs(20));
    let t = engine.task(id).unwrap();
    assert_eq!(t.status, TaskStatus::Error);
    assert_eq!(t.steps[1].status, StepStatus::Complete);
    assert_eq!(t.steps[1].attempts, 3, "b fails twice then succeeds");
    assert_eq!(t.steps[2].status, StepStatus::Error);
    assert_eq!(t.steps[2].attempts, 2, "c uses its two attempts");
    assert!(t.steps[2].retry_at.is_none());
    // invalid context is rejected with the schema errors
    match engine
        .request_blocking(request("flaky", r#"{"n": "x"}"#, None))
        .unwrap()
    {
        SubmitOutcome::Rejected {
            reason, details, ..
        } => {
            assert_eq!(reason, RejectReason::InvalidContext);
            assert!(details[0].contains("/n"), "{details:?}");
        }
        other => panic!("{other:?}"),
    }
    match engine
        .request_blocking(request("nope", "{}", None))
        .unwrap()
    {
        SubmitOutcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::UnknownTemplate),
        other => panic!("{other:?}"),
    }
    let before = engine
        .digest(PartitionId(0))
        .unwrap()
        .blocking_recv()
        .unwrap();
    engine.shutdown();
    let engine = h.engine();
    let t = engine.task(id).unwrap();
    assert_eq!(t.status, TaskStatus::Error, "state survives a restart");
    let after = engine
        .digest(PartitionId(0))
        .unwrap()
        .blocking_recv()
        .unwrap();
    assert!(
        after.position > before.position,
        "a restart appends a claim"
    );
}

#[test]
fn idempotency_key_answers_with_the_first_task() {
    let h = Harness::new(1);
    let engine = h.engine();
    let first = request("diamond", "{}", Some("order-7"));
    let first_id = first.task_id;
    assert!(matches!(
        engine.request_blocking(first).unwrap(),
        SubmitOutcome::Accepted { .. }
    ));
    match engine
        .request_blocking(request("diamond", "{}", Some("order-7")))
        .unwrap()
    {
        SubmitOutcome::Rejected {
            reason: RejectReason::DuplicateIdempotencyKey { existing },
            ..
        } => {
            assert_eq!(existing, first_id)
        }
        other => panic!("{other:?}"),
    }
}

struct Slow;

#[async_trait::async_trait]
impl StepHandler for Slow {
    async fn call(&self, _ctx: StepContext) -> Result<serde_json::Value, StepError> {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(serde_json::json!({}))
    }
}

#[test]
fn cancel_stops_a_running_task() {
    let h = Harness::new(1);
    h.handlers.register("slow", Slow);
    let engine = h.engine();
    engine
        .registry()
        .add_yaml(
            "namespace: test\nname: slow\nversion: 1.0.0\nsteps:\n  - { name: a, handler: slow }\n  - { name: b, handler: noop, depends_on: [a] }\n",
            "slow.yaml",
        )
        .unwrap();
    let env = request("slow", "{}", None);
    let id = env.task_id;
    engine.request_blocking(env).unwrap();
    let cancel = Envelope::command(
        id,
        CorrelationId::NIL,
        Timestamp::now(),
        Command::CancelTask(CancelTask::default()),
    );
    assert!(matches!(
        engine.request_blocking(cancel).unwrap(),
        SubmitOutcome::Applied { .. }
    ));
    let t = engine.task(id).unwrap();
    assert_eq!(t.status, TaskStatus::Cancelled);
    assert_eq!(t.steps[0].status, StepStatus::Cancelled);
    assert_eq!(t.steps[1].status, StepStatus::Cancelled);
}
