//! The generational header: which build holds each byte of a memory or disk
//! image, and its binary encoding.
//!
//! A header is flattened: every block points straight at the build that last
//! wrote it (or at [`BuildId::NIL`], which reads as zeros), so resolving an
//! offset is one binary search, never a walk down a chain of parents. This
//! module owns the mapping arithmetic and the wire format; it does no I/O
//! (the build store reads and writes header files).
//!
//! # Invariants (checked by [`Header::validate`], and so by every decode)
//! - `block_size` is a power of two in `512 B..=1 GiB`; `0 < size <= 2^62`.
//! - `size` need not be a multiple of `block_size`: the last block is then
//!   partial and only its real bytes are stored. Every mapping starts on a
//!   block boundary and its length is a whole number of blocks, except a
//!   mapping that ends at `size`.
//! - Mappings are sorted, non-empty, and cover `[0, size)` exactly once.
//! - A build's storage offsets are multiples of `block_size` and increase
//!   with the image offset, never overlapping: a build's data file holds its
//!   own blocks packed back to back in offset order. Nil mappings store 0.
//!
//! # Encoding (format version 1, little-endian)
//! ```text
//!  0  magic "EMBRHDR\0"        8 bytes
//!  8  format version (1)      u32
//! 12  flags (0)               u32
//! 16  block_size              u64
//! 24  size                    u64
//! 32  generation              u64
//! 40  build_id                16 bytes (UUID)
//! 56  base_build_id           16 bytes
//! 72  mapping count n         u64
//! 80  n × {offset u64, length u64, build_id 16 bytes, build_storage_offset u64}
//!  …  SHA-256 of every preceding byte, 32 bytes
//! ```

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use ember_types::BuildId;
use sha2::{Digest, Sha256};

use crate::blockset::BlockSet;
use crate::error::{Result, SnapshotError};

/// First bytes of every header file.
pub const HEADER_MAGIC: [u8; 8] = *b"EMBRHDR\0";
/// The header format version this code writes and reads.
pub const HEADER_VERSION: u32 = 1;
/// Smallest supported block size (a disk sector).
pub const MIN_BLOCK_SIZE: u64 = 512;
/// Largest supported block size (a 1 GiB huge page).
pub const MAX_BLOCK_SIZE: u64 = 1 << 30;
/// Largest image a header describes; keeps every offset+length inside `i64`.
pub const MAX_IMAGE_SIZE: u64 = 1 << 62;

const FIXED_LEN: usize = 80;
const MAPPING_LEN: usize = 40;
const CHECKSUM_LEN: usize = 32;

/// What the header says about the image as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderMeta {
    /// Format version ([`HEADER_VERSION`]).
    pub version: u32,
    /// Granularity of mappings, in bytes.
    pub block_size: u64,
    /// Image size in bytes.
    pub size: u64,
    /// 0 for a base build, parent's + 1 for each diff.
    pub generation: u64,
    /// The build this header belongs to.
    pub build_id: BuildId,
    /// The generation-0 build of this chain.
    pub base_build_id: BuildId,
}

/// `[offset, offset + length)` of the image is stored in `build_id`'s data
/// file from `build_storage_offset` on (nil: reads as zeros, stores 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub offset: u64,
    pub length: u64,
    pub build_id: BuildId,
    pub build_storage_offset: u64,
}

impl Mapping {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub fn is_nil(&self) -> bool {
        self.build_id.is_nil()
    }

    /// The part of this mapping covering image bytes `[from, to)`.
    fn slice(&self, from: u64, to: u64) -> Mapping {
        debug_assert!(self.offset <= from && from < to && to <= self.end());
        Mapping {
            offset: from,
            length: to - from,
            build_id: self.build_id,
            build_storage_offset: if self.is_nil() {
                0
            } else {
                self.build_storage_offset + (from - self.offset)
            },
        }
    }
}

