//! The built-in `http` handler against a real HTTP server on loopback: every
//! class of response, timeouts, limits, and a workflow that retries a 503.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tasker_engine::handler::{HttpHandler, StepContext, StepHandler};
use tasker_engine::record::{CorrelationId, RawJson, StepErrorKind, TaskId, Timestamp};

async fn serve(flaky: Arc<AtomicU32>) -> String {
    let app = Router::new()
        .route(
            "/ok",
            post(|headers: HeaderMap, Json(body): Json<Value>| async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                Json(json!({"echo": body, "key": key}))
            }),
        )
        .route("/empty", post(|| async { StatusCode::NO_CONTENT }))
        .route("/html", post(|| async { "<html>hi</html>" }))
        .route(
            "/busy",
            post(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "2")],
                    "slow down",
                )
            }),
        )
        .route(
            "/unavailable",
            post(|| async { StatusCode::SERVICE_UNAVAILABLE }),
        )
        .route(
            "/boom",
            post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .route("/missing", post(|| async { StatusCode::NOT_FOUND }))
        .route(
            "/invalid",
            post(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "bad order") }),
        )
        .route(
            "/redirect",
            post(|| async { (StatusCode::FOUND, [("location", "/ok")]).into_response() }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }),
        )
        .route("/big", post(|| async { "x".repeat(2 << 20) }))
        .route(
            "/flaky",
            post(move || {
                let n = flaky.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        StatusCode::SERVICE_UNAVAILABLE.into_response()
                    } else {
                        Json(json!({"attempt_seen": n + 1})).into_response()
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn ctx(url: &str, timeout_ms: u64) -> StepContext {
    StepContext {
        task_id: TaskId::v7(Timestamp(1_700_000_000_000), 5),
        correlation_id: CorrelationId::NIL,
        namespace: "shop".into(),
        task_name: "order".into(),
        version: "1.0.0".into(),
        step: "charge".into(),
        attempt: 2,
        context: RawJson::parse(r#"{"order_id": 9}"#).unwrap(),
        parents: vec![(
            "validate".into(),
            RawJson::parse(r#"{"ok": true}"#).unwrap(),
        )],
        config: RawJson::from_value(&json!({"url": url})),
        timeout: Duration::from_millis(timeout_ms),
    }
}

#[tokio::test]
async fn every_response_class_maps_to_its_outcome() {
    let base = serve(Arc::new(AtomicU32::new(0))).await;
    let h = HttpHandler::new();

    let ok = h.call(ctx(&format!("{base}/ok"), 2_000)).await.unwrap();
    assert_eq!(ok["echo"]["context"]["order_id"], 9);
    assert_eq!(ok["echo"]["parents"]["validate"]["ok"], true);
    assert_eq!(ok["echo"]["attempt"], 2);
    assert_eq!(ok["echo"]["step"], "charge");
    assert!(ok["key"].as_str().unwrap().ends_with("/charge/2"), "{ok}");

    assert_eq!(
        h.call(ctx(&format!("{base}/empty"), 2_000)).await.unwrap(),
        Value::Null
    );

    let cases = [
        ("/html", StepErrorKind::Permanent, "not JSON"),
        ("/busy", StepErrorKind::Retryable, "429"),
        ("/unavailable", StepErrorKind::Retryable, "503"),
        ("/boom", StepErrorKind::Retryable, "500"),
        ("/missing", StepErrorKind::Permanent, "404"),
        ("/invalid", StepErrorKind::Permanent, "bad order"),
        ("/redirect", StepErrorKind::Permanent, "redirect"),
        ("/big", StepErrorKind::Permanent, "limit"),
        ("/slow", StepErrorKind::Retryable, "failed"),
    ];
    for (path, kind, text) in cases {
        let e = h
            .call(ctx(&format!("{base}{path}"), 300))
            .await
            .unwrap_err();
        assert_eq!(e.kind, kind, "{path}: {e:?}");
        assert!(e.message.contains(text), "{path}: {}", e.message);
    }
    let busy = h
        .call(ctx(&format!("{base}/busy"), 2_000))
        .await
        .unwrap_err();
    assert_eq!(busy.retry_after_ms, Some(2_000));

    // Nobody listening: retryable.
    let e = h
        .call(ctx("http://127.0.0.1:9/nothing", 500))
        .await
        .unwrap_err();
    assert_eq!(e.kind, StepErrorKind::Retryable);
    // No URL: permanent.
    let mut c = ctx("x", 500);
    c.config = RawJson::empty_object();
    assert_eq!(h.call(c).await.unwrap_err().kind, StepErrorKind::Permanent);
}

#[test]
fn a_workflow_retries_a_503_and_completes_with_the_response() {
    use tasker_engine::handler::HandlerRegistry;
    use tasker_engine::log::file::{FileLog, FileLogConfig};
    use tasker_engine::record::{Command, Envelope, RequestTask};
    use tasker_engine::registry::TemplateRegistry;
    use tasker_engine::runtime::{Engine, EngineOptions, SubmitOutcome};
    use tasker_engine::state::TaskStatus;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let hits = Arc::new(AtomicU32::new(0));
    let base = rt.block_on(serve(Arc::clone(&hits)));
    let dir = tempfile::TempDir::new().unwrap();
    let registry = Arc::new(TemplateRegistry::new(
        Arc::new(HandlerRegistry::with_builtins()),
        None,
    ));
    registry
        .add_yaml(
            &format!(
                "namespace: t\nname: pay\nversion: 1.0.0\nsteps:\n  - name: charge\n    handler: http\n    retry_limit: 3\n    backoff: {{ initial: 10ms }}\n    config: {{ url: \"{base}/flaky\" }}\n"
            ),
            "pay.yaml",
        )
        .unwrap();
    let log = Arc::new(FileLog::open(dir.path(), FileLogConfig::default()).unwrap());
    let engine = Engine::start(log, registry, EngineOptions::default(), None).unwrap();
    let id = TaskId::generate();
    let env = Envelope::command(
        id,
        CorrelationId::NIL,
        Timestamp::now(),
        Command::RequestTask(RequestTask {
            namespace: "t".into(),
            name: "pay".into(),
            context: RawJson::empty_object(),
            ..RequestTask::default()
        }),
    );
    assert!(matches!(
        engine.request_blocking(env).unwrap(),
        SubmitOutcome::Accepted { .. }
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let task = loop {
        if let Some(t) = engine.task(id).filter(|t| t.status.is_terminal()) {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "task did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(task.status, TaskStatus::Complete);
    assert_eq!(task.steps[0].attempts, 2);
    assert_eq!(
        task.steps[0].result.as_ref().unwrap().to_value()["attempt_seen"],
        2
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
