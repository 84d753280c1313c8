//! Helpers shared by the engine's tests that run a one-partition diamond
//! workload on a log (`storage_faults`, `log_gaps`).
#![allow(dead_code, clippy::unwrap_used)] // test code; not every test uses all of it

use std::sync::Arc;
use std::time::{Duration, Instant};

use tasker_engine::codec;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::Log;
use tasker_engine::record::{
    Command, CorrelationId, Envelope, PartitionId, Position, RawJson, RequestTask, TaskId,
    Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineError, EngineOptions};
use tasker_engine::state::{State, TaskStatus};

/// The diamond `t/d` (a -> b, c -> d) of `noop` steps.
pub const DIAMOND: &str = "namespace: t\nname: d\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n  - { name: c, handler: noop, depends_on: [a] }\n  - { name: d, handler: noop, depends_on: [b, c] }\n";

/// A `task.requested` for the diamond, with a new task id.
pub fn request() -> Envelope {
    Envelope::command(
        TaskId::generate(),
        CorrelationId::NIL,
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: "t".into(),
            name: "d".into(),
            context: RawJson::empty_object(),
            ..RequestTask::default()
        }),
    )
}

/// The records of partition 0 of `log` that decode, from the start to its
/// end now.
pub fn envelopes(log: &dyn Log) -> Vec<Envelope> {
    let p = PartitionId(0);
    let end = log.end(p).unwrap();
    let mut r = log.reader(p, Position(0)).unwrap();
    let mut out = Vec::new();
    while r.position() < end {
        for rec in r.poll(10_000, Duration::from_millis(200)).unwrap() {
            out.extend(codec::decode(&rec.record.payload).ok());
        }
    }
    out
}

/// Partition 0 of `log`, folded from the start to its end now.
pub fn fold(log: &dyn Log) -> State {
    let mut state = State::default();
    for env in envelopes(log) {
        state.apply(&env);
    }
    state
}

/// An engine with the diamond registered, on `log`.
pub fn engine(log: Arc<dyn Log>) -> Result<Engine, EngineError> {
    let registry = Arc::new(TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        None,
    ));
    registry.add_yaml(DIAMOND, "d.yaml").unwrap();
    Engine::start(log, registry, EngineOptions::default(), None)
}

/// Waits up to 30 s for every task of `ids` to be complete in the engine.
pub fn wait_complete(engine: &Engine, ids: &[TaskId]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ids.iter().all(|id| {
        engine
            .task(*id)
            .is_some_and(|t| t.status == TaskStatus::Complete)
    }) {
        assert!(
            Instant::now() < deadline,
            "tasks did not complete (log gaps seen: {})",
            engine.metrics().log_gaps.get()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
