//! The on-disk build store: where builds live, how they are found, checked
//! and garbage-collected.
//!
//! ```text
//! <data>/builds/
//!   .lock                        writers hold it shared, gc exclusive
//!   <build_id>/                  one committed, immutable build
//!     memfile  memfile.header    guest memory (optional)
//!     rootfs   rootfs.header     root disk (optional)
//!     vmstate                    VMM device/CPU state (optional)
//!     meta.json                  `BuildMeta`: what it is, sizes and SHA-256s
//!   .tmp-<build_id>-<random>/    a build being written (`BuildWriter`)
//!   .del-<build_id>-<random>/    a build being deleted by gc
//! ```
//!
//! A build directory appears only by an atomic rename of a complete, synced
//! temporary directory, and leaves by a rename before its files are removed,
//! so a crash never leaves a half build under a build ID. Leftover `.tmp-`
//! and `.del-` directories are removed by [`BuildStore::recover`].
//!
//! Writing builds is in `writer`, reading images in `reader`.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use ember_types::BuildId;
use nix::fcntl::Flock;
use sha2::{Digest, Sha256};

use crate::error::{Result, SnapshotError, io};
use crate::header::Header;
use crate::meta::{BuildFile, BuildInfo, BuildMeta, ImageKind};
use crate::reader::{ImageReader, MaterializeReport};
use crate::sys::{self, LockMode};
use crate::writer::BuildWriter;

pub(crate) const TMP_PREFIX: &str = ".tmp-";
const DEL_PREFIX: &str = ".del-";
const LOCK_FILE: &str = ".lock";
const META_FILE: &str = "meta.json";

/// A directory of builds. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct BuildStore {
    builds: PathBuf,
}

/// What [`BuildStore::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Builds reachable from the live roots, all kept.
    pub kept: Vec<BuildId>,
    /// Builds no live root reaches, now deleted.
    pub deleted: Vec<BuildId>,
}

