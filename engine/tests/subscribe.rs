//! Subscribers on the embedded log: filters by type and namespace receive exactly
//! the matching events, in log order per task, while the engine runs; a
//! subscriber that stops resumes from its committed positions (cursor file)
//! without losing any.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tasker_engine::codec;
use tasker_engine::handler::HandlerRegistry;
use tasker_engine::log::Log;
use tasker_engine::log::file::{FileLog, FileLogConfig};
use tasker_engine::record::{
    Command, CorrelationId, Envelope, Event, Kind, PartitionId, Position, RawJson, RecordType,
    RequestTask, TaskId, Timestamp,
};
use tasker_engine::registry::TemplateRegistry;
use tasker_engine::runtime::{Engine, EngineOptions};
use tasker_engine::subscribe::{Delivery, Filter, StartAt, Subscriber};

const TEMPLATES: &[(&str, &str)] = &[
    (
        "flaky",
        "
namespace: shop
name: flaky
version: 1.0.0
steps:
  - { name: a, handler: noop }
  - name: b
    handler: fail
    depends_on: [a]
    retry_limit: 3
    backoff: { initial: 2ms, max: 5ms }
    config: { times: 1 }
  - { name: c, handler: noop, depends_on: [b] }
",
    ),
    (
        "other",
        "
namespace: billing
name: flaky
version: 1.0.0
steps:
  - name: a
    handler: fail
    retry_limit: 2
    backoff: { initial: 2ms }
    config: { times: 1 }
",
    ),
];

fn start(dir: &std::path::Path) -> Engine {
    let handlers = Arc::new(HandlerRegistry::with_builtins());
    let registry = Arc::new(TemplateRegistry::new(handlers, None));
    for (name, yaml) in TEMPLATES {
        registry.add_yaml(yaml, name).unwrap();
    }
    let log: Arc<dyn Log> = Arc::new(
        FileLog::open(
            dir.join("log"),
            FileLogConfig {
                partitions: 3,
                ..FileLogConfig::default()
            },
        )
        .unwrap(),
    );
    Engine::start(log, registry, EngineOptions::default(), None).unwrap()
}

