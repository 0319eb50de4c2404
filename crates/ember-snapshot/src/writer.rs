//! Writing a build: a `BuildWriter` fills a private temporary directory and
//! commits it with one atomic rename, so readers see all of a build or none.
//!
//! Image data arrives three ways, each turned into a dirty set (written,
//! packed in offset order, to the data file) and a zero set (nil mappings):
//! - [`BuildWriter::write_image_from_full`]: a complete image (QEMU's RAM
//!   file, a memory dump, a whole disk); blocks equal to the parent's are
//!   left out by comparing contents.
//! - [`BuildWriter::write_image_from_sparse`]: a full-size sparse file
//!   holding only the dirty blocks (Firecracker's Diff snapshot); its data
//!   extents are the dirty set.
//! - [`BuildWriter::write_image_from_blocks`]: an explicit dirty block list
//!   and a callback that reads them (a qcow2 overlay's written clusters).
//!
//! In every case all-zero blocks become nil instead of being stored. What
//! the writer does not do is decide what a build contains or when to
//! snapshot; the host agent does.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ember_types::BuildId;
use nix::fcntl::Flock;
use sha2::{Digest, Sha256};

use crate::blockset::BlockSet;
use crate::error::{Result, SnapshotError, io};
use crate::header::{Header, check_geometry};
use crate::meta::{BuildFile, BuildInfo, BuildMeta, FileDigest, ImageKind, META_FORMAT};
use crate::reader::ImageReader;
use crate::store::{BuildStore, TMP_PREFIX, hash_file, hex};
use crate::sys::{self, LockMode};

/// Bytes read per step when scanning an image.
const CHUNK: u64 = 1 << 20;

/// What a new image generation is a diff of.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    /// No parent: a first build. Blocks not written read as zeros.
    Fresh { block_size: u64 },
    /// A diff against this (committed) header; blocks not written are
    /// inherited from it, and the block size is its block size.
    Parent(&'a Header),
}

/// What writing one image cost and produced.
#[derive(Debug, Clone)]
pub struct WriteReport {
    pub kind: ImageKind,
    /// Size of the image the header describes.
    pub image_size: u64,
    /// Bytes stored in this build's data file.
    pub bytes_written: u64,
    pub dirty_blocks: u64,
    /// Blocks found all-zero (stored as nil, not written).
    pub zero_blocks: u64,
    /// The new header, already written next to the data file.
    pub header: Header,
}

/// A build being written. Dropping it without [`commit`](Self::commit)
/// removes everything it wrote; after any error, drop it and start over.
/// Each file (memfile, rootfs, vmstate) is written at most once.
#[derive(Debug)]
pub struct BuildWriter {
    store: BuildStore,
    build_id: BuildId,
    info: BuildInfo,
    tmp: PathBuf,
    files: BTreeMap<BuildFile, FileDigest>,
    headers: Vec<(ImageKind, Header)>,
    committed: bool,
    // Held until commit or drop: the directory lock tells `recover` this
    // temporary directory is alive; the store lock keeps gc from deleting a
    // parent this build references before it is committed.
    _dir_lock: Flock<File>,
    _store_lock: Flock<File>,
}

impl BuildWriter {
    pub(crate) fn create(
        store: BuildStore,
        build_id: BuildId,
        info: BuildInfo,
        store_lock: Flock<File>,
    ) -> Result<BuildWriter> {
        let tmp = store.root().join(format!(
            "{TMP_PREFIX}{build_id}-{:016x}",
            rand::random::<u64>()
        ));
        fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        let dir_lock =
            match File::open(&tmp).and_then(|dir| sys::lock(dir, LockMode::Exclusive, false)) {
                Ok(Some(lock)) => lock,
                other => {
                    let _ = fs::remove_dir_all(&tmp);
                    let e = other
                        .err()
                        .unwrap_or_else(|| io::ErrorKind::WouldBlock.into());
                    return Err(io("lock", &tmp)(e));
                }
            };
        Ok(BuildWriter {
            store,
            build_id,
            info,
            tmp,
            files: BTreeMap::new(),
            headers: Vec::new(),
            committed: false,
            _dir_lock: dir_lock,
            _store_lock: store_lock,
        })
    }

