//! Retry timing, decided once in `decide` and recorded in `step.failed.retry_at`.

use crate::record::{BackoffSpec, StepId, TaskId};

/// Delay before attempt `attempt + 1`, after attempt `attempt` (1-based) failed.
///
/// A handler's Retry-After wins as given. Otherwise `initial_ms * 2^(attempt-1)`
/// capped at `max_ms` (1, 2, 4, 8, 16, 32 s, ... 300 s by default), then
/// ±`jitter_pct`% jitter seeded by (task, step, attempt): the same failure always
/// gets the same delay, and tasks failing together spread out.
pub fn retry_delay_ms(
    spec: &BackoffSpec,
    retry_after_ms: Option<u64>,
    task: TaskId,
    step: StepId,
    attempt: u32,
) -> u64 {
    if let Some(ms) = retry_after_ms {
        return ms;
    }
    let exp = attempt.saturating_sub(1).min(63);
    let base = spec
        .initial_ms
        .saturating_mul(1u64.checked_shl(exp).unwrap_or(u64::MAX))
        .min(spec.max_ms);
    let jitter = u64::from(spec.jitter_pct.min(100));
    if jitter == 0 || base == 0 {
        return base;
    }
    let span = base.saturating_mul(jitter) / 100; // ± span
    if span == 0 {
        return base;
    }
    let r = seed(task, step, attempt) % (2 * span + 1);
    base - span + r
}

/// A stable 64-bit value from the failure's identity (no RNG, no clock).
fn seed(task: TaskId, step: StepId, attempt: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(task.as_bytes());
    h.update(&step.0.to_le_bytes());
    h.update(&attempt.to_le_bytes());
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Timestamp;

    #[test]
    fn follows_the_schedule_within_jitter_and_is_deterministic() {
        let spec = BackoffSpec::default();
        let task = TaskId::v7(Timestamp(1), 9);
        let expected = [
            1_000u64, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000,
            300_000,
        ];
        for (i, base) in expected.iter().enumerate() {
            let attempt = i as u32 + 1;
            let d = retry_delay_ms(&spec, None, task, StepId(1), attempt);
            assert!(
                d >= base * 9 / 10 && d <= base * 11 / 10,
                "attempt {attempt}: {d} vs {base}"
            );
            assert_eq!(d, retry_delay_ms(&spec, None, task, StepId(1), attempt));
        }
        let spread: std::collections::HashSet<u64> = (0..50u32)
            .map(|s| retry_delay_ms(&spec, None, task, StepId(s), 3))
            .collect();
        assert!(spread.len() > 10, "jitter should spread delays: {spread:?}");
        assert_eq!(
            retry_delay_ms(&spec, Some(42_000), task, StepId(1), 5),
            42_000
        );
        assert!(retry_delay_ms(&spec, None, task, StepId(1), u32::MAX) <= 330_000);
        let none = BackoffSpec {
            initial_ms: 10,
            max_ms: 10,
            jitter_pct: 0,
        };
        assert_eq!(retry_delay_ms(&none, None, task, StepId(0), 7), 10);
    }
}
