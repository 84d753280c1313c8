//! Opaque JSON text carried inside records, so the fold never parses JSON.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Validated JSON text. Records store it as a string (bincode cannot carry
/// `serde_json::Value`), and cloning it is a reference-count bump.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Arc<str>);

impl RawJson {
    /// Checks that `text` is one JSON value and keeps it as written.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        let _: serde::de::IgnoredAny = serde_json::from_str(text)?;
        Ok(RawJson(Arc::from(text)))
    }

    /// Serializes a value; infallible for `serde_json::Value`.
    pub fn from_value(value: &serde_json::Value) -> Self {
        RawJson(Arc::from(value.to_string()))
    }

    /// Wraps text the caller produced with serde_json (trusted, not re-validated).
    pub fn from_trusted(text: String) -> Self {
        RawJson(Arc::from(text))
    }

    pub fn null() -> Self {
        RawJson(Arc::from("null"))
    }

    pub fn empty_object() -> Self {
        RawJson(Arc::from("{}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses into a value (for handlers and read models, never the fold).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl Default for RawJson {
    fn default() -> Self {
        RawJson::null()
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