    pub fn build_id(&self) -> BuildId {
        self.build_id
    }

    /// The temporary directory being filled (for diagnostics).
    pub fn staging_dir(&self) -> &Path {
        &self.tmp
    }

    /// Where a VMM may write the device state itself (Firecracker's
    /// `snapshot_path`, QEMU's migration target) before `commit`, instead of
    /// passing it through [`write_vmstate`](Self::write_vmstate).
    pub fn vmstate_path(&self) -> PathBuf {
        self.tmp.join(BuildFile::Vmstate.name())
    }

    /// Store the VMM's device state.
    pub fn write_vmstate(&mut self, mut src: impl Read) -> Result<u64> {
        let path = self.create_file(BuildFile::Vmstate)?;
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut hasher = HashingWriter {
            file: &mut file,
            hasher: Sha256::new(),
            size: 0,
        };
        io::copy(&mut src, &mut hasher).map_err(io("write", &path))?;
        let digest = hasher.digest();
        file.sync_all().map_err(io("sync", &path))?;
        let size = digest.size;
        self.files.insert(BuildFile::Vmstate, digest);
        Ok(size)
    }

    /// Way (a): a complete image. With a parent, a block is stored only if
    /// it differs from what the parent header reads there. Holes in the
    /// image (a RAM file's untouched pages) are zeros and are not read.
    pub fn write_image_from_full(
        &mut self,
        kind: ImageKind,
        base: Base<'_>,
        image_path: &Path,
    ) -> Result<WriteReport> {
        let image = File::open(image_path).map_err(io("open", image_path))?;
        let size = image.metadata().map_err(io("stat", image_path))?.len();
        let parent = match base {
            Base::Parent(p) => Some(self.store.reader(p.clone(), kind)?),
            Base::Fresh { .. } => None,
        };
        let mut diff = self.start_image(kind, base, size)?;
        let data = data_blocks(&image, image_path, size, diff.block_size)?;
        for run in data.complement(size.div_ceil(diff.block_size)).runs() {
            diff.zero.insert_run(run);
        }
        for run in data.runs() {
            diff.add_from_file(&image, image_path, run, parent.as_ref())?;
        }
        self.finish_image(diff, base)
    }

    /// Way (b): a full-size sparse file whose data extents are exactly the
    /// dirty blocks (holes are inherited from the parent, or zeros for a
    /// fresh build). Extents are widened to whole blocks. Needs a file
    /// system that reports holes (ext4, XFS, btrfs, tmpfs all do); on one
    /// that does not, the whole file counts as dirty.
    pub fn write_image_from_sparse(
        &mut self,
        kind: ImageKind,
        base: Base<'_>,
        image_path: &Path,
    ) -> Result<WriteReport> {
        let image = File::open(image_path).map_err(io("open", image_path))?;
        let size = image.metadata().map_err(io("stat", image_path))?.len();
        let mut diff = self.start_image(kind, base, size)?;
        for run in data_blocks(&image, image_path, size, diff.block_size)?.runs() {
            diff.add_from_file(&image, image_path, run, None)?;
        }
        self.finish_image(diff, base)
    }

