//! The resolved template carried by `task.accepted`, so replay never depends on
//! the templates installed today.

use serde::{Deserialize, Serialize};

use super::ids::StepId;
use super::json::RawJson;

/// Retry backoff for one step: exponential from `initial_ms`, capped at `max_ms`,
/// with ±`jitter_pct`% deterministic jitter. A handler's Retry-After overrides it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct BackoffSpec {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub jitter_pct: u8,
}

impl Default for BackoffSpec {
    /// 1, 2, 4, 8, 16, 32 s then doubling, capped at 300 s, ±10%.
    fn default() -> Self {
        BackoffSpec {
            initial_ms: 1_000,
            max_ms: 300_000,
            jitter_pct: 10,
        }
    }
}

/// One step as the task will run it.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct StepSpec {
    pub name: String,
    pub handler: String,
    /// Parents, as indexes into [`TemplateSnapshot::steps`]; always lower than this step's
    /// own index (the snapshot is stored in topological order).
    pub depends_on: Vec<StepId>,
    pub retryable: bool,
    /// Maximum number of attempts, the first included (>= 1).
    pub retry_limit: u32,
    pub timeout_ms: u64,
    pub backoff: BackoffSpec,
    /// Handler configuration from the template, passed to the handler as is.
    pub config: RawJson,
}

/// A template resolved to one version, with its steps in topological order.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct TemplateSnapshot {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub steps: Vec<StepSpec>,
}

impl TemplateSnapshot {
    pub fn step(&self, id: StepId) -> Option<&StepSpec> {
        self.steps.get(id.index())
    }

    pub fn step_id(&self, name: &str) -> Option<StepId> {
        self.steps
            .iter()
            .position(|s| s.name == name)
            .map(|i| StepId(i as u32))
    }

    /// `namespace/name@version`, as users write it.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}@{}", self.namespace, self.name, self.version)
    }
}
