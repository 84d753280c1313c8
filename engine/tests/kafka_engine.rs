//! The engine on a live Kafka-protocol broker (`TASKER_KAFKA_BROKERS`): tasks run
//! end to end, replay equals the live digest, a client that shares none of our
//! code publishes JSON commands, garbage does not stall a partition, and two
//! engines on one partition are fenced by epochs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tasker_engine::codec;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::kafka::{KafkaLog, KafkaLogConfig};
use tasker_engine::log::{Log, partition_for_task};
use tasker_engine::record::{
    Command, CorrelationId, Envelope, Event, PartitionId, Position, RawJson, RejectReason,
    RequestTask, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineOptions, PartitionStatus, SubmitOutcome};
use tasker_engine::state::{HashChain, State, TaskStatus};

fn brokers() -> String {
    std::env::var("TASKER_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "TASKER_KAFKA_BROKERS is not set. These tests need a Kafka-protocol broker: run \
             scripts/test (it installs and starts Nisshi), or start one and export \
             TASKER_KAFKA_BROKERS=127.0.0.1:9092"
        )
    })
}

fn kafka(partitions: u32) -> (KafkaLogConfig, Arc<dyn Log>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = KafkaLogConfig::new(
        &brokers(),
        &format!("tasker-e2e-{}", uuid::Uuid::now_v7().simple()),
        partitions,
    );
    config.linger_ms = 1;
    let log: Arc<dyn Log> = Arc::new(KafkaLog::open(config.clone()).unwrap());
    (config, log)
}

fn registry() -> Arc<TemplateRegistry> {
    let r = Arc::new(TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        None,
    ));
    r.add_yaml(
        "namespace: shop\nname: diamond\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n  - { name: c, handler: noop, depends_on: [a] }\n  - { name: d, handler: noop, depends_on: [b, c] }\n",
        "diamond.yaml",
    )
    .unwrap();
    r.add_yaml(
        "namespace: shop\nname: slow\nversion: 1.0.0\nsteps:\n  - { name: a, handler: sleep, config: { ms: 30 } }\n  - { name: b, handler: sleep, depends_on: [a], config: { ms: 30 } }\n",
        "slow.yaml",
    )
    .unwrap();
    r
}

fn request(name: &str) -> Envelope {
    Envelope::command(
        TaskId::generate(),
        CorrelationId::generate(),
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: "shop".into(),
            name: name.into(),
            context: RawJson::empty_object(),
            ..RequestTask::default()
        }),
    )
}

fn wait_terminal(engine: &Engine, ids: &[TaskId], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = ids
            .iter()
            .filter(|id| !engine.task(**id).is_some_and(|t| t.status.is_terminal()))
            .count();
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} tasks not terminal");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Folds a partition up to `upto`, checking the chain too.
fn replay(
    log: &dyn Log,
    partition: PartitionId,
    upto: Position,
) -> (State, HashChain, Vec<Envelope>) {
    let mut state = State::default();
    let mut chain = HashChain::genesis(partition);
    let mut events = Vec::new();
    let mut reader = log.reader(partition, Position(0)).unwrap();
    while reader.position() < upto {
        let batch = reader.poll(10_000, Duration::from_secs(2)).unwrap();
        assert!(!batch.is_empty(), "log ends before {upto}");
        for rec in batch.into_iter().filter(|r| r.position < upto) {
            chain.push(&rec.record.payload);
            if let Ok(env) = codec::decode(&rec.record.payload) {
                state.apply(&env);
                events.push(env);
            }
        }
    }
    (state, chain, events)
}