/// Where one image offset lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The build holding the byte; nil means the byte is zero.
    pub build_id: BuildId,
    /// Offset of the byte in that build's data file (0 for nil).
    pub storage_offset: u64,
    /// Bytes from the offset to the end of its mapping: that many bytes
    /// continue contiguously in the same build's storage (or stay zero).
    pub remaining: u64,
}

impl Resolved {
    pub fn is_zero(&self) -> bool {
        self.build_id.is_nil()
    }
}

/// One piece of a byte range, clipped to a single mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub image_offset: u64,
    pub length: u64,
    /// Nil: zeros.
    pub build_id: BuildId,
    pub storage_offset: u64,
}

/// A validated header. Constructed only through operations that keep the
/// invariants in the module documentation, so readers can trust it.
#[derive(Clone)]
pub struct Header {
    meta: HeaderMeta,
    mappings: Vec<Mapping>,
    index: MappingIndex,
}

impl PartialEq for Header {
    fn eq(&self, other: &Self) -> bool {
        self.meta == other.meta && self.mappings == other.mappings
    }
}

impl Eq for Header {}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("meta", &self.meta)
            .field("mappings", &self.mappings)
            .finish()
    }
}

impl Header {
    /// Generation 0 where `build_id`'s data file holds the whole image at
    /// identity offsets.
    pub fn base(build_id: BuildId, size: u64, block_size: u64) -> Result<Header> {
        check_geometry(size, block_size)?;
        non_nil(build_id)?;
        Header::from_parts(
            base_meta(build_id, size, block_size),
            vec![Mapping {
                offset: 0,
                length: size,
                build_id,
                build_storage_offset: 0,
            }],
        )
    }

    /// Generation 0 where `build_id`'s data file holds only the blocks in
    /// `stored`, packed in offset order; every other block reads as zeros.
    /// A first snapshot from a full image stores its non-zero blocks so.
    pub fn base_sparse(
        build_id: BuildId,
        size: u64,
        block_size: u64,
        stored: &BlockSet,
    ) -> Result<Header> {
        check_geometry(size, block_size)?;
        non_nil(build_id)?;
        let meta = base_meta(build_id, size, block_size);
        let overlay = overlay(&meta, stored, &BlockSet::new())?;
        let nil = [Mapping {
            offset: 0,
            length: size,
            build_id: BuildId::NIL,
            build_storage_offset: 0,
        }];
        Header::from_parts(meta, normalize(merge(&nil, &overlay)))
    }

    /// The next generation: `dirty` blocks are stored in `new_build_id`'s data
    /// file packed back to back in offset order, `zero` blocks read as zeros,
    /// and every other block stays where `parent` put it.
    pub fn next_generation(
        parent: &Header,
        new_build_id: BuildId,
        dirty: &BlockSet,
        zero: &BlockSet,
    ) -> Result<Header> {
        non_nil(new_build_id)?;
        let meta = HeaderMeta {
            version: HEADER_VERSION,
            generation: parent.meta.generation + 1,
            build_id: new_build_id,
            ..parent.meta
        };
        let overlay = overlay(&meta, dirty, zero)?;
        Header::from_parts(meta, normalize(merge(&parent.mappings, &overlay)))
    }

    /// A header from its parts, if they satisfy every invariant.
    pub fn from_parts(meta: HeaderMeta, mappings: Vec<Mapping>) -> Result<Header> {
        validate(&meta, &mappings)?;
        let index = MappingIndex::new(&mappings, meta.size);
        Ok(Header {
            meta,
            mappings,
            index,
        })
    }

    pub fn meta(&self) -> &HeaderMeta {
        &self.meta
    }

    pub fn build_id(&self) -> BuildId {
        self.meta.build_id
    }

    pub fn size(&self) -> u64 {
        self.meta.size
    }

    pub fn block_size(&self) -> u64 {
        self.meta.block_size
    }

    /// Number of blocks, counting a partial last block.
    pub fn block_count(&self) -> u64 {
        self.meta.size.div_ceil(self.meta.block_size)
    }

