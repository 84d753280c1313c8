//! The YAML document and its validation into a [`Template`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::Template;
use super::error::{TemplateError, TemplateErrorKind, TemplateErrors};
use super::order::topological_order;
use crate::record::{BackoffSpec, RawJson, StepId, StepSpec, TemplateSnapshot};
use crate::state::Dag;

pub const DEFAULT_RETRY_LIMIT: u32 = 3;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TemplateDoc {
    namespace: String,
    name: String,
    version: String,
    #[serde(default)]
    description: String,
    /// JSON Schema every task's context must satisfy.
    #[serde(default)]
    context_schema: Option<serde_json::Value>,
    #[serde(default)]
    steps: Vec<StepDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDoc {
    name: String,
    handler: String,
    /// Documentation only; not carried into the snapshot.
    #[serde(default, rename = "description")]
    _description: String,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    retryable: Option<bool>,
    #[serde(default)]
    retry_limit: Option<u32>,
    /// `30s`, `500ms`, `2m`, or a number of milliseconds.
    #[serde(default)]
    timeout: Option<DurationDoc>,
    #[serde(default)]
    backoff: Option<BackoffDoc>,
    #[serde(default)]
    config: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackoffDoc {
    initial: Option<DurationDoc>,
    max: Option<DurationDoc>,
    jitter_pct: Option<u8>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DurationDoc {
    Millis(u64),
    Text(String),
}

impl DurationDoc {
    fn millis(&self) -> Result<u64, String> {
        match self {
            DurationDoc::Millis(ms) => Ok(*ms),
            DurationDoc::Text(text) => humantime::parse_duration(text.trim())
                .map(|d: Duration| d.as_millis().min(u128::from(u64::MAX)) as u64)
                .map_err(|e| format!("`{text}` is not a duration like 30s or 500ms: {e}")),
        }
    }
}

pub(super) fn parse(text: &str, file: &str) -> Result<TemplateDoc, TemplateErrors> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let field = e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "document".to_owned());
        TemplateErrors(vec![TemplateError {
            file: file.to_owned(),
            field,
            kind: TemplateErrorKind::Syntax(e.to_string()),
        }])
    })
}

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && s.len() <= 128
}

