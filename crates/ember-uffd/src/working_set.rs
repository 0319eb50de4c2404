//! The working set: which parts of a build's memory image a restored VM
//! needed, in the order it first needed them. Recorded while serving
//! faults, stored as a small sidecar file in the build directory, and
//! replayed as a prefetch on later restores of the same build.
//!
//! File format (`working-set`, all integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `EMBER-WS` |
//! | 4 | version, 1 |
//! | 4 | granularity: offsets and lengths are multiples of it (4096) |
//! | 8 | size of the memory image it was recorded against |
//! | 8 | `count` |
//! | 16 × count | ranges `{offset: u64, length: u64}` of the image, in first-touch order |
//! | 4 | CRC-32 (IEEE) of every byte before it |
//!
//! A file that fails any check is ignored with a warning: a restore never
//! fails because of its working set.

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;
use crate::bitmap::AtomicBitmap;

const MAGIC: &[u8; 8] = b"EMBER-WS";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8;
/// Offsets and lengths are multiples of this.
pub const GRANULARITY: u64 = 4096;

/// Byte ranges of a memory image in the order a VM first touched them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    pub image_size: u64,
    pub ranges: Vec<Range<u64>>,
}

impl WorkingSet {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.ranges.len() * 16 + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(GRANULARITY as u32).to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.ranges.len() as u64).to_le_bytes());
        for r in &self.ranges {
            out.extend_from_slice(&r.start.to_le_bytes());
            out.extend_from_slice(&(r.end - r.start).to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<WorkingSet, Error> {
        let bad = |why: &str| Err(Error::CorruptWorkingSet(why.to_owned()));
        if bytes.len() < HEADER + 4 {
            return bad("shorter than its header");
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return bad("checksum mismatch");
        }
        if &body[..8] != MAGIC {
            return bad("not a working-set file (bad magic)");
        }
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return bad("unknown version");
        }
        if u32_at(12) as u64 != GRANULARITY {
            return bad("unknown granularity");
        }
        let image_size = u64_at(16);
        let count = u64_at(24);
        if count.checked_mul(16) != Some((body.len() - HEADER) as u64) {
            return bad("length does not match its entry count");
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = HEADER + i * 16;
            let (offset, length) = (u64_at(at), u64_at(at + 8));
            let end = offset.checked_add(length);
            if length == 0
                || !offset.is_multiple_of(GRANULARITY)
                || !length.is_multiple_of(GRANULARITY)
                || end.is_none_or(|e| e > image_size)
            {
                return bad("range outside the image or misaligned");
            }
            ranges.push(offset..offset + length);
        }
        Ok(WorkingSet { image_size, ranges })
    }

    /// Read `path`; `Ok(None)` if there is no such file.
    pub fn read(path: &Path) -> Result<Option<WorkingSet>, Error> {
        match std::fs::read(path) {
            Ok(bytes) => WorkingSet::decode(&bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                what: format!("reading {}", path.display()),
                source: e,
            }),
        }
    }

    /// Write to `path` atomically: a temporary file in the same directory,
    /// fsync, rename, fsync the directory. Readers see the old file or the
    /// new one, never a torn one.
    pub fn write_atomic(&self, path: &Path) -> Result<(), Error> {
        write_atomic(path, &self.encode())
    }

    /// The ranges in batches of about `batch_bytes`, each batch sorted by
    /// offset and coalesced, batches in first-touch order: the earliest
    /// needed memory goes first, and each batch turns into few large copies.
    pub fn batches(&self, batch_bytes: u64) -> Vec<Vec<Range<u64>>> {
        let mut out = Vec::new();
        let mut batch: Vec<Range<u64>> = Vec::new();
        let mut size = 0;
        for r in &self.ranges {
            batch.push(r.clone());
            size += r.end - r.start;
            if size >= batch_bytes {
                out.push(coalesce(std::mem::take(&mut batch)));
                size = 0;
            }
        }
        if !batch.is_empty() {
            out.push(coalesce(batch));
        }
        out
    }
}

