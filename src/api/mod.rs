//! The HTTP API served by `tasker run` (`api.bind`): REST under `/v1`, GraphQL at
//! `/graphql`, health, Prometheus metrics and the OpenAPI document. One file per
//! concern; REST and GraphQL share the service layer (`service.rs`). Errors are
//! RFC 9457 problem+json (`problem.rs`); every response carries `X-Correlation-ID`.

// `Problem` is the error of every operation and becomes the response body; it is
// built once per failed request, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

pub mod analytics;
pub mod audit;
pub mod auth;
pub mod events;
pub mod graphql;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod problem;
mod read;
pub mod service;
pub mod tasks;
pub mod templates;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tasker_engine::config::{Config, Resolved};
use tasker_engine::record::CorrelationId;
use tasker_engine::runtime::Engine;
use tracing::Instrument;

pub use audit::{DigestJson, ProjectorJson};
pub use problem::Problem;
pub use service::Accepted;

/// The request and response header carrying the correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// API settings resolved from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub max_projector_lag_records: u64,
    pub max_projector_lag: Duration,
    pub status_cache: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_body_bytes: 1 << 20,
            max_projector_lag_records: 100_000,
            max_projector_lag: Duration::from_secs(60),
            status_cache: Duration::from_secs(15),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    /// The read model, when `tasker run` projects.
    pub read_model: Option<tasker_projections::Store>,
    /// The projector's progress, for the partitions this process projects.
    pub projector: crate::project::Active,
    pub settings: Arc<Settings>,
    pub auth: Arc<auth::Auth>,
    pub status_cache: Arc<health::StatusCache>,
    pub graphql: graphql::TaskerSchema,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .field("read_model", &self.read_model.as_ref().map(|s| s.kind()))
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The API over `engine` configured by `config` (reads JWT keys).
    pub fn new(
        engine: Arc<Engine>,
        read_model: Option<tasker_projections::Store>,
        projector: crate::project::Active,
        config: &Config,
        resolved: &Resolved,
    ) -> anyhow::Result<AppState> {
        problem::set_max_json_depth(config.api.max_json_depth);
        let auth = auth::Auth::from_config(&config.auth, resolved.jwt_leeway)?;
        if !auth.enabled() && !resolved.bind.ip().is_loopback() {
            tracing::warn!(bind = %resolved.bind, "the API listens beyond loopback with auth disabled; set auth.enabled");
        }
        Ok(AppState {
            engine,
            read_model,
            projector,
            settings: Arc::new(Settings {
                max_body_bytes: config.api.max_body_bytes,
                max_projector_lag_records: config.health.max_projector_lag_records,
                max_projector_lag: resolved.health_max_projector_lag,
                status_cache: resolved.health_status_cache,
            }),
            auth: Arc::new(auth),
            status_cache: Arc::default(),
            graphql: graphql::schema(),
        })
    }
}

/// The correlation id of the current request (from `X-Correlation-ID` when it is
/// a UUID, else generated).
#[derive(Debug, Clone, Copy)]
pub struct Correlation(pub CorrelationId);

/// Middleware: picks the correlation id, runs the request in a span carrying it,
/// and returns it in the response.
async fn correlate(mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let id = given
        .and_then(|v| v.parse::<CorrelationId>().ok())
        .unwrap_or_else(CorrelationId::generate);
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        correlation_id = %id,
        status = tracing::field::Empty,
    );
    if let Some(g) = given.filter(|g| g.parse::<CorrelationId>().is_err()) {
        tracing::debug!(parent: &span, given = g, "X-Correlation-ID is not a UUID; generated one");
    }
    req.extensions_mut().insert(Correlation(id));
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.record("status", resp.status().as_u16());
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert(CORRELATION_HEADER, v);
    }
    resp
}

async fn authenticate(state: State<AppState>, req: Request, next: Next) -> Response {
    auth::authenticate(state, req, next).await
}

pub fn router(state: AppState) -> Router {
    let limit = state.settings.max_body_bytes;
    Router::new()
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/health/status", get(health::status))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/openapi.json", get(openapi::spec))
        .route("/v1/tasks", post(tasks::create_task).get(tasks::list_tasks))
        .route("/v1/tasks/{id}", get(tasks::show_task))
        .route("/v1/tasks/{id}/steps", get(tasks::task_steps))
        .route("/v1/tasks/{id}/history", get(tasks::task_history))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel_task))
        .route("/v1/tasks/{id}/retry", post(tasks::retry_task))
        .route(
            "/v1/tasks/{id}/steps/{step}/resolve",
            post(tasks::resolve_step),
        )
        .route("/v1/templates", get(templates::list))
        .route("/v1/templates/{namespace}", get(templates::namespace))
        .route("/v1/templates/{namespace}/{name}", get(templates::show))
        .route("/v1/handlers", get(templates::handlers))
        .route("/v1/analytics/performance", get(analytics::performance))
        .route("/v1/analytics/bottlenecks", get(analytics::bottlenecks))
        .route("/v1/events/catalog", get(events::show))
        .route("/v1/digests", get(audit::digests))
        .route("/v1/projector", get(audit::projector))
        .route("/graphql", post(graphql::execute))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(correlate))
        .with_state(state)
}
