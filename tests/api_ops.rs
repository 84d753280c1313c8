//! Operations endpoints through a real `tasker run`: health (live, ready, status),
//! Prometheus metrics, the OpenAPI document, GraphQL over the same service layer,
//! and what answers without a read model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod api_support;
mod support;

use std::time::{Duration, Instant};

use api_support::{Api, Env};
use serde_json::{Value, json};

/// The value of a metric line `name{labels} value` (or `name value`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn gql(api: &Api, query: &str, variables: Value) -> Value {
    let a = api.post("/graphql", &json!({"query": query, "variables": variables}));
    assert_eq!(a.status, 200, "{}", a.text);
    a.json()
}

#[test]
fn health_metrics_openapi_and_graphql() {
    let env = Env::new("[health]\nstatus_cache = \"1h\"\n");
    let server = env.start(&[]);
    let api = Api::new(&server.api);

    // Live is immediate; ready checks the log, the read model, its migrations, the projector.
    let started = Instant::now();
    let live = api.get("/health/live");
    assert_eq!(
        (live.status, live.json()["status"].clone()),
        (200, json!("ok"))
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let ready = api.get("/health/ready");
    assert_eq!(ready.status, 200, "{}", ready.text);
    let ready = ready.json();
    assert_eq!(ready["status"], "ready");
    let checks: Vec<&str> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        checks,
        ["log", "read_model", "migrations", "projector"],
        "{ready}"
    );
    assert!(
        ready["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true),
        "{ready}"
    );

    // Status counts are cached: tasks after the first call do not show.
    let first = api.get("/health/status");
    assert_eq!(first.status, 200, "{}", first.text);
    let first = first.json();
    assert_eq!(first["counts"]["total_tasks"], 0, "{first}");
    assert_eq!(first["partitions"].as_array().unwrap().len(), 4, "{first}");
    assert!(
        first["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "live")
    );

    // GraphQL mutations and queries through the service layer.
    let created = gql(
        &api,
        "mutation($ctx: JSON) { createTask(input: {namespace: \"shop\", name: \"order\", context: $ctx}) { status taskId position } }",
        json!({"ctx": {"order_id": 7}}),
    );
    assert_eq!(
        created["data"]["createTask"]["status"], "accepted",
        "{created}"
    );
    let id = created["data"]["createTask"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    api.wait_status(&id, "complete");
    let q = gql(
        &api,
        "query($id: String!) { task(id: $id) { taskId status namespace context steps { name status attempts } }
                 step(taskId: $id, name: \"charge\") { name status dependsOn }
                 tasks(namespace: \"shop\", first: 10) { tasks { taskId source } nextCursor }
                 tasksByStatus(status: \"complete\") { tasks { taskId } } }",
        json!({"id": id}),
    );
    assert!(q["errors"].is_null(), "{q}");
    assert_eq!(q["data"]["task"]["status"], "complete", "{q}");
    assert_eq!(q["data"]["task"]["context"], json!({"order_id": 7}), "{q}");
    assert_eq!(
        q["data"]["task"]["steps"].as_array().unwrap().len(),
        3,
        "{q}"
    );
    assert_eq!(q["data"]["step"]["dependsOn"], json!(["validate"]), "{q}");
    assert_eq!(q["data"]["tasks"]["tasks"][0]["taskId"], id.as_str(), "{q}");
    assert_eq!(
        q["data"]["tasksByStatus"]["tasks"][0]["taskId"],
        id.as_str(),
        "{q}"
    );
    let unknown = gql(
        &api,
        "{ task(id: \"0195f0a0-0000-7000-8000-00000000dead\") { taskId } }",
        json!({}),
    );
    assert!(
        unknown["data"]["task"].is_null() && unknown["errors"].is_null(),
        "{unknown}"
    );
    let refused = gql(
        &api,
        "mutation { createTask(input: {namespace: \"shop\", name: \"nope\"}) { taskId } }",
        json!({}),
    );
    assert_eq!(
        refused["errors"][0]["extensions"]["status"], 404,
        "{refused}"
    );
    assert_eq!(
        refused["errors"][0]["extensions"]["reason"], "unknown_template",
        "{refused}"
    );
    let cancel = gql(
        &api,
        "mutation($id: String!) { cancelTask(id: $id) { status } }",
        json!({"id": id}),
    );
    assert_eq!(cancel["errors"][0]["extensions"]["status"], 409, "{cancel}");
    let broken = gql(
        &api,
        "mutation { createTask(input: {namespace: \"shop\", name: \"broken\"}) { taskId } }",
        json!({}),
    );
    let broken = broken["data"]["createTask"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    api.wait_status(&broken, "error");
    let retried = gql(
        &api,
        "mutation($id: String!) { retryTask(id: $id, reason: \"again\") { status } }",
        json!({"id": broken}),
    );
    assert_eq!(
        retried["data"]["retryTask"]["status"], "applied",
        "{retried}"
    );
    api.wait_for(&format!("/v1/tasks/{broken}/history"), |h| {
        h.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event_type"] == "step.failed")
            .count()
            == 2
    });
    api.wait_status(&broken, "error");
    let resolved = gql(
        &api,
        "mutation($id: String!) { resolveStep(taskId: $id, step: \"explode\", result: {ok: true}, skipDependents: true) { status } }",
        json!({"id": broken}),
    );
    assert_eq!(
        resolved["data"]["resolveStep"]["status"], "applied",
        "{resolved}"
    );
    let t = api.wait_for(&format!("/v1/tasks/{broken}"), |t| t["status"] != "error");
    assert_eq!(t["steps"][1]["status"], "skipped", "{t}");
    let bad = gql(&api, "{ nothing }", json!({}));
    assert!(
        bad["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nothing"),
        "{bad}"
    );

    // Metrics in the Prometheus text format.
    let m = api.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        m.content_type
    );
    let text = m.text;
    assert!(
        metric(&text, "tasker_tasks_total{outcome=\"accepted\"}").unwrap() >= 2.0,
        "{text}"
    );
    assert!(
        metric(&text, "tasker_tasks_total{outcome=\"completed\"}").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, "tasker_steps_total{outcome=\"failed\"}").unwrap() >= 2.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "tasker_rejected_records_total{reason=\"unknown_template\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains("# TYPE tasker_step_duration_seconds histogram"));
    let steps = metric(&text, "tasker_step_duration_seconds_count").unwrap();
    assert!(steps >= 5.0, "{text}");
    assert_eq!(
        metric(&text, "tasker_step_duration_seconds_bucket{le=\"+Inf\"}"),
        Some(steps)
    );
    assert!(
        metric(
            &text,
            "tasker_step_duration_seconds_quantiles{quantile=\"0.99\"}"
        )
        .is_some()
    );
    assert!(metric(&text, "tasker_log_append_duration_seconds_count").unwrap() >= 1.0);
    assert!(metric(&text, "tasker_executor_concurrency_limit").unwrap() >= 1.0);
    assert!(
        metric(&text, "tasker_projector_lag_records{partition=\"0\"}").is_some(),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tasker_partition_live{partition=\"3\"}"),
        Some(1.0)
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line: {line}");
    }

    // The served spec is the checked-in one.
    let spec = api.get("/v1/openapi.json");
    assert_eq!(spec.status, 200);
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(spec.json(), stored);

    // Still the cached counts.
    let again = api.get("/health/status").json();
    assert_eq!(again["computed_at"], first["computed_at"]);
    assert_eq!(again["counts"]["total_tasks"], 0);
    server.stop();
}

#[test]
fn without_a_read_model_reads_come_from_memory_and_the_rest_is_503() {
    let env = Env::new("[projector]\nenabled = false\n");
    let server = env.start(&[]);
    let api = Api::new(&server.api);
    let id = api.order(1);
    api.wait_status(&id, "complete");
    let page = api.get("/v1/tasks").json();
    assert_eq!(page["tasks"][0]["source"], "memory", "{page}");
    assert_eq!(api.get(&format!("/v1/tasks/{id}/steps")).status, 200);
    api.get(&format!("/v1/tasks/{id}/history"))
        .problem(503, "read_model_disabled");
    api.get("/v1/analytics/performance")
        .problem(503, "read_model_disabled");
    api.get("/v1/analytics/bottlenecks")
        .problem(503, "read_model_disabled");
    let status = api.get("/health/status").json();
    assert!(status["counts"].is_null(), "{status}");
    let ready = api.get("/health/ready");
    assert_eq!(ready.status, 200, "{}", ready.text);
    server.stop();
}

#[test]
fn a_read_model_made_from_another_log_stops_its_projector_and_says_so() {
    let env = Env::new("");
    let rm = env.dir.path().join("shared-read-model.db");
    let url = format!("sqlite://{}", rm.display());
    let first = env.start(&[("DATABASE_URL", url.as_str())]);
    let api = Api::new(&first.api);
    for i in 0..5 {
        let a = api.post(
            "/v1/tasks",
            &json!({"namespace": "shop", "name": "order", "context": {"order_id": i}}),
        );
        assert_eq!(a.status, 202, "{}", a.text);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api
        .get("/v1/projector")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["position"].as_u64() > Some(0))
    {
        assert!(Instant::now() < deadline, "nothing projected");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.stop();
    // The same read model with a new, empty log (another data directory).
    let other = tempfile::TempDir::new().unwrap();
    let second = support::Server::start(
        other.path(),
        &env.templates,
        &[("DATABASE_URL", url.as_str())],
    );
    let api = Api::new(&second.api);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopped = loop {
        let list = api.get("/v1/projector").json();
        if let Some(p) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["error"].is_string())
        {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "no projector stopped: {list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        stopped["error"]
            .as_str()
            .unwrap()
            .contains("projected from another log"),
        "{stopped}"
    );
    let ready = api.get("/health/ready");
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert!(
        ready.text.contains("the projector stopped"),
        "{}",
        ready.text
    );
    let series = format!(
        "tasker_projector_stopped{{partition=\"{}\"}}",
        stopped["partition"]
    );
    assert_eq!(metric(&api.get("/metrics").text, &series), Some(1.0));
    // The engine itself runs on.
    let a = api.post(
        "/v1/tasks",
        &json!({"namespace": "shop", "name": "order", "context": {"order_id": 99}}),
    );
    assert_eq!(a.status, 202, "{}", a.text);
    second.stop();
}
