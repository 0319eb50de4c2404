//! The file endpoints' operations: read (streamed), atomic streamed write,
//! stat, list, mkdir, remove, rename, each run with the acting user's
//! file-system identity (via [`fsid::run_as`]) so permission checks and
//! ownership are the kernel's own.
//!
//! It does not parse HTTP; `api` hands it validated paths and body streams.

use std::fs::{DirBuilder, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ember_guest_api::{DirListing, FileInfo, FileKind};
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::error::AgentError;
use crate::fsid;
use crate::users::Identity;

/// Checks a path from a request: absolute, no NUL.
pub fn absolute_path(path: &str) -> Result<PathBuf, AgentError> {
    if path.contains('\0') {
        return Err(AgentError::InvalidRequest(format!(
            "path {path:?} contains a NUL byte"
        )));
    }
    if !path.starts_with('/') {
        return Err(AgentError::InvalidRequest(format!(
            "path {path:?} is not absolute: paths must start with '/'"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Octal permission bits from a query (`644`, `0755`).
pub fn parse_mode(mode: &str) -> Result<u32, AgentError> {
    match u32::from_str_radix(mode.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o7777 && !mode.is_empty() => Ok(m),
        _ => Err(AgentError::InvalidRequest(format!(
            "mode {mode:?} is not octal permission bits such as 644 or 0755"
        ))),
    }
}

fn check_mode(mode: u32) -> Result<u32, AgentError> {
    if mode > 0o7777 {
        return Err(AgentError::InvalidRequest(format!(
            "mode {mode:o} has bits beyond 7777"
        )));
    }
    Ok(mode)
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> AgentError + '_ {
    move |e| AgentError::io(path.display().to_string(), e)
}

pub fn info_from(path: &Path, meta: &Metadata) -> FileInfo {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    let symlink_target = ft.is_symlink().then(|| {
        std::fs::read_link(path)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_unix_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        symlink_target,
    }
}

fn lstat_info(path: &Path) -> Result<FileInfo, AgentError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_at(path))?;
    Ok(info_from(path, &meta))
}

pub async fn stat(id: &Identity, path: PathBuf) -> Result<FileInfo, AgentError> {
    fsid::run_as(id, move || lstat_info(&path)).await
}

pub async fn list(id: &Identity, path: PathBuf) -> Result<DirListing, AgentError> {
    fsid::run_as(id, move || {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&path).map_err(io_at(&path))? {
            let entry = entry.map_err(io_at(&path))?;
            let child = entry.path();
            // An entry removed while we list is simply not listed.
            match std::fs::symlink_metadata(&child) {
                Ok(meta) => entries.push(info_from(&child, &meta)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&child)(e)),
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(DirListing {
            path: path.to_string_lossy().into_owned(),
            entries,
        })
    })
    .await
}

/// An open file to stream out, with its length when it has a real one.
#[derive(Debug)]
pub struct ReadableFile {
    pub file: tokio::fs::File,
    /// `None` for pseudo-files that report size 0 (procfs): read to EOF.
    pub len: Option<u64>,
}

pub async fn open_for_read(id: &Identity, path: PathBuf) -> Result<ReadableFile, AgentError> {
    let (file, len) = fsid::run_as(id, move || {
        // O_NONBLOCK so that a FIFO cannot hang the open; regular files ignore it.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(io_at(&path))?;
        let meta = file.metadata().map_err(io_at(&path))?;
        if meta.is_dir() {
            return Err(io_at(&path)(io::Error::from_raw_os_error(libc::EISDIR)));
        }
        if !meta.is_file() {
            return Err(AgentError::InvalidRequest(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let len = (meta.len() > 0).then_some(meta.len());
        Ok((file, len))
    })
    .await?;
    Ok(ReadableFile {
        file: tokio::fs::File::from_std(file),
        len,
    })
}

/// Streams `body` into a temporary file next to `path`, fsyncs it and
/// renames it over `path`. The temporary file is removed on any failure.
pub async fn write<S, E>(
    id: &Identity,
    path: PathBuf,
    mode: Option<u32>,
    parents: bool,
    mut body: S,
) -> Result<FileInfo, AgentError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mode = mode.map(check_mode).transpose()?;
    let target = path.clone();
    let (file, tmp, mode) = fsid::run_as(id, move || create_temp(&target, mode, parents)).await?;
    let tmp_for_cleanup = tmp.clone();
    let cleanup = move || {
        if let Err(e) = std::fs::remove_file(&tmp_for_cleanup) {
            tracing::warn!(path = %tmp_for_cleanup.display(), error = %e, "cannot remove a temporary file");
        }
    };
    let mut file = tokio::fs::File::from_std(file);
    let copied: Result<(), AgentError> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                AgentError::InvalidRequest(format!("reading the upload failed: {e}"))
            })?;
            file.write_all(&chunk).await.map_err(io_at(&tmp))?;
        }
        file.flush().await.map_err(io_at(&tmp))?;
        file.sync_all().await.map_err(io_at(&tmp))?;
        Ok(())
    }
    .await;
    if let Err(e) = copied {
        cleanup();
        return Err(e);
    }
    let file = file.into_std().await;
    let (target, tmp2) = (path.clone(), tmp.clone());
    let installed = fsid::run_as(id, move || {
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(io_at(&tmp2))?;
        std::fs::rename(&tmp2, &target).map_err(io_at(&target))?;
        Ok(())
    })
    .await;
    if let Err(e) = installed {
        cleanup();
        return Err(e);
    }
    if let Some(parent) = path.parent()
        && let Err(e) = std::fs::File::open(parent).and_then(|d| d.sync_all())
    {
        tracing::warn!(dir = %parent.display(), error = %e, "cannot fsync the directory after a write");
    }
    lstat_info(&path)
}

/// Creates the temporary file for a write; returns it, its path and the mode
/// the result gets.
fn create_temp(
    target: &Path,
    mode: Option<u32>,
    parents: bool,
) -> Result<(std::fs::File, PathBuf, u32), AgentError> {
    let parent = match target.parent() {
        Some(p) => p,
        None => return Err(io_at(target)(io::Error::from_raw_os_error(libc::EISDIR))),
    };
    if parents {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io_at(parent))?;
    }
    let existing_mode = match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            return Err(io_at(target)(io::Error::from_raw_os_error(libc::EISDIR)));
        }
        Ok(meta) if meta.is_file() => Some(meta.mode() & 0o7777),
        _ => None,
    };
    let mode = mode.or(existing_mode).unwrap_or(0o644);
    let tmp = parent.join(format!(".ember-tmp-{:016x}", rand::random::<u64>()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    Ok((file, tmp, mode))
}

pub async fn mkdir(
    id: &Identity,
    path: PathBuf,
    mode: Option<u32>,
    parents: bool,
) -> Result<FileInfo, AgentError> {
    let mode = check_mode(mode.unwrap_or(0o755))?;
    fsid::run_as(id, move || {
        if parents {
            if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                return lstat_info(&path);
            }
            if let Some(parent) = path.parent() {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(io_at(parent))?;
            }
        }
        match DirBuilder::new().mode(mode).create(&path) {
            Ok(()) => {}
            Err(e) if parents && e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {
                return lstat_info(&path);
            }
            Err(e) => return Err(io_at(&path)(e)),
        }
        // The umask trimmed the bits given to mkdir; set exactly what was asked.
        std::fs::set_permissions(&path, Permissions::from_mode(mode)).map_err(io_at(&path))?;
        lstat_info(&path)
    })
    .await
}

pub async fn remove(id: &Identity, path: PathBuf, recursive: bool) -> Result<(), AgentError> {
    if path.parent().is_none() {
        return Err(AgentError::InvalidRequest("refusing to remove /".into()));
    }
    fsid::run_as(id, move || {
        let meta = std::fs::symlink_metadata(&path).map_err(io_at(&path))?;
        let result = if !meta.is_dir() {
            std::fs::remove_file(&path)
        } else if recursive {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_dir(&path)
        };
        result.map_err(io_at(&path))
    })
    .await
}

pub async fn rename(
    id: &Identity,
    from: PathBuf,
    to: PathBuf,
    overwrite: bool,
) -> Result<FileInfo, AgentError> {
    fsid::run_as(id, move || {
        let result = if overwrite {
            std::fs::rename(&from, &to)
        } else {
            rename_noreplace(&from, &to)
        };
        result.map_err(|e| {
            let context = format!("rename {} to {}", from.display(), to.display());
            if e.raw_os_error() == Some(libc::EXDEV) {
                AgentError::Conflict(format!(
                    "{context}: they are on different file systems; copy and remove instead"
                ))
            } else {
                AgentError::io(context, e)
            }
        })?;
        lstat_info(&to)
    })
    .await
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // A file system without RENAME_NOREPLACE: check, then rename (racy, but
    // only against the sandbox's own processes).
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    std::fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_without_nul() {
        assert!(absolute_path("/etc/passwd").is_ok());
        for bad in ["", "etc/passwd", "./x", "/a\0b"] {
            let e = absolute_path(bad).unwrap_err();
            assert_eq!(e.code(), ember_guest_api::ErrorCode::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("644").unwrap(), 0o644);
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert_eq!(parse_mode("4755").unwrap(), 0o4755);
        for bad in ["", "9", "rwx", "17777", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
    }
}
