//! Templates: the YAML model, validation (names, semver, DAG shape, JSON Schema) and
//! the resolved form tasks are accepted with. Pure: callers read the files.

mod error;
mod model;
mod order;

use std::fmt;
use std::sync::Arc;

pub use error::{TemplateError, TemplateErrorKind, TemplateErrors};

use crate::record::{RawJson, TemplateSnapshot};
use crate::state::Dag;

/// A validated template, ready to accept tasks.
#[derive(Clone)]
pub struct Template {
    pub version: semver::Version,
    pub description: String,
    dag: Arc<Dag>,
    context_schema: Option<Arc<jsonschema::Validator>>,
    context_schema_json: Option<serde_json::Value>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Template")
            .field("template", &self.snapshot().qualified_name())
            .field("steps", &self.snapshot().steps.len())
            .field("has_context_schema", &self.context_schema.is_some())
            .finish()
    }
}

impl Template {
    /// Parses and validates one YAML document; `file` names it in errors.
    pub fn from_yaml(text: &str, file: &str) -> Result<Template, TemplateErrors> {
        let doc = model::parse(text, file)?;
        model::validate(doc, file)
    }

    pub fn snapshot(&self) -> &TemplateSnapshot {
        self.dag.snapshot()
    }

    pub fn dag(&self) -> &Arc<Dag> {
        &self.dag
    }

    pub fn namespace(&self) -> &str {
        &self.snapshot().namespace
    }

    pub fn name(&self) -> &str {
        &self.snapshot().name
    }

    pub fn context_schema(&self) -> Option<&serde_json::Value> {
        self.context_schema_json.as_ref()
    }

    /// Checks handler names against what is registered; errors name the step.
    pub fn check_handlers(
        &self,
        file: &str,
        is_known: impl Fn(&str) -> bool,
    ) -> Result<(), TemplateErrors> {
        let errors: Vec<TemplateError> = self
            .snapshot()
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| !is_known(&s.handler))
            .map(|(i, s)| TemplateError {
                file: file.to_owned(),
                field: format!("steps[{i}].handler"),
                kind: TemplateErrorKind::UnknownHandler(s.handler.clone()),
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TemplateErrors(errors))
        }
    }

    /// Validates a task's context against the template's JSON Schema; the errors
    /// are one line each (`/path: message`), ready for `task.rejected.details`.
    pub fn validate_context(&self, context: &RawJson) -> Result<(), Vec<String>> {
        let value: serde_json::Value = serde_json::from_str(context.as_str())
            .map_err(|e| vec![format!("context is not valid JSON: {e}")])?;
        let Some(schema) = &self.context_schema else {
            return Ok(());
        };
        let errors: Vec<String> = schema
            .iter_errors(&value)
            .map(|e| {
                let path = e.instance_path().to_string();
                let path = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                format!("{path}: {e}")
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests;
