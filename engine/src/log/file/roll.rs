//! Rolling to a new segment off the append path.
//!
//! Sealing a segment (its sparse index written, fsynced, renamed, the directory
//! fsynced) and creating the next one (created, header written, fsynced, the
//! directory fsynced) took five journal commits inside the append that crossed
//! `segment_bytes`, and every task of the partition waited for that append. A
//! helper thread per writer now does both out of line: it keeps an empty spare
//! file ready, and writes a sealed segment's index after the roll. The append
//! that rolls writes the header into the spare and renames it; its own
//! `fdatasync` makes the header durable with the first records.
//!
//! After a crash: a spare that was renamed may still be under its spare name
//! (the rename reaches the disk with the next directory sync, which the helper
//! does when it creates the next spare), so opening the partition's writer
//! adopts a spare whose header names a segment after the last one, and removes
//! any other spare (without a valid header it never held an acknowledged
//! record: the `fdatasync` that acknowledged one covered the header). A last
//! segment shorter than a header is a roll whose header never reached the disk,
//! and gets its header again. A sealed segment without an index is scanned, as
//! before. Readers (`replay`, `audit`, a reader in another process) read such a
//! spare where it lies until a writer renames it (`segment::readable_segments`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use super::format::encode_segment_header;
use super::segment::{
    io_err, list_segments, segment_path, spare_path, sync_dir, unrenamed_spare, write_index,
};
use crate::log::LogError;

/// Turns the spare into the segment starting at `base`: header written (not
/// synced: the first append's `fdatasync` covers it), then renamed.
pub(super) fn adopt(
    mut spare: File,
    dir: &Path,
    partition: u32,
    base: u64,
) -> Result<File, LogError> {
    let from = spare_path(dir);
    let path = segment_path(dir, base);
    spare
        .write_all(&encode_segment_header(partition, base))
        .map_err(io_err("write segment header", &from))?;
    fs::rename(&from, &path).map_err(io_err("rename spare segment", &path))?;
    Ok(spare)
}

/// On open, before the segments are listed: gives a spare renamed just before a
/// crash its segment name (when it would be the last segment), and removes a
/// spare that never became a segment.
pub(super) fn recover_spare(dir: &Path, partition: u32) -> Result<(), LogError> {
    let spare = spare_path(dir);
    if !spare.exists() {
        return Ok(());
    }
    match unrenamed_spare(dir, partition, &list_segments(dir)?)? {
        Some(base) => {
            let path = segment_path(dir, base);
            tracing::warn!(
                partition,
                file = %path.display(),
                "a segment started just before a crash was still under its spare name; adopting it"
            );
            fs::rename(&spare, &path).map_err(io_err("rename spare segment", &path))?;
        }
        None => fs::remove_file(&spare).map_err(io_err("remove spare segment", &spare))?,
    }
    sync_dir(dir)
}

/// Creates an empty spare, durably.
fn create_spare(dir: &Path) -> Result<File, LogError> {
    let path = spare_path(dir);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("create spare segment", &path))?;
    file.sync_all()
        .map_err(io_err("sync spare segment", &path))?;
    sync_dir(dir)?;
    Ok(file)
}

enum Job {
    Seal {
        base: u64,
        records: u64,
        index: Vec<(u64, u64)>,
    },
    Spare,
}

/// The helper thread of one partition's writer.
#[derive(Debug)]
pub(super) struct Roller {
    jobs: Option<Sender<Job>>,
    /// Spares made on request (`None`: making one failed); at most one is
    /// asked for at a time, so the helper never waits to hand one over.
    spares: Receiver<Option<File>>,
    /// A spare was asked for and has not been taken.
    asked: bool,
    handle: Option<JoinHandle<()>>,
}

impl Roller {
    /// Starts the helper, which makes the first spare at once.
    pub(super) fn start(dir: PathBuf, partition: u32) -> Result<Roller, LogError> {
        let path = dir.clone();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (spares_tx, spares_rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(format!("tasker-log-roll-p{partition}"))
            .spawn(move || {
                while let Ok(job) = jobs_rx.recv() {
                    match job {
                        Job::Seal {
                            base,
                            records,
                            index,
                        } => {
                            if let Err(e) = write_index(&dir, base, records, &index) {
                                tracing::warn!(partition, base, error = %e, "cannot write a sealed segment's index; readers will scan it");
                            }
                        }
                        Job::Spare => {
                            let spare = create_spare(&dir)
                                .inspect_err(|e| tracing::warn!(partition, error = %e, "cannot prepare the next segment; the next roll creates it inline"))
                                .ok();
                            if spares_tx.send(spare).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(io_err("spawn segment roller", &path))?;
        let mut roller = Roller {
            jobs: Some(jobs_tx),
            spares: spares_rx,
            asked: false,
            handle: Some(handle),
        };
        roller.request_spare();
        Ok(roller)
    }

    fn request_spare(&mut self) {
        if !self.asked && self.send(Job::Spare) {
            self.asked = true;
        }
    }

    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    /// The spare, if one is ready. The next is asked for by [`Self::sealed`],
    /// once this one has its segment name (the helper creates it at the same path).
    pub(super) fn take_spare(&mut self) -> Option<File> {
        let spare = self.spares.try_recv().ok()?;
        self.asked = false;
        spare
    }

    /// Writes the sealed segment's index in the background, and asks for the
    /// next spare.
    pub(super) fn sealed(&mut self, base: u64, records: u64, index: Vec<(u64, u64)>) {
        self.send(Job::Seal {
            base,
            records,
            index,
        });
        self.request_spare();
    }
}

impl Drop for Roller {
    /// Finishes queued indexes (a writer reopened in this process must not race them).
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
