//! The read model's queries: every question answered on hand-built event streams
//! with known answers, on PostgreSQL and SQLite alike; and a conformance property
//! test (random DAGs and outcomes run through `decide` and the fold, projected
//! into both stores) proving SQL readiness equals `TaskState::is_step_ready` and
//! that both stores answer every question identically.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use tasker_engine::decide::{Input, Resolution, decide};
use tasker_engine::record::{
    BackoffSpec, Body, CancelTask, Command, CorrelationId, Envelope, Epoch, Event, PartitionId,
    Position, RawJson, RequestTask, ResolveStep, RetryTask, StepCancelled, StepCompleted,
    StepError, StepErrorKind, StepFailed, StepId, StepOutcome, StepResolvedManually, StepSkipped,
    StepSpec, StepStarted, TaskAccepted, TaskCancelled, TaskFailed, TaskId, TemplateSnapshot,
    Timestamp,
};
use tasker_engine::state::{Applied, Dag, State, StepStatus, TaskStatus};
use tasker_projections::batch::Batch;
use tasker_projections::{
    AnalyticsMetrics, DependencyLevel, ExecutionContext, HealthCounts, SlowestFilter, Store,
};

use common::TestDb;

const PROJECTOR: &str = "read_model";
const T0: u64 = 1_700_000_000_000;

fn at(offset: u64) -> Timestamp {
    Timestamp(T0 + offset)
}

// ---------------------------------------------------------------------------
// Stores
// ---------------------------------------------------------------------------

/// A fresh PostgreSQL database and a fresh SQLite file, both migrated.
struct Stores {
    db: TestDb,
    _dir: tempfile::TempDir,
    pg: Store,
    lite: Store,
    /// The next log position to project.
    next: u64,
}

impl Stores {
    async fn new() -> Stores {
        let db = TestDb::new().await;
        let pg = Store::open(&db.url).await.unwrap();
        pg.migrate().await.unwrap();
        let dir = tempfile::TempDir::new().unwrap();
        let lite = Store::open(&format!("sqlite://{}", dir.path().join("rm.db").display()))
            .await
            .unwrap();
        lite.migrate().await.unwrap();
        Stores {
            db,
            _dir: dir,
            pg,
            lite,
            next: 0,
        }
    }

    fn both(&self) -> [&Store; 2] {
        [&self.pg, &self.lite]
    }

    /// Projects `records` (log positions continue from the last call) into both
    /// stores, in batches of `batch` records.
    async fn project(&mut self, records: &[Envelope], batch: usize) {
        for chunk in records.chunks(batch.max(1)) {
            let start = Position(self.next);
            let mut b = Batch::new(PartitionId(0), start, Epoch(0));
            for (i, env) in chunk.iter().enumerate() {
                b.add(Position(self.next + i as u64), Some(env));
            }
            for store in self.both() {
                store.apply(PROJECTOR, start, &b).await.unwrap();
            }
            self.next += chunk.len() as u64;
        }
    }

    async fn reset(&mut self) {
        for store in self.both() {
            store.reset(PROJECTOR).await.unwrap();
        }
        self.next = 0;
    }

    async fn drop_db(self) {
        self.db.drop_db().await;
    }
}

// ---------------------------------------------------------------------------
// Hand-built event streams
// ---------------------------------------------------------------------------

fn step_spec(name: &str, parents: &[u32], retryable: bool, retry_limit: u32) -> StepSpec {
    StepSpec {
        name: name.into(),
        handler: "noop".into(),
        depends_on: parents.iter().map(|&p| StepId(p)).collect(),
        retryable,
        retry_limit,
        timeout_ms: 1_000,
        backoff: BackoffSpec::default(),
        config: RawJson::empty_object(),
    }
}

/// shop/order@1.0.0: validate -> (charge, reserve) -> ship -> notify.
fn order() -> Arc<TemplateSnapshot> {
    Arc::new(TemplateSnapshot {
        namespace: "shop".into(),
        name: "order".into(),
        version: "1.0.0".into(),
        steps: vec![
            step_spec("validate", &[], true, 3),
            step_spec("charge", &[0], true, 3),
            step_spec("reserve", &[0], true, 3),
            step_spec("ship", &[1, 2], true, 3),
            step_spec("notify", &[3], false, 1),
        ],
    })
}

/// ops/cleanup@2.0.0: scan -> purge.
fn cleanup() -> Arc<TemplateSnapshot> {
    Arc::new(TemplateSnapshot {
        namespace: "ops".into(),
        name: "cleanup".into(),
        version: "2.0.0".into(),
        steps: vec![
            step_spec("scan", &[], true, 1),
            step_spec("purge", &[0], true, 2),
        ],
    })
}

/// Records of one task, in log order.
struct TaskLog {
    id: TaskId,
    correlation: CorrelationId,
    records: Vec<Envelope>,
}

impl TaskLog {
    fn new(n: u64) -> TaskLog {
        TaskLog {
            // v7 ids whose time part orders them: A < B < ... as the stores sort.
            id: TaskId::v7(at(n), u128::from(n)),
            correlation: CorrelationId::from_uuid(uuid::Uuid::from_u128(0xC0 + u128::from(n))),
            records: Vec::new(),
        }
    }

    fn event(&mut self, t: u64, event: Event) -> &mut Self {
        self.records.push(Envelope {
            task_id: self.id,
            correlation_id: self.correlation,
            source_position: None,
            epoch: Epoch(0),
            at: at(t),
            body: Body::Event(event),
        });
        self
    }

    fn accepted(&mut self, t: u64, template: Arc<TemplateSnapshot>, context: &str) -> &mut Self {
        let request = RequestTask {
            namespace: template.namespace.clone(),
            name: template.name.clone(),
            version: Some(template.version.clone()),
            context: RawJson::parse(context).unwrap(),
            initiator: Some("test".into()),
            tags: vec!["t1".into()],
            ..RequestTask::default()
        };
        self.event(t, Event::TaskAccepted(TaskAccepted { request, template }))
    }

    fn started(&mut self, t: u64, step: u32, attempt: u32) -> &mut Self {
        self.event(
            t,
            Event::StepStarted(StepStarted {
                step: StepId(step),
                attempt,
            }),
        )
    }

    fn completed(&mut self, t: u64, step: u32, attempt: u32) -> &mut Self {
        self.event(
            t,
            Event::StepCompleted(StepCompleted {
                step: StepId(step),
                attempt,
                result: RawJson::parse(&format!("{{\"ok\": true, \"step\": {step}}}")).unwrap(),
            }),
        )
    }

    fn failed(&mut self, t: u64, step: u32, error: StepError, retry_at: Option<u64>) -> &mut Self {
        self.event(
            t,
            Event::StepFailed(StepFailed {
                step: StepId(step),
                attempt: 1,
                error,
                retry_at: retry_at.map(at),
            }),
        )
    }
}

