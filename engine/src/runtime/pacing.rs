//! Background file I/O paced so that the log's group commits do not queue
//! behind it: snapshots are written and removed on their own thread, but they
//! share the disk with every partition's `fdatasync`.
//!
//! Writing: a snapshot is made durable a step at a time as it is written
//! ([`Paced`]). Written whole and fsynced at the end, a full snapshot (tens of
//! MiB) sat in the disk queue ahead of the group commits: appends waited up to
//! 180 ms behind it. In 2 MiB steps an append waits for at most one step.
//!
//! Removing: on a filesystem mounted with online discard (`-o discard`,
//! common on cloud VMs), unlinking a file sends the device one TRIM for all of
//! its blocks, and every `fdatasync` queued behind it waits. Measured here (ext4 on virtio,
//! 2026-11-27): unlinking a 100 MiB file took 18–21 ms and held a concurrent
//! 4 KiB append + `fdatasync` loop for 13–18 ms (0.5–3.6 ms before). Shrinking
//! it 4 MiB at a time with a 2 ms pause between steps took 75–83 ms and the
//! same loop's worst sync was 1.3–3.4 ms. Snapshot pruning deletes files of
//! tens of MiB on a background thread, so it pays the time and the log keeps
//! its latency.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// A snapshot is made durable this many bytes at a time while it is written.
pub(crate) const PACE_BYTES: u64 = 2 << 20;

/// Something whose written data can be made durable.
pub(crate) trait SyncData {
    fn sync_data(&mut self) -> io::Result<()>;
}

impl SyncData for fs::File {
    fn sync_data(&mut self) -> io::Result<()> {
        fs::File::sync_data(self)
    }
}

/// Passes writes through and syncs after every `every` bytes (then rests, with
/// [`Paced::with_duty`]).
pub(crate) struct Paced<W> {
    inner: W,
    every: u64,
    unsynced: u64,
    duty: Option<DutyCycle>,
}

impl<W: io::Write + SyncData> Paced<W> {
    pub(crate) fn new(inner: W, every: u64) -> Self {
        Paced {
            inner,
            every,
            unsynced: 0,
            duty: None,
        }
    }

    /// Rests after each sync so writing and syncing take at most `share` of the time.
    pub(crate) fn with_duty(mut self, share: f64) -> Self {
        self.duty = Some(DutyCycle::new(share));
        self
    }

