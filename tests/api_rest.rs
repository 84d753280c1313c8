//! The REST API through a real `tasker run` on an ephemeral port: every endpoint's
//! answer and its error statuses, listings that merge memory and the read model,
//! history from the read model, templates with their DAG, analytics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod api_support;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use api_support::{Api, Env};
use serde_json::{Value, json};

#[test]
fn tasks_are_requested_shown_listed_and_controlled() {
    let env = Env::new("");
    let server = env.start(&[]);
    let api = Api::new(&server.api);

    // Request: 202 with the correlation id echoed and carried by the task.
    let corr = "0195f0a0-0000-7000-8000-000000000001";
    let a = api.request(
        api.http
            .post(format!("{}/v1/tasks", api.base))
            .header("X-Correlation-ID", corr)
            .json(
                &json!({"namespace": "shop", "name": "order", "context": {"order_id": 1},
                          "initiator": "test", "tags": ["a"]}),
            ),
    );
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(a.correlation.as_deref(), Some(corr));
    let body = a.json();
    assert_eq!(body["status"], "accepted");
    let id = body["task_id"].as_str().unwrap().to_owned();
    let task = api.wait_status(&id, "complete");
    assert_eq!(task["correlation_id"], corr);
    assert_eq!(task["initiator"], "test");
    assert_eq!(task["steps"].as_array().unwrap().len(), 3);
    // Without the header, a correlation id is generated and returned.
    let a = api.get("/health/live");
    assert_eq!(a.status, 200);
    assert!(
        a.correlation.as_deref().is_some_and(|c| c.len() == 36),
        "{a:?}"
    );

    // Request refusals.
    let refused = |body: Value, status: u16, reason: &str| {
        let a = api.post("/v1/tasks", &body);
        a.problem(status, reason)
    };
    refused(
        json!({"namespace": "shop", "name": "nope"}),
        404,
        "unknown_template",
    );
    refused(
        json!({"namespace": "shop", "name": "order", "version": "9.0.0", "context": {"order_id": 1}}),
        404,
        "unknown_version",
    );
    let p = refused(
        json!({"namespace": "shop", "name": "order", "context": {"order_id": "one"}}),
        422,
        "invalid_context",
    );
    assert!(!p["details"].as_array().unwrap().is_empty(), "{p}");
    refused(
        json!({"namespace": "shop", "name": "order", "task_id": "nope"}),
        400,
        "invalid_task_id",
    );
    // Idempotency: the second request answers the first task.
    let first = api.post(
        "/v1/tasks",
        &json!({"namespace": "shop", "name": "order", "context": {"order_id": 2}, "idempotency_key": "k-2"}),
    );
    assert_eq!(first.status, 202, "{}", first.text);
    let again = api.post(
        "/v1/tasks",
        &json!({"namespace": "shop", "name": "order", "context": {"order_id": 2}, "idempotency_key": "k-2"}),
    );
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json()["status"], "duplicate");
    assert_eq!(again.json()["task_id"], first.json()["task_id"]);

    // Show: bad id, unknown id.
    api.get("/v1/tasks/not-a-uuid")
        .problem(400, "invalid_task_id");
    let unknown = "0195f0a0-0000-7000-8000-00000000dead";
    api.get(&format!("/v1/tasks/{unknown}"))
        .problem(404, "unknown_task");

    // Steps: levels and readiness of a finished chain.
    let steps = api.get(&format!("/v1/tasks/{id}/steps"));
    assert_eq!(steps.status, 200, "{}", steps.text);
    let steps = steps.json();
    let names: Vec<&str> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["validate", "charge", "ship"]);
    let levels: Vec<u64> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["level"].as_u64().unwrap())
        .collect();
    assert_eq!(levels, [0, 1, 2]);
    assert!(
        steps
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ready"] == false && s["status"] == "complete")
    );
    assert_eq!(steps[1]["depends_on"], json!(["validate"]));
    api.get(&format!("/v1/tasks/{unknown}/steps"))
        .problem(404, "unknown_task");
    api.get("/v1/tasks/x/steps").problem(400, "invalid_task_id");

    // History from the read model, in log order.
    let history = api.wait_for(&format!("/v1/tasks/{id}/history"), |h| {
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["event_type"] == "task.completed")
    });
    let events: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"task.accepted"), "{history}");
    assert_eq!(events.last(), Some(&"task.completed"), "{history}");
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["step"] == "ship" && e["to_state"] == "complete"),
        "{history}"
    );
    let positions: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{positions:?}");
    api.get(&format!("/v1/tasks/{unknown}/history"))
        .problem(404, "unknown_task");

    // Cancel a sleeping task; cancelling again conflicts.
    let slow = api.post("/v1/tasks", &json!({"namespace": "shop", "name": "slow"}));
    assert_eq!(slow.status, 202, "{}", slow.text);
    let slow = slow.json()["task_id"].as_str().unwrap().to_owned();
    api.wait_status(&slow, "in_progress");
    let c = api.post(
        &format!("/v1/tasks/{slow}/cancel"),
        &json!({"reason": "test"}),
    );
    assert_eq!(c.status, 200, "{}", c.text);
    assert_eq!(c.json()["status"], "applied");
    api.wait_status(&slow, "cancelled");
    api.post(&format!("/v1/tasks/{slow}/cancel"), &json!({}))
        .problem(409, "invalid_transition");
    api.post(&format!("/v1/tasks/{unknown}/cancel"), &json!({}))
        .problem(404, "unknown_task");
    api.post(
        &format!("/v1/tasks/{slow}/cancel"),
        &json!({"because": "x"}),
    )
    .problem(422, "invalid_body");
    // A body is optional.
    let a = api.request(api.http.post(format!("{}/v1/tasks/{id}/cancel", api.base)));
    a.problem(409, "invalid_transition");

    // Retry and resolve a task in error.
    let broken = api.post("/v1/tasks", &json!({"namespace": "shop", "name": "broken"}));
    let broken = broken.json()["task_id"].as_str().unwrap().to_owned();
    api.wait_status(&broken, "error");
    let r = api.post(
        &format!("/v1/tasks/{broken}/retry"),
        &json!({"reason": "again"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    // The retried attempt failed again: two failures in the history.
    api.wait_for(&format!("/v1/tasks/{broken}/history"), |h| {
        let failures = h
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event_type"] == "step.failed")
            .count();
        failures == 2
            && h.as_array()
                .unwrap()
                .iter()
                .any(|e| e["event_type"] == "task.retried")
    });
    api.wait_status(&broken, "error");
    api.post(&format!("/v1/tasks/{id}/retry"), &json!({}))
        .problem(409, "invalid_transition");
    api.post(&format!("/v1/tasks/{unknown}/retry"), &json!({}))
        .problem(404, "unknown_task");
    api.post(
        &format!("/v1/tasks/{broken}/steps/nope/resolve"),
        &json!({}),
    )
    .problem(404, "unknown_step");
    api.post(
        &format!("/v1/tasks/{broken}/steps/explode/resolve"),
        &json!({"result": 5, "oops": 1}),
    )
    .problem(422, "invalid_body");
    let r = api.post(
        &format!("/v1/tasks/{broken}/steps/explode/resolve"),
        &json!({"result": {"fixed": true}, "reason": "by hand", "resolved_by": "ops"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let done = api.wait_for(&format!("/v1/tasks/{broken}"), |t| {
        t["status"] == "complete"
    });
    assert_eq!(done["steps"][0]["status"], "resolved_manually");
    assert_eq!(done["steps"][0]["result"], json!({"fixed": true}));
    api.post(
        &format!("/v1/tasks/{broken}/steps/explode/resolve"),
        &json!({}),
    )
    .problem(409, "invalid_transition");

    // Listing: newest first, filters, cursor pages that cover everything once.
    let mut mine: Vec<String> = (10..16).map(|n| api.order(n)).collect();
    let inv = api.post(
        "/v1/tasks",
        &json!({"namespace": "billing", "name": "invoice"}),
    );
    let inv = inv.json()["task_id"].as_str().unwrap().to_owned();
    mine.push(inv.clone());
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/tasks?limit=3&cursor={c}"),
            None => "/v1/tasks?limit=3".to_owned(),
        };
        let page = api.get(&path);
        assert_eq!(page.status, 200, "{}", page.text);
        let page = page.json();
        let tasks = page["tasks"].as_array().unwrap();
        assert!(tasks.len() <= 3);
        seen.extend(
            tasks
                .iter()
                .map(|t| t["task_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a task listed twice: {seen:?}");
    assert!(
        mine.iter().all(|m| unique.contains(m)),
        "missing tasks: {seen:?}"
    );
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "not newest first");
    let billing = api.get("/v1/tasks?namespace=billing").json();
    assert_eq!(billing["tasks"].as_array().unwrap().len(), 1, "{billing}");
    assert_eq!(billing["tasks"][0]["task_id"], inv.as_str());
    let errors = api.get("/v1/tasks?status=cancelled&name=slow").json();
    assert_eq!(errors["tasks"].as_array().unwrap().len(), 1, "{errors}");
    assert_eq!(errors["tasks"][0]["task_id"], slow.as_str());
    let future = api.get("/v1/tasks?since=2999-01-01T00:00:00Z").json();
    assert!(future["tasks"].as_array().unwrap().is_empty(), "{future}");
    let recent = api
        .get("/v1/tasks?since=1h&namespace=shop&limit=500")
        .json();
    assert!(recent["tasks"].as_array().unwrap().len() >= 8, "{recent}");
    api.get("/v1/tasks?status=sleeping")
        .problem(400, "invalid_query");
    api.get("/v1/tasks?limit=0").problem(400, "invalid_query");
    api.get("/v1/tasks?limit=many")
        .problem(400, "invalid_query");
    api.get("/v1/tasks?cursor=zzz")
        .problem(400, "invalid_task_id");
    api.get("/v1/tasks?since=someday")
        .problem(400, "invalid_query");
    api.get("/v1/tasks?colour=red")
        .problem(400, "invalid_query");

    // Unknown routes and methods are problems too.
    api.get("/v1/nothing").problem(404, "no_route");
    api.request(api.http.delete(format!("{}/v1/tasks", api.base)))
        .problem(405, "method_not_allowed");
    server.stop();
}

#[test]
fn finished_tasks_are_read_from_the_read_model_after_leaving_memory() {
    let env = Env::new("[engine]\nretention = \"200ms\"\n");
    let server = env.start(&[]);
    let api = Api::new(&server.api);
    let old = api.order(1);
    api.wait_status(&old, "complete");
    // Wait until the read model has it, then let newer records move the fold's
    // clock past the retention window.
    api.wait_for(&format!("/v1/tasks/{old}/history"), |h| {
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["event_type"] == "task.completed")
    });
    std::thread::sleep(Duration::from_millis(400));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let newer = api.order(2);
        api.wait_status(&newer, "complete");
        let page = api.get("/v1/tasks?limit=500").json();
        let row = page["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task_id"] == old.as_str())
            .cloned();
        if let Some(row) = row
            && row["source"] == "read_model"
        {
            break row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task never left memory: {page}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["status"], "complete");
    assert_eq!(listed["namespace"], "shop");
    let task = api.get(&format!("/v1/tasks/{old}"));
    assert_eq!(task.status, 200, "{}", task.text);
    let task = task.json();
    assert_eq!(task["status"], "complete");
    assert_eq!(task["context"], json!({"order_id": 1}));
    assert_eq!(task["steps"][2]["name"], "ship");
    assert_eq!(task["steps"][2]["depends_on"], json!(["charge"]));
    let steps = api.get(&format!("/v1/tasks/{old}/steps")).json();
    assert_eq!(steps[2]["level"], 2, "{steps}");
    assert_eq!(steps[0]["status"], "complete", "{steps}");
    server.stop();
}

#[test]
fn templates_analytics_and_the_event_catalog() {
    let env = Env::new("");
    let server = env.start(&[]);
    let api = Api::new(&server.api);
    let all = api.get("/v1/templates");
    assert_eq!(all.status, 200, "{}", all.text);
    let all = all.json();
    let names: HashSet<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}/{}",
                t["namespace"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        names.contains("shop/order") && names.contains("billing/invoice"),
        "{all}"
    );
    let shop = api.get("/v1/templates/shop").json();
    assert!(
        shop.as_array()
            .unwrap()
            .iter()
            .all(|t| t["namespace"] == "shop"),
        "{shop}"
    );
    api.get("/v1/templates/nowhere")
        .problem(404, "unknown_namespace");
    let order = api.get("/v1/templates/shop/order");
    assert_eq!(order.status, 200, "{}", order.text);
    let order = order.json();
    assert_eq!(order["version"], "1.0.0");
    assert_eq!(order["versions"], json!(["1.0.0"]));
    assert_eq!(
        order["edges"],
        json!([{"from": "validate", "to": "charge"}, {"from": "charge", "to": "ship"}])
    );
    assert_eq!(order["steps"][2]["level"], 2);
    assert_eq!(order["context_schema"]["required"], json!(["order_id"]));
    assert_eq!(
        api.get("/v1/templates/billing/invoice?version=^2").json()["version"],
        "2.1.0"
    );
    api.get("/v1/templates/billing/invoice?version=^3")
        .problem(404, "unknown_version");
    api.get("/v1/templates/shop/nope")
        .problem(404, "unknown_template");
    api.get("/v1/templates/shop/order?v=1")
        .problem(400, "invalid_query");
    let handlers = api.get("/v1/handlers").json();
    assert!(
        handlers.as_array().unwrap().iter().any(|h| h == "noop"),
        "{handlers}"
    );

    let catalog = api.get("/v1/events/catalog");
    assert_eq!(catalog.status, 200);
    let catalog = catalog.json();
    assert_eq!(catalog.as_array().unwrap().len(), 21, "{catalog}");
    let requested = catalog
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "task.requested")
        .unwrap();
    assert_eq!(requested["kind"], "command");
    assert!(requested["meaning"].as_str().unwrap().len() > 10);

    let ids: Vec<String> = (0..5).map(|n| api.order(n)).collect();
    for id in &ids {
        api.wait_status(id, "complete");
    }
    let perf = api.wait_for("/v1/analytics/performance?period=1h", |p| {
        p["task_throughput"].as_u64() >= Some(5) && p["completion_count"].as_u64() >= Some(5)
    });
    assert_eq!(perf["system_health_score"], 1.0, "{perf}");
    api.get("/v1/analytics/performance?period=soon")
        .problem(400, "invalid_query");
    let b = api.wait_for(
        "/v1/analytics/bottlenecks?namespace=shop&name=order&limit=3",
        |b| b["slowest_steps"].as_array().unwrap().len() == 3,
    );
    assert!(
        b["slowest_steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["namespace"] == "shop" && s["task_name"] == "order"),
        "{b}"
    );
    assert_eq!(b["slowest_tasks"].as_array().unwrap().len(), 3, "{b}");
    let d: Vec<i64> = b["slowest_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["duration_ms"].as_i64().unwrap())
        .collect();
    assert!(d.windows(2).all(|w| w[0] >= w[1]), "{d:?}");
    let none = api
        .get("/v1/analytics/bottlenecks?namespace=billing")
        .json();
    assert!(
        none["slowest_steps"].as_array().unwrap().is_empty(),
        "{none}"
    );
    api.get("/v1/analytics/bottlenecks?limit=1000")
        .problem(400, "invalid_query");
    server.stop();
}
