//! The hash chain over a partition's records: `head(n) = H(head(n-1) || bytes(n))`.
//! Any changed, dropped or reordered record changes every later head.

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use crate::record::PartitionId;

/// The chain head after `count` records.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct HashChain {
    head: Digest,
    count: u64,
}

impl HashChain {
    /// The head before the first record; differs per partition so logs cannot be swapped.
    pub fn genesis(partition: PartitionId) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"tasker.chain.v1");
        h.update(&partition.0.to_le_bytes());
        HashChain {
            head: Digest(*h.finalize().as_bytes()),
            count: 0,
        }
    }

    /// Extends the chain with one record's payload bytes.
    pub fn push(&mut self, record: &[u8]) {
        let mut h = blake3::Hasher::new();
        h.update(&self.head.0);
        h.update(record);
        self.head = Digest(*h.finalize().as_bytes());
        self.count += 1;
    }

    pub fn head(&self) -> Digest {
        self.head
    }

    /// Records chained so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_content_change_the_head() {
        let mut a = HashChain::genesis(PartitionId(0));
        a.push(b"one");
        a.push(b"two");
        let mut b = HashChain::genesis(PartitionId(0));
        b.push(b"two");
        b.push(b"one");
        let mut c = HashChain::genesis(PartitionId(1));
        c.push(b"one");
        c.push(b"two");
        assert_ne!(a.head(), b.head());
        assert_ne!(a.head(), c.head());
        assert_eq!(a.count(), 2);
        let mut d = HashChain::genesis(PartitionId(0));
        d.push(b"one");
        d.push(b"two");
        assert_eq!(a, d);
    }
}
