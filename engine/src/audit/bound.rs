//! Where an audit stops: a position, or a time.

use std::fmt;
use std::str::FromStr;
use std::time::UNIX_EPOCH;

use crate::record::{Position, Timestamp};

/// The end of a log prefix. `Position(p)`: the records before position `p` (the
/// same meaning as the position `tasker status --digest` reports). `Time(t)`: the
/// records up to the first one stamped after `t` (record times are the writers'
/// clocks, so a prefix is cut at the first later record rather than filtered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Position(Position),
    Time(Timestamp),
}

impl Bound {
    /// Whether the record at `position`, stamped `timestamp`, lies within the bound.
    pub fn admits(self, position: Position, timestamp: Timestamp) -> bool {
        match self {
            Bound::Position(p) => position < p,
            Bound::Time(t) => timestamp <= t,
        }
    }
}

/// A `--to` / `--at` argument that is neither a position nor a time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither a position (a number) nor an RFC 3339 time like 2026-11-26T10:00:00Z")]
pub struct BadBound(pub String);

impl FromStr for Bound {
    type Err = BadBound;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<u64>()
                .map(|p| Bound::Position(Position(p)))
                .map_err(|_| BadBound(s.to_owned()));
        }
        let t = humantime::parse_rfc3339_weak(s).map_err(|_| BadBound(s.to_owned()))?;
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| BadBound(s.to_owned()))?
            .as_millis();
        Ok(Bound::Time(Timestamp::from_millis(ms as u64)))
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Position(p) => write!(f, "position {p}"),
            Bound::Time(t) => write!(f, "{t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_times_parse_and_bound_a_prefix() {
        assert_eq!("42".parse(), Ok(Bound::Position(Position(42))));
        let t: Bound = "2024-06-10T06:13:20.123Z".parse().unwrap();
        assert_eq!(t, Bound::Time(Timestamp(1_718_000_000_123)));
        assert!(t.admits(Position(9), Timestamp(1_718_000_000_123)));
        assert!(!t.admits(Position(9), Timestamp(1_718_000_000_124)));
        let p = Bound::Position(Position(5));
        assert!(p.admits(Position(4), Timestamp(u64::MAX)));
        assert!(!p.admits(Position(5), Timestamp(0)));
        for bad in ["", "-1", "yesterday", "2024-13-01T00:00:00Z"] {
            assert!(bad.parse::<Bound>().is_err(), "{bad}");
        }
    }
}