    /// Way (c): the caller names the dirty blocks of a `size`-byte image
    /// (with a parent, its size) and `read(offset, buf)` fills `buf` with
    /// image bytes from `offset`: block-aligned, whole blocks (the partial
    /// last one aside), at most 1 MiB per call, in ascending order. A fresh
    /// image reads as zeros outside `dirty`.
    pub fn write_image_from_blocks(
        &mut self,
        kind: ImageKind,
        base: Base<'_>,
        size: u64,
        dirty: &BlockSet,
        mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<WriteReport> {
        let mut diff = self.start_image(kind, base, size)?;
        let bs = diff.block_size;
        let blocks = size.div_ceil(bs);
        if dirty.end() > blocks {
            return Err(SnapshotError::BlockOutOfRange {
                block: dirty.end() - 1,
                blocks,
            });
        }
        let mut buf = vec![0u8; chunk_len(bs)];
        for run in dirty.runs() {
            let end = (run.end * bs).min(size);
            let mut offset = run.start * bs;
            while offset < end {
                let n = (end - offset).min(buf.len() as u64) as usize;
                read(offset, &mut buf[..n])
                    .map_err(|source| SnapshotError::BlockSource { offset, source })?;
                diff.add(offset, &buf[..n], None)?;
                offset += n as u64;
            }
        }
        self.finish_image(diff, base)
    }

    /// A first build whose image is an existing, immutable file, taken as
    /// is: hard-linked into the build (on the same file system; a reflink or
    /// a sparse copy otherwise), with an identity header (block `i` at
    /// storage offset `i * block_size`). For importing a base image that
    /// already exists on disk without storing its bytes twice. The caller
    /// must never modify `image_path` afterwards.
    pub fn link_image(
        &mut self,
        kind: ImageKind,
        block_size: u64,
        image_path: &Path,
    ) -> Result<WriteReport> {
        let size = fs::metadata(image_path)
            .map_err(io("stat", image_path))?
            .len();
        check_geometry(size, block_size)?;
        let path = self.tmp.join(kind.data_file().name());
        if path.exists() {
            return Err(SnapshotError::BuildFileWritten {
                build: self.build_id,
                file: kind.data_file().name(),
            });
        }
        if fs::hard_link(image_path, &path).is_err() {
            let src = File::open(image_path).map_err(io("open", image_path))?;
            let dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io("create", &path))?;
            dst.set_len(size).map_err(io("truncate", &path))?;
            copy_sparse(&src, &dst, size).map_err(io("copy", image_path))?;
            dst.sync_all().map_err(io("sync", &path))?;
        }
        let file = File::open(&path).map_err(io("open", &path))?;
        let (hashed, sha256) = hash_file(&file).map_err(io("read", &path))?;
        let header = Header::base(self.build_id, size, block_size)?;
        let bytes = header.encode();
        let header_path = self.create_file(kind.header_file())?;
        write_synced(&header_path, &bytes)?;
        self.files.insert(
            kind.data_file(),
            FileDigest {
                size: hashed,
                sha256,
            },
        );
        self.files.insert(
            kind.header_file(),
            FileDigest {
                size: bytes.len() as u64,
                sha256: hex(&Sha256::digest(&bytes)),
            },
        );
        self.headers.push((kind, header.clone()));
        let blocks = size.div_ceil(block_size);
        Ok(WriteReport {
            kind,
            image_size: size,
            bytes_written: 0,
            dirty_blocks: blocks,
            zero_blocks: 0,
            header,
        })
    }

    fn start_image(&mut self, kind: ImageKind, base: Base<'_>, size: u64) -> Result<ImageDiff> {
        let block_size = match base {
            Base::Fresh { block_size } => block_size,
            Base::Parent(p) => {
                if p.size() != size {
                    return Err(SnapshotError::ImageSizeMismatch {
                        expected: p.size(),
                        found: size,
                    });
                }
                p.block_size()
            }
        };
        check_geometry(size, block_size)?;
        let path = self.create_file(kind.data_file())?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        Ok(ImageDiff {
            kind,
            block_size,
            size,
            file,
            path,
            hasher: Sha256::new(),
            written: 0,
            dirty: BlockSet::new(),
            zero: BlockSet::new(),
            parent_buf: Vec::new(),
            read_buf: Vec::new(),
        })
    }

    fn finish_image(&mut self, diff: ImageDiff, base: Base<'_>) -> Result<WriteReport> {
        diff.file.sync_all().map_err(io("sync", &diff.path))?;
        let header = match base {
            Base::Fresh { block_size } => {
                Header::base_sparse(self.build_id, diff.size, block_size, &diff.dirty)?
            }
            Base::Parent(p) => Header::next_generation(p, self.build_id, &diff.dirty, &diff.zero)?,
        };
        debug_assert_eq!(header.own_storage_len(), diff.written);
        let data_digest = FileDigest {
            size: diff.written,
            sha256: hex(&diff.hasher.finalize()),
        };
        let bytes = header.encode();
        let header_path = self.create_file(diff.kind.header_file())?;
        write_synced(&header_path, &bytes)?;
        self.files.insert(diff.kind.data_file(), data_digest);
        self.files.insert(
            diff.kind.header_file(),
            FileDigest {
                size: bytes.len() as u64,
                sha256: hex(&Sha256::digest(&bytes)),
            },
        );
        self.headers.push((diff.kind, header.clone()));
        tracing::debug!(
            build = %self.build_id,
            kind = ?diff.kind,
            image_size = diff.size,
            bytes_written = diff.written,
            "image written"
        );
        Ok(WriteReport {
            kind: diff.kind,
            image_size: diff.size,
            bytes_written: diff.written,
            dirty_blocks: diff.dirty.len(),
            zero_blocks: diff.zero.len(),
            header,
        })
    }