    /// The mappings in offset order.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// Where image byte `offset` lives, or `None` past the end.
    pub fn resolve(&self, offset: u64) -> Option<Resolved> {
        let m = self.mapping_at(offset)?;
        let delta = offset - m.offset;
        Some(Resolved {
            build_id: m.build_id,
            storage_offset: if m.is_nil() {
                0
            } else {
                m.build_storage_offset + delta
            },
            remaining: m.length - delta,
        })
    }

    /// Index of the mapping containing `offset`.
    fn mapping_index(&self, offset: u64) -> Option<usize> {
        if offset >= self.meta.size {
            return None;
        }
        Some(self.index.find(offset))
    }

    fn mapping_at(&self, offset: u64) -> Option<&Mapping> {
        self.mapping_index(offset).map(|i| &self.mappings[i])
    }

    /// The pieces of image bytes `range`, one per mapping it touches; empty
    /// past the end, clipped at `size`.
    pub fn segments(&self, range: Range<u64>) -> Segments<'_> {
        let end = range.end.min(self.meta.size);
        let index = self
            .mapping_index(range.start)
            .unwrap_or(self.mappings.len());
        Segments {
            mappings: &self.mappings,
            index,
            pos: range.start,
            end,
        }
    }

    /// Every non-nil build the mappings read from (the header's own build
    /// included when it stores anything).
    pub fn referenced_builds(&self) -> BTreeSet<BuildId> {
        self.mappings
            .iter()
            .filter(|m| !m.is_nil())
            .map(|m| m.build_id)
            .collect()
    }

    /// Bytes this header's own build stores: the length its data file must have.
    pub fn own_storage_len(&self) -> u64 {
        self.mappings
            .iter()
            .filter(|m| m.build_id == self.meta.build_id)
            .map(|m| m.build_storage_offset + m.length)
            .max()
            .unwrap_or(0)
    }

    /// For each referenced build, the end of the furthest byte read from its
    /// data file: each file must be at least that long.
    pub fn storage_extents(&self) -> HashMap<BuildId, u64> {
        let mut ends = HashMap::new();
        for m in self.mappings.iter().filter(|m| !m.is_nil()) {
            let end = ends.entry(m.build_id).or_insert(0);
            *end = (*end).max(m.build_storage_offset + m.length);
        }
        ends
    }

    /// Coalesce adjacent mappings where that changes no resolution.
    pub fn normalize(&mut self) {
        self.mappings = normalize(std::mem::take(&mut self.mappings));
        self.index = MappingIndex::new(&self.mappings, self.meta.size);
    }

    /// Check every invariant in the module documentation.
    pub fn validate(&self) -> Result<()> {
        validate(&self.meta, &self.mappings)
    }

    /// The binary form described in the module documentation.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.meta, &self.mappings)
    }

    /// Parse and validate an encoded header. Any malformed input is an
    /// error; none panics.
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        let prefix = bytes.len().min(HEADER_MAGIC.len());
        if bytes[..prefix] != HEADER_MAGIC[..prefix] {
            return Err(SnapshotError::HeaderMagic);
        }
        let min = FIXED_LEN + CHECKSUM_LEN;
        if bytes.len() < min {
            return Err(SnapshotError::HeaderTruncated {
                len: bytes.len(),
                expected: min,
            });
        }
        let mut r = FieldReader { bytes, pos: 8 };
        let version = r.u32();
        if version != HEADER_VERSION {
            return Err(SnapshotError::HeaderVersion {
                found: version,
                supported: HEADER_VERSION,
            });
        }
        let flags = r.u32();
        let block_size = r.u64();
        let size = r.u64();
        let generation = r.u64();
        let build_id = r.build_id();
        let base_build_id = r.build_id();
        let count = r.u64();
        let expected = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(MAPPING_LEN))
            .and_then(|n| n.checked_add(FIXED_LEN + CHECKSUM_LEN))
            .unwrap_or(usize::MAX);
        if bytes.len() < expected {
            return Err(SnapshotError::HeaderTruncated {
                len: bytes.len(),
                expected,
            });
        }
        if bytes.len() > expected {
            return Err(SnapshotError::HeaderInvalid {
                reason: format!("{} bytes follow the checksum", bytes.len() - expected),
            });
        }
        let (body, checksum) = bytes.split_at(expected - CHECKSUM_LEN);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(SnapshotError::HeaderChecksum);
        }
        if flags != 0 {
            return Err(SnapshotError::HeaderInvalid {
                reason: format!("unknown flags {flags:#x}"),
            });
        }
        // `expected` fit in memory, so `count` fits in usize.
        let mappings = (0..count as usize)
            .map(|_| Mapping {
                offset: r.u64(),
                length: r.u64(),
                build_id: r.build_id(),
                build_storage_offset: r.u64(),
            })
            .collect();
        Header::from_parts(
            HeaderMeta {
                version,
                block_size,
                size,
                generation,
                build_id,
                base_build_id,
            },
            mappings,
        )
    }
}