pub(super) fn validate(doc: TemplateDoc, file: &str) -> Result<Template, TemplateErrors> {
    let mut errors = Vec::new();
    let mut err = |field: String, kind: TemplateErrorKind| {
        errors.push(TemplateError {
            file: file.to_owned(),
            field,
            kind,
        })
    };

    for (field, value) in [("namespace", &doc.namespace), ("name", &doc.name)] {
        if !valid_identifier(value) {
            err(
                field.to_owned(),
                TemplateErrorKind::Invalid(format!(
                    "`{value}` must be 1-128 characters of letters, digits, `_`, `-` or `.`"
                )),
            );
        }
    }
    let version = match semver::Version::parse(doc.version.trim()) {
        Ok(v) => Some(v),
        Err(_) => {
            err(
                "version".into(),
                TemplateErrorKind::BadVersion(doc.version.clone()),
            );
            None
        }
    };
    let context_schema = match &doc.context_schema {
        None => None,
        Some(schema) => match jsonschema::validator_for(schema) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                err(
                    "context_schema".into(),
                    TemplateErrorKind::BadSchema(e.to_string()),
                );
                None
            }
        },
    };
    if doc.steps.is_empty() {
        err("steps".into(), TemplateErrorKind::EmptyDag);
    }

    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, step) in doc.steps.iter().enumerate() {
        if !valid_identifier(&step.name) {
            err(
                format!("steps[{i}].name"),
                TemplateErrorKind::Invalid(format!(
                    "`{}` must be 1-128 characters of letters, digits, `_`, `-` or `.`",
                    step.name
                )),
            );
        }
        if index.insert(step.name.as_str(), i).is_some() {
            err(
                format!("steps[{i}].name"),
                TemplateErrorKind::DuplicateStep(step.name.clone()),
            );
        }
        if step.handler.trim().is_empty() {
            err(
                format!("steps[{i}].handler"),
                TemplateErrorKind::Invalid("a handler name is required".into()),
            );
        }
        if step.retry_limit == Some(0) {
            err(
                format!("steps[{i}].retry_limit"),
                TemplateErrorKind::Invalid(
                    "must be at least 1 (it counts every attempt, the first included)".into(),
                ),
            );
        }
    }

    let mut parents: Vec<Vec<usize>> = Vec::with_capacity(doc.steps.len());
    for (i, step) in doc.steps.iter().enumerate() {
        let mut ps = Vec::new();
        for (j, dep) in step.depends_on.iter().enumerate() {
            match index.get(dep.as_str()) {
                Some(&p) if !ps.contains(&p) => ps.push(p),
                Some(_) => err(
                    format!("steps[{i}].depends_on[{j}]"),
                    TemplateErrorKind::Invalid(format!("`{dep}` is listed twice")),
                ),
                None => err(
                    format!("steps[{i}].depends_on[{j}]"),
                    TemplateErrorKind::UnknownDependency(dep.clone()),
                ),
            }
        }
        parents.push(ps);
    }

    let mut specs: Vec<Option<StepSpec>> = Vec::with_capacity(doc.steps.len());
    for (i, step) in doc.steps.iter().enumerate() {
        let timeout_ms = match step.timeout.as_ref().map(DurationDoc::millis) {
            None => DEFAULT_TIMEOUT_MS,
            Some(Ok(0)) => {
                err(
                    format!("steps[{i}].timeout"),
                    TemplateErrorKind::Invalid("must be greater than zero".into()),
                );
                DEFAULT_TIMEOUT_MS
            }
            Some(Ok(ms)) => ms,
            Some(Err(e)) => {
                err(format!("steps[{i}].timeout"), TemplateErrorKind::Invalid(e));
                DEFAULT_TIMEOUT_MS
            }
        };
        let mut backoff = BackoffSpec::default();
        if let Some(b) = &step.backoff {
            for (name, value, slot) in [
                ("initial", &b.initial, &mut backoff.initial_ms),
                ("max", &b.max, &mut backoff.max_ms),
            ] {
                match value.as_ref().map(DurationDoc::millis) {
                    None => {}
                    Some(Ok(ms)) => *slot = ms,
                    Some(Err(e)) => err(
                        format!("steps[{i}].backoff.{name}"),
                        TemplateErrorKind::Invalid(e),
                    ),
                }
            }
            if let Some(j) = b.jitter_pct {
                if j > 100 {
                    err(
                        format!("steps[{i}].backoff.jitter_pct"),
                        TemplateErrorKind::Invalid("must be between 0 and 100".into()),
                    );
                }
                backoff.jitter_pct = j.min(100);
            }
            if backoff.max_ms < backoff.initial_ms {
                err(
                    format!("steps[{i}].backoff.max"),
                    TemplateErrorKind::Invalid("must not be less than `initial`".into()),
                );
            }
        }
        let config = step
            .config
            .as_ref()
            .map(RawJson::from_value)
            .unwrap_or_else(RawJson::empty_object);
        specs.push(Some(StepSpec {
            name: step.name.clone(),
            handler: step.handler.trim().to_owned(),
            depends_on: Vec::new(), // filled in topological order below
            retryable: step.retryable.unwrap_or(true),
            retry_limit: step.retry_limit.unwrap_or(DEFAULT_RETRY_LIMIT).max(1),
            timeout_ms,
            backoff,
            config,
        }));
    }

    let names: Vec<&str> = doc.steps.iter().map(|s| s.name.as_str()).collect();
    let order = match topological_order(&parents) {
        Ok(order) => order,
        Err(cycle) => {
            let mut path: Vec<String> = cycle.iter().map(|&i| names[i].to_owned()).collect();
            if let Some(first) = path.first().cloned() {
                path.push(first);
            }
            let at = cycle.first().copied().unwrap_or(0);
            err(
                format!("steps[{at}].depends_on"),
                TemplateErrorKind::Cycle(path),
            );
            Vec::new()
        }
    };

    if !errors.is_empty() {
        return Err(TemplateErrors(errors));
    }
    let Some(version) = version else {
        return Err(TemplateErrors(errors));
    };

    // Re-index steps in topological order so every parent precedes its children.
    let mut new_index = vec![0u32; order.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new as u32;
    }
    let mut steps = Vec::with_capacity(order.len());
    for &old in &order {
        if let Some(mut spec) = specs[old].take() {
            let mut deps: Vec<StepId> =
                parents[old].iter().map(|&p| StepId(new_index[p])).collect();
            deps.sort();
            spec.depends_on = deps;
            steps.push(spec);
        }
    }
    let snapshot = TemplateSnapshot {
        namespace: doc.namespace,
        name: doc.name,
        version: version.to_string(),
        steps,
    };
    Ok(Template {
        version,
        description: doc.description,
        dag: Arc::new(Dag::new(Arc::new(snapshot))),
        context_schema,
        context_schema_json: doc.context_schema,
    })
}
