//! Tasker's engine. A task is an instance of a versioned template (a DAG of steps);
//! every state change is an event appended to a partitioned log; a deterministic
//! fold (`state`) turns events into task and step state, and `decide` turns
//! commands, step outcomes and timers into new events. `record` and `codec` define
//! the log's vocabulary and bytes, `template` validates workflows, and `log` holds
//! the backends (embedded segment files, Kafka) behind one trait.
//!
//! The pure core (`record`, `codec`, `state`, `decide`, `template`) does no I/O,
//! reads no clock and spawns nothing.

#[cfg(feature = "runtime")]
pub mod audit;
pub mod cloudevents;
pub mod codec;
pub mod config;
pub mod decide;
#[cfg(feature = "runtime")]
pub mod handler;
pub mod log;
#[cfg(feature = "kafka")]
pub mod mirror;
pub mod record;
#[cfg(feature = "runtime")]
pub mod registry;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod state;
#[cfg(feature = "runtime")]
pub mod subscribe;
pub mod template;
