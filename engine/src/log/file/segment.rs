//! Segment files on disk: names, listing, creation, and the sparse index files
//! written when a segment is sealed.
//!
//! ```text
//! <root>/p00003/00000000000000000000.seg   records 0..n of partition 3
//!               00000000000000000000.idx   its sparse index, once sealed
//!               00000000000000412000.seg   the next segment, base 412000
//!               next.spare                 an empty file the next roll renames
//!               LOCK                       held by the partition's writer
//! idx = count u64 | entries u32 | (record u64, offset u64)* | crc32c u32
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::format::{SEGMENT_HEADER_LEN, decode_segment_header, encode_segment_header};
use crate::log::LogError;

pub fn partition_dir(root: &Path, partition: u32) -> PathBuf {
    root.join(format!("p{partition:05}"))
}

pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

pub fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

pub fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError + use<> {
    let path = path.to_owned();
    move |source| LogError::Io { op, path, source }
}

/// Segment base positions in the directory, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut bases = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(bases),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".seg")
            && stem.len() == 20
            && let Ok(base) = stem.parse::<u64>()
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// The spare the writer's roller keeps ready (see `roll`): not a segment name,
/// so [`list_segments`] never sees it.
pub(crate) fn spare_path(dir: &Path) -> PathBuf {
    dir.join("next.spare")
}

/// The base the spare's header names, if it holds a valid header of this
/// partition: a segment a crash may have left under the spare's name (its
/// rename not yet durable). An empty or torn spare never held a record.
pub(crate) fn spare_base(dir: &Path, partition: u32) -> Result<Option<u64>, LogError> {
    let path = spare_path(dir);
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    let read = File::open(&path).and_then(|mut f| f.read_exact(&mut header));
    match read {
        Ok(()) => Ok(match decode_segment_header(&header) {
            Ok((p, base)) if p == partition => Some(base),
            _ => None,
        }),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(io_err("read spare segment", &path)(e)),
    }
}

/// The segments a reader sees: the listed ones, then a spare that holds the
/// segment after the last (a crash before its rename was durable). Readers
/// open them with [`open_segment`]; only a writer's open renames such a spare.
pub(crate) fn readable_segments(dir: &Path, partition: u32) -> Result<Vec<u64>, LogError> {
    let mut bases = list_segments(dir)?;
    if let Some(base) = unrenamed_spare(dir, partition, &bases)? {
        bases.push(base);
    }
    Ok(bases)
}

/// The base of a spare holding the segment after the `listed` ones: one whose
/// rename a crash may have lost (any other spare never held a record).
pub(crate) fn unrenamed_spare(
    dir: &Path,
    partition: u32,
    listed: &[u64],
) -> Result<Option<u64>, LogError> {
    Ok(spare_base(dir, partition)?.filter(|&base| listed.last().is_none_or(|&last| base > last)))
}

/// Opens the segment starting at `base` for reading: under its name or, for one
/// [`readable_segments`] found under the spare's name, under that. `None` if
/// neither holds it.
pub(crate) fn open_segment(
    dir: &Path,
    partition: u32,
    base: u64,
) -> Result<Option<(PathBuf, File)>, LogError> {
    let path = segment_path(dir, base);
    match File::open(&path) {
        Ok(file) => return Ok(Some((path, file))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("open segment", &path)(e)),
    }
    let spare = spare_path(dir);
    match File::open(&spare) {
        Ok(mut file) => {
            let mut header = [0u8; SEGMENT_HEADER_LEN];
            if file.read_exact(&mut header).is_ok()
                && decode_segment_header(&header) == Ok((partition, base))
            {
                file.rewind().map_err(io_err("open segment", &spare))?;
                return Ok(Some((spare, file)));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("open segment", &spare)(e)),
    }
    // A writer may have renamed it since the first look.
    match File::open(&path) {
        Ok(file) => Ok(Some((path, file))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("open segment", &path)(e)),
    }
}

/// Creates a directory (and parents) readable only by its owner: the log and
/// the SQLite read model both hold task contexts.
pub fn create_private_dir(dir: &Path) -> Result<(), LogError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err("create directory", dir))
}

/// Makes a new file's directory entry durable.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// Creates an empty segment with its header, durably.
pub fn create_segment(dir: &Path, partition: u32, base: u64) -> Result<File, LogError> {
    let path = segment_path(dir, base);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("create segment", &path))?;
    file.write_all(&encode_segment_header(partition, base))
        .and_then(|_| file.sync_all())
        .map_err(io_err("write segment header", &path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Writes a sealed segment's record count and sparse index, without syncing:
/// the index is a cache of a scan, checksummed, so one a crash lost or tore is
/// `None` to [`read_index`]: readers scan the segment, and the next writer to
/// open the partition indexes it again.
pub fn write_index(
    dir: &Path,
    base: u64,
    records: u64,
    index: &[(u64, u64)],
) -> Result<(), LogError> {
    let path = index_path(dir, base);
    let mut buf = Vec::with_capacity(16 + index.len() * 16);
    buf.extend_from_slice(&records.to_le_bytes());
    buf.extend_from_slice(&(index.len() as u32).to_le_bytes());
    for (rec, off) in index {
        buf.extend_from_slice(&rec.to_le_bytes());
        buf.extend_from_slice(&off.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension("idx.tmp");
    fs::write(&tmp, &buf)
        .and_then(|_| fs::rename(&tmp, &path))
        .map_err(io_err("write index", &path))
}

/// A sealed segment's `(record count, sparse index)`, or `None` if the index file
/// is missing or damaged (callers then scan the segment).
pub fn read_index(dir: &Path, base: u64) -> Option<(u64, Vec<(u64, u64)>)> {
    let buf = fs::read(index_path(dir, base)).ok()?;
    if buf.len() < 16 {
        return None;
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let records = u64::from_le_bytes(body[..8].try_into().ok()?);
    let n = u32::from_le_bytes(body[8..12].try_into().ok()?) as usize;
    if body.len() != 12 + n * 16 {
        return None;
    }
    let entries = body[12..]
        .chunks_exact(16)
        .filter_map(|c| {
            Some((
                u64::from_le_bytes(c[..8].try_into().ok()?),
                u64::from_le_bytes(c[8..].try_into().ok()?),
            ))
        })
        .collect();
    Some((records, entries))
}