/// Check the invariants in the module documentation.
fn validate(meta: &HeaderMeta, mappings: &[Mapping]) -> Result<()> {
    let HeaderMeta {
        version,
        block_size,
        size,
        generation,
        build_id,
        base_build_id,
    } = *meta;
    let invalid = |reason: String| Err(SnapshotError::HeaderInvalid { reason });
    if version != HEADER_VERSION {
        return Err(SnapshotError::HeaderVersion {
            found: version,
            supported: HEADER_VERSION,
        });
    }
    if let Err(e) = check_geometry(size, block_size) {
        return invalid(e.to_string());
    }
    if build_id.is_nil() || base_build_id.is_nil() {
        return invalid("build_id and base_build_id must not be nil".into());
    }
    if generation == 0 && base_build_id != build_id {
        return invalid("a generation-0 header is its own base build".into());
    }
    let mut pos = 0u64;
    let mut storage_end: HashMap<BuildId, u64> = HashMap::new();
    for (i, m) in mappings.iter().enumerate() {
        if m.offset != pos {
            return invalid(format!(
                "mapping {i} starts at {} where {pos} was expected",
                m.offset
            ));
        }
        if m.length == 0 {
            return invalid(format!("mapping {i} is empty"));
        }
        let end = match m.offset.checked_add(m.length) {
            Some(end) if end <= size => end,
            _ => return invalid(format!("mapping {i} ends past the image size {size}")),
        };
        if m.length % block_size != 0 && end != size {
            return invalid(format!(
                "mapping {i} length {} is not a multiple of the block size {block_size}",
                m.length
            ));
        }
        if m.is_nil() {
            if m.build_storage_offset != 0 {
                return invalid(format!("nil mapping {i} has a storage offset"));
            }
        } else {
            let s = m.build_storage_offset;
            if s % block_size != 0 {
                return invalid(format!(
                    "mapping {i} storage offset {s} is not block-aligned"
                ));
            }
            if s.checked_add(m.length).is_none_or(|e| e > MAX_IMAGE_SIZE) {
                return invalid(format!("mapping {i} storage range overflows"));
            }
            let last = storage_end.entry(m.build_id).or_insert(0);
            if s < *last {
                return invalid(format!(
                    "mapping {i} reuses or reorders storage of build {}",
                    m.build_id
                ));
            }
            *last = s + m.length;
        }
        pos = end;
    }
    if pos != size {
        return invalid(format!("mappings cover {pos} bytes of {size}"));
    }
    Ok(())
}

