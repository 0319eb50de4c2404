//! The few file-system calls the store needs that `std` lacks: finding data
//! extents of sparse files, cloning and copying byte ranges in the kernel,
//! syncing directories, renaming without replacing, advisory locks. Thin
//! wrappers returning `io::Error`; policy (fallbacks, which errors matter)
//! stays with the callers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, RenameFlags};
use nix::unistd::Whence;

/// Make a directory's entries (creations, renames) durable.
pub(crate) fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Start of the first data extent at or after `from`, or `None` when only
/// a hole remains. File systems without hole tracking report all data.
pub(crate) fn next_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    match nix::unistd::lseek(file.as_raw_fd(), offset(from)?, Whence::SeekData) {
        Ok(at) => Ok(Some(at as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Start of the first hole at or after `from` (the file size if none).
pub(crate) fn next_hole(file: &File, from: u64) -> io::Result<u64> {
    let at = nix::unistd::lseek(file.as_raw_fd(), offset(from)?, Whence::SeekHole)?;
    Ok(at as u64)
}

fn offset(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Share `len` bytes of `src` at `src_off` into `dst` at `dst_off`
/// (`FICLONERANGE`: a reflink, no data copied). Fails with `EOPNOTSUPP`,
/// `EXDEV` or `EINVAL` where the file system or alignment does not allow it.
pub(crate) fn clone_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: FICLONERANGE reads one `file_clone_range` through the pointer,
    // which points at a live, initialised struct for the whole call; both
    // descriptors are open files owned by the borrowed `File`s.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &range) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copy `len` bytes from `src` at `src_off` to `dst` at `dst_off` inside the
/// kernel (`copy_file_range`). Returns the bytes copied, which is less than
/// `len` only if `src` ends early.
pub(crate) fn copy_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<u64> {
    let mut off_in = offset(src_off)?;
    let mut off_out = offset(dst_off)?;
    let mut done = 0;
    while done < len {
        let chunk = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        let n =
            nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk)?;
        if n == 0 {
            break;
        }
        done += n as u64;
    }
    Ok(done)
}

/// Rename `from` to `to`, failing with `EEXIST` if `to` exists (even as an
/// empty directory, which a plain rename would silently replace).
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE)?;
    Ok(())
}

/// Which advisory lock to take.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

/// Take an advisory lock on `file`. With `wait`, block until it is free;
/// without, return `Ok(None)` if another holder has a conflicting lock.
/// The lock lives as long as the result.
pub(crate) fn lock(file: File, mode: LockMode, wait: bool) -> io::Result<Option<Flock<File>>> {
    let arg = match (mode, wait) {
        (LockMode::Shared, true) => FlockArg::LockShared,
        (LockMode::Shared, false) => FlockArg::LockSharedNonblock,
        (LockMode::Exclusive, true) => FlockArg::LockExclusive,
        (LockMode::Exclusive, false) => FlockArg::LockExclusiveNonblock,
    };
    match Flock::lock(file, arg) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}
