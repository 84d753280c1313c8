use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use super::segment::{list_segments, partition_dir, segment_path};
use super::*;
use crate::log::conformance::{Harness, TestLog, sample};
use crate::log::{LogError, Record};
use crate::record::{PartitionId, Position};

struct FileTestLog {
    dir: TempDir,
    config: FileLogConfig,
    log: Option<Arc<dyn Log>>,
}

impl TestLog for FileTestLog {
    fn log(&self) -> Arc<dyn Log> {
        Arc::clone(self.log.as_ref().expect("open"))
    }
    fn reopen(&mut self) -> Result<(), LogError> {
        self.log = None;
        self.log = Some(Arc::new(FileLog::open(
            self.dir.path(),
            self.config.clone(),
        )?));
        Ok(())
    }
}

struct FileHarness {
    segment_bytes: u64,
}

impl Harness for FileHarness {
    fn fresh(&self, partitions: u32) -> Result<Box<dyn TestLog>, LogError> {
        let dir = TempDir::new().expect("tempdir");
        let config = FileLogConfig {
            partitions,
            segment_bytes: self.segment_bytes,
            fsync: FsyncPolicy::Batch,
            faults: None,
        };
        let log: Arc<dyn Log> = Arc::new(FileLog::open(dir.path(), config.clone())?);
        Ok(Box::new(FileTestLog {
            dir,
            config,
            log: Some(log),
        }))
    }
}

mod conformance_one_segment {
    use super::*;
    crate::conformance_tests!(FileHarness {
        segment_bytes: 64 << 20
    });
}

mod conformance_tiny_segments {
    use super::*;
    crate::conformance_tests!(FileHarness {
        segment_bytes: 2048
    });
}

fn open(dir: &std::path::Path, segment_bytes: u64) -> FileLog {
    FileLog::open(
        dir,
        FileLogConfig {
            partitions: 1,
            segment_bytes,
            fsync: FsyncPolicy::Batch,
            faults: None,
        },
    )
    .expect("open")
}

fn read_positions(log: &FileLog, from: u64) -> Result<Vec<u64>, LogError> {
    let mut r = log.reader(PartitionId(0), Position(from))?;
    let mut out = Vec::new();
    loop {
        let got = r.poll(1000, Duration::from_millis(20))?;
        if got.is_empty() {
            return Ok(out);
        }
        out.extend(got.iter().map(|s| s.position.0));
    }
}

fn last_segment(dir: &std::path::Path) -> PathBuf {
    let pdir = partition_dir(dir, 0);
    let base = *list_segments(&pdir)
        .expect("list")
        .last()
        .expect("a segment");
    segment_path(&pdir, base)
}

#[test]
fn recovers_torn_tail() {
    let dir = TempDir::new().expect("tempdir");
    {
        let log = open(dir.path(), 64 << 20);
        let mut w = log.writer(PartitionId(0)).expect("writer");
        w.append(&(0..5).map(sample).collect::<Vec<_>>())
            .expect("append");
        w.append(&(5..8).map(sample).collect::<Vec<_>>())
            .expect("append");
    }
    let path = last_segment(dir.path());
    let full = fs::read(&path).expect("read");
    // Cut the last batch at every byte: recovery keeps exactly the first batch.
    let mut first_batch_len = 0;
    {
        let s = scan(&full);
        assert_eq!(s.records, 8);
    }
    for cut in (SEGMENT_HEADER_LEN..full.len()).rev() {
        let s = scan(&full[..cut]);
        if s.records == 5 && s.damage.is_some() {
            first_batch_len = s.valid_len as usize;
        }
    }
    assert!(first_batch_len > 0);
    for cut in [first_batch_len + 1, first_batch_len + 13, full.len() - 1] {
        fs::write(&path, &full[..cut]).expect("write torn file");
        let log = open(dir.path(), 64 << 20);
        let mut w = log
            .writer(PartitionId(0))
            .expect("torn tail must be recovered");
        assert_eq!(
            log.end(PartitionId(0)).expect("end"),
            Position(5),
            "cut {cut}"
        );
        assert_eq!(
            fs::metadata(&path).expect("meta").len(),
            first_batch_len as u64
        );
        assert_eq!(
            read_positions(&log, 0).expect("read"),
            (0..5).collect::<Vec<_>>()
        );
        // and appending continues at the recovered end
        assert_eq!(w.append(&[sample(99)]).expect("append"), vec![Position(5)]);
        drop(w);
        fs::write(&path, &full[..first_batch_len]).expect("reset");
    }
}