    /// Every other build `header` reads from must be committed with a data
    /// file of this kind long enough for what the header reads: a parent
    /// deleted meanwhile, or a header of the other kind passed as parent,
    /// fails here instead of producing a build that cannot be read.
    fn check_references(&self, kind: ImageKind, header: &Header) -> Result<()> {
        let mut extents: Vec<(BuildId, u64)> = header
            .storage_extents()
            .into_iter()
            .filter(|(b, _)| *b != self.build_id)
            .collect();
        extents.sort();
        let missing: Vec<BuildId> = extents
            .iter()
            .map(|(b, _)| *b)
            .filter(|b| !self.store.exists(*b))
            .collect();
        if !missing.is_empty() {
            return Err(SnapshotError::ReferencedBuildsMissing {
                build: self.build_id,
                missing,
            });
        }
        for (build, needed) in extents {
            let path = self.store.data_path(build, kind);
            let len = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(self.store.missing(build, kind.data_file().name()));
                }
                Err(e) => return Err(io("stat", path)(e)),
            };
            if len < needed {
                return Err(SnapshotError::StorageOutOfRange {
                    build,
                    file: kind.data_file().name(),
                    needed,
                    len,
                });
            }
        }
        Ok(())
    }

    /// Create `file` in the staging directory; each file is written once.
    fn create_file(&self, file: BuildFile) -> Result<PathBuf> {
        let path = self.tmp.join(file.name());
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(SnapshotError::BuildFileWritten {
                    build: self.build_id,
                    file: file.name(),
                })
            }
            Err(e) => Err(io("create", path)(e)),
        }
    }

    /// Make the build durable and visible under its ID. Fails, leaving
    /// nothing behind, if a build its headers read from is gone or lacks
    /// the data they read.
    pub fn commit(mut self) -> Result<BuildMeta> {
        if !self.files.contains_key(&BuildFile::Vmstate) {
            // A VMM may have written the state straight to `vmstate_path`.
            let path = self.vmstate_path();
            match File::open(&path) {
                Ok(file) => {
                    let (size, sha256) = hash_file(&file).map_err(io("read", &path))?;
                    file.sync_all().map_err(io("sync", &path))?;
                    self.files
                        .insert(BuildFile::Vmstate, FileDigest { size, sha256 });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("open", path)(e)),
            }
        }
        for (kind, header) in &self.headers {
            self.check_references(*kind, header)?;
        }
        let created_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let meta = BuildMeta {
            format: META_FORMAT,
            build_id: self.build_id,
            created_at_unix_ms,
            info: std::mem::take(&mut self.info),
            files: std::mem::take(&mut self.files),
        };
        let json = serde_json::to_vec_pretty(&meta).expect("BuildMeta serializes");
        write_synced(&self.tmp.join("meta.json"), &json)?;
        sys::fsync_dir(&self.tmp).map_err(io("sync", &self.tmp))?;
        let dst = self.store.build_dir(self.build_id);
        match sys::rename_noreplace(&self.tmp, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SnapshotError::BuildExists {
                    build: self.build_id,
                });
            }
            Err(e) => return Err(io("rename", &self.tmp)(e)),
        }
        self.committed = true;
        let root = self.store.root().to_owned();
        sys::fsync_dir(&root).map_err(io("sync", root))?;
        tracing::info!(build = %self.build_id, "build committed");
        Ok(meta)
    }
}

impl Drop for BuildWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.tmp) {
            tracing::warn!(path = %self.tmp.display(), error = %e, "could not remove an abandoned build");
        }
    }
}

