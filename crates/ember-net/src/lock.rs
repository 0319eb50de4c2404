//! Lock files: an exclusive `flock` on a file, held as long as the value
//! lives, released by the kernel when the holder dies.
//!
//! Lock files are removed when their resource is gone. Removing a lock file
//! races with a process that opened it just before: it would lock the
//! unlinked inode while a third process locks a fresh file at the same path.
//! So a lock only counts once the locked file is still the one at the path;
//! otherwise the taker retries.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{NetError, Result};

#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock unless another open file holds it (`Ok(None)`).
    pub(crate) fn try_acquire(path: &Path) -> Result<Option<LockFile>> {
        Self::take(path, false)
    }

    /// Waits for the lock.
    pub(crate) fn acquire(path: &Path) -> Result<LockFile> {
        Ok(Self::take(path, true)?.expect("a blocking lock is always taken"))
    }

    fn take(path: &Path, wait: bool) -> Result<Option<LockFile>> {
        let err = |what, e| NetError::io(what, path, e);
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| err("cannot open lock file", e))?;
            if wait {
                file.lock().map_err(|e| err("cannot lock", e))?;
            } else {
                match file.try_lock() {
                    Ok(()) => {}
                    Err(TryLockError::WouldBlock) => return Ok(None),
                    Err(TryLockError::Error(e)) => return Err(err("cannot lock", e)),
                }
            }
            let held = file
                .metadata()
                .map_err(|e| err("cannot stat lock file", e))?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
                // Removed or replaced between open and lock: that lock guards nothing.
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(err("cannot stat lock file", e)),
            }
            let mut lock = LockFile {
                file,
                path: path.to_path_buf(),
            };
            lock.record_holder();
            return Ok(Some(lock));
        }
    }

    /// Writes our PID into the file, for whoever wonders who holds a slot.
    /// Purely informational: the flock is what counts.
    fn record_holder(&mut self) {
        let pid = std::process::id();
        let _ = self
            .file
            .set_len(0)
            .and_then(|()| self.file.write_all(format!("{pid}\n").as_bytes()));
    }

    /// Deletes the file, then releases the lock. Only the holder removes a
    /// lock file, so nobody can lose a lock they believe they hold.
    pub(crate) fn remove(self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NetError::io("cannot remove lock file", &self.path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_refused_until_release_and_removal_is_safe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = LockFile::try_acquire(&path).unwrap().unwrap();
        // flock conflicts between open files, even within one process.
        assert!(LockFile::try_acquire(&path).unwrap().is_none());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );

        // A taker that opened the old file before it was removed must not
        // end up holding a lock on the unlinked inode.
        let stale_open = File::open(&path).unwrap();
        first.remove().unwrap();
        assert!(!path.exists());
        stale_open.try_lock().unwrap();
        let fresh = LockFile::try_acquire(&path).unwrap().unwrap();
        assert!(path.exists());
        drop(stale_open);
        assert!(LockFile::try_acquire(&path).unwrap().is_none());
        drop(fresh);
        assert!(LockFile::try_acquire(&path).unwrap().is_some());
    }
}
