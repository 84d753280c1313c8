//! What readers (HTTP, CLI) see of a partition: an immutable snapshot the processor
//! publishes after every round through `arc-swap`. Readers never touch the
//! processor's state and never wait for it.

use std::sync::Arc;

use crate::record::{Epoch, PartitionId, Position, TaskId};
use crate::state::TaskState;

/// One partition as of its last round.
#[derive(Debug, Clone)]
pub struct PartitionView {
    pub partition: PartitionId,
    /// Every record before this position has been read and folded.
    pub read_position: Position,
    /// The position after this processor's last append.
    pub appended: Position,
    pub epoch: Epoch,
    /// Tasks in memory (finished tasks leave after the retention window).
    pub tasks: imbl::HashMap<TaskId, Arc<TaskState>>,
    /// True once recovery finished and the processor takes new work.
    pub live: bool,
}

impl PartitionView {
    pub fn empty(partition: PartitionId) -> Self {
        PartitionView {
            partition,
            read_position: Position(0),
            appended: Position(0),
            epoch: Epoch(0),
            tasks: imbl::HashMap::new(),
            live: false,
        }
    }

    pub fn task(&self, id: &TaskId) -> Option<&Arc<TaskState>> {
        self.tasks.get(id)
    }
}
