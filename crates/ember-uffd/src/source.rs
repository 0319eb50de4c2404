//! Where each byte of a guest memory image comes from: the [`MemorySource`]
//! seam (the page server asks "what is at offset X, and for how long does it
//! continue so?"), [`Layout`], a validated list of mappings that implements
//! it, and [`Image`], a source plus its open, mapped data files.
//!
//! It does not parse snapshot headers or know the build store's layout; the
//! adapter from `ember-snapshot`'s header builds a [`Layout`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Error;

/// Mappings, file offsets and lengths are multiples of this: the smallest
/// page a region can have.
pub const ALIGN: u64 = 4096;

/// The run of an image that starts at a given offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes of zeros (never written, or a nil mapping).
    Zero { len: u64 },
    /// `len` bytes at `file_offset` in data file `file`.
    File {
        file: usize,
        file_offset: u64,
        len: u64,
    },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Zero { len } | Extent::File { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The seam between the page server and a snapshot format.
pub trait MemorySource: Send + Sync + std::fmt::Debug {
    /// The image's size in bytes.
    fn size(&self) -> u64;
    /// The extent that starts at `offset` (< `size()`), running to the end of
    /// its mapping. `None` when `offset` is outside the image.
    fn locate(&self, offset: u64) -> Option<Extent>;
}

/// Where one mapping's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    Zero,
    File { file: usize, file_offset: u64 },
}

/// `[offset, offset + length)` of the image comes from `backing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub offset: u64,
    pub length: u64,
    pub backing: Backing,
}

/// Mappings that cover an image exactly once, in order.
#[derive(Debug, Clone)]
pub struct Layout {
    size: u64,
    mappings: Vec<Mapping>,
}

impl Layout {
    /// Validate and accept `mappings`: sorted, non-empty, page-aligned,
    /// covering `[0, size)` exactly once, naming only files `< files`.
    pub fn new(size: u64, mappings: Vec<Mapping>, files: usize) -> Result<Layout, Error> {
        let bad = |why: String| Err(Error::CorruptLayout(why));
        if size == 0 || !size.is_multiple_of(ALIGN) {
            return bad(format!(
                "image size {size} is not a positive multiple of {ALIGN}"
            ));
        }
        let mut next = 0u64;
        for m in &mappings {
            if m.offset != next {
                return bad(format!(
                    "mapping at {:#x} does not start where the previous one ends ({next:#x})",
                    m.offset
                ));
            }
            if m.length == 0 || !m.length.is_multiple_of(ALIGN) {
                return bad(format!(
                    "mapping at {:#x} has length {} (not a positive multiple of {ALIGN})",
                    m.offset, m.length
                ));
            }
            if let Backing::File { file, file_offset } = m.backing {
                if file >= files {
                    return bad(format!(
                        "mapping at {:#x} names data file {file} of {files}",
                        m.offset
                    ));
                }
                if !file_offset.is_multiple_of(ALIGN) || file_offset.checked_add(m.length).is_none()
                {
                    return bad(format!(
                        "mapping at {:#x} has file offset {file_offset:#x}",
                        m.offset
                    ));
                }
            }
            next = match m.offset.checked_add(m.length) {
                Some(n) => n,
                None => return bad(format!("mapping at {:#x} overflows", m.offset)),
            };
        }
        if next != size {
            return bad(format!(
                "mappings cover [0, {next:#x}) but the image is {size:#x} bytes"
            ));
        }
        Ok(Layout { size, mappings })
    }

    /// One file holding the whole image (a Firecracker full-snapshot memfile).
    pub fn flat(size: u64) -> Result<Layout, Error> {
        Layout::new(
            size,
            vec![Mapping {
                offset: 0,
                length: size,
                backing: Backing::File {
                    file: 0,
                    file_offset: 0,
                },
            }],
            1,
        )
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }
}

impl MemorySource for Layout {
    fn size(&self) -> u64 {
        self.size
    }

    fn locate(&self, offset: u64) -> Option<Extent> {
        if offset >= self.size {
            return None;
        }
        let i = self
            .mappings
            .partition_point(|m| m.offset + m.length <= offset);
        let m = self.mappings.get(i)?;
        let skip = offset - m.offset;
        let len = m.length - skip;
        Some(match m.backing {
            Backing::Zero => Extent::Zero { len },
            Backing::File { file, file_offset } => Extent::File {
                file,
                file_offset: file_offset + skip,
                len,
            },
        })
    }
}

