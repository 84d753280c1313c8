//! `/v1/templates` and `/v1/handlers`: the installed templates (with their DAG)
//! and step handlers, from the registry's current catalog.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, State};
use serde::{Deserialize, Serialize};
use tasker_engine::template::Template;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Permission, Principal};
use super::problem::{ApiQuery, Problem};

/// A template version in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateSummary {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub description: String,
    pub steps: usize,
}

/// One step of a template.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateStep {
    pub name: String,
    pub handler: String,
    pub depends_on: Vec<String>,
    pub retryable: bool,
    pub retry_limit: u32,
    pub timeout_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub backoff_jitter_pct: u8,
    pub config: serde_json::Value,
    /// 0 for roots, else the longest path from a root.
    pub level: u32,
}

/// One edge of the DAG: `to` depends on `from`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Edge {
    pub from: String,
    pub to: String,
}

/// A template version with its DAG.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateDetail {
    pub namespace: String,
    pub name: String,
    pub version: String,
    /// Every installed version, oldest first.
    pub versions: Vec<String>,
    pub description: String,
    pub context_schema: Option<serde_json::Value>,
    /// In topological order.
    pub steps: Vec<TemplateStep>,
    pub edges: Vec<Edge>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    /// An exact version or requirement (`^1`); default the highest.
    pub version: Option<String>,
}

fn summary(t: &Template) -> TemplateSummary {
    let s = t.snapshot();
    TemplateSummary {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        version: s.version.clone(),
        description: t.description.clone(),
        steps: s.steps.len(),
    }
}

fn detail(t: &Template, versions: Vec<String>) -> TemplateDetail {
    let s = t.snapshot();
    let mut levels: Vec<u32> = Vec::with_capacity(s.steps.len());
    let mut edges = Vec::new();
    let steps = s
        .steps
        .iter()
        .map(|step| {
            let level = step
                .depends_on
                .iter()
                .filter_map(|p| levels.get(p.index()).map(|l| l + 1))
                .max()
                .unwrap_or(0);
            levels.push(level);
            let parents: Vec<String> = step
                .depends_on
                .iter()
                .filter_map(|p| s.step(*p).map(|p| p.name.clone()))
                .collect();
            edges.extend(parents.iter().map(|p| Edge {
                from: p.clone(),
                to: step.name.clone(),
            }));
            TemplateStep {
                name: step.name.clone(),
                handler: step.handler.clone(),
                depends_on: parents,
                retryable: step.retryable,
                retry_limit: step.retry_limit,
                timeout_ms: step.timeout_ms,
                backoff_initial_ms: step.backoff.initial_ms,
                backoff_max_ms: step.backoff.max_ms,
                backoff_jitter_pct: step.backoff.jitter_pct,
                config: step.config.to_value(),
                level,
            }
        })
        .collect();
    TemplateDetail {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        version: s.version.clone(),
        versions,
        description: t.description.clone(),
        context_schema: t.context_schema().cloned(),
        steps,
        edges,
    }
}

fn visible(state: &AppState, who: &Principal, namespace: Option<&str>) -> Vec<Arc<Template>> {
    state
        .engine
        .registry()
        .catalog()
        .templates()
        .filter(|t| namespace.is_none_or(|n| t.namespace() == n) && who.covers(t.namespace()))
        .cloned()
        .collect()
}

/// Every installed template version the caller may see.
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = Vec<TemplateSummary>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<TemplateSummary>>, Problem> {
    who.require(Permission::HandlerIndex, None)?;
    Ok(Json(
        visible(&state, &who, None)
            .iter()
            .map(|t| summary(t))
            .collect(),
    ))
}

/// The templates of one namespace.
#[utoipa::path(get, path = "/v1/templates/{namespace}", tag = "templates",
    params(("namespace" = String, Path)),
    responses((status = 200, body = Vec<TemplateSummary>), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, description = "no template in the namespace", body = Problem)))]
pub async fn namespace(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(ns): Path<String>,
) -> Result<Json<Vec<TemplateSummary>>, Problem> {
    who.require(Permission::HandlerIndex, Some(&ns))?;
    let list: Vec<TemplateSummary> = visible(&state, &who, Some(&ns))
        .iter()
        .map(|t| summary(t))
        .collect();
    if list.is_empty() {
        return Err(Problem::not_found(
            "unknown_namespace",
            format!("no template is installed in namespace `{ns}`"),
        ));
    }
    Ok(Json(list))
}

/// One template (the highest version, or `?version=`) with its DAG.
#[utoipa::path(get, path = "/v1/templates/{namespace}/{name}", tag = "templates",
    params(("namespace" = String, Path), ("name" = String, Path), VersionQuery),
    responses((status = 200, body = TemplateDetail), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, description = "unknown template or version", body = Problem)))]
pub async fn show(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((ns, name)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<VersionQuery>,
) -> Result<Json<TemplateDetail>, Problem> {
    who.require(Permission::HandlerIndex, Some(&ns))?;
    let registry = state.engine.registry();
    let t = registry
        .resolve(&ns, &name, q.version.as_deref())
        .map_err(|r| Problem::not_found(r.reason.code(), r.message))?;
    let versions: Vec<String> = registry
        .catalog()
        .templates()
        .filter(|t| t.namespace() == ns && t.name() == name)
        .map(|t| t.version.to_string())
        .collect();
    Ok(Json(detail(&t, versions)))
}

/// Step handlers registered in this process.
#[utoipa::path(get, path = "/v1/handlers", tag = "templates",
    responses((status = 200, body = Vec<String>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn handlers(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<String>>, Problem> {
    who.require(Permission::HandlerIndex, None)?;
    let mut names = state.engine.registry().handlers().names();
    names.sort();
    Ok(Json(names))
}