#[test]
fn rejects_mid_log_corruption() {
    let dir = TempDir::new().expect("tempdir");
    {
        let log = open(dir.path(), 64 << 20);
        let mut w = log.writer(PartitionId(0)).expect("writer");
        for b in 0..3 {
            w.append(&(b * 4..b * 4 + 4).map(sample).collect::<Vec<_>>())
                .expect("append");
        }
    }
    let path = last_segment(dir.path());
    let mut data = fs::read(&path).expect("read");
    let at = SEGMENT_HEADER_LEN + 40; // inside the first record of the first batch
    data[at] ^= 0x55;
    fs::write(&path, &data).expect("write");
    let log = open(dir.path(), 64 << 20);
    match log.writer(PartitionId(0)) {
        Err(LogError::Corrupt {
            path: p,
            offset,
            reason,
        }) => {
            assert_eq!(p, path);
            assert_eq!(offset, SEGMENT_HEADER_LEN as u64);
            assert!(reason.contains("intact"), "{reason}");
        }
        other => panic!("expected corruption error, got {:?}", other.map(|_| ())),
    }
    // Readers refuse it too, naming the place (no silent stop at the damage).
    match read_positions(&log, 0) {
        Err(LogError::Corrupt {
            path: p, offset, ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(offset, SEGMENT_HEADER_LEN as u64);
        }
        other => panic!("reader must refuse, got {other:?}"),
    }
}

#[test]
fn rejects_corruption_in_a_sealed_segment_when_reading() {
    let dir = TempDir::new().expect("tempdir");
    {
        let log = open(dir.path(), 1024);
        let mut w = log.writer(PartitionId(0)).expect("writer");
        for i in 0..40 {
            w.append(&[sample(i)]).expect("append");
        }
    }
    let pdir = partition_dir(dir.path(), 0);
    let bases = list_segments(&pdir).expect("list");
    assert!(bases.len() > 2, "expected several segments, got {bases:?}");
    let sealed = segment_path(&pdir, bases[1]);
    let mut data = fs::read(&sealed).expect("read");
    let last = data.len() - 3;
    data[last] ^= 0xFF;
    fs::write(&sealed, &data).expect("write");
    let log = open(dir.path(), 1024);
    match read_positions(&log, 0) {
        Err(LogError::Corrupt { path, .. }) => assert_eq!(path, sealed),
        other => panic!("expected corruption in {}, got {other:?}", sealed.display()),
    }
}

#[test]
fn missing_segment_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    {
        let log = open(dir.path(), 1024);
        let mut w = log.writer(PartitionId(0)).expect("writer");
        for i in 0..40 {
            w.append(&[sample(i)]).expect("append");
        }
    }
    let pdir = partition_dir(dir.path(), 0);
    let bases = list_segments(&pdir).expect("list");
    fs::remove_file(segment_path(&pdir, bases[1])).expect("remove");
    let log = open(dir.path(), 1024);
    match log.writer(PartitionId(0)) {
        Err(LogError::Corrupt { reason, .. }) => assert!(reason.contains("missing"), "{reason}"),
        other => panic!(
            "expected a missing-segment error, got {:?}",
            other.map(|_| ())
        ),
    }
}