#[test]
fn runs_tasks_and_replay_equals_the_live_digest() {
    let (_, log) = kafka(3);
    let engine =
        Engine::start(Arc::clone(&log), registry(), EngineOptions::default(), None).unwrap();
    let mut ids = Vec::new();
    for _ in 0..150 {
        let e = request("diamond");
        ids.push(e.task_id);
        assert!(matches!(
            engine.request_blocking(e).unwrap(),
            SubmitOutcome::Accepted { .. }
        ));
    }
    wait_terminal(&engine, &ids, Duration::from_secs(60));
    assert!(
        ids.iter()
            .all(|id| engine.task(*id).unwrap().status == TaskStatus::Complete)
    );
    for p in 0..3 {
        let report = engine
            .digest(PartitionId(p))
            .unwrap()
            .blocking_recv()
            .unwrap();
        let (state, chain, events) = replay(&*log, PartitionId(p), report.position);
        assert_eq!(state.digest(), report.digest, "partition {p}");
        assert_eq!(chain.head(), report.chain, "partition {p}");
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
    engine.shutdown();
}

#[test]
fn json_commands_from_a_foreign_client_run_and_garbage_does_not_stall() {
    let (config, log) = kafka(2);
    let engine =
        Engine::start(Arc::clone(&log), registry(), EngineOptions::default(), None).unwrap();
    // A plain rdkafka producer with hand-written JSON: nothing of our codec. Like
    // every non-Java client it must partition as Java does (documented in the README).
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let task = TaskId::generate();
    let key = task.to_string();
    let json = format!(
        r#"{{"type":"task.requested","task_id":"{task}","namespace":"shop","name":"diamond","context":{{"from":"python-like client"}}}}"#
    );
    let headers = || {
        OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/json"),
        })
    };
    // Garbage first, on the same partition, then a valid command.
    producer
        .send(
            BaseRecord::to(&config.topic)
                .key(&key)
                .payload(&b"\x00\xffnot a record"[..]),
        )
        .unwrap();
    producer
        .send(
            BaseRecord::to(&config.topic)
                .key(&key)
                .payload(&b"{\"type\": 17}"[..])
                .headers(headers()),
        )
        .unwrap();
    producer
        .send(
            BaseRecord::to(&config.topic)
                .key(&key)
                .payload(json.as_bytes())
                .headers(headers()),
        )
        .unwrap();
    // And one without a task id, keyed by its idempotency key.
    let anon = r#"{"type":"task.requested","namespace":"shop","name":"diamond","idempotency_key":"ext-1","context":{}}"#;
    producer
        .send(
            BaseRecord::to(&config.topic)
                .key("shop/ext-1")
                .payload(anon.as_bytes())
                .headers(headers()),
        )
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    wait_terminal(&engine, &[task], Duration::from_secs(30));
    let t = engine.task(task).unwrap();
    assert_eq!(t.status, TaskStatus::Complete);
    assert_eq!(t.request.context.to_value()["from"], "python-like client");
    let partition = partition_for_task(task, 2);
    assert!(
        engine.metrics().malformed_records.get() >= 2,
        "garbage counted"
    );
    // The anonymous one got an id on the partition it was sent to.
    let deadline = Instant::now() + Duration::from_secs(30);
    let anon_task = loop {
        let found = (0..2).find_map(|p| {
            engine.view(PartitionId(p)).and_then(|v| {
                v.tasks().find(|t| {
                    t.request.idempotency_key.as_deref() == Some("ext-1") && t.status.is_terminal()
                })
            })
        });
        if let Some(t) = found {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the anonymous JSON task never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(anon_task.status, TaskStatus::Complete);
    let report = engine.digest(partition).unwrap().blocking_recv().unwrap();
    let (_, _, events) = replay(&*log, partition, report.position);
    let rejected: Vec<_> = events
        .iter()
        .filter_map(|e| match e.as_event() {
            Some(Event::TaskRejected(r)) => Some(r.reason.clone()),
            _ => None,
        })
        .collect();
    let bad = rejected
        .iter()
        .filter(|r| matches!(r, RejectReason::Malformed | RejectReason::UnsupportedSchema))
        .count();
    assert!(bad >= 2, "{rejected:?}");
    engine.shutdown();
}

#[test]
fn a_second_engine_on_the_same_partition_fences_the_first() {
    let (_, log) = kafka(1);
    let p = PartitionId(0);
    let a = Engine::new(Arc::clone(&log), registry(), EngineOptions::default(), None).unwrap();
    a.start_partition(p).unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let e = request("slow");
        ids.push(e.task_id);
        a.request_blocking(e).unwrap();
    }
    // B takes the same partition while A is working: B claims a higher epoch.
    let b = Engine::new(Arc::clone(&log), registry(), EngineOptions::default(), None).unwrap();
    b.start_partition(p).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match a.status(p) {
            Some(PartitionStatus::Stopped { error: Some(e) }) => {
                assert!(e.contains("claimed by a newer owner"), "{e}");
                break;
            }
            other => assert!(Instant::now() < deadline, "A was not fenced: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // B finishes everything, including what A had in flight.
    wait_terminal(&b, &ids, Duration::from_secs(60));
    assert!(
        ids.iter()
            .all(|id| b.task(*id).unwrap().status == TaskStatus::Complete)
    );
    let report = b.digest(p).unwrap().blocking_recv().unwrap();
    let (state, _, events) = replay(&*log, p, report.position);
    assert_eq!(state.digest(), report.digest);
    // Whatever A wrote after B's claim was ignored by the fold, not applied twice.
    let claims = events
        .iter()
        .filter(|e| matches!(e.body, tasker_engine::record::Body::Control(_)))
        .count();
    assert_eq!(claims, 2, "one claim per owner");
    let mut applied = std::collections::HashSet::new();
    let mut fold = State::default();
    for e in &events {
        if matches!(fold.apply(e), tasker_engine::state::Applied::Event)
            && let Some(Event::StepCompleted(c)) = e.as_event()
        {
            assert!(
                applied.insert((e.task_id, c.step, c.attempt)),
                "applied twice: {e:?}"
            );
        }
    }
    drop(a);
    b.shutdown();
}