    pub(crate) fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: io::Write + SyncData> io::Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= self.every {
            self.inner.sync_data()?;
            self.unsynced = 0;
            if let Some(duty) = &mut self.duty {
                duty.pause();
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The share of the time a background snapshot may spend hashing and encoding
/// (of one core), and writing and syncing (of the disk). Done in bursts (0.3-0.8
/// s of encoding per snapshot at 20,000 tasks/s with 300,000 tasks in memory),
/// it delayed the processors even at nice 10, and its writes the log's syncs:
/// p99 latency 15-40 ms with snapshots against 6 ms without (docs/benchmarks.md).
pub(crate) const BACKGROUND_SHARE: f64 = 0.25;

/// Keeps a background thread's work to a share of one core: each [`pause`]
/// sleeps long enough that the work since the last one was at most `share` of
/// the time that passed.
///
/// [`pause`]: DutyCycle::pause
#[derive(Debug)]
pub(crate) struct DutyCycle {
    rest_per_work: f64,
    since: Instant,
    owed: Duration,
}

/// Sleeps shorter than this are saved up (a sleep costs a wake-up).
const MIN_SLEEP: Duration = Duration::from_millis(1);

impl DutyCycle {
    pub(crate) fn new(share: f64) -> Self {
        let share = share.clamp(0.01, 1.0);
        DutyCycle {
            rest_per_work: (1.0 - share) / share,
            since: Instant::now(),
            owed: Duration::ZERO,
        }
    }

    pub(crate) fn pause(&mut self) {
        let rest = self.rest_after(self.since.elapsed());
        if !rest.is_zero() {
            std::thread::sleep(rest);
        }
        self.since = Instant::now();
    }

    /// The rest owed after `worked`: none until it adds up to [`MIN_SLEEP`].
    fn rest_after(&mut self, worked: Duration) -> Duration {
        self.owed += worked.mul_f64(self.rest_per_work);
        if self.owed >= MIN_SLEEP {
            std::mem::take(&mut self.owed)
        } else {
            Duration::ZERO
        }
    }
}

/// Bytes released per step.
pub(crate) const STEP_BYTES: u64 = 4 << 20;
/// Pause between steps, for the device to serve the log's syncs.
pub(crate) const STEP_PAUSE: Duration = Duration::from_millis(2);

/// Truncates `path` from the end, `step` bytes at a time with `pause` between
/// steps, then unlinks it. Returns how many truncations it took. A crash part
/// way leaves a shorter file, which the caller must treat as damaged (snapshot
/// files carry their length and checksum).
pub(crate) fn remove_gently(path: &Path, step: u64, pause: Duration) -> io::Result<u32> {
    let file = OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    let mut steps = 0;
    while len > step {
        len -= step;
        file.set_len(len)?;
        steps += 1;
        std::thread::sleep(pause);
    }
    drop(file);
    fs::remove_file(path)?;
    Ok(steps)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Records what reached it and where the syncs fell.
    #[derive(Default)]
    struct Sink {
        data: Vec<u8>,
        synced_at: Vec<usize>,
    }

    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.data.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl SyncData for Sink {
        fn sync_data(&mut self) -> io::Result<()> {
            self.synced_at.push(self.data.len());
            Ok(())
        }
    }

    #[test]
    fn a_duty_cycle_rests_in_proportion_and_saves_up_short_rests() {
        let ms = Duration::from_millis;
        let mut quarter = DutyCycle::new(0.25);
        assert_eq!(quarter.rest_after(ms(4)), ms(12));
        // 0.2 ms of work owes 0.6 ms: saved until a whole millisecond is owed.
        assert_eq!(
            quarter.rest_after(Duration::from_micros(200)),
            Duration::ZERO
        );
        assert_eq!(
            quarter.rest_after(Duration::from_micros(200)),
            Duration::from_micros(1_200)
        );
        assert_eq!(quarter.rest_after(ms(0)), Duration::ZERO);
        let mut all = DutyCycle::new(1.0);
        assert_eq!(all.rest_after(ms(50)), Duration::ZERO);
    }

    #[test]
    fn a_snapshot_is_synced_in_steps_as_it_is_written() {
        use io::Write;
        let mut out = std::io::BufWriter::with_capacity(10, Paced::new(Sink::default(), 25));
        let bytes: Vec<u8> = (0..100u8).collect();
        for chunk in bytes.chunks(7) {
            out.write_all(chunk).unwrap_or_else(|e| panic!("{e}"));
        }
        let sink = out
            .into_inner()
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner();
        assert_eq!(sink.data, bytes, "the bytes pass through unchanged");
        // A sync after every 25 bytes or more, never more than a write apart.
        assert_eq!(sink.synced_at.len(), 3, "syncs at {:?}", sink.synced_at);
        let mut last = 0;
        for at in &sink.synced_at {
            assert!(
                at - last >= 25 && at - last < 25 + 10,
                "syncs at {:?}",
                sink.synced_at
            );
            last = *at;
        }
    }

    #[test]
    fn a_file_is_shrunk_in_steps_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.snap");
        std::fs::write(&path, vec![7u8; 100 * 1024]).unwrap();
        // 100 KiB in 16 KiB steps: six truncations (to 84, 68, 52, 36, 20, 4
        // KiB), and the last 4 KiB go with the unlink.
        assert_eq!(remove_gently(&path, 16 * 1024, Duration::ZERO).unwrap(), 6);
        assert!(!path.exists());
    }

    #[test]
    fn a_small_file_is_just_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.delta");
        std::fs::write(&path, b"tiny").unwrap();
        assert_eq!(remove_gently(&path, STEP_BYTES, STEP_PAUSE).unwrap(), 0);
        assert!(!path.exists());
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = remove_gently(&dir.path().join("gone"), STEP_BYTES, STEP_PAUSE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