fn coalesce(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Write `bytes` to `path` through a temporary name and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |what: &str, source| Error::Io {
        what: format!("{what} {}", path.display()),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io("creating a temporary file for", e))?;
        f.write_all(bytes).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Collects first-touch ranges from many threads without contention: each
/// thread appends to its own shard, stamped from one global sequence.
#[derive(Debug)]
pub struct Recorder {
    sequence: AtomicU64,
    shards: Vec<Mutex<Vec<Stamped>>>,
}

/// A range and its place in the global first-touch order.
type Stamped = (u64, Range<u64>);

impl Recorder {
    pub fn new(shards: usize) -> Recorder {
        Recorder {
            sequence: AtomicU64::new(0),
            shards: (0..shards.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    pub fn record(&self, shard: usize, range: Range<u64>) {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.shards[shard % self.shards.len()]
            .lock()
            .expect("recorder shard poisoned")
            .push((seq, range));
    }

    /// Everything recorded so far, appended to `base` (a working set being
    /// extended), each page kept at its first appearance, adjacent ranges
    /// joined.
    pub fn collect(&self, image_size: u64, base: Option<&WorkingSet>) -> WorkingSet {
        let mut entries: Vec<Stamped> = Vec::new();
        for shard in &self.shards {
            entries.extend(
                shard
                    .lock()
                    .expect("recorder shard poisoned")
                    .iter()
                    .cloned(),
            );
        }
        entries.sort_by_key(|(seq, _)| *seq);
        let seen = AtomicBitmap::new(image_size.div_ceil(GRANULARITY) as usize);
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let base_ranges = base
            .filter(|b| b.image_size == image_size)
            .map(|b| b.ranges.clone())
            .unwrap_or_default();
        let mut claimed = Vec::new();
        for r in base_ranges
            .into_iter()
            .chain(entries.into_iter().map(|(_, r)| r))
        {
            let pages = (r.start / GRANULARITY) as usize
                ..(r.end.min(image_size).div_ceil(GRANULARITY)) as usize;
            if pages.is_empty() {
                continue;
            }
            claimed.clear();
            seen.claim_range(pages, &mut claimed);
            for p in &claimed {
                let r = p.start as u64 * GRANULARITY..p.end as u64 * GRANULARITY;
                match ranges.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => ranges.push(r),
                }
            }
        }
        WorkingSet { image_size, ranges }
    }

    pub fn is_empty(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.lock().expect("recorder shard poisoned").is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trips(ranges in proptest::collection::vec((0u64..1000, 1u64..20), 0..50)) {
            let ws = WorkingSet {
                image_size: 1100 * GRANULARITY,
                ranges: ranges.iter().map(|(o, l)| o * GRANULARITY..(o + l) * GRANULARITY).collect(),
            };
            prop_assert_eq!(WorkingSet::decode(&ws.encode()).unwrap(), ws);
        }

        #[test]
        fn any_single_corrupted_byte_is_detected(at in 0usize..100, flip in 1u8..=255) {
            let ws = WorkingSet { image_size: 1 << 20, ranges: vec![0..4096, 8192..16384, 40960..45056] };
            let mut bytes = ws.encode();
            let at = at % bytes.len();
            bytes[at] ^= flip;
            prop_assert!(WorkingSet::decode(&bytes).is_err());
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a list of one range is meant
    fn truncated_files_and_out_of_image_ranges_are_refused() {
        let ws = WorkingSet {
            image_size: 8192,
            ranges: vec![0..4096],
        };
        let bytes = ws.encode();
        assert!(WorkingSet::decode(&bytes[..bytes.len() - 1]).is_err());
        let outside = WorkingSet {
            image_size: 8192,
            ranges: vec![4096..12288],
        };
        let err = WorkingSet::decode(&outside.encode()).unwrap_err();
        assert!(err.to_string().contains("outside the image"), "{err}");
    }

    #[test]
    fn batches_keep_touch_order_between_batches_and_sort_within() {
        let g = GRANULARITY;
        let ws = WorkingSet {
            image_size: 100 * g,
            ranges: vec![
                50 * g..51 * g,
                10 * g..11 * g,
                11 * g..12 * g,
                90 * g..91 * g,
                5 * g..6 * g,
            ],
        };
        let b = ws.batches(3 * g);
        assert_eq!(
            b,
            vec![
                vec![10 * g..12 * g, 50 * g..51 * g],
                vec![5 * g..6 * g, 90 * g..91 * g]
            ]
        );
    }

    #[test]
    fn recorder_orders_by_first_touch_and_drops_repeats() {
        let g = GRANULARITY;
        let r = Recorder::new(2);
        r.record(0, 4 * g..6 * g);
        r.record(1, 0..g);
        r.record(0, 5 * g..7 * g); // page 5 repeats; only page 6 is new
        r.record(1, g..2 * g); // joins 0..g
        let ws = r.collect(16 * g, None);
        assert_eq!(ws.ranges, vec![4 * g..6 * g, 0..g, 6 * g..7 * g, g..2 * g]);
        let base = WorkingSet {
            image_size: 16 * g,
            ranges: vec![10 * g..11 * g, 4 * g..5 * g],
        };
        let merged = r.collect(16 * g, Some(&base));
        assert_eq!(
            merged.ranges,
            vec![10 * g..11 * g, 4 * g..6 * g, 0..g, 6 * g..7 * g, g..2 * g]
        );
    }
}
