//! Subscribers and the JSON mirror on a live Kafka-protocol broker
//! (`TASKER_KAFKA_BROKERS`; `scripts/test` starts one): consumer-group commits,
//! resuming after a restart, and every event mirrored as a CloudEvent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tasker_engine::log::kafka::{KafkaLog, KafkaLogConfig};
use tasker_engine::log::{Log, partition_for_task};
use tasker_engine::mirror::Mirror;
use tasker_engine::record::{
    Body, CorrelationId, Envelope, Epoch, Event, PartitionId, Position, RecordType, StepId,
    StepStarted, TaskId, Timestamp,
};
use tasker_engine::runtime::to_record;
use tasker_engine::subscribe::{CursorStore, Filter, KafkaCursors, StartAt, Subscriber};

fn brokers() -> String {
    std::env::var("TASKER_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "TASKER_KAFKA_BROKERS is not set. These tests need a Kafka-protocol broker: run \
             scripts/test (it installs and starts Nisshi), or start one and export \
             TASKER_KAFKA_BROKERS=127.0.0.1:9092"
        )
    })
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

fn config(topic: &str) -> KafkaLogConfig {
    let mut c = KafkaLogConfig::new(&brokers(), topic, 2);
    c.linger_ms = 1;
    c
}

fn event(task: TaskId, event: Event) -> Envelope {
    Envelope {
        task_id: task,
        correlation_id: CorrelationId::from_uuid(*task.as_uuid()),
        source_position: None,
        epoch: Epoch(1),
        at: Timestamp::now(),
        body: Body::Event(event),
    }
}

/// Appends, for each task, `task.started`, `step.started` and `task.completed`
/// (namespace `ns`) to its partition; returns the tasks.
fn write(log: &dyn Log, n: usize, ns: &str) -> Vec<TaskId> {
    let mut by_partition: BTreeMap<PartitionId, Vec<_>> = BTreeMap::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = TaskId::generate();
        ids.push(id);
        let p = partition_for_task(id, log.partitions());
        for e in [
            Event::TaskStarted,
            Event::StepStarted(StepStarted {
                step: StepId(0),
                attempt: 1,
            }),
            Event::TaskCompleted,
        ] {
            let record = to_record(
                &event(id, e),
                Some(Bytes::from(ns.to_owned())),
                &mut Vec::new(),
            )
            .unwrap();
            by_partition.entry(p).or_default().push(record);
        }
    }
    for (p, records) in by_partition {
        log.writer(p).unwrap().append(&records).unwrap();
    }
    ids
}

fn partitions() -> Vec<PartitionId> {
    vec![PartitionId(0), PartitionId(1)]
}

#[test]
fn a_kafka_subscriber_commits_to_its_consumer_group_and_resumes_there() {
    let topic = unique("tasker-sub");
    let cfg = config(&topic);
    let log: Arc<dyn Log> = Arc::new(KafkaLog::open(cfg.clone()).unwrap());
    let ids = write(&*log, 40, "shop");
    write(&*log, 10, "billing");
    let name = unique("subscriber");
    let filter = Filter::parse(&["task.completed".into()], &["shop".into()]).unwrap();
    let open = |start| {
        Subscriber::open(
            &name,
            Arc::clone(&log),
            &partitions(),
            filter.clone(),
            start,
            Box::new(KafkaCursors::new(&cfg, &name).unwrap()),
        )
        .unwrap()
    };
    let mut sub = open(StartAt::Earliest);
    let mut first = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.len() < 20 {
        assert!(Instant::now() < deadline, "got {} deliveries", first.len());
        first.extend(sub.poll(5, Duration::from_millis(200)).unwrap());
    }
    let committed = first[10].clone();
    sub.commit_delivery(&committed).unwrap();
    drop(sub);

    // The group's offsets are on the broker.
    let mut cursors = KafkaCursors::new(&cfg, &name).unwrap();
    let stored = cursors.load(&partitions()).unwrap();
    assert_eq!(
        stored.get(&committed.partition),
        Some(&committed.position.next()),
        "{stored:?}"
    );

    let mut sub = open(StartAt::Earliest);
    let mut all: Vec<_> = first
        .iter()
        .filter(|d| d.partition == committed.partition && d.position <= committed.position)
        .cloned()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while all.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "got {} of {}",
            all.len(),
            ids.len()
        );
        all.extend(sub.poll(100, Duration::from_millis(200)).unwrap());
    }
    assert!(
        sub.poll(100, Duration::from_millis(500))
            .unwrap()
            .is_empty()
    );
    let mut got: Vec<TaskId> = all.iter().map(|d| d.envelope.task_id).collect();
    got.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(got, want, "each shop task's completion exactly once");
    assert!(
        all.iter()
            .all(|d| d.envelope.record_type() == RecordType::TaskCompleted)
    );
}

#[test]
fn the_mirror_publishes_every_event_as_a_cloud_event() {
    let topic = unique("tasker-log");
    let mirror_topic = unique("tasker-events-json");
    let cfg = config(&topic);
    let log: Arc<dyn Log> = Arc::new(KafkaLog::open(cfg.clone()).unwrap());
    let ids = write(&*log, 30, "shop");
    let mirror = Mirror::start(Arc::clone(&log), &cfg, &mirror_topic, partitions).unwrap();
    let mirrored = KafkaLog::open(config(&mirror_topic)).unwrap();
    let mut events: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut readers: Vec<_> = partitions()
        .into_iter()
        .map(|p| mirrored.reader(p, Position(0)).unwrap())
        .collect();
    while events.len() < ids.len() * 3 {
        assert!(
            Instant::now() < deadline,
            "mirrored {} of {}",
            events.len(),
            ids.len() * 3
        );
        for r in &mut readers {
            for rec in r.poll(1000, Duration::from_millis(100)).unwrap() {
                events.push(serde_json::from_slice(&rec.record.payload).unwrap());
            }
        }
    }
    // Every event once (ids are unique), in order per task, with its data.
    let mut seen = std::collections::HashSet::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for e in &events {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["datacontenttype"], "application/json");
        assert!(
            e["source"]
                .as_str()
                .unwrap()
                .starts_with(&format!("tasker://{topic}/"))
        );
        assert!(
            seen.insert(e["id"].as_str().unwrap().to_owned()),
            "duplicate {e}"
        );
        assert_eq!(e["data"]["task_id"], e["subject"]);
        assert_eq!(e["taskernamespace"], "shop");
        order
            .entry(e["subject"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(order.len(), ids.len());
    for types in order.values() {
        assert_eq!(types, &["task.started", "step.started", "task.completed"]);
    }
    // Offsets are committed once delivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = KafkaCursors::new(&cfg, tasker_engine::mirror::GROUP)
            .unwrap()
            .load(&partitions())
            .unwrap();
        let done = partitions()
            .iter()
            .all(|p| stored.get(p) == Some(&log.end(*p).unwrap()));
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "mirror offsets {stored:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(mirror.published() >= (ids.len() * 3) as u64);
}