fn submit(engine: &Engine, ns: &str, n: usize) -> Vec<TaskId> {
    (0..n)
        .map(|i| {
            let id = TaskId::generate();
            let env = Envelope::command(
                id,
                CorrelationId::generate(),
                Timestamp::now(),
                Command::RequestTask(RequestTask {
                    namespace: ns.into(),
                    name: "flaky".into(),
                    context: RawJson::from_trusted(format!(r#"{{"i":{i}}}"#)),
                    ..RequestTask::default()
                }),
            );
            engine.submit(env).unwrap();
            id
        })
        .collect()
}

fn wait_terminal(engine: &Engine, ids: &[TaskId]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids
        .iter()
        .any(|id| engine.task(*id).is_none_or(|t| !t.status.is_terminal()))
    {
        assert!(Instant::now() < deadline, "tasks did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The expected deliveries, from the decoded log (not the headers the filter uses).
fn expected(log: &dyn Log, types: &BTreeSet<RecordType>, ns: &str) -> Vec<(PartitionId, Position)> {
    let mut out = Vec::new();
    for p in 0..log.partitions() {
        let p = PartitionId(p);
        let mut namespaces: HashMap<TaskId, String> = HashMap::new();
        let end = log.end(p).unwrap();
        let mut reader = log.reader(p, Position(0)).unwrap();
        while reader.position() < end {
            for rec in reader.poll(10_000, Duration::from_millis(100)).unwrap() {
                let env = codec::decode(&rec.record.payload).unwrap();
                if let Some(Event::TaskAccepted(a)) = env.as_event() {
                    namespaces.insert(env.task_id, a.request.namespace.clone());
                }
                if env.kind() == Kind::Event
                    && types.contains(&env.record_type())
                    && namespaces.get(&env.task_id).is_some_and(|n| n == ns)
                {
                    out.push((p, rec.position));
                }
            }
        }
    }
    out.sort();
    out
}

fn drain(sub: &mut Subscriber, until: usize, got: &mut Vec<Delivery>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < until {
        assert!(
            Instant::now() < deadline,
            "only {} of {until} deliveries",
            got.len()
        );
        got.extend(sub.poll(7, Duration::from_millis(50)).unwrap());
    }
}

fn positions(got: &[Delivery]) -> Vec<(PartitionId, Position)> {
    let mut v: Vec<_> = got.iter().map(|d| (d.partition, d.position)).collect();
    v.sort();
    v
}

#[test]
fn filtered_subscribers_get_exactly_their_events_and_resume_from_their_cursor() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = start(dir.path());
    let types: BTreeSet<RecordType> = [RecordType::StepFailed, RecordType::TaskCompleted].into();
    let filter = Filter::parse(&["step.failed,task.completed".into()], &["shop".into()]).unwrap();
    assert_eq!(filter.types.as_ref(), Some(&types));
    // Subscribed before anything happens: follows the engine live.
    let mut sub = Subscriber::embedded(
        "audit-trail",
        Arc::clone(engine.log()),
        dir.path(),
        filter.clone(),
        StartAt::Earliest,
    )
    .unwrap();
    let mut ids = submit(&engine, "shop", 60);
    ids.extend(submit(&engine, "billing", 30));
    wait_terminal(&engine, &ids);
    let log = Arc::clone(engine.log());
    let want = expected(&*log, &types, "shop");
    // 60 shop tasks: one step.failed and one task.completed each.
    assert_eq!(want.len(), 120);

    // First run: take half, commit a point inside it, then "crash".
    let mut first = Vec::new();
    drain(&mut sub, want.len() / 2, &mut first);
    let committed = first[first.len() / 3].clone();
    sub.commit_delivery(&committed).unwrap();
    let cursor = std::fs::read_to_string(dir.path().join("cursors/audit-trail")).unwrap();
    assert!(
        cursor.contains(&format!(
            "{}={}",
            committed.partition.0,
            committed.position.0 + 1
        )),
        "{cursor}"
    );
    drop(sub);

    // Second run resumes from the cursor; partitions never committed start where
    // the subscription says (the start applies to them only).
    let mut sub = Subscriber::embedded(
        "audit-trail",
        Arc::clone(&log),
        dir.path(),
        filter.clone(),
        StartAt::Earliest,
    )
    .unwrap();
    let resumed = BTreeMap::from([(committed.partition, committed.position.next())]);
    assert_eq!(sub.committed(), &resumed);
    let before: Vec<Delivery> = first
        .iter()
        .filter(|d| d.partition == committed.partition && d.position <= committed.position)
        .cloned()
        .collect();
    let mut second = Vec::new();
    drain(&mut sub, want.len() - before.len(), &mut second);
    assert!(sub.poll(10, Duration::from_millis(100)).unwrap().is_empty());
    let mut all = before;
    all.extend(second.iter().cloned());
    assert_eq!(positions(&all), want, "lost or duplicated events");

    // Exactly the matching events, decoded, in log order per task.
    let mut last: HashMap<TaskId, Position> = HashMap::new();
    for d in &second {
        assert!(types.contains(&d.envelope.record_type()));
        assert_eq!(d.record.headers.namespace.as_deref(), Some(&b"shop"[..]));
        assert_eq!(d.envelope.task_id, d.record.key);
        if let Some(prev) = last.insert(d.envelope.task_id, d.position) {
            assert!(
                prev < d.position,
                "task {} out of order",
                d.envelope.task_id
            );
        }
        let ce = d.cloud_event("tasker.log");
        assert_eq!(ce.id, format!("{}-{}", d.partition.0, d.position.0));
        assert_eq!(ce.kind, d.envelope.record_type().name());
    }
    sub.commit_polled().unwrap();

    // A subscriber that started at the end saw nothing of the past, and a new
    // event (the one completion still to come) arrives live.
    let mut late = Subscriber::embedded(
        "late",
        Arc::clone(&log),
        dir.path(),
        filter,
        StartAt::Latest,
    )
    .unwrap();
    assert!(
        late.poll(100, Duration::from_millis(50))
            .unwrap()
            .is_empty()
    );
    let more = submit(&engine, "shop", 1);
    wait_terminal(&engine, &more);
    let mut got = Vec::new();
    drain(&mut late, 2, &mut got);
    assert!(got.iter().all(|d| d.envelope.task_id == more[0]));
    let mut got = Vec::new();
    drain(&mut sub, 2, &mut got);
    assert!(got.iter().all(|d| d.envelope.task_id == more[0]));

    // Everything (no filter) is every event; a time start skips the past.
    let mut everything = Subscriber::open(
        "all",
        Arc::clone(&log),
        &(0..3).map(PartitionId).collect::<Vec<_>>(),
        Filter::default(),
        StartAt::Time(Timestamp::now().saturating_add_ms(60_000)),
        Box::new(tasker_engine::subscribe::NoCursors),
    )
    .unwrap();
    assert!(
        everything
            .poll(100, Duration::from_millis(50))
            .unwrap()
            .is_empty()
    );
    engine.shutdown();
}

#[test]
fn a_subscriber_stopping_inside_a_batch_commits_what_it_took_in_every_partition() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = start(dir.path());
    let ids = submit(&engine, "shop", 30);
    wait_terminal(&engine, &ids);
    let filter = Filter::parse(&["task.completed".into()], &[]).unwrap();
    let open = || {
        Subscriber::embedded(
            "limited",
            Arc::clone(engine.log()),
            dir.path(),
            filter.clone(),
            StartAt::Earliest,
        )
        .unwrap()
    };
    let mut sub = open();
    let mut got = Vec::new();
    drain(&mut sub, ids.len(), &mut got);
    // A prefix that reaches into a second partition: what a `tail --limit` took.
    let second = got
        .iter()
        .position(|d| d.partition != got[0].partition)
        .expect("deliveries from more than one partition");
    let taken = &got[..=second + 1];
    sub.commit_deliveries(taken).unwrap();
    drop(sub);
    let mut want = BTreeMap::new();
    for d in taken {
        want.insert(d.partition, d.position.next());
    }
    assert!(want.len() >= 2);
    let mut sub = open();
    assert_eq!(sub.committed(), &want);
    // The next run gets exactly the rest: nothing twice, nothing lost.
    let mut rest = Vec::new();
    drain(&mut sub, ids.len() - taken.len(), &mut rest);
    assert!(sub.poll(10, Duration::from_millis(100)).unwrap().is_empty());
    let mut all = positions(taken);
    all.extend(positions(&rest));
    all.sort_unstable();
    let mut expected = positions(&got);
    expected.sort_unstable();
    assert_eq!(all, expected);
}
