//! Reading an image that a header spreads over several builds: byte ranges
//! for the page server and diff creation, and whole files for restores that
//! need one (QEMU's memory file, a raw disk clone). It does not decide which
//! header to read; the store and its callers do.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ember_types::BuildId;

use crate::error::{Result, SnapshotError, io};
use crate::header::Header;
use crate::meta::ImageKind;
use crate::store::BuildStore;
use crate::sys;

/// One image assembled from the data files of every build its header
/// references. Every file is opened once, up front, and checked to be long
/// enough, so reads fail only on I/O errors. `Send + Sync`: reads take
/// `&self` and use positional I/O, so threads may share one reader.
#[derive(Debug)]
pub struct ImageReader {
    header: Header,
    kind: ImageKind,
    files: HashMap<BuildId, (File, PathBuf)>,
}

/// How [`ImageReader::materialize`] produced the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaterializeReport {
    pub size: u64,
    /// Shared with a build's data file by reflink (`FICLONERANGE`).
    pub cloned_bytes: u64,
    /// Copied (`copy_file_range`, else read and write).
    pub copied_bytes: u64,
    /// Left as holes: nil runs.
    pub hole_bytes: u64,
}

impl ImageReader {
    pub(crate) fn open(store: &BuildStore, header: Header, kind: ImageKind) -> Result<Self> {
        let mut extents: Vec<(BuildId, u64)> = header.storage_extents().into_iter().collect();
        extents.sort();
        let mut missing = Vec::new();
        let mut files = HashMap::with_capacity(extents.len());
        for (build, needed) in extents {
            if !store.exists(build) {
                missing.push(build);
                continue;
            }
            let path = store.data_path(build, kind);
            let name = kind.data_file().name();
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(store.missing(build, name));
                }
                Err(e) => return Err(io("open", path)(e)),
            };
            let len = file.metadata().map_err(io("stat", &path))?.len();
            if len < needed {
                return Err(SnapshotError::StorageOutOfRange {
                    build,
                    file: name,
                    needed,
                    len,
                });
            }
            files.insert(build, (file, path));
        }
        if !missing.is_empty() {
            return Err(SnapshotError::ReferencedBuildsMissing {
                build: header.build_id(),
                missing,
            });
        }
        Ok(ImageReader {
            header,
            kind,
            files,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size()
    }

    /// The open data file of a referenced build, for callers that read
    /// resolved ranges themselves (e.g. straight into a page buffer).
    pub fn data_file(&self, build: BuildId) -> Option<&File> {
        self.files.get(&build).map(|(f, _)| f)
    }

    /// Fill `buf` with image bytes from `offset` on; nil runs read as zeros.
    /// The whole range must lie inside the image.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let size = self.header.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(SnapshotError::ReadPastEnd { offset, len, size });
        }
        let mut pos = 0usize;
        for seg in self.header.segments(offset..offset + len) {
            let out = &mut buf[pos..pos + seg.length as usize];
            pos += out.len();
            if seg.build_id.is_nil() {
                out.fill(0);
                continue;
            }
            let (file, path) = &self.files[&seg.build_id];
            file.read_exact_at(out, seg.storage_offset)
                .map_err(io("read", path))?;
        }
        Ok(())
    }

    /// Write the whole image to a new file at `dst` (which must not exist):
    /// nil runs stay holes, other runs are reflinked from the builds where
    /// the file system supports it, else copied in the kernel, else read
    /// and written. The file is synced; on failure it is removed.
    pub fn materialize(&self, dst: &Path) -> Result<MaterializeReport> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dst)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SnapshotError::DestinationExists {
                    path: dst.to_owned(),
                });
            }
            Err(e) => return Err(io("create", dst)(e)),
        };
        let result = self.fill(&file, dst);
        if result.is_err() {
            drop(file);
            if let Err(e) = fs::remove_file(dst) {
                tracing::warn!(path = %dst.display(), error = %e, "could not remove a partial image");
            }
        }
        result
    }

    fn fill(&self, dst: &File, dst_path: &Path) -> Result<MaterializeReport> {
        let mut report = MaterializeReport {
            size: self.header.size(),
            ..Default::default()
        };
        dst.set_len(report.size).map_err(io("resize", dst_path))?;
        let mut can_clone = true;
        let mut can_copy_range = true;
        for m in self.header.mappings() {
            if m.is_nil() {
                report.hole_bytes += m.length;
                continue;
            }
            let (src, src_path) = &self.files[&m.build_id];
            let (from, to, len) = (m.build_storage_offset, m.offset, m.length);
            if can_clone {
                match sys::clone_range(src, from, dst, to, len) {
                    Ok(()) => {
                        report.cloned_bytes += len;
                        continue;
                    }
                    // Unaligned range: copy this one, keep cloning others.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) if unsupported(&e) => can_clone = false,
                    Err(e) => return Err(io("clone range from", src_path)(e)),
                }
            }
            if can_copy_range {
                match sys::copy_range(src, from, dst, to, len) {
                    Ok(n) if n == len => {
                        report.copied_bytes += len;
                        continue;
                    }
                    Ok(_) => {
                        return Err(io("copy range from", src_path)(
                            io::ErrorKind::UnexpectedEof.into(),
                        ));
                    }
                    Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                        can_copy_range = false
                    }
                    Err(e) => return Err(io("copy range from", src_path)(e)),
                }
            }
            copy_with_buffer(src, from, dst, to, len).map_err(io("copy from", src_path))?;
            report.copied_bytes += len;
        }
        dst.sync_all().map_err(io("sync", dst_path))?;
        Ok(report)
    }
}

/// Errors meaning "this file system or kernel cannot do that at all".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::ENOSYS | libc::EPERM)
    )
}

fn copy_with_buffer(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from + done)?;
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}
