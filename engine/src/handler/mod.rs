//! Step handlers: the code a step runs. Rust handlers implement [`StepHandler`];
//! built-ins cover tests, benchmarks (`noop`, `sleep`, `fail`) and workflows written
//! without Rust (`http`). Handlers run at least once per attempt: after a crash an
//! in-progress attempt runs again, so handlers should be idempotent (use
//! `task_id` + `step` + `attempt` as an idempotency key downstream).

mod builtin;
mod http;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

pub use builtin::{FailHandler, NoopHandler, SleepHandler};
pub use http::HttpHandler;

use crate::record::{CorrelationId, RawJson, StepError, TaskId};

/// The name of the built-in marker for steps run by remote workers: the engine
/// dispatches nothing and waits for `step.result_reported`.
pub const REMOTE_HANDLER: &str = "remote";

/// What a handler gets for one attempt.
#[derive(Clone, Debug)]
pub struct StepContext {
    pub task_id: TaskId,
    pub correlation_id: CorrelationId,
    pub namespace: String,
    pub task_name: String,
    pub version: String,
    pub step: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The task's context (validated against the template's schema).
    pub context: RawJson,
    /// Results of the step's parents, by step name.
    pub parents: Vec<(String, RawJson)>,
    /// The step's `config` from the template.
    pub config: RawJson,
    /// The step's timeout; the executor enforces it.
    pub timeout: Duration,
}

impl StepContext {
    pub fn context_value(&self) -> serde_json::Value {
        self.context.to_value()
    }

    pub fn config_value(&self) -> serde_json::Value {
        self.config.to_value()
    }

    pub fn parent(&self, name: &str) -> Option<&RawJson> {
        self.parents.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }
}

/// A step implementation. Return the step's JSON result, or a [`StepError`] saying
/// whether another attempt may help (`StepError::retryable`, optionally with
/// `retry_after_ms`) or not (`StepError::permanent`).
#[async_trait::async_trait]
pub trait StepHandler: Send + Sync + 'static {
    async fn call(&self, ctx: StepContext) -> Result<serde_json::Value, StepError>;
}

/// Handlers by name; thread-safe and replaceable at runtime.
pub struct HandlerRegistry {
    handlers: ArcSwap<BTreeMap<String, Arc<dyn StepHandler>>>,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerRegistry")
            .field("handlers", &self.names())
            .finish()
    }
}

impl Default for HandlerRegistry {
    fn default() -> Self {
        HandlerRegistry::with_builtins()
    }
}

impl HandlerRegistry {
    pub fn empty() -> Self {
        HandlerRegistry {
            handlers: ArcSwap::from_pointee(BTreeMap::new()),
        }
    }

    /// `noop`, `sleep`, `fail` and `http`.
    pub fn with_builtins() -> Self {
        let r = HandlerRegistry::empty();
        r.register("noop", NoopHandler);
        r.register("sleep", SleepHandler);
        r.register("fail", FailHandler);
        r.register("http", HttpHandler::new());
        r
    }

    /// Adds or replaces a handler; tasks started afterwards use it.
    pub fn register(&self, name: &str, handler: impl StepHandler) {
        let handler: Arc<dyn StepHandler> = Arc::new(handler);
        self.handlers.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.insert(name.to_owned(), Arc::clone(&handler));
            next
        });
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn StepHandler>> {
        self.handlers.load().get(name).cloned()
    }

    /// Known to the engine: registered here, or the remote-worker marker.
    pub fn is_known(&self, name: &str) -> bool {
        name == REMOTE_HANDLER || self.handlers.load().contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.handlers.load().keys().cloned().collect();
        names.push(REMOTE_HANDLER.to_owned());
        names
    }
}