#[test]
fn second_writer_refused() {
    let dir = TempDir::new().expect("tempdir");
    let log = open(dir.path(), 64 << 20);
    let w = log.writer(PartitionId(0)).expect("first writer");
    let other = open(dir.path(), 64 << 20);
    match other.writer(PartitionId(0)) {
        Err(LogError::Locked { holder, .. }) => {
            assert!(holder.contains(&std::process::id().to_string()), "{holder}")
        }
        res => panic!("second writer must be refused, got {:?}", res.map(|_| ())),
    }
    drop(w);
    assert!(
        other.writer(PartitionId(0)).is_ok(),
        "lock is released on drop"
    );
}

#[test]
fn reads_across_segments() {
    let dir = TempDir::new().expect("tempdir");
    let log = open(dir.path(), 4096);
    let mut w = log.writer(PartitionId(0)).expect("writer");
    let records: Vec<Record> = (0..2_000).map(sample).collect();
    for chunk in records.chunks(7) {
        w.append(chunk).expect("append");
    }
    let pdir = partition_dir(dir.path(), 0);
    let segments = list_segments(&pdir).expect("list");
    assert!(
        segments.len() > 10,
        "expected many segments, got {}",
        segments.len()
    );
    drop(w);
    for from in [0u64, 1, 999, 1_500, 1_999] {
        let got = read_positions(&log, from).expect("read");
        assert_eq!(got, (from..2_000).collect::<Vec<_>>(), "from {from}");
    }
    // every sealed segment got an index, and reopening continues where it was
    let reopened = open(dir.path(), 4096);
    assert_eq!(reopened.end(PartitionId(0)).expect("end"), Position(2_000));
    let mut w = reopened.writer(PartitionId(0)).expect("writer");
    assert_eq!(
        w.append(&[sample(1)]).expect("append"),
        vec![Position(2_000)]
    );
}

#[test]
fn partition_count_is_fixed_at_creation() {
    let dir = TempDir::new().expect("tempdir");
    drop(open(dir.path(), 4096));
    let err = FileLog::open(
        dir.path(),
        FileLogConfig {
            partitions: 4,
            ..FileLogConfig::default()
        },
    )
    .expect_err("partition count mismatch");
    assert!(
        err.to_string().contains("created with 1 partitions"),
        "{err}"
    );
    assert_eq!(
        FileLog::open_existing(dir.path())
            .expect("existing")
            .partitions(),
        1
    );
}

#[test]
fn failed_write_is_rolled_back_and_later_appends_continue() {
    // A record over the limit is refused before anything is written.
    let dir = TempDir::new().expect("tempdir");
    let log = open(dir.path(), 64 << 20);
    let mut w = log.writer(PartitionId(0)).expect("writer");
    w.append(&[sample(0)]).expect("append");
    let mut big = sample(1);
    big.payload = bytes::Bytes::from(vec![0u8; crate::codec::MAX_RECORD_BYTES + 1]);
    assert!(matches!(
        w.append(&[big]),
        Err(LogError::RecordTooLarge { .. })
    ));
    assert_eq!(w.append(&[sample(2)]).expect("append"), vec![Position(1)]);
}

#[test]
fn log_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().expect("tempdir");
    let root = dir.path().join("data/log");
    let log = FileLog::open(&root, FileLogConfig::default()).expect("open");
    drop(log.writer(PartitionId(0)).expect("writer"));
    for d in [root.clone(), partition_dir(&root, 0)] {
        let mode = fs::metadata(&d).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
}

