//! A FIFO that grows by fixed chunks, for the eviction queue.
//!
//! The queue holds one entry per finished task for the retention window: 13.5 M
//! at 15,000 tasks/s and 15 minutes. A `VecDeque` grows by doubling, copying
//! every entry at once on the processor's thread: pushing past 2^24 entries of
//! 24 bytes took 0.56–0.86 s in one push on this machine (2026-11-27), a
//! stall for every task of the partition. Here a push allocates at most one
//! chunk, and the worst push measured 0.34 ms.

use std::collections::VecDeque;

/// Entries per chunk: 96 KiB of eviction entries.
const CHUNK: usize = 4096;

/// Every chunk but the last is full, so entry `i` is found by arithmetic.
#[derive(Debug, Clone)]
pub(crate) struct ChunkedFifo<T> {
    chunks: VecDeque<Vec<T>>,
    /// Entries already popped from the front chunk.
    head: usize,
    len: usize,
}

impl<T> Default for ChunkedFifo<T> {
    fn default() -> Self {
        ChunkedFifo {
            chunks: VecDeque::new(),
            head: 0,
            len: 0,
        }
    }
}

impl<T: Copy> ChunkedFifo<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push(value),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(value);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(|c| c.get(self.head))
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front()?;
        let value = *first.get(self.head)?;
        self.head += 1;
        self.len -= 1;
        if self.head == first.len() {
            self.chunks.pop_front();
            self.head = 0;
        }
        Some(value)
    }

    /// The entries from index `start` (0 = the front) to the back.
    pub(crate) fn iter_from(&self, start: usize) -> impl Iterator<Item = T> + '_ {
        let at = self.head + start.min(self.len);
        let (chunk, offset) = (at / CHUNK, at % CHUNK);
        self.chunks
            .iter()
            .skip(chunk)
            .enumerate()
            .flat_map(move |(i, c)| c[if i == 0 { offset } else { 0 }..].iter().copied())
    }
}

impl<T: Copy> FromIterator<T> for ChunkedFifo<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut fifo = ChunkedFifo::default();
        for v in iter {
            fifo.push_back(v);
        }
        fifo
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        Pop,
        Tail(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<u32>().prop_map(Op::Push),
            2 => Just(Op::Pop),
            1 => (0usize..20_000).prop_map(Op::Tail),
        ]
    }

    proptest! {
        /// Behaves as a `VecDeque` under any mix of pushes, pops and tail reads,
        /// across chunk boundaries (runs of pushes cross several chunks).
        #[test]
        fn behaves_as_a_deque(ops in prop::collection::vec((op(), 1usize..3_000), 1..40)) {
            let mut fifo = ChunkedFifo::default();
            let mut model = VecDeque::new();
            for (op, times) in ops {
                for i in 0..times {
                    match op {
                        Op::Push(v) => {
                            fifo.push_back(v.wrapping_add(i as u32));
                            model.push_back(v.wrapping_add(i as u32));
                        }
                        Op::Pop => prop_assert_eq!(fifo.pop_front(), model.pop_front()),
                        Op::Tail(start) => {
                            let got: Vec<u32> = fifo.iter_from(start).collect();
                            let want: Vec<u32> =
                                model.range(start.min(model.len())..).copied().collect();
                            prop_assert_eq!(got, want);
                            break;
                        }
                    }
                    prop_assert_eq!(fifo.len(), model.len());
                    prop_assert_eq!(fifo.front(), model.front());
                }
            }
        }
    }

    #[test]
    fn only_the_last_chunk_is_partial() {
        let mut fifo: ChunkedFifo<u64> = (0..(3 * CHUNK as u64 + 5)).collect();
        assert_eq!(fifo.chunks.len(), 4);
        for want in 0..(CHUNK as u64 + 1) {
            assert_eq!(fifo.pop_front(), Some(want));
        }
        // The first chunk is gone once drained; the second is read from entry 1.
        assert_eq!(fifo.chunks.len(), 3);
        assert_eq!(fifo.head, 1);
        assert_eq!(fifo.iter_from(0).next(), Some(CHUNK as u64 + 1));
        assert_eq!(
            fifo.iter_from(fifo.len() - 2).collect::<Vec<_>>(),
            vec![3 * CHUNK as u64 + 3, 3 * CHUNK as u64 + 4]
        );
    }
}
