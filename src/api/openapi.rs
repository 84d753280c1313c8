//! The OpenAPI document, generated from the handlers' annotations (utoipa),
//! served at `/v1/openapi.json` and checked in at `docs/openapi.json` (a test
//! fails when the file is stale; `TASKER_BLESS=1 cargo test -p tasker openapi`
//! rewrites it).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{
    analytics, audit, events, graphql, health, metrics, problem, service, tasks, templates,
};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("static token or JWT (HS256/RS256)")
                    .description(Some(
                        "Needed when auth.enabled. Permissions are tasker.<resource>:<action> \
                         scoped to namespaces; 401 without or with an invalid token, 403 \
                         outside the permission or namespace.",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tasker",
        description = "Workflow orchestration on an append-only event log: request and control \
                       tasks, read them and their history, templates, analytics, health and \
                       metrics. Errors are RFC 9457 problem+json. Every response carries \
                       X-Correlation-ID (taken from the request or generated).",
        license(name = "Apache-2.0"),
    ),
    paths(
        tasks::create_task, tasks::list_tasks, tasks::show_task, tasks::task_steps,
        tasks::task_history, tasks::cancel_task, tasks::retry_task, tasks::resolve_step,
        templates::list, templates::namespace, templates::show, templates::handlers,
        analytics::performance, analytics::bottlenecks,
        events::show,
        audit::digests, audit::projector,
        health::live, health::ready, health::status,
        metrics::metrics,
        graphql::execute,
        spec,
    ),
    components(schemas(problem::Problem, service::TaskSummary, crate::views::StepJson,
        crate::views::StepErrorJson)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "tasks", description = "Request, list, show and control tasks"),
        (name = "templates", description = "Installed templates and step handlers"),
        (name = "analytics", description = "Performance and bottlenecks from the read model"),
        (name = "events", description = "The record catalog"),
        (name = "health", description = "Liveness, readiness, status counts"),
        (name = "operations", description = "Metrics, digests, projector progress"),
        (name = "graphql", description = "The same operations over GraphQL"),
    )
)]
pub struct ApiDoc;

/// The document as served and checked in.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut text = doc.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
pub async fn spec() -> Json<serde_json::Value> {
    Json(serde_json::from_str(&document()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_json_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        let fresh = document();
        if std::env::var("TASKER_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(path, &fresh).unwrap();
        }
        let stored = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            stored == fresh,
            "docs/openapi.json is stale: run `TASKER_BLESS=1 cargo test -p tasker --bin tasker openapi`"
        );
        let doc: serde_json::Value = serde_json::from_str(&fresh).unwrap();
        for path in [
            "/v1/tasks",
            "/v1/tasks/{id}",
            "/v1/tasks/{id}/steps",
            "/v1/tasks/{id}/history",
            "/v1/tasks/{id}/cancel",
            "/v1/tasks/{id}/retry",
            "/v1/tasks/{id}/steps/{step}/resolve",
            "/v1/templates/{namespace}/{name}",
            "/v1/analytics/bottlenecks",
            "/v1/events/catalog",
            "/health/ready",
            "/metrics",
            "/graphql",
        ] {
            assert!(
                doc["paths"][path].is_object(),
                "{path} missing from the spec"
            );
        }
        assert!(doc["components"]["schemas"]["CreateTask"].is_object());
    }
}