#[test]
fn cross_process_style_reader_sees_appends_without_a_shared_writer() {
    // A reader from a separately opened handle (as `tasker tail` in another process)
    // picks up records by polling the files.
    let dir = TempDir::new().expect("tempdir");
    let writer_log = open(dir.path(), 64 << 20);
    let reader_log = open(dir.path(), 64 << 20);
    let mut w = writer_log.writer(PartitionId(0)).expect("writer");
    let mut r = reader_log
        .reader(PartitionId(0), Position(0))
        .expect("reader");
    assert!(
        r.poll(10, Duration::from_millis(20))
            .expect("poll")
            .is_empty()
    );
    w.append(&[sample(0), sample(1)]).expect("append");
    let got = r.poll(10, Duration::from_millis(500)).expect("poll");
    assert_eq!(got.len(), 2);
    // a half-written frame at the end is not returned yet
    let path = last_segment(dir.path());
    let mut f = OpenOptions::new().append(true).open(&path).expect("open");
    f.write_all(&[0xF7, 0x5A, 1, 0, 200, 0])
        .expect("write partial");
    assert!(
        r.poll(10, Duration::from_millis(20))
            .expect("poll")
            .is_empty()
    );
}

/// Appends one record at a time until the partition has `segments` segments;
/// returns how many were appended.
fn append_until_segments(
    w: &mut dyn crate::log::LogWriter,
    pdir: &std::path::Path,
    segments: usize,
) -> u64 {
    let mut n = 0;
    while list_segments(pdir).expect("list").len() < segments {
        w.append(&[sample(n)]).expect("append");
        n += 1;
    }
    n
}

/// The writer appends at `at`, and a reader sees every position up to it.
fn appends_continue_at(log: &FileLog, mut w: Box<dyn crate::log::LogWriter>, at: u64) {
    assert_eq!(w.append(&[sample(at)]).expect("append"), vec![Position(at)]);
    drop(w);
    assert_eq!(
        read_positions(log, 0).expect("read"),
        (0..=at).collect::<Vec<_>>()
    );
}