/// The binary form described in the module documentation.
fn encode(meta: &HeaderMeta, mappings: &[Mapping]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(FIXED_LEN + mappings.len() * MAPPING_LEN + CHECKSUM_LEN);
    let m = meta;
    buf.extend_from_slice(&HEADER_MAGIC);
    buf.extend_from_slice(&m.version.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&m.block_size.to_le_bytes());
    buf.extend_from_slice(&m.size.to_le_bytes());
    buf.extend_from_slice(&m.generation.to_le_bytes());
    buf.extend_from_slice(m.build_id.as_bytes());
    buf.extend_from_slice(m.base_build_id.as_bytes());
    buf.extend_from_slice(&(mappings.len() as u64).to_le_bytes());
    for mapping in mappings {
        buf.extend_from_slice(&mapping.offset.to_le_bytes());
        buf.extend_from_slice(&mapping.length.to_le_bytes());
        buf.extend_from_slice(mapping.build_id.as_bytes());
        buf.extend_from_slice(&mapping.build_storage_offset.to_le_bytes());
    }
    let digest = Sha256::digest(&buf);
    buf.extend_from_slice(&digest);
    buf
}

/// Finds the mapping holding an offset without searching them all: the
/// image is cut into at most `MAX_BUCKETS` power-of-two buckets, each
/// remembering the mapping its first byte is in, so a lookup binary-searches
/// only the few mappings of one bucket (random lookups in a 100k-mapping
/// header otherwise miss the cache at every step).
#[derive(Clone, Default)]
struct MappingIndex {
    shift: u32,
    /// Per bucket: index of the mapping containing the bucket's first byte.
    first: Vec<u32>,
    /// `mappings[i].offset`.
    starts: Vec<u64>,
}

const MAX_BUCKETS: u64 = 1 << 16;

impl MappingIndex {
    /// `mappings` must be valid for `size`.
    fn new(mappings: &[Mapping], size: u64) -> MappingIndex {
        let starts: Vec<u64> = mappings.iter().map(|m| m.offset).collect();
        let mut shift = MIN_BLOCK_SIZE.trailing_zeros();
        while (size >> shift) >= MAX_BUCKETS {
            shift += 1;
        }
        let buckets = size.div_ceil(1 << shift);
        let mut first = Vec::with_capacity(buckets as usize);
        let mut i = 0;
        for b in 0..buckets {
            let start = b << shift;
            while i + 1 < starts.len() && starts[i + 1] <= start {
                i += 1;
            }
            first.push(i as u32);
        }
        MappingIndex {
            shift,
            first,
            starts,
        }
    }

    /// Index of the mapping containing `offset`, which is inside the image.
    fn find(&self, offset: u64) -> usize {
        let bucket = (offset >> self.shift) as usize;
        let lo = self.first[bucket] as usize;
        let hi = self
            .first
            .get(bucket + 1)
            .map_or(self.starts.len(), |&i| i as usize + 1);
        lo + self.starts[lo..hi].partition_point(|&s| s <= offset) - 1
    }
}

/// Iterator returned by [`Header::segments`].
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    mappings: &'a [Mapping],
    index: usize,
    pos: u64,
    end: u64,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if self.pos >= self.end {
            return None;
        }
        let m = self.mappings.get(self.index)?;
        let piece = m.slice(self.pos, m.end().min(self.end));
        self.pos = piece.end();
        self.index += 1;
        Some(Segment {
            image_offset: piece.offset,
            length: piece.length,
            build_id: piece.build_id,
            storage_offset: piece.build_storage_offset,
        })
    }
}

/// Reads fixed-width fields; callers check the length first.
struct FieldReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl FieldReader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        out.copy_from_slice(&self.bytes[self.pos..self.pos + N]);
        self.pos += N;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn build_id(&mut self) -> BuildId {
        BuildId::from_bytes(self.take())
    }
}

fn base_meta(build_id: BuildId, size: u64, block_size: u64) -> HeaderMeta {
    HeaderMeta {
        version: HEADER_VERSION,
        block_size,
        size,
        generation: 0,
        build_id,
        base_build_id: build_id,
    }
}

fn non_nil(build_id: BuildId) -> Result<()> {
    if build_id.is_nil() {
        return Err(SnapshotError::NilBuild);
    }
    Ok(())
}