/// One data file, open and mapped read-only.
#[derive(Debug)]
pub struct DataFile {
    path: PathBuf,
    file: File,
    len: u64,
    map: *const u8,
}

// SAFETY: `map` is a read-only shared mapping owned by this value and
// unmapped only in Drop; reading it from several threads is sound.
unsafe impl Send for DataFile {}
// SAFETY: as above; nothing mutates through `map`.
unsafe impl Sync for DataFile {}

impl DataFile {
    pub fn open(path: &Path) -> Result<DataFile, Error> {
        let io = |source| Error::SourceFile {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let map = if len == 0 {
            std::ptr::null()
        } else {
            // SAFETY: a fresh read-only shared mapping of a file we hold
            // open; the kernel picks the address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io(std::io::Error::last_os_error()));
            }
            p.cast::<u8>().cast_const()
        };
        Ok(DataFile {
            path: path.to_owned(),
            file,
            len,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A pointer to `offset` in the mapping, if `[offset, offset+len)` lies
    /// inside the file as it was when opened. Reading through it may still
    /// fail (inside the kernel, as `EFAULT`) if the file shrank since.
    pub fn ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        if self.map.is_null() || end > self.len {
            return None;
        }
        // SAFETY: offset < len of the mapping, checked above.
        Some(unsafe { self.map.add(offset as usize) })
    }

    /// Map `[offset, offset+len)` of the file into this process's page
    /// tables now (`MADV_POPULATE_READ`), from the page cache or the disk.
    /// A `UFFDIO_COPY` whose source is not mapped takes a slower path in the
    /// kernel, which for hugetlbfs allocates a second, temporary huge page
    /// from the pool. Failures are ignored: the copy then reports them.
    pub fn populate(&self, offset: u64, len: u64) {
        let Some(ptr) = self.ptr(offset, len) else {
            return;
        };
        let start = (ptr as usize) & !(ALIGN as usize - 1);
        let end = ptr as usize + len as usize;
        // SAFETY: the range lies inside our read-only mapping; populating
        // only fills page tables and cannot change its contents.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_READ,
            )
        };
    }