/// The roller prepares a spare as soon as a writer opens; waits for it.
fn wait_for_spare(pdir: &std::path::Path) -> fs::Metadata {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(meta) = fs::metadata(super::segment::spare_path(pdir)) {
            return meta;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the roller never prepared a spare segment in {}",
            pdir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_roll_renames_the_prepared_spare_and_indexes_the_sealed_segment_after() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new().expect("tempdir");
    let log = open(dir.path(), 1024);
    let mut w = log.writer(PartitionId(0)).expect("writer");
    let pdir = partition_dir(dir.path(), 0);
    let spare = wait_for_spare(&pdir);
    assert_eq!(spare.len(), 0, "a spare is empty until a roll takes it");
    let n = append_until_segments(w.as_mut(), &pdir, 2);
    let bases = list_segments(&pdir).expect("list");
    let new = fs::metadata(segment_path(&pdir, bases[1])).expect("new segment");
    assert_eq!(
        new.ino(),
        spare.ino(),
        "the new segment is the spare, renamed"
    );
    drop(w); // waits for the roller's queued work
    assert_eq!(
        super::segment::read_index(&pdir, bases[0]).map(|(count, _)| count),
        Some(bases[1]),
        "the sealed segment was indexed"
    );
    assert_eq!(
        read_positions(&log, 0).expect("read"),
        (0..n).collect::<Vec<_>>()
    );
}

/// Three segments and one more record, then the crash this simulates came
/// before the directory sync: the newest segment is still named as the spare
/// was, and the segment it follows has no index. Returns the segments' bases
/// and the record count.
fn crash_before_the_roll_was_durable(root: &std::path::Path) -> (Vec<u64>, u64) {
    let pdir = partition_dir(root, 0);
    let n = {
        let log = open(root, 1024);
        let mut w = log.writer(PartitionId(0)).expect("writer");
        let n = append_until_segments(w.as_mut(), &pdir, 3);
        w.append(&[sample(n)]).expect("append");
        n + 1
    };
    let bases = list_segments(&pdir).expect("list");
    let spare = super::segment::spare_path(&pdir);
    let _ = fs::remove_file(&spare);
    fs::rename(segment_path(&pdir, bases[2]), &spare).expect("rename back");
    fs::remove_file(super::segment::index_path(&pdir, bases[1])).expect("remove index");
    (bases, n)
}

#[test]
fn a_segment_left_under_the_spare_name_by_a_crash_is_adopted() {
    let dir = TempDir::new().expect("tempdir");
    let pdir = partition_dir(dir.path(), 0);
    let (bases, n) = crash_before_the_roll_was_durable(dir.path());
    let log = open(dir.path(), 1024);
    let w = log.writer(PartitionId(0)).expect("writer");
    assert_eq!(
        list_segments(&pdir).expect("list"),
        bases,
        "the spare is a segment again"
    );
    appends_continue_at(&log, w, n);
}

#[test]
fn readers_see_a_segment_left_under_the_spare_name_before_a_writer_adopts_it() {
    let dir = TempDir::new().expect("tempdir");
    let pdir = partition_dir(dir.path(), 0);
    let (bases, n) = crash_before_the_roll_was_durable(dir.path());
    let log = FileLog::open_existing(dir.path()).expect("open");
    assert_eq!(log.end(PartitionId(0)).expect("end"), Position(n));
    assert_eq!(
        read_positions(&log, 0).expect("read"),
        (0..n).collect::<Vec<_>>(),
        "a reader-only process reads the records under the spare's name"
    );
    // From a position inside that segment, as a resumed consumer would.
    let mut r = log
        .reader(PartitionId(0), Position(bases[2]))
        .expect("reader");
    let got = r.poll(usize::MAX, Duration::from_millis(50)).expect("poll");
    assert_eq!(
        got.iter().map(|s| s.position.0).collect::<Vec<_>>(),
        (bases[2]..n).collect::<Vec<_>>()
    );
    let raw = crate::audit::scan::scan_partition(dir.path(), PartitionId(0), |_, _| {})
        .expect("audit scan");
    assert_eq!(raw.end, Position(n), "the audit scan reads it too");
    assert!(raw.findings.is_empty(), "{:?}", raw.findings);
    assert!(
        super::segment::spare_path(&pdir).exists(),
        "readers leave the spare where it is"
    );
}

#[test]
fn a_spare_that_never_became_a_segment_is_removed_on_open() {
    let dir = TempDir::new().expect("tempdir");
    let pdir = partition_dir(dir.path(), 0);
    {
        let log = open(dir.path(), 64 << 20);
        let mut w = log.writer(PartitionId(0)).expect("writer");
        w.append(&[sample(0), sample(1)]).expect("append");
    }
    // A torn header, and a header for a segment that exists already.
    for junk in [
        b"torn".to_vec(),
        super::format::encode_segment_header(0, 0).to_vec(),
    ] {
        fs::write(super::segment::spare_path(&pdir), &junk).expect("write spare");
        let log = open(dir.path(), 64 << 20);
        let w = log.writer(PartitionId(0)).expect("writer");
        assert_eq!(list_segments(&pdir).expect("list"), vec![0]);
        assert_eq!(wait_for_spare(&pdir).len(), 0, "a fresh spare replaced it");
        let end = log.end(PartitionId(0)).expect("end").0;
        appends_continue_at(&log, w, end);
    }
}

#[test]
fn a_segment_whose_header_never_reached_the_disk_gets_it_again() {
    let dir = TempDir::new().expect("tempdir");
    let pdir = partition_dir(dir.path(), 0);
    {
        let log = open(dir.path(), 1024);
        let mut w = log.writer(PartitionId(0)).expect("writer");
        append_until_segments(w.as_mut(), &pdir, 2);
    }
    // The rename reached the disk, nothing written into the file did (so the
    // append that rolled was never acknowledged).
    let bases = list_segments(&pdir).expect("list");
    fs::File::create(segment_path(&pdir, bases[1])).expect("truncate");
    let log = open(dir.path(), 1024);
    let w = log.writer(PartitionId(0)).expect("writer");
    appends_continue_at(&log, w, bases[1]);
}
