//! Grouping moments when something was slow into bursts, and how far apart the
//! bursts are: periodic bursts point at something outside the engine. Shared by
//! `tasker bench`'s tail report and the host probe (`benches/host.rs`, which
//! includes this file).

use std::time::Duration;

/// Moments closer than this belong to one burst.
pub const BURST_GAP: Duration = Duration::from_millis(300);

/// Bursts found in a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Bursts {
    /// When each burst began.
    pub starts: Vec<Duration>,
    pub median_gap: Option<Duration>,
}

/// Groups `times` (ascending) into bursts.
pub fn bursts(times: impl IntoIterator<Item = Duration>) -> Bursts {
    let mut starts: Vec<Duration> = Vec::new();
    let mut last: Option<Duration> = None;
    for t in times {
        if last.is_none_or(|l| t.saturating_sub(l) > BURST_GAP) {
            starts.push(t);
        }
        last = Some(t);
    }
    let mut gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    Bursts {
        median_gap: gaps.get(gaps.len() / 2).copied(),
        starts,
    }
}