    /// Start reading `[offset, offset+len)` of the file into the page cache
    /// (`POSIX_FADV_WILLNEED`) without waiting for it: many such requests
    /// keep the disk's queue deep, where faults read one window at a time.
    /// Advice only; failures are ignored.
    pub fn advise_willneed(&self, offset: u64, len: u64) {
        // SAFETY: a valid descriptor; the advice reads nothing into our memory.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    /// Read exactly `buf.len()` bytes at `offset` with `pread`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

impl Drop for DataFile {
    fn drop(&mut self) {
        if !self.map.is_null() {
            // SAFETY: `map` came from mmap with this length and is unmapped
            // exactly once, here.
            unsafe { libc::munmap(self.map.cast_mut().cast(), self.len as usize) };
        }
    }
}

/// A memory image ready to serve: its source, its data files, and the name
/// the page server logs (the build ID).
#[derive(Debug, Clone)]
pub struct Image {
    source: Arc<dyn MemorySource>,
    files: Arc<Vec<DataFile>>,
    name: String,
}

impl Image {
    /// Open `files` and check that every file extent of `source` lies inside
    /// its file, so a build that is short from the start is refused before
    /// any VM depends on it.
    pub fn open(
        name: impl Into<String>,
        source: Arc<dyn MemorySource>,
        files: &[PathBuf],
    ) -> Result<Image, Error> {
        let name = name.into();
        let files = files
            .iter()
            .map(|p| DataFile::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut offset = 0;
        while offset < source.size() {
            let Some(extent) = source.locate(offset) else {
                return Err(Error::CorruptLayout(format!(
                    "{name}: no mapping covers offset {offset:#x}"
                )));
            };
            if extent.is_empty() {
                return Err(Error::CorruptLayout(format!(
                    "{name}: empty extent at offset {offset:#x}"
                )));
            }
            if let Extent::File {
                file,
                file_offset,
                len,
            } = extent
            {
                let Some(f) = files.get(file) else {
                    return Err(Error::CorruptLayout(format!(
                        "{name}: offset {offset:#x} names missing data file {file}"
                    )));
                };
                if file_offset.checked_add(len).is_none_or(|end| end > f.len()) {
                    return Err(Error::CorruptLayout(format!(
                        "{name}: offset {offset:#x} needs bytes {file_offset:#x}..{:#x} of {} which has {:#x}",
                        file_offset.saturating_add(len),
                        f.path().display(),
                        f.len()
                    )));
                }
            }
            offset += extent.len();
        }
        Ok(Image {
            source,
            files: Arc::new(files),
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.source.size()
    }

    pub fn locate(&self, offset: u64) -> Option<Extent> {
        self.source.locate(offset)
    }

    pub fn file(&self, index: usize) -> Option<&DataFile> {
        self.files.get(index)
    }

    /// Ask the kernel to read image bytes `range` from the disk ahead of
    /// need (zero extents cost nothing). See [`DataFile::advise_willneed`].
    pub fn advise_willneed(&self, range: std::ops::Range<u64>) {
        let mut at = range.start;
        while at < range.end {
            let Some(extent) = self.locate(at) else {
                return;
            };
            let len = extent.len().min(range.end - at);
            if len == 0 {
                return;
            }
            if let Extent::File {
                file, file_offset, ..
            } = extent
                && let Some(f) = self.files.get(file)
            {
                f.advise_willneed(file_offset, len);
            }
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(offset: u64, length: u64, backing: Backing) -> Mapping {
        Mapping {
            offset,
            length,
            backing,
        }
    }

    #[test]
    fn layouts_with_gaps_overlaps_or_short_coverage_are_refused() {
        let z = Backing::Zero;
        assert!(Layout::new(8192, vec![m(0, 4096, z)], 0).is_err());
        assert!(Layout::new(8192, vec![m(0, 4096, z), m(8192, 4096, z)], 0).is_err());
        assert!(Layout::new(8192, vec![m(0, 8192, z), m(4096, 4096, z)], 0).is_err());
        assert!(Layout::new(8192, vec![m(0, 100, z), m(100, 8092, z)], 0).is_err());
        let f = Backing::File {
            file: 1,
            file_offset: 0,
        };
        let err = Layout::new(4096, vec![m(0, 4096, f)], 1).unwrap_err();
        assert!(err.to_string().contains("data file 1 of 1"), "{err}");
        assert!(Layout::new(8192, vec![m(0, 4096, z), m(4096, 4096, z)], 0).is_ok());
    }

    proptest! {
        /// `locate` agrees with a naive byte-by-byte model of the mappings.
        #[test]
        fn locate_matches_a_naive_model(lengths in proptest::collection::vec((1u64..6, 0usize..3), 1..12), probes in proptest::collection::vec(0u64..1000, 1..40)) {
            let mut mappings = Vec::new();
            let mut offset = 0;
            let mut file_used = [0u64; 2];
            for (pages, kind) in &lengths {
                let length = pages * ALIGN;
                let backing = if *kind == 2 { Backing::Zero } else {
                    let b = Backing::File { file: *kind, file_offset: file_used[*kind] };
                    file_used[*kind] += length;
                    b
                };
                mappings.push(m(offset, length, backing));
                offset += length;
            }
            let layout = Layout::new(offset, mappings.clone(), 2).unwrap();
            for p in probes {
                let at = (p * 97) % offset;
                let owner = mappings.iter().find(|m| m.offset <= at && at < m.offset + m.length).unwrap();
                let want = match owner.backing {
                    Backing::Zero => Extent::Zero { len: owner.offset + owner.length - at },
                    Backing::File { file, file_offset } => Extent::File { file, file_offset: file_offset + at - owner.offset, len: owner.offset + owner.length - at },
                };
                prop_assert_eq!(layout.locate(at), Some(want));
            }
            prop_assert_eq!(layout.locate(offset), None);
        }
    }

    #[test]
    fn an_image_whose_file_is_too_short_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memfile");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let layout = Arc::new(Layout::flat(8192).unwrap());
        let err = Image::open("b1", layout, &[path]).unwrap_err();
        assert!(err.to_string().contains("needs bytes"), "{err}");
    }
}