/// Seven tasks, one per situation the questions distinguish (times are offsets
/// from T0, in ms):
/// - A (order): validate done, charge failed and waits for its retry at 5250,
///   reserve done; ship and notify wait for charge.
/// - B (order): complete, requested at 200, finished at 3305.
/// - C (cleanup): scan failed for good (attempts exhausted); the task failed.
/// - D (order): cancelled before anything ran.
/// - E (cleanup): scan is running.
/// - F (cleanup): scan failed, then resolved by hand with purge skipped.
/// - G (order): just accepted; validate is ready.
fn world() -> (Vec<TaskId>, Vec<Envelope>) {
    let mut logs: Vec<TaskLog> = (1..=7).map(TaskLog::new).collect();
    let declined = StepError {
        kind: StepErrorKind::Retryable,
        message: "card declined".into(),
        retry_after_ms: Some(5_000),
    };
    logs[0]
        .accepted(100, order(), r#"{"order": 1}"#)
        .event(110, Event::TaskStarted)
        .started(110, 0, 1)
        .completed(210, 0, 1)
        .started(220, 1, 1)
        .started(220, 2, 1)
        .failed(250, 1, declined, Some(5_250))
        .completed(520, 2, 1);
    logs[1]
        .accepted(200, order(), r#"{"order": 2}"#)
        .event(300, Event::TaskStarted)
        .started(300, 0, 1)
        .completed(350, 0, 1)
        .started(400, 1, 1)
        .started(400, 2, 1)
        .completed(410, 2, 1)
        .completed(2_400, 1, 1)
        .started(2_500, 3, 1)
        .completed(3_200, 3, 1)
        .started(3_300, 4, 1)
        .completed(3_305, 4, 1)
        .event(3_305, Event::TaskCompleted);
    logs[2]
        .accepted(300, cleanup(), r#"{"dir": "/tmp"}"#)
        .event(400, Event::TaskStarted)
        .started(400, 0, 1)
        .failed(900, 0, StepError::permanent("disk gone"), None)
        .event(
            900,
            Event::TaskFailed(TaskFailed {
                failed_steps: vec![StepId(0)],
            }),
        );
    logs[3].accepted(400, order(), r#"{"order": 4}"#);
    for step in 0..5 {
        logs[3].event(
            450,
            Event::StepCancelled(StepCancelled { step: StepId(step) }),
        );
    }
    logs[3].event(
        450,
        Event::TaskCancelled(TaskCancelled {
            requested_by: Some("ops".into()),
            reason: None,
        }),
    );
    logs[4]
        .accepted(500, cleanup(), r#"{"dir": "/var"}"#)
        .event(950, Event::TaskStarted)
        .started(950, 0, 1);
    logs[5]
        .accepted(600, cleanup(), r#"{"dir": "/srv"}"#)
        .event(700, Event::TaskStarted)
        .started(700, 0, 1)
        .failed(800, 0, StepError::permanent("locked"), None)
        .event(
            800,
            Event::TaskFailed(TaskFailed {
                failed_steps: vec![StepId(0)],
            }),
        )
        .event(
            1_500,
            Event::StepResolvedManually(StepResolvedManually {
                step: StepId(0),
                result: RawJson::parse(r#"{"by": "hand"}"#).unwrap(),
                resolved_by: Some("ops".into()),
                reason: Some("unlocked".into()),
            }),
        )
        .event(
            1_500,
            Event::StepSkipped(StepSkipped {
                step: StepId(1),
                reason: "scan resolved with skip_dependents".into(),
            }),
        )
        .event(1_500, Event::TaskResolvedManually);
    logs[6].accepted(900, order(), r#"{"order": 7}"#);
    let ids = logs.iter().map(|l| l.id).collect();
    // Interleave the tasks by time, as a partition would hold them.
    let mut records: Vec<Envelope> = logs.into_iter().flat_map(|l| l.records).collect();
    records.sort_by_key(|e| e.at);
    (ids, records)
}

/// `tasker run` on Kafka opens the default SQLite read model before anything
/// else has written under the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_read_model_is_created_with_its_missing_directories() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir
        .path()
        .join("tasker-data")
        .join("sub")
        .join("read-model.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .expect("open creates the directories");
    store.migrate().await.expect("migrate");
    assert!(path.exists(), "{} was not created", path.display());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for dir in [
            path.parent().unwrap(),
            path.parent().unwrap().parent().unwrap(),
        ] {
            let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is readable by others", dir.display());
        }
    }
}

/// The moment most questions are asked at: after everything above, before A's
/// retry is due.
const NOW: u64 = 4_000;

/// task, step, state, dependencies satisfied, retry eligible, ready, parents, done.
type Summary<'a> = (TaskId, u32, &'a str, bool, bool, bool, u32, u32);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_levels_and_rows_on_a_known_log() {
    let mut stores = Stores::new().await;
    let (ids, records) = world();
    // Batches that cut tasks in the middle, so rows are patched across batches.
    stores.project(&records, 9).await;
    let [a, _b, c, _d, e, _f, g] = ids[..] else {
        unreachable!()
    };
    for store in stores.both() {
        let kind = store.kind();
        // --- readiness: A waits for charge's retry; G's root is ready; E runs.
        let r = store.readiness(&[g, a, e], at(NOW)).await.unwrap();
        let summary: Vec<Summary> = r
            .iter()
            .map(|s| {
                (
                    s.task_id,
                    s.step_index,
                    s.current_state.as_str(),
                    s.dependencies_satisfied,
                    s.retry_eligible,
                    s.ready_for_execution,
                    s.total_parents,
                    s.completed_parents,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (a, 0, "complete", true, false, false, 0, 0),
                (a, 1, "error", true, false, false, 1, 1),
                (a, 2, "complete", true, false, false, 1, 1),
                (a, 3, "pending", false, true, false, 2, 1),
                (a, 4, "pending", false, true, false, 1, 0),
                (e, 0, "in_progress", true, false, false, 0, 0),
                (e, 1, "pending", false, true, false, 1, 0),
                (g, 0, "pending", true, true, true, 0, 0),
                (g, 1, "pending", false, true, false, 1, 0),
                (g, 2, "pending", false, true, false, 1, 0),
                (g, 3, "pending", false, true, false, 2, 0),
                (g, 4, "pending", false, true, false, 1, 0),
            ],
            "{kind}"
        );
        let charge = &r[1];
        assert_eq!(charge.name, "charge");
        assert_eq!(charge.attempts, 1);
        assert_eq!(charge.retry_limit, 3);
        assert_eq!(charge.last_attempted_at, Some(at(220)));
        assert_eq!(charge.last_failure_at, Some(at(250)));
        assert_eq!(charge.next_retry_at, Some(at(5_250)));
        assert_eq!(charge.backoff_request_seconds, Some(5), "{kind}");
        assert_eq!(r[0].last_failure_at, None);
        // The backoff boundary: due exactly at next_retry_at, not a ms before.
        let before = store.readiness(&[a], at(5_249)).await.unwrap();
        assert!(!before[1].retry_eligible && !before[1].ready_for_execution);
        let due = store.readiness(&[a], at(5_250)).await.unwrap();
        assert!(
            due[1].retry_eligible && due[1].ready_for_execution,
            "{kind}"
        );
        assert!(!due[3].ready_for_execution, "ship still waits for charge");
        // A failed task: nothing is ready, not even the pending purge; a
        // permanent failure is never retry-eligible.
        let failed = store.readiness(&[c], at(1_000_000)).await.unwrap();
        assert_eq!(failed.len(), 2);
        assert!(failed.iter().all(|s| !s.ready_for_execution));
        assert!(!failed[0].retry_eligible && failed[1].retry_eligible);
        assert!(
            store
                .readiness(&[TaskId::v7(at(99), 99)], at(NOW))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.readiness(&[], at(NOW)).await.unwrap().is_empty());

        // --- dependency levels: longest path from a root.
        let levels = |v: Vec<DependencyLevel>| -> Vec<(u32, String, u32)> {
            v.into_iter()
                .map(|l| (l.step_index, l.name, l.level))
                .collect()
        };
        assert_eq!(
            levels(store.dependency_levels(a).await.unwrap()),
            vec![
                (0, "validate".into(), 0),
                (1, "charge".into(), 1),
                (2, "reserve".into(), 1),
                (3, "ship".into(), 2),
                (4, "notify".into(), 3),
            ],
            "{kind}"
        );
        assert_eq!(
            levels(store.dependency_levels(c).await.unwrap()),
            vec![(0, "scan".into(), 0), (1, "purge".into(), 1)]
        );
        assert!(
            store
                .dependency_levels(TaskId::v7(at(99), 99))
                .await
                .unwrap()
                .is_empty()
        );

        // --- the task and step rows.
        let task = store.task(a).await.unwrap().unwrap();
        assert_eq!(
            (
                task.namespace.as_str(),
                task.name.as_str(),
                task.version.as_str(),
                task.status.as_str()
            ),
            ("shop", "order", "1.0.0", "in_progress")
        );
        assert_eq!(task.context, serde_json::json!({"order": 1}));
        assert_eq!(
            (task.requested_at, task.started_at, task.completed_at),
            (at(100), Some(at(110)), None)
        );
        assert_eq!(task.initiator.as_deref(), Some("test"));
        assert_eq!(task.tags, vec!["t1".to_owned()]);
        assert_eq!(
            task.correlation_id,
            uuid::Uuid::from_u128(0xC0 + 1),
            "{kind}"
        );
        assert_eq!((task.log_partition, task.log_position), (0, 0));
        assert_eq!(task.updated_at, at(110));
        assert!(store.task(TaskId::v7(at(99), 99)).await.unwrap().is_none());
        let steps = store.steps(a).await.unwrap();
        assert_eq!(steps.len(), 5);
        let s0 = &steps[0];
        assert_eq!(
            (
                s0.status.as_str(),
                s0.duration_ms,
                s0.started_at,
                s0.completed_at
            ),
            ("complete", Some(100), Some(at(110)), Some(at(210)))
        );
        assert_eq!(s0.results, Some(serde_json::json!({"ok": true, "step": 0})));
        let s1 = &steps[1];
        assert_eq!(
            (
                s1.status.as_str(),
                s1.attempts,
                s1.retryable,
                s1.duration_ms
            ),
            ("error", 1, true, None)
        );
        assert_eq!(
            s1.error,
            Some(serde_json::json!({
                "kind": "retryable", "message": "card declined",
                "retry_after_ms": 5000, "attempt": 1
            })),
            "{kind}"
        );
        assert_eq!(s1.next_retry_at, Some(at(5_250)));
        assert_eq!(s1.updated_at, at(250));
        assert!(!steps[4].retryable);
        assert_eq!(steps[4].retry_limit, 1);
    }
    // Logs the engine would not write, where only parts of the rule decide: a
    // retry scheduled for a step that is not retryable, or that has no attempts
    // left. Neither is eligible, as in `TaskState::is_step_ready`.
    let edge = Arc::new(TemplateSnapshot {
        namespace: "ops".into(),
        name: "edge".into(),
        version: "1.0.0".into(),
        steps: vec![
            step_spec("final", &[], false, 3),
            step_spec("spent", &[], true, 1),
            step_spec("fine", &[], true, 2),
        ],
    });
    let mut h = TaskLog::new(8);
    h.accepted(5_000, edge, "{}")
        .event(5_000, Event::TaskStarted)
        .started(5_000, 0, 1)
        .started(5_000, 1, 1)
        .started(5_000, 2, 1)
        .failed(5_010, 0, StepError::retryable("x"), Some(5_100))
        .failed(5_010, 1, StepError::retryable("y"), Some(5_100))
        .failed(5_010, 2, StepError::retryable("z"), Some(5_100));
    stores.project(&h.records, 4).await;
    let mut engine = State::new(u64::MAX);
    for env in &h.records {
        assert_eq!(engine.apply(env), Applied::Event);
    }
    let task = engine.task(&h.id).unwrap();
    for store in stores.both() {
        let r = store.readiness(&[h.id], at(6_000)).await.unwrap();
        let eligible: Vec<bool> = r.iter().map(|s| s.retry_eligible).collect();
        assert_eq!(eligible, vec![false, false, true], "{}", store.kind());
        for s in &r {
            assert_eq!(
                s.ready_for_execution,
                task.is_step_ready(StepId(s.step_index), at(6_000)),
                "{} step {}",
                store.kind(),
                s.step_index
            );
        }
    }
    // Both stores hold the same rows.
    for id in &ids {
        assert_eq!(
            stores.pg.task(*id).await.unwrap(),
            stores.lite.task(*id).await.unwrap()
        );
        assert_eq!(
            stores.pg.steps(*id).await.unwrap(),
            stores.lite.steps(*id).await.unwrap()
        );
    }
    stores.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_health_and_execution_context_on_a_known_log() {
    let mut stores = Stores::new().await;
    // An empty read model: nothing happened, nothing failed.
    for store in stores.both() {
        let empty = store.analytics(at(0), at(NOW)).await.unwrap();
        assert_eq!(
            empty,
            AnalyticsMetrics {
                active_tasks_count: 0,
                total_namespaces_count: 0,
                unique_task_types_count: 0,
                system_health_score: 1.0,
                task_throughput: 0,
                completion_count: 0,
                error_count: 0,
                completion_rate: 0.0,
                error_rate: 0.0,
                step_throughput: 0,
                step_success_rate: 1.0,
                avg_task_duration_ms: None,
                avg_step_duration_ms: None,
                period_start: at(0),
                calculated_at: at(NOW),
            },
            "{}",
            store.kind()
        );
        assert_eq!(store.health_counts(at(NOW)).await.unwrap().total_tasks, 0);
    }
    let (ids, records) = world();
    stores.project(&records, 1_000).await;
    let [a, b, c, d, e, f, g] = ids[..] else {
        unreachable!()
    };
    for store in stores.both() {
        let kind = store.kind();
        // --- analytics: all seven tasks were requested in (T0, NOW].
        let m = store.analytics(at(0), at(NOW)).await.unwrap();
        assert_eq!(
            m,
            AnalyticsMetrics {
                active_tasks_count: 3,     // A, E, G
                total_namespaces_count: 2, // shop, ops
                unique_task_types_count: 2,
                system_health_score: 0.5, // B complete, C error
                task_throughput: 7,
                completion_count: 1,
                error_count: 1,
                completion_rate: 14.29, // 1/7
                error_rate: 14.29,
                // Steps finished in the period: 7 complete, 2 in error (A's
                // charge, C's scan; F's scan failed but is resolved now).
                step_throughput: 9,
                step_success_rate: 0.778,
                // B: 3305 - 200.
                avg_task_duration_ms: Some(3_105),
                // (100 + 300 + 50 + 2000 + 10 + 700 + 5) / 7 = 452.14
                avg_step_duration_ms: Some(452),
                period_start: at(0),
                calculated_at: at(NOW),
            },
            "{kind}"
        );
        // A later window: tasks D (cancelled), E, F and G, none complete or
        // failed; steps finished after 350: A's reserve, B's charge, reserve,
        // ship, notify (300 + 2000 + 10 + 700 + 5 ms) and C's failed scan.
        let late = store.analytics(at(350), at(NOW)).await.unwrap();
        assert_eq!(
            (
                late.task_throughput,
                late.completion_count,
                late.error_count,
                late.completion_rate,
                late.error_rate,
                late.step_throughput,
                late.step_success_rate,
                late.avg_task_duration_ms,
                late.avg_step_duration_ms,
            ),
            (4, 0, 0, 0.0, 0.0, 6, 0.833, None, Some(603)),
            "{kind}"
        );
        // The health score looks at the hour before as_of: nothing requested then.
        let later = store
            .analytics(at(0), at(NOW + 2 * 3_600_000))
            .await
            .unwrap();
        assert_eq!((later.system_health_score, later.task_throughput), (1.0, 7));

        // --- health counts.
        let h = store.health_counts(at(NOW)).await.unwrap();
        assert_eq!(
            h,
            HealthCounts {
                total_tasks: 7,
                pending_tasks: 1,
                in_progress_tasks: 2,
                complete_tasks: 1,
                error_tasks: 1,
                cancelled_tasks: 1,
                resolved_manually_tasks: 1,
                total_steps: 26,
                pending_steps: 9,
                in_progress_steps: 1,
                complete_steps: 7,
                error_steps: 2,
                skipped_steps: 1,
                cancelled_steps: 5,
                resolved_manually_steps: 1,
                retryable_error_steps: 1, // A's charge
                exhausted_retry_steps: 1, // C's scan (1 of 1 attempts)
                in_backoff_steps: 1,      // A's charge until 5250
            },
            "{kind}"
        );
        let due = store.health_counts(at(5_250)).await.unwrap();
        assert_eq!(
            (due.in_backoff_steps, due.retryable_error_steps),
            (0, 1),
            "{kind}"
        );

        // --- execution context.
        let ctx = |c: ExecutionContext| {
            (
                c.status,
                [
                    c.total_steps,
                    c.pending_steps,
                    c.in_progress_steps,
                    c.completed_steps,
                    c.failed_steps,
                    c.ready_steps,
                ],
                c.execution_status,
                c.recommended_action,
                c.completion_percentage,
                c.health_status,
            )
        };
        let s = |x: &str| x.to_owned();
        let cases = [
            (
                a,
                NOW,
                (
                    s("in_progress"),
                    [5, 2, 0, 2, 1, 0],
                    s("waiting_for_dependencies"),
                    s("wait_for_dependencies"),
                    40.0,
                    s("recovering"),
                ),
            ),
            (
                a,
                5_250,
                (
                    s("in_progress"),
                    [5, 2, 0, 2, 1, 1],
                    s("has_ready_steps"),
                    s("execute_ready_steps"),
                    40.0,
                    s("recovering"),
                ),
            ),
            (
                b,
                NOW,
                (
                    s("complete"),
                    [5, 0, 0, 5, 0, 0],
                    s("all_complete"),
                    s("finalize_task"),
                    100.0,
                    s("healthy"),
                ),
            ),
            (
                c,
                NOW,
                (
                    s("error"),
                    [2, 1, 0, 0, 1, 0],
                    s("blocked_by_failures"),
                    s("handle_failures"),
                    0.0,
                    s("blocked"),
                ),
            ),
            (
                d,
                NOW,
                (
                    s("cancelled"),
                    [5, 0, 0, 0, 0, 0],
                    s("waiting_for_dependencies"),
                    s("wait_for_dependencies"),
                    0.0,
                    s("healthy"),
                ),
            ),
            (
                e,
                NOW,
                (
                    s("in_progress"),
                    [2, 1, 1, 0, 0, 0],
                    s("processing"),
                    s("wait_for_completion"),
                    0.0,
                    s("healthy"),
                ),
            ),
            (
                f,
                NOW,
                (
                    s("resolved_manually"),
                    [2, 0, 0, 2, 0, 0],
                    s("all_complete"),
                    s("finalize_task"),
                    100.0,
                    s("healthy"),
                ),
            ),
            (
                g,
                NOW,
                (
                    s("pending"),
                    [5, 5, 0, 0, 0, 1],
                    s("has_ready_steps"),
                    s("execute_ready_steps"),
                    0.0,
                    s("healthy"),
                ),
            ),
        ];
        for (id, when, expected) in cases {
            let got = store
                .execution_context(id, at(when))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got.task_id, id);
            assert_eq!(ctx(got), expected, "{kind}: task {id} at {when}");
        }
        let got = store.execution_context(c, at(NOW)).await.unwrap().unwrap();
        assert_eq!(
            (got.namespace.as_str(), got.task_name.as_str()),
            ("ops", "cleanup")
        );
        assert!(
            store
                .execution_context(TaskId::v7(at(99), 99), at(NOW))
                .await
                .unwrap()
                .is_none()
        );
    }
    stores.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowest_steps_and_tasks_on_a_known_log() {
    let mut stores = Stores::new().await;
    let (ids, records) = world();
    stores.project(&records, 5).await;
    let [a, b, c, d, _e, f, _g] = ids[..] else {
        unreachable!()
    };
    for store in stores.both() {
        let kind = store.kind();
        // --- slowest steps: complete steps by execution time.
        let all = store
            .slowest_steps(&SlowestFilter::default())
            .await
            .unwrap();
        let keys: Vec<(TaskId, u32, i64)> = all
            .iter()
            .map(|s| (s.task_id, s.step_index, s.duration_ms))
            .collect();
        assert_eq!(
            keys,
            vec![
                (b, 1, 2_000),
                (b, 3, 700),
                (a, 2, 300),
                (a, 0, 100),
                (b, 0, 50),
                (b, 2, 10),
                (b, 4, 5),
            ],
            "{kind}"
        );
        let top = &all[0];
        assert_eq!(
            (
                top.step_name.as_str(),
                top.namespace.as_str(),
                top.task_name.as_str(),
                top.version.as_str()
            ),
            ("charge", "shop", "order", "1.0.0")
        );
        assert_eq!(
            (
                top.attempts,
                top.retry_limit,
                top.started_at,
                top.completed_at
            ),
            (1, 3, Some(at(400)), Some(at(2_400)))
        );
        let since = store
            .slowest_steps(&SlowestFilter {
                since: Some(at(500)),
                limit: 3,
                ..SlowestFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(
            since
                .iter()
                .map(|s| (s.task_id, s.step_index))
                .collect::<Vec<_>>(),
            vec![(b, 1), (b, 3), (a, 2)],
            "completed after 500, three slowest: {kind}"
        );
        for (ns, name, version, n) in [
            (Some("ops"), None, None, 0),
            (Some("shop"), Some("order"), Some("1.0.0"), 7),
            (None, Some("order"), Some("2.0.0"), 0),
            (None, None, Some("1.0.0"), 7),
        ] {
            let got = store
                .slowest_steps(&SlowestFilter {
                    namespace: ns.map(str::to_owned),
                    task_name: name.map(str::to_owned),
                    version: version.map(str::to_owned),
                    limit: 100,
                    ..SlowestFilter::default()
                })
                .await
                .unwrap();
            assert_eq!(got.len(), n, "{kind}: {ns:?} {name:?} {version:?}");
        }

        // --- slowest tasks: finished tasks, requested -> finished.
        let all = store
            .slowest_tasks(&SlowestFilter::default())
            .await
            .unwrap();
        let keys: Vec<(TaskId, &str, i64, [u64; 3])> = all
            .iter()
            .map(|t| {
                (
                    t.task_id,
                    t.status.as_str(),
                    t.duration_ms,
                    [t.step_count, t.completed_steps, t.error_steps],
                )
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                (b, "complete", 3_105, [5, 5, 0]),
                (f, "resolved_manually", 900, [2, 0, 0]),
                (c, "error", 600, [2, 0, 1]),
                (d, "cancelled", 50, [5, 0, 0]),
            ],
            "{kind}"
        );
        assert_eq!(
            (
                all[0].requested_at,
                all[0].completed_at,
                all[0].initiator.as_deref()
            ),
            (at(200), at(3_305), Some("test"))
        );
        let ops = store
            .slowest_tasks(&SlowestFilter {
                namespace: Some("ops".into()),
                ..SlowestFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(
            ops.iter().map(|t| t.task_id).collect::<Vec<_>>(),
            vec![f, c]
        );
        let since = store
            .slowest_tasks(&SlowestFilter {
                since: Some(at(1_000)),
                ..SlowestFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(
            since.iter().map(|t| t.task_id).collect::<Vec<_>>(),
            vec![b, f],
            "{kind}"
        );
        let one = store
            .slowest_tasks(&SlowestFilter {
                limit: 1,
                ..SlowestFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(one.len(), 1);
    }
    stores.drop_db().await;
}

// ---------------------------------------------------------------------------
// Conformance: random DAGs and outcomes through decide + the fold
// ---------------------------------------------------------------------------

/// One step of a generated template.
#[derive(Debug, Clone)]
struct StepGen {
    /// Parents, as indexes into the steps before this one (none for step 0).
    parents: Vec<Index>,
    retryable: bool,
    retry_limit: u32,
    initial_ms: u64,
}

#[derive(Debug, Clone)]
struct Scenario {
    templates: Vec<Vec<StepGen>>,
    /// Drives every choice of the run (outcomes, timing, commands, ids).
    seed: u64,
    /// Records per projected batch.
    batch: usize,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let step = (
        vec(any::<Index>(), 0..=3),
        any::<bool>(),
        1..=4u32,
        1..=60u64,
    )
        .prop_map(|(parents, retryable, retry_limit, initial_ms)| StepGen {
            parents,
            retryable,
            retry_limit,
            initial_ms,
        });
    (vec(vec(step, 1..=10), 1..=3), any::<u64>(), 1..=40usize).prop_map(
        |(templates, seed, batch)| Scenario {
            templates,
            seed,
            batch,
        },
    )
}

fn template(index: usize, steps: &[StepGen]) -> TemplateSnapshot {
    let steps = steps
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut depends_on: Vec<StepId> = if i == 0 {
                Vec::new()
            } else {
                g.parents
                    .iter()
                    .map(|p| StepId(p.index(i) as u32))
                    .collect()
            };
            depends_on.sort();
            depends_on.dedup();
            StepSpec {
                name: format!("s{i}"),
                handler: "noop".into(),
                depends_on,
                retryable: g.retryable,
                retry_limit: g.retry_limit,
                timeout_ms: 1_000,
                backoff: BackoffSpec {
                    initial_ms: g.initial_ms,
                    max_ms: g.initial_ms * 4,
                    jitter_pct: 10,
                },
                config: RawJson::empty_object(),
            }
        })
        .collect();
    TemplateSnapshot {
        namespace: if index.is_multiple_of(2) {
            "sim"
        } else {
            "lab"
        }
        .into(),
        name: format!("t{index}"),
        version: "1.0.0".into(),
        steps,
    }
}

/// SplitMix64, seeded by the scenario: the run's only randomness.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const MAX_TASKS: usize = 8;
const HOUR: u64 = 3_600_000;
const ITERATIONS: usize = 600;

/// A simulated engine: inputs are decided and their events applied to the fold
/// and appended to the log, as the processor does.
struct Sim {
    dags: Vec<Resolution>,
    rng: Rng,
    now: u64,
    state: State,
    log: Vec<Envelope>,
    tasks: Vec<TaskId>,
}

impl Sim {
    fn new(s: &Scenario) -> Sim {
        Sim {
            dags: s
                .templates
                .iter()
                .enumerate()
                .map(|(i, t)| Ok(Arc::new(Dag::new(Arc::new(template(i, t))))))
                .collect(),
            rng: Rng(s.seed),
            now: T0,
            // No retention: every task stays, so the engine can answer for all.
            state: State::new(u64::MAX),
            log: Vec::new(),
            tasks: Vec::new(),
        }
    }

    fn at(&self) -> Timestamp {
        Timestamp(self.now)
    }

    /// Decides `input`; appends and applies its events. Refusals append nothing.
    fn input(&mut self, input: Input<'_>) -> Result<bool, TestCaseError> {
        let task = input.task();
        let Ok(events) = decide(&self.state, input, self.at()) else {
            return Ok(false);
        };
        for event in events {
            let env = Envelope {
                task_id: task,
                correlation_id: CorrelationId::NIL,
                source_position: None,
                epoch: Epoch(0),
                at: self.at(),
                body: Body::Event(event),
            };
            prop_assert_eq!(self.state.apply(&env), Applied::Event);
            self.log.push(env);
        }
        Ok(true)
    }

    fn request(&mut self) -> Result<(), TestCaseError> {
        let t = self.rng.below(self.dags.len());
        let id = TaskId::v7(self.at(), u128::from(self.rng.next()));
        let dag = self.dags[t].clone();
        let Ok(d) = &dag else { unreachable!() };
        let command = Command::RequestTask(RequestTask {
            namespace: d.snapshot().namespace.clone(),
            name: d.snapshot().name.clone(),
            context: RawJson::from_trusted(format!("{{\"n\":{}}}", self.tasks.len())),
            initiator: Some("sim".into()),
            ..RequestTask::default()
        });
        let accepted = self.input(Input::Command {
            task: id,
            command: &command,
            resolution: Some(&dag),
        })?;
        prop_assert!(accepted, "a fresh task was refused");
        self.tasks.push(id);
        Ok(())
    }

    /// (task, step) pairs of tasks with `task` status where `f` holds.
    fn steps_where(
        &self,
        f: impl Fn(TaskStatus, &tasker_engine::state::StepState) -> bool,
    ) -> Vec<(TaskId, StepId)> {
        let mut out = Vec::new();
        for id in &self.tasks {
            if let Some(t) = self.state.task(id) {
                for (i, s) in t.steps.iter().enumerate() {
                    if f(t.status, s) {
                        out.push((*id, StepId(i as u32)));
                    }
                }
            }
        }
        out
    }

    fn outcome(&mut self, attempt: u32) -> StepOutcome {
        match self.rng.below(100) {
            0..55 => StepOutcome::Completed {
                result: RawJson::from_trusted(format!("{{\"attempt\":{attempt}}}")),
            },
            55..75 => StepOutcome::Failed(StepError {
                retry_after_ms: self
                    .rng
                    .chance(25)
                    .then(|| 500 + self.rng.below(3_000) as u64),
                ..StepError::retryable(format!("flaky {attempt}"))
            }),
            75..85 => StepOutcome::Failed(StepError::timeout(1_000)),
            _ => StepOutcome::Failed(StepError::permanent("broken")),
        }
    }

    /// An operator cancels a running task, retries a failed one or resolves a
    /// failed step (skipping its dependents or not).
    fn operator(&mut self) -> Result<(), TestCaseError> {
        let in_state = |sim: &Sim, f: fn(TaskStatus) -> bool| -> Vec<TaskId> {
            sim.tasks
                .iter()
                .copied()
                .filter(|id| sim.state.task(id).is_some_and(|t| f(t.status)))
                .collect()
        };
        let (candidates, command) = match self.rng.below(4) {
            0 => (
                in_state(self, |s| !s.is_terminal()),
                Command::CancelTask(CancelTask::default()),
            ),
            1 => (
                in_state(self, |s| s == TaskStatus::Error),
                Command::RetryTask(RetryTask::default()),
            ),
            _ => {
                let failed = self.steps_where(|_, s| s.status == StepStatus::Error);
                let Some(&(task, step)) = failed.get(self.rng.below(failed.len())) else {
                    return Ok(());
                };
                let name = self.state.task(&task).unwrap().step_name(step).to_owned();
                let skip = self.rng.chance(40);
                return self
                    .input(Input::Command {
                        task,
                        command: &Command::ResolveStep(ResolveStep {
                            step: name,
                            result: None,
                            resolved_by: Some("op".into()),
                            reason: None,
                            skip_dependents: skip,
                        }),
                        resolution: None,
                    })
                    .map(|_| ());
            }
        };
        let Some(&task) = candidates.get(self.rng.below(candidates.len())) else {
            return Ok(());
        };
        self.input(Input::Command {
            task,
            command: &command,
            resolution: None,
        })
        .map(|_| ())
    }

    /// One tick. Returns false when nothing can happen any more.
    fn tick(&mut self) -> Result<bool, TestCaseError> {
        self.now += self.rng.below(15) as u64;
        // Now and then a quiet spell, so periods span whole hours of the analytics
        // summaries (PostgreSQL) and start and end inside others.
        if self.rng.chance(2) {
            self.now += self.rng.below(90 * 60_000) as u64;
        }
        if self.tasks.len() < MAX_TASKS && (self.tasks.is_empty() || self.rng.chance(6)) {
            self.request()?;
            return Ok(true);
        }
        if self.rng.chance(3) {
            self.operator()?;
            return Ok(true);
        }
        let now = self.at();
        let ready: Vec<(TaskId, StepId)> = self
            .steps_where(|t, s| !t.is_terminal() && s.status == StepStatus::Pending)
            .into_iter()
            .filter(|(t, s)| self.state.task(t).is_some_and(|t| t.is_step_ready(*s, now)))
            .collect();
        let running = self
            .steps_where(|t, s| t == TaskStatus::InProgress && s.status == StepStatus::InProgress);
        let due = self.steps_where(|t, s| {
            t == TaskStatus::InProgress
                && s.status == StepStatus::Error
                && s.retry_at.is_some_and(|at| at <= now)
        });
        // Some ready steps and due retries stay waiting, as in a busy runtime.
        if !ready.is_empty() && (running.is_empty() || self.rng.chance(40)) {
            let n = 1 + self.rng.below(ready.len());
            for _ in 0..n {
                let (task, step) = ready[self.rng.below(ready.len())];
                self.input(Input::StartStep { task, step })?;
            }
            return Ok(true);
        }
        if !due.is_empty() && (running.is_empty() || self.rng.chance(30)) {
            let (task, step) = due[self.rng.below(due.len())];
            self.input(Input::RetryDue { task, step })?;
            return Ok(true);
        }
        if !running.is_empty() {
            let (task, step) = running[self.rng.below(running.len())];
            let attempt = self.state.task(&task).unwrap().steps[step.index()].attempts;
            let outcome = self.outcome(attempt);
            self.input(Input::StepFinished {
                task,
                step,
                attempt,
                outcome: &outcome,
            })?;
            return Ok(true);
        }
        let next_retry = self
            .steps_where(|t, s| t == TaskStatus::InProgress && s.is_awaiting_retry())
            .iter()
            .filter_map(|(t, s)| self.state.task(t).and_then(|t| t.steps[s.index()].retry_at))
            .min();
        if let Some(at) = next_retry {
            self.now = self.now.max(at.as_millis());
            return Ok(true);
        }
        Ok(self.tasks.len() < MAX_TASKS)
    }

    /// The times worth asking at: now, and both sides of every pending retry.
    fn probe_times(&self) -> Vec<Timestamp> {
        let mut times = vec![self.at(), Timestamp(self.now + 1)];
        for (t, s) in self.steps_where(|_, s| s.retry_at.is_some()) {
            let at = self.state.task(&t).unwrap().steps[s.index()]
                .retry_at
                .unwrap();
            times.push(Timestamp(at.as_millis() - 1));
            times.push(at);
        }
        times.sort();
        times.dedup();
        times.truncate(8);
        times
    }

    /// The longest path from a root to each step, from the template.
    fn levels(&self, task: TaskId) -> Vec<(u32, String, u32)> {
        let t = self.state.task(&task).unwrap();
        let spec = t.dag.snapshot();
        let mut level = vec![0u32; spec.steps.len()];
        for (i, s) in spec.steps.iter().enumerate() {
            level[i] = s
                .depends_on
                .iter()
                .map(|p| level[p.index()] + 1)
                .max()
                .unwrap_or(0);
        }
        let mut out: Vec<(u32, String, u32)> = spec
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u32, s.name.clone(), level[i]))
            .collect();
        out.sort_by_key(|(i, _, l)| (*l, *i));
        out
    }
}

/// Projects what the simulation appended since the last checkpoint, then checks
/// every question: readiness against the engine, and PostgreSQL against SQLite.
async fn checkpoint(
    stores: &mut Stores,
    sim: &Sim,
    batch: usize,
    coverage: &mut Coverage,
) -> Result<(), TestCaseError> {
    let new = sim.log[stores.next as usize..].to_vec();
    stores.project(&new, batch).await;
    let (pg, lite) = (&stores.pg, &stores.lite);
    let ids = &sim.tasks;
    let total_steps: usize = ids
        .iter()
        .map(|id| sim.state.task(id).unwrap().steps.len())
        .sum();
    for as_of in sim.probe_times() {
        let a = pg.readiness(ids, as_of).await.unwrap();
        let b = lite.readiness(ids, as_of).await.unwrap();
        prop_assert_eq!(&a, &b, "readiness at {}: postgres vs sqlite", as_of.0);
        prop_assert_eq!(a.len(), total_steps);
        for r in &a {
            let task = sim.state.task(&r.task_id).unwrap();
            let step = StepId(r.step_index);
            let s = &task.steps[step.index()];
            prop_assert_eq!(
                r.ready_for_execution,
                task.is_step_ready(step, as_of),
                "task {} step {} at {} (+{} ms): SQL says {:?}; engine task {:?} step {:?}",
                r.task_id,
                r.step_index,
                as_of.0,
                as_of.0 - T0,
                r,
                task.status,
                s
            );
            prop_assert_eq!(r.dependencies_satisfied, task.parents_satisfied(step));
            prop_assert_eq!(r.current_state.as_str(), s.status.as_str());
            prop_assert_eq!(r.attempts, s.attempts);
            prop_assert_eq!(r.next_retry_at, s.retry_at);
            prop_assert_eq!(r.last_failure_at, s.last_failure_at);
            if s.status == StepStatus::Error && !task.status.is_terminal() && s.retry_at.is_some() {
                if r.ready_for_execution {
                    coverage.ready_in_error += 1;
                } else {
                    coverage.waiting_in_error += 1;
                }
            }
        }
    }
    let now = sim.at();
    // Counts against the engine's statuses.
    let h = pg.health_counts(now).await.unwrap();
    prop_assert_eq!(&h, &lite.health_counts(now).await.unwrap(), "health counts");
    let mut tasks_by: BTreeMap<&str, u64> = BTreeMap::new();
    let mut steps_by: BTreeMap<&str, u64> = BTreeMap::new();
    for id in ids {
        let t = sim.state.task(id).unwrap();
        *tasks_by.entry(t.status.as_str()).or_default() += 1;
        for s in &t.steps {
            *steps_by.entry(s.status.as_str()).or_default() += 1;
        }
    }
    let n = |m: &BTreeMap<&str, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    prop_assert_eq!(
        [
            h.total_tasks,
            h.pending_tasks,
            h.in_progress_tasks,
            h.complete_tasks,
            h.error_tasks,
            h.cancelled_tasks,
            h.resolved_manually_tasks
        ],
        [
            ids.len() as u64,
            n(&tasks_by, "pending"),
            n(&tasks_by, "in_progress"),
            n(&tasks_by, "complete"),
            n(&tasks_by, "error"),
            n(&tasks_by, "cancelled"),
            n(&tasks_by, "resolved_manually")
        ]
    );
    prop_assert_eq!(
        [
            h.total_steps,
            h.pending_steps,
            h.in_progress_steps,
            h.complete_steps,
            h.error_steps,
            h.skipped_steps,
            h.cancelled_steps,
            h.resolved_manually_steps
        ],
        [
            total_steps as u64,
            n(&steps_by, "pending"),
            n(&steps_by, "in_progress"),
            n(&steps_by, "complete"),
            n(&steps_by, "error"),
            n(&steps_by, "skipped"),
            n(&steps_by, "cancelled"),
            n(&steps_by, "resolved_manually")
        ]
    );
    for id in ids {
        let levels = pg.dependency_levels(*id).await.unwrap();
        prop_assert_eq!(&levels, &lite.dependency_levels(*id).await.unwrap());
        let levels: Vec<(u32, String, u32)> = levels
            .into_iter()
            .map(|l| (l.step_index, l.name, l.level))
            .collect();
        prop_assert_eq!(levels, sim.levels(*id), "levels of {}", id);
        let ctx = pg.execution_context(*id, now).await.unwrap().unwrap();
        prop_assert_eq!(
            &ctx,
            &lite.execution_context(*id, now).await.unwrap().unwrap()
        );
        let task = sim.state.task(id).unwrap();
        let ready = task
            .dag
            .step_ids()
            .filter(|s| task.is_step_ready(*s, now))
            .count();
        prop_assert_eq!(ctx.ready_steps, ready as u64);
        prop_assert_eq!(ctx.status.as_str(), task.status.as_str());
        prop_assert_eq!(ctx.total_steps, task.steps.len() as u64);
        prop_assert_eq!(pg.task(*id).await.unwrap(), lite.task(*id).await.unwrap());
        prop_assert_eq!(pg.steps(*id).await.unwrap(), lite.steps(*id).await.unwrap());
    }
    prop_assert!(
        summaries_are_exact(pg).await,
        "the projector's hourly summaries differ from a recomputation"
    );
    // Periods from the start, the last moments, and on and around hour boundaries.
    let first_hour = (T0 / HOUR + 1) * HOUR;
    let last_hour = (sim.now / HOUR) * HOUR;
    let sinces = [
        T0,
        sim.now.saturating_sub(40),
        first_hour - 1,
        first_hour,
        first_hour + 1,
        last_hour,
    ];
    let as_ofs = [
        sim.now,
        last_hour - 1,
        last_hour,
        last_hour + 1,
        first_hour + HOUR,
    ];
    for since in sinces {
        for as_of in as_ofs {
            let (lo, hi) = ((since / HOUR + 1) * HOUR, (as_of / HOUR) * HOUR);
            if lo < hi && summarized_hours(pg, lo, hi).await > 0 {
                coverage.summarized_periods += 1;
            }
            let (since, as_of) = (Timestamp(since), Timestamp(as_of));
            prop_assert_eq!(
                pg.analytics(since, as_of).await.unwrap(),
                lite.analytics(since, as_of).await.unwrap(),
                "analytics in ({}, {}]",
                since.0,
                as_of.0
            );
        }
    }
    for filter in [
        SlowestFilter::default(),
        SlowestFilter {
            limit: 1_000,
            ..SlowestFilter::default()
        },
        SlowestFilter {
            since: Some(Timestamp(sim.now.saturating_sub(60))),
            namespace: Some("sim".into()),
            limit: 5,
            ..SlowestFilter::default()
        },
        SlowestFilter {
            task_name: Some("t1".into()),
            version: Some("1.0.0".into()),
            limit: 1_000,
            ..SlowestFilter::default()
        },
    ] {
        prop_assert_eq!(
            pg.slowest_steps(&filter).await.unwrap(),
            lite.slowest_steps(&filter).await.unwrap(),
            "slowest steps {:?}",
            filter
        );
        prop_assert_eq!(
            pg.slowest_tasks(&filter).await.unwrap(),
            lite.slowest_tasks(&filter).await.unwrap(),
            "slowest tasks {:?}",
            filter
        );
    }
    Ok(())
}

/// What the cases exercised, so the property cannot pass vacuously.
#[derive(Debug, Default)]
struct Coverage {
    checks: usize,
    /// Steps ready at a checkpoint's `now`.
    ready: usize,
    /// Steps in error answered ready at some probed time (a retry came due).
    ready_in_error: usize,
    /// Steps in error answered not ready because their retry was not due yet.
    waiting_in_error: usize,
    /// Analytics periods holding a whole hour with tasks or steps in it, so
    /// PostgreSQL's answer came partly from the hourly summaries.
    summarized_periods: usize,
    /// Task and step statuses seen at checkpoints.
    task_statuses: std::collections::BTreeSet<&'static str>,
    step_statuses: std::collections::BTreeSet<&'static str>,
}

async fn run_case(
    stores: &mut Stores,
    scenario: &Scenario,
    coverage: &mut Coverage,
) -> Result<(), TestCaseError> {
    stores.reset().await;
    let mut sim = Sim::new(scenario);
    for i in 0..ITERATIONS {
        let more = sim.tick()?;
        if !more || i + 1 == ITERATIONS || sim.rng.chance(6) {
            let now = sim.at();
            coverage.checks += 1;
            for (t, s) in sim.steps_where(|_, _| true) {
                let task = sim.state.task(&t).unwrap();
                coverage.ready += usize::from(task.is_step_ready(s, now));
                coverage.task_statuses.insert(task.status.as_str());
                coverage
                    .step_statuses
                    .insert(task.steps[s.index()].status.as_str());
            }
            checkpoint(stores, &sim, scenario.batch, coverage).await?;
        }
        if !more {
            break;
        }
    }
    Ok(())
}

/// For every step of every task, at several times, the SQL readiness (both
/// stores) equals `TaskState::is_step_ready`, and PostgreSQL and SQLite answer
/// every question identically. The proptest seed is printed; set
/// `TASKER_PROPTEST_SEED` to replay it (a failure also prints the minimal
/// `Scenario`, whose `seed` drives the run).
#[test]
fn sql_readiness_matches_the_engine_and_stores_agree() {
    let seed: u64 = std::env::var("TASKER_PROPTEST_SEED")
        .ok()
        .map(|s| s.parse().expect("TASKER_PROPTEST_SEED is a u64"))
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    println!(
        "read-model conformance: proptest seed {seed} (TASKER_PROPTEST_SEED={seed} replays it)"
    );
    let cases: u32 = std::env::var("TASKER_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stores = std::cell::RefCell::new(rt.block_on(Stores::new()));
    let coverage = std::cell::RefCell::new(Coverage::default());
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 200,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&scenario(), |s| {
        rt.block_on(run_case(
            &mut stores.borrow_mut(),
            &s,
            &mut coverage.borrow_mut(),
        ))
    });
    rt.block_on(stores.into_inner().drop_db());
    if let Err(e) = result {
        panic!("seed {seed}: {e}");
    }
    let c = coverage.into_inner();
    println!("read-model conformance: {c:?}");
    assert!(
        c.checks >= cases as usize
            && c.ready > 0
            && c.ready_in_error > 0
            && c.waiting_in_error > 0
            && c.summarized_periods > 0
            && c.task_statuses.len() == TaskStatus::ALL.len()
            && c.step_statuses.len() == StepStatus::ALL.len(),
        "the cases did not exercise readiness, due and waiting retries, summarized periods and every status: {c:?}"
    );
}

/// Whether the hourly analytics summaries the projector keeps equal
/// `tasker_rebuild_hourly_v01()`'s recomputation from the rows (rolled back).
async fn summaries_are_exact(store: &Store) -> bool {
    let Store::Postgres(pg) = store else {
        unreachable!()
    };
    let mut tx = pg.pool().begin().await.unwrap();
    let kept = common::summary_rows(&mut tx).await;
    sqlx::query("SELECT tasker_rebuild_hourly_v01()")
        .execute(&mut *tx)
        .await
        .unwrap();
    let recomputed = common::summary_rows(&mut tx).await;
    tx.rollback().await.unwrap();
    // Hours whose rows all left (counts back to zero) stay as zero rows.
    let zero =
        |r: &String| r.ends_with(" 0 0 0 0") || (r.starts_with("step ") && r.ends_with(" 0 0 0"));
    let kept: Vec<String> = kept.into_iter().filter(|r| !zero(r)).collect();
    kept == recomputed
}

/// Summary hours in [lo, hi) (milliseconds) with something in them.
async fn summarized_hours(store: &Store, lo: u64, hi: u64) -> i64 {
    let Store::Postgres(pg) = store else {
        unreachable!()
    };
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM tasker_task_hourly
                 WHERE requested > 0 AND hour >= tasker_ms_to_ts($1) AND hour < tasker_ms_to_ts($2))
              + (SELECT count(*) FROM tasker_step_hourly
                 WHERE complete > 0 AND hour >= tasker_ms_to_ts($1) AND hour < tasker_ms_to_ts($2))",
    )
    .bind(lo as i64)
    .bind(hi as i64)
    .fetch_one(pg.pool())
    .await
    .unwrap()
}
