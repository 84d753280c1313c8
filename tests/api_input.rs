//! Bad input never hurts the server: invalid JSON, oversized bodies (the limit is
//! configured), wrong types, unknown fields, deep nesting and wrong media types
//! are 4xx problem+json, and the server keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod api_support;
mod support;

use api_support::{Api, Env};
use serde_json::json;

#[test]
fn bad_input_is_a_problem_and_the_server_keeps_serving() {
    let env = Env::new("[api]\nmax_body_bytes = 4096\nmax_json_depth = 16\n");
    let server = env.start(&[]);
    let api = Api::new(&server.api);
    let json_type = "application/json";

    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("/v1/tasks", b"{\"namespace\": \"shop\",".to_vec(), json_type, 400, "invalid_json"),
        ("/v1/tasks", b"not json at all".to_vec(), json_type, 400, "invalid_json"),
        ("/v1/tasks", br#"{"namespace": "shop", "name": "order"} {}"#.to_vec(), json_type, 400, "invalid_json"),
        ("/v1/tasks", br#"{"namespace": 7, "name": "order"}"#.to_vec(), json_type, 422, "invalid_body"),
        ("/v1/tasks", br#"{"namespace": "shop", "name": "order", "tags": "x"}"#.to_vec(), json_type, 422, "invalid_body"),
        ("/v1/tasks", br#"{"namespace": "shop", "name": "order", "colour": "red"}"#.to_vec(), json_type, 422, "invalid_body"),
        ("/v1/tasks", br#"{"name": "order"}"#.to_vec(), json_type, 422, "invalid_body"),
        ("/v1/tasks", br#"[1, 2]"#.to_vec(), json_type, 422, "invalid_body"),
        ("/v1/tasks", br#"{"namespace": "shop", "name": "order"}"#.to_vec(), "text/plain", 415, "unsupported_media_type"),
        (
            "/v1/tasks",
            format!(
                r#"{{"namespace": "shop", "name": "order", "context": {{"order_id": 1, "pad": "{}"}}}}"#,
                "x".repeat(8192)
            )
            .into_bytes(),
            json_type,
            413,
            "body_too_large",
        ),
        (
            "/v1/tasks",
            format!(
                r#"{{"namespace": "shop", "name": "order", "context": {{"order_id": 1, "deep": {}1{}}}}}"#,
                "[".repeat(40),
                "]".repeat(40)
            )
            .into_bytes(),
            json_type,
            400,
            "json_too_deep",
        ),
        ("/v1/tasks/0195f0a0-0000-7000-8000-000000000001/cancel", b"{\"reason\": 5}".to_vec(), json_type, 422, "invalid_body"),
        ("/v1/tasks/0195f0a0-0000-7000-8000-000000000001/cancel", b"{oops".to_vec(), json_type, 400, "invalid_json"),
        ("/graphql", b"{\"query\": ".to_vec(), json_type, 400, "invalid_json"),
        ("/graphql", vec![b'{'; 100], json_type, 400, "json_too_deep"),
        ("/graphql", vec![b' '; 5000], json_type, 413, "body_too_large"),
    ];
    for (path, body, content_type, status, reason) in cases {
        let a = api.post_raw(path, content_type, body);
        let p = a.problem(status, reason);
        if status == 422 {
            assert!(
                p["detail"].as_str().unwrap().contains('`')
                    || p["detail"].as_str().unwrap().contains("field"),
                "{p}"
            );
        }
    }
    // The field is named.
    let p = api.post(
        "/v1/tasks",
        &json!({"namespace": "shop", "name": "order", "context": {}, "tags": [1]}),
    );
    let p = p.problem(422, "invalid_body");
    assert!(p["detail"].as_str().unwrap().contains("tags"), "{p}");
    // Query strings too.
    api.get("/v1/tasks?limit=-1").problem(400, "invalid_query");
    // Still serving: a good request is accepted and runs.
    let id = api.order(1);
    api.wait_status(&id, "complete");
    assert_eq!(api.get("/health/live").status, 200);
    server.stop();
}