impl BuildStore {
    /// The store under `<data_dir>/builds`, created if missing.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<BuildStore> {
        let builds = data_dir.as_ref().join("builds");
        fs::create_dir_all(&builds).map_err(io("create", &builds))?;
        let store = BuildStore { builds };
        store.lock_file()?;
        Ok(store)
    }

    /// The store under `<data_dir>/builds` for reading only: nothing is
    /// created or locked (a page server in a jail sees its builds read-only
    /// and nothing else).
    pub fn open_read_only(data_dir: impl AsRef<Path>) -> Result<BuildStore> {
        let builds = data_dir.as_ref().join("builds");
        if !builds.is_dir() {
            return Err(io("open", &builds)(std::io::ErrorKind::NotFound.into()));
        }
        Ok(BuildStore { builds })
    }

    /// `<data>/builds`.
    pub fn root(&self) -> &Path {
        &self.builds
    }

    pub fn build_dir(&self, build: BuildId) -> PathBuf {
        self.builds.join(build.to_string())
    }

    pub fn file_path(&self, build: BuildId, file: BuildFile) -> PathBuf {
        self.build_dir(build).join(file.name())
    }

    /// The data file of an image: `<data>/builds/<build>/memfile` or `rootfs`.
    /// It holds only this build's own blocks; read it through a header.
    pub fn data_path(&self, build: BuildId, kind: ImageKind) -> PathBuf {
        self.file_path(build, kind.data_file())
    }

    pub fn header_path(&self, build: BuildId, kind: ImageKind) -> PathBuf {
        self.file_path(build, kind.header_file())
    }

    pub fn meta_path(&self, build: BuildId) -> PathBuf {
        self.build_dir(build).join(META_FILE)
    }

    /// Is `build` committed in this store?
    pub fn exists(&self, build: BuildId) -> bool {
        !build.is_nil() && self.build_dir(build).is_dir()
    }

    /// Every committed build, sorted. Directories whose names are not build
    /// IDs are not builds and are left alone.
    pub fn list(&self) -> Result<Vec<BuildId>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.builds).map_err(io("list", &self.builds))? {
            let entry = entry.map_err(io("list", &self.builds))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            match name.parse::<BuildId>() {
                Ok(id) if entry.path().is_dir() => out.push(id),
                _ => tracing::debug!(path = %entry.path().display(), "not a build, ignored"),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Start writing a new build. Nothing is visible under `build_id`
    /// until [`BuildWriter::commit`].
    pub fn begin(&self, build_id: BuildId, info: BuildInfo) -> Result<BuildWriter> {
        if build_id.is_nil() {
            return Err(SnapshotError::NilBuild);
        }
        if self.exists(build_id) {
            return Err(SnapshotError::BuildExists { build: build_id });
        }
        let store_lock = self
            .lock_store(LockMode::Shared, true)?
            .expect("a waiting lock is always granted");
        BuildWriter::create(self.clone(), build_id, info, store_lock)
    }

    pub fn read_meta(&self, build: BuildId) -> Result<BuildMeta> {
        let path = self.meta_path(build);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.missing(build, "meta.json"));
            }
            Err(e) => return Err(io("read", path)(e)),
        };
        let meta: BuildMeta = serde_json::from_slice(&bytes)
            .map_err(|source| SnapshotError::MetaCorrupt { build, source })?;
        if meta.build_id != build {
            return Err(SnapshotError::MetaCorrupt {
                build,
                source: serde::de::Error::custom(format!("it names build {}", meta.build_id)),
            });
        }
        Ok(meta)
    }

    /// The header of `build`'s memory or disk image, after checking every
    /// build it reads from is present.
    pub fn open_header(&self, build: BuildId, kind: ImageKind) -> Result<Header> {
        let header = self.read_header(build, kind.header_file())?;
        let missing: Vec<BuildId> = header
            .referenced_builds()
            .into_iter()
            .filter(|b| !self.exists(*b))
            .collect();
        if !missing.is_empty() {
            return Err(SnapshotError::ReferencedBuildsMissing { build, missing });
        }
        Ok(header)
    }

    /// Decode a header file, checking it belongs to `build`.
    fn read_header(&self, build: BuildId, file: BuildFile) -> Result<Header> {
        let path = self.file_path(build, file);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.missing(build, file.name()));
            }
            Err(e) => return Err(io("read", path)(e)),
        };
        let header = Header::decode(&bytes).map_err(|e| SnapshotError::HeaderCorrupt {
            build,
            file: file.name(),
            source: Box::new(e),
        })?;
        if header.build_id() != build {
            return Err(SnapshotError::HeaderBuildMismatch {
                build,
                file: file.name(),
                found: header.build_id(),
            });
        }
        Ok(header)
    }

    /// A reader assembling `header`'s image from the data files of every
    /// build it references, each opened once now.
    pub fn reader(&self, header: Header, kind: ImageKind) -> Result<ImageReader> {
        ImageReader::open(self, header, kind)
    }

    /// [`open_header`](Self::open_header) then [`reader`](Self::reader).
    pub fn open_image(&self, build: BuildId, kind: ImageKind) -> Result<ImageReader> {
        let header = self.open_header(build, kind)?;
        self.reader(header, kind)
    }

    /// Write `header`'s whole image to a new sparse file at `dst` (holes for
    /// nil runs), sharing extents with the builds where the file system can.
    pub fn materialize(
        &self,
        header: &Header,
        kind: ImageKind,
        dst: &Path,
    ) -> Result<MaterializeReport> {
        self.reader(header.clone(), kind)?.materialize(dst)
    }

    /// Recompute the size and SHA-256 of every file `meta.json` lists and
    /// check the headers decode and fit their data files.
    pub fn verify(&self, build: BuildId) -> Result<BuildMeta> {
        let meta = self.read_meta(build)?;
        for (&file, digest) in &meta.files {
            let path = self.file_path(build, file);
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(SnapshotError::BuildFileMissing {
                        build,
                        file: file.name(),
                    });
                }
                Err(e) => return Err(io("open", path)(e)),
            };
            let (size, sha256) = hash_file(f).map_err(io("read", &path))?;
            if size != digest.size {
                return Err(SnapshotError::SizeMismatch {
                    build,
                    file: file.name(),
                    expected: digest.size,
                    found: size,
                });
            }
            if sha256 != digest.sha256 {
                return Err(SnapshotError::ChecksumMismatch {
                    build,
                    file: file.name(),
                });
            }
        }
        for kind in ImageKind::ALL {
            if !meta.has(kind.header_file()) {
                continue;
            }
            let header = self.read_header(build, kind.header_file())?;
            let data = kind.data_file();
            let len = meta.files.get(&data).map_or(0, |d| d.size);
            if header.own_storage_len() > len {
                return Err(SnapshotError::StorageOutOfRange {
                    build,
                    file: data.name(),
                    needed: header.own_storage_len(),
                    len,
                });
            }
        }
        Ok(meta)
    }

    /// The builds `build`'s headers read from, itself excluded.
    pub fn build_references(&self, build: BuildId) -> Result<BTreeSet<BuildId>> {
        let meta = self.read_meta(build)?;
        let mut refs = BTreeSet::new();
        for kind in ImageKind::ALL {
            if meta.has(kind.header_file()) {
                refs.extend(
                    self.read_header(build, kind.header_file())?
                        .referenced_builds(),
                );
            }
        }
        refs.remove(&build);
        Ok(refs)
    }

    /// Delete every build that no live root reaches through header
    /// references (a template or paused sandbox names its leaf build; its
    /// headers name its ancestors). Returns what was kept and deleted.
    ///
    /// `live_roots` must name every build meant to survive, including any
    /// committed since the caller listed its roots: a build committed by
    /// another task after the roots were collected is not protected. Where
    /// other tasks commit builds, use [`BuildStore::gc_with`]. Fails with
    /// `StoreBusy`, deleting nothing, while a `BuildWriter` is open, and
    /// with an error, deleting nothing, if a reachable build's meta.json or
    /// header cannot be read (its references would be unknown).
    pub fn gc(&self, live_roots: &[BuildId]) -> Result<GcReport> {
        self.gc_with(|| live_roots.to_vec())
    }

    /// [`BuildStore::gc`] with the roots asked for only once the store is
    /// locked against writers. Every build committed before that moment is
    /// a complete directory, and none can be committed until gc returns, so
    /// a caller that records a build's intent (in whatever `roots` reads)
    /// before [`BuildStore::begin`] can never lose it to gc.
    pub fn gc_with(&self, roots: impl FnOnce() -> Vec<BuildId>) -> Result<GcReport> {
        let Some(_lock) = self.lock_store(LockMode::Exclusive, false)? else {
            return Err(SnapshotError::StoreBusy);
        };
        let live_roots = roots();
        let all: BTreeSet<BuildId> = self.list()?.into_iter().collect();
        let mut reachable = BTreeSet::new();
        let mut queue: Vec<BuildId> = live_roots;
        while let Some(build) = queue.pop() {
            if build.is_nil() || !reachable.insert(build) {
                continue;
            }
            if !all.contains(&build) {
                tracing::warn!(%build, "gc: a live build is missing from the store");
                continue;
            }
            queue.extend(self.build_references(build)?);
        }
        let mut report = GcReport::default();
        for build in all {
            if reachable.contains(&build) {
                report.kept.push(build);
            } else {
                self.delete(build)?;
                tracing::info!(%build, "gc: deleted unreferenced build");
                report.deleted.push(build);
            }
        }
        Ok(report)
    }

    /// Move the build out of its name first, so a crash mid-removal leaves
    /// a `.del-` directory for `recover`, never a partial build.
    fn delete(&self, build: BuildId) -> Result<()> {
        let dir = self.build_dir(build);
        let doomed = self.builds.join(format!(
            "{DEL_PREFIX}{build}-{:016x}",
            rand::random::<u64>()
        ));
        fs::rename(&dir, &doomed).map_err(io("rename", &dir))?;
        sys::fsync_dir(&self.builds).map_err(io("sync", &self.builds))?;
        fs::remove_dir_all(&doomed).map_err(io("remove", &doomed))
    }

    /// Remove what crashed writers and deletions left behind: `.tmp-`
    /// directories no live `BuildWriter` holds, and `.del-` directories.
    /// Safe to call at any time. Returns the removed paths.
    pub fn recover(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.builds).map_err(io("list", &self.builds))? {
            let entry = entry.map_err(io("list", &self.builds))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_tmp = name.starts_with(TMP_PREFIX);
            if !is_tmp && !name.starts_with(DEL_PREFIX) {
                continue;
            }
            let _held = if is_tmp {
                let dir = match File::open(&path) {
                    Ok(d) => d,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io("open", path)(e)),
                };
                match sys::lock(dir, LockMode::Exclusive, false).map_err(io("lock", &path))? {
                    Some(lock) => Some(lock),
                    None => {
                        tracing::debug!(path = %path.display(), "recover: build still being written");
                        continue;
                    }
                }
            } else {
                None
            };
            match fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("remove", path)(e)),
            }
            tracing::info!(path = %path.display(), "recover: removed leftover directory");
            removed.push(path);
        }
        Ok(removed)
    }

    fn lock_file(&self) -> Result<File> {
        let path = self.builds.join(LOCK_FILE);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("open", path))
    }

    pub(crate) fn lock_store(&self, mode: LockMode, wait: bool) -> Result<Option<Flock<File>>> {
        let file = self.lock_file()?;
        sys::lock(file, mode, wait).map_err(io("lock", self.builds.join(LOCK_FILE)))
    }

    /// The error for a missing file of `build`: the build itself, or one file.
    pub(crate) fn missing(&self, build: BuildId, file: &'static str) -> SnapshotError {
        if self.exists(build) {
            SnapshotError::BuildFileMissing { build, file }
        } else {
            SnapshotError::BuildMissing { build }
        }
    }
}

/// Size and lowercase-hex SHA-256 of everything `reader` yields.
pub(crate) fn hash_file(mut reader: impl Read) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finalize())))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