/// Copy `len` bytes of `src` to the same offsets of `dst`, skipping holes.
fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset)?;
        if !is_zero(&buf[..n]) {
            dst.write_all_at(&buf[..n], offset)?;
        }
        offset += n as u64;
    }
    Ok(())
}

/// One image being written: classifies blocks and appends dirty ones.
struct ImageDiff {
    kind: ImageKind,
    block_size: u64,
    size: u64,
    file: File,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    dirty: BlockSet,
    zero: BlockSet,
    parent_buf: Vec<u8>,
    read_buf: Vec<u8>,
}

impl ImageDiff {
    /// Classify the blocks of `chunk`, the image bytes at block-aligned
    /// `offset`: all-zero blocks go to the zero set; with `parent`, blocks
    /// equal to the parent's are inherited; every other block is dirty and
    /// appended to the data file. Calls come in ascending offset order.
    fn add(&mut self, offset: u64, chunk: &[u8], parent: Option<&ImageReader>) -> Result<()> {
        let bs = self.block_size as usize;
        let first_block = offset / self.block_size;
        let mut parent_loaded = false;
        let mut run: Option<usize> = None;
        for (i, block) in chunk.chunks(bs).enumerate() {
            let b = first_block + i as u64;
            let dirty = if is_zero(block) {
                self.zero.insert(b);
                false
            } else if let Some(parent) = parent {
                if !parent_loaded {
                    self.parent_buf.resize(chunk.len(), 0);
                    parent.read_at(&mut self.parent_buf[..chunk.len()], offset)?;
                    parent_loaded = true;
                }
                self.parent_buf[i * bs..i * bs + block.len()] != *block
            } else {
                true
            };
            if dirty {
                self.dirty.insert(b);
                run.get_or_insert(i * bs);
            } else if let Some(start) = run.take() {
                self.append(&chunk[start..i * bs])?;
            }
        }
        if let Some(start) = run {
            self.append(&chunk[start..])?;
        }
        Ok(())
    }

    /// [`add`](Self::add) every block of `blocks`, read from `image`.
    fn add_from_file(
        &mut self,
        image: &File,
        path: &Path,
        blocks: Range<u64>,
        parent: Option<&ImageReader>,
    ) -> Result<()> {
        let bs = self.block_size;
        let end = (blocks.end * bs).min(self.size);
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.resize(chunk_len(bs), 0);
        let mut offset = blocks.start * bs;
        let result = loop {
            if offset >= end {
                break Ok(());
            }
            let n = (end - offset).min(buf.len() as u64) as usize;
            if let Err(e) = image.read_exact_at(&mut buf[..n], offset) {
                break Err(io("read", path)(e));
            }
            if let Err(e) = self.add(offset, &buf[..n], parent) {
                break Err(e);
            }
            offset += n as u64;
        };
        self.read_buf = buf;
        result
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(io("write", &self.path))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// The blocks of `image` that hold data (not holes), extents widened to
/// whole blocks. A file system without hole tracking reports all data.
fn data_blocks(image: &File, path: &Path, size: u64, bs: u64) -> Result<BlockSet> {
    let mut blocks = BlockSet::new();
    let mut cursor = 0;
    while cursor < size {
        let Some(data) = sys::next_data(image, cursor).map_err(io("seek data in", path))? else {
            break;
        };
        if data >= size {
            break;
        }
        let hole = sys::next_hole(image, data).map_err(io("seek hole in", path))?;
        blocks.insert_run(data / bs..hole.min(size).div_ceil(bs));
        cursor = hole.max(data + 1);
    }
    Ok(blocks)
}

/// Whole blocks of about `CHUNK` bytes.
fn chunk_len(block_size: u64) -> usize {
    CHUNK.max(block_size) as usize
}

fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(64);
    let aligned = words.all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0);
    aligned && words.remainder().iter().all(|&b| b == 0)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.sync_all().map_err(io("sync", path))
}

/// Hashes what passes through to the file.
struct HashingWriter<'a> {
    file: &'a mut File,
    hasher: Sha256,
    size: u64,
}

impl HashingWriter<'_> {
    fn digest(self) -> FileDigest {
        FileDigest {
            size: self.size,
            sha256: hex(&self.hasher.finalize()),
        }
    }
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