pub(crate) fn check_geometry(size: u64, block_size: u64) -> Result<()> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(SnapshotError::BlockSize { block_size });
    }
    if size == 0 {
        return Err(SnapshotError::EmptyImage);
    }
    if size > MAX_IMAGE_SIZE {
        return Err(SnapshotError::HeaderInvalid {
            reason: format!("image size {size} exceeds {MAX_IMAGE_SIZE}"),
        });
    }
    Ok(())
}

/// The mappings a new build contributes: its dirty runs packed into its
/// data file in offset order, and its zero runs as nil.
fn overlay(meta: &HeaderMeta, dirty: &BlockSet, zero: &BlockSet) -> Result<Vec<Mapping>> {
    let blocks = meta.size.div_ceil(meta.block_size);
    for set in [dirty, zero] {
        if set.end() > blocks {
            return Err(SnapshotError::BlockOutOfRange {
                block: set.end() - 1,
                blocks,
            });
        }
    }
    if let Some(block) = dirty.first_common(zero) {
        return Err(SnapshotError::DirtyAndZero { block });
    }
    let bs = meta.block_size;
    let byte_range = |r: Range<u64>| r.start * bs..(r.end * bs).min(meta.size);
    let mut out = Vec::with_capacity(dirty.run_count() + zero.run_count());
    let mut storage = 0;
    let mut dirty_runs = dirty.runs().peekable();
    let mut zero_runs = zero.runs().peekable();
    loop {
        let take_dirty = match (dirty_runs.peek(), zero_runs.peek()) {
            (Some(d), Some(z)) => d.start < z.start,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let (range, build_id, storage_offset) = if take_dirty {
            let r = byte_range(dirty_runs.next().expect("peeked"));
            let at = storage;
            storage += r.end - r.start;
            (r, meta.build_id, at)
        } else {
            (
                byte_range(zero_runs.next().expect("peeked")),
                BuildId::NIL,
                0,
            )
        };
        out.push(Mapping {
            offset: range.start,
            length: range.end - range.start,
            build_id,
            build_storage_offset: storage_offset,
        });
    }
    Ok(out)
}

/// `base` with every byte covered by `overlay` replaced by the overlay's
/// mapping. Both lists must be sorted and free of overlaps (`overlay` may
/// have gaps); the result is sorted but not normalized.
pub fn merge(base: &[Mapping], overlay: &[Mapping]) -> Vec<Mapping> {
    let mut kept = Vec::with_capacity(base.len() + overlay.len());
    for m in base {
        let mut pos = m.offset;
        let first = overlay.partition_point(|o| o.end() <= m.offset);
        for o in overlay[first..].iter().take_while(|o| o.offset < m.end()) {
            if o.offset > pos {
                kept.push(m.slice(pos, o.offset));
            }
            pos = pos.max(o.end());
        }
        if pos < m.end() {
            kept.push(m.slice(pos, m.end()));
        }
    }
    let mut out = Vec::with_capacity(kept.len() + overlay.len());
    let (mut i, mut j) = (0, 0);
    while i < kept.len() || j < overlay.len() {
        let take_kept =
            j == overlay.len() || (i < kept.len() && kept[i].offset < overlay[j].offset);
        if take_kept {
            out.push(kept[i]);
            i += 1;
        } else {
            out.push(overlay[j]);
            j += 1;
        }
    }
    out
}

/// Drop empty mappings, zero the storage offset of nil ones, and coalesce
/// neighbours that resolve alike: nil runs always, runs of one build only
/// where their storage is contiguous too.
pub fn normalize(mappings: Vec<Mapping>) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::with_capacity(mappings.len());
    for mut m in mappings.into_iter().filter(|m| m.length > 0) {
        if m.is_nil() {
            m.build_storage_offset = 0;
        }
        if let Some(prev) = out.last_mut() {
            let adjacent = prev.end() == m.offset && prev.build_id == m.build_id;
            let contiguous =
                m.is_nil() || prev.build_storage_offset + prev.length == m.build_storage_offset;
            if adjacent && contiguous {
                prev.length += m.length;
                continue;
            }
        }
        out.push(m);
    }
    out
}

#[cfg(test)]
mod tests;
