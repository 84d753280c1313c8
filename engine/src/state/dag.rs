//! A task's template with the adjacency the engine needs, shared by every task of
//! the same template version.

use std::sync::Arc;

use crate::codec;
use crate::record::{StepId, TemplateSnapshot};

/// The template snapshot plus derived children lists (never serialized: derived on
/// load from the snapshot, which is what the log carries).
#[derive(Debug, PartialEq, Eq)]
pub struct Dag {
    snapshot: Arc<TemplateSnapshot>,
    children: Vec<Vec<StepId>>,
    /// blake3 of the snapshot's canonical bytes; part of every task's digest.
    hash: [u8; 32],
}

impl Dag {
    /// Builds the adjacency. Parent indexes that are out of range or not lower than
    /// the step's own index are dropped: a snapshot in the log is trusted to be the
    /// topologically ordered one `template` produced, and the fold must not panic if not.
    pub fn new(snapshot: Arc<TemplateSnapshot>) -> Self {
        let n = snapshot.steps.len();
        let mut children = vec![Vec::new(); n];
        for (i, step) in snapshot.steps.iter().enumerate() {
            for parent in &step.depends_on {
                if parent.index() < i {
                    children[parent.index()].push(StepId(i as u32));
                }
            }
        }
        let bytes = codec::canonical_bytes(&*snapshot).unwrap_or_default();
        let hash = *blake3::hash(&bytes).as_bytes();
        Dag {
            snapshot,
            children,
            hash,
        }
    }

    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    pub fn snapshot(&self) -> &TemplateSnapshot {
        &self.snapshot
    }

    pub fn shared_snapshot(&self) -> &Arc<TemplateSnapshot> {
        &self.snapshot
    }

    pub fn len(&self) -> usize {
        self.snapshot.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.snapshot.steps.is_empty()
    }

    /// Valid parents of `step` (those lower than its index).
    pub fn parents(&self, step: StepId) -> impl Iterator<Item = StepId> + '_ {
        self.snapshot
            .steps
            .get(step.index())
            .map(|s| s.depends_on.as_slice())
            .unwrap_or(&[])
            .iter()
            .copied()
            .filter(move |p| p.index() < step.index())
    }

    pub fn children(&self, step: StepId) -> &[StepId] {
        self.children
            .get(step.index())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn step_ids(&self) -> impl Iterator<Item = StepId> + use<> {
        (0..self.len() as u32).map(StepId)
    }
}
