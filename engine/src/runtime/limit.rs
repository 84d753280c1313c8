//! Adaptive step concurrency between a floor and a ceiling, from observed step
//! latency and queue depth (a gradient limiter, as in Netflix's concurrency-limits):
//! while work is queued and latency holds steady the limit grows; when latency rises
//! above its long-run level (a downstream is saturating) the limit shrinks.
//! Rises of well under a millisecond do not count: for steps that take
//! microseconds they are the scheduler's jitter, and shrinking on them swung
//! the limit between its floor and ~300 within 100 ms under load, holding
//! ready steps back in the processors while the executor had room.

/// The limiter's state. Pure: callers feed it samples.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    min: usize,
    max: usize,
    limit: f64,
    short_rtt: f64,
    long_rtt: f64,
    samples: u64,
}

/// Latency may rise this much over its long-run average before the limit shrinks.
const TOLERANCE: f64 = 1.5;
const UPDATE_EVERY: u64 = 8;
/// Latency changes well under this are scheduling noise, not a saturating
/// downstream (µs).
const NOISE_US: f64 = 1_000.0;

impl AdaptiveLimit {
    pub fn new(min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        AdaptiveLimit {
            min,
            max,
            limit: min as f64,
            short_rtt: 0.0,
            long_rtt: 0.0,
            samples: 0,
        }
    }

    pub fn current(&self) -> usize {
        (self.limit.round() as usize).clamp(self.min, self.max)
    }

    /// Records one finished step's latency (µs) with `queued` steps waiting;
    /// returns the new limit.
    pub fn on_sample(&mut self, rtt_us: f64, queued: usize) -> usize {
        let rtt = rtt_us.max(1.0);
        if self.samples == 0 {
            self.short_rtt = rtt;
            self.long_rtt = rtt;
        } else {
            self.short_rtt = 0.9 * self.short_rtt + 0.1 * rtt;
            self.long_rtt = 0.998 * self.long_rtt + 0.002 * rtt;
        }
        self.samples += 1;
        if !self.samples.is_multiple_of(UPDATE_EVERY) {
            return self.current();
        }
        // Let the long-run level drift down fast so a warm-up spike is forgotten.
        if self.long_rtt > self.short_rtt * 2.0 {
            self.long_rtt = 0.95 * self.long_rtt + 0.05 * self.short_rtt;
        }
        let gradient =
            (TOLERANCE * (self.long_rtt + NOISE_US) / (self.short_rtt + NOISE_US)).clamp(0.5, 1.0);
        let headroom = if queued > 0 {
            self.limit.sqrt().max(1.0)
        } else {
            0.0
        };
        let target = self.limit * gradient + headroom;
        self.limit = (0.8 * self.limit + 0.2 * target).clamp(self.min as f64, self.max as f64);
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_under_queueing_with_steady_latency_and_shrinks_when_latency_climbs() {
        let mut l = AdaptiveLimit::new(4, 200);
        assert_eq!(l.current(), 4);
        for _ in 0..5_000 {
            l.on_sample(1_000.0, 100);
        }
        assert_eq!(
            l.current(),
            200,
            "steady latency + queue grows to the ceiling"
        );
        let mut idle = AdaptiveLimit::new(4, 200);
        for _ in 0..5_000 {
            idle.on_sample(1_000.0, 0);
        }
        assert_eq!(idle.current(), 4, "no queue, no growth");
        // A downstream saturates: latency jumps tenfold.
        for _ in 0..300 {
            l.on_sample(10_000.0, 100);
        }
        assert!(
            l.current() < 100,
            "a latency jump shrinks the limit: {}",
            l.current()
        );
        // The new latency becomes the norm and the limit recovers.
        for _ in 0..20_000 {
            l.on_sample(10_000.0, 100);
        }
        assert_eq!(l.current(), 200, "steady again, it grows back");
        for _ in 0..20_000 {
            l.on_sample(1e9, 100);
        }
        assert!(l.current() >= 4);
    }

    #[test]
    fn sub_millisecond_jitter_of_fast_steps_does_not_shrink_the_limit() {
        let mut l = AdaptiveLimit::new(8, 512);
        for _ in 0..5_000 {
            l.on_sample(10.0, 10);
        }
        assert_eq!(
            l.current(),
            512,
            "fast steps with a queue reach the ceiling"
        );
        // The scheduler delays a run of them: 10 µs becomes 400 µs, 40 times over.
        let lowest = (0..2_000).map(|_| l.on_sample(400.0, 10)).min();
        assert_eq!(lowest, Some(512), "jitter is not a saturating downstream");
        // A real slowdown of fast steps (10 µs to 5 ms) still shrinks it.
        for _ in 0..300 {
            l.on_sample(5_000.0, 10);
        }
        assert!(l.current() < 256, "shrinks: {}", l.current());
    }
}
