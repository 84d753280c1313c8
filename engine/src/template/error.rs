//! Template validation errors: every one names the file and the field.

use std::fmt;

/// One problem in one template file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {kind}")]
pub struct TemplateError {
    pub file: String,
    /// A path into the document, e.g. `steps[2].depends_on`.
    pub field: String,
    pub kind: TemplateErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateErrorKind {
    #[error("not a valid template document: {0}")]
    Syntax(String),
    #[error("`{0}` is not a semver version (e.g. 1.2.0)")]
    BadVersion(String),
    #[error("the template has no steps")]
    EmptyDag,
    #[error("step `{0}` is defined more than once")]
    DuplicateStep(String),
    #[error("depends on `{0}`, which is not a step of this template")]
    UnknownDependency(String),
    #[error("dependency cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("handler `{0}` is not registered")]
    UnknownHandler(String),
    #[error("invalid JSON Schema: {0}")]
    BadSchema(String),
    #[error("{0}")]
    Invalid(String),
}

/// All problems found in a template (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateErrors(pub Vec<TemplateError>);

impl TemplateErrors {
    pub fn iter(&self) -> impl Iterator<Item = &TemplateError> {
        self.0.iter()
    }
}

impl fmt::Display for TemplateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateErrors {}
