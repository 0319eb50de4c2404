//! The on-disk cache under `<data>/images`: content keys, the builders'
//! lock, staging directories and their atomic publication, and cleanup of
//! what a crashed builder left behind. What goes into each entry is the
//! other modules' business.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::progress::Progress;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub(crate) struct Store {
    root: PathBuf,
}

/// A key over named inputs: the same inputs always give the same key, and
/// changing any one of them (or its name) gives another.
pub(crate) fn key(inputs: &[(&str, &str)]) -> String {
    let mut hash = Sha256::new();
    for (name, value) in inputs {
        // Length-prefixed, so no two different input lists serialise alike.
        for part in [name, value] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
    }
    hex(&hash.finalize()[..8])
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's contents, as hex.
pub(crate) fn file_sha256(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(Error::io("open", path))?;
    let mut hash = Sha256::new();
    std::io::copy(&mut file, &mut hash).map_err(Error::io("read", path))?;
    Ok(hex(&hash.finalize()))
}

/// The exclusive lock that serialises builders. Dropping it unlocks; so
/// does the holder's death, which is why anything under `tmp/` is stale
/// once the lock is ours.
pub(crate) struct BuildLock {
    _lock: Flock<File>,
}

impl std::fmt::Debug for BuildLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildLock")
    }
}

impl Store {
    pub(crate) fn open(data_dir: &Path) -> Result<Store> {
        let root = data_dir.join("images");
        for dir in [
            root.clone(),
            root.join("kernel"),
            root.join("tree"),
            root.join("tmp"),
        ] {
            fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        }
        // Absolute, because overlays and snapshots record the image's paths.
        let root = root.canonicalize().map_err(Error::io("resolve", &root))?;
        Ok(Store { root })
    }

    /// The store rooted at `<data>/images`, only if it exists.
    pub(crate) fn existing(data_dir: &Path) -> Option<Store> {
        let root = data_dir.join("images").canonicalize().ok()?;
        root.is_dir().then_some(Store { root })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }
    pub(crate) fn image_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
    pub(crate) fn kernel_dir(&self, key: &str) -> PathBuf {
        self.root.join("kernel").join(key)
    }
    /// Where the kernel package's resolution to a version is remembered.
    pub(crate) fn kernel_resolution(&self, package: &str) -> PathBuf {
        self.root
            .join("kernel")
            .join(format!("{}.resolved.json", key(&[("package", package)])))
    }
    pub(crate) fn tree_dir(&self, key: &str) -> PathBuf {
        self.root.join("tree").join(key)
    }

    pub(crate) fn lock(&self, progress: &mut dyn FnMut(Progress)) -> Result<BuildLock> {
        let path = self.root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io("open", &path))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(BuildLock { _lock: lock }),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, errno)) => return Err(Error::io("lock", &path)(errno.into())),
        };
        progress(Progress::WaitingForLock { lock: path.clone() });
        tracing::info!(lock = %path.display(), "another process is building an image; waiting");
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io("lock", &path)(e.into()))?;
        Ok(BuildLock { _lock: lock })
    }

    /// Remove whatever crashed builders left in `tmp/`. Only call with the
    /// lock held: then no one else is working there.
    pub(crate) fn clear_stale(&self, _lock: &BuildLock) -> Result<()> {
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp)
            .map_err(Error::io("read", &tmp))?
            .flatten()
        {
            tracing::info!(path = %entry.path().display(), "removing a stale build directory");
            remove_tree(&entry.path())?;
        }
        Ok(())
    }

    /// A fresh directory under `tmp/`, removed on drop unless published.
    pub(crate) fn staging(&self, _lock: &BuildLock, name: &str) -> Result<Staging> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = self
            .root
            .join("tmp")
            .join(format!("{name}.{}.{nanos}", std::process::id()));
        fs::create_dir(&path).map_err(Error::io("create", &path))?;
        Ok(Staging { path })
    }

    /// Point `current` at the image `key`, atomically.
    pub(crate) fn set_current(&self, key: &str) -> Result<()> {
        let link = self.root.join("current");
        if fs::read_link(&link).is_ok_and(|t| t == Path::new(key)) {
            return Ok(());
        }
        let tmp = self.root.join(format!(".current.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(key, &tmp).map_err(Error::io("create", &tmp))?;
        fs::rename(&tmp, &link).map_err(Error::io("replace", &link))
    }

    pub(crate) fn current(&self) -> Option<PathBuf> {
        let target = fs::read_link(self.root.join("current")).ok()?;
        Some(self.root.join(target))
    }
}

/// A build directory under `tmp/`. Dropping it removes it (unmounting
/// anything a tool left mounted inside first).
#[derive(Debug)]
pub(crate) struct Staging {
    path: PathBuf,
}

impl Staging {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Move `self/<inner>` (or the whole directory if `inner` is empty) to
    /// `dest`, after making its contents durable, so `dest` appears
    /// complete or not at all.
    pub(crate) fn publish(self, inner: &str, dest: &Path) -> Result<()> {
        let src = if inner.is_empty() {
            self.path.clone()
        } else {
            self.path.join(inner)
        };
        sync_tree(&src)?;
        fs::rename(&src, dest).map_err(Error::io("publish", dest))?;
        if let Some(parent) = dest.parent() {
            sync_path(parent)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.path.exists()
            && let Err(err) = remove_tree(&self.path)
        {
            tracing::warn!(path = %self.path.display(), %err, "could not remove a build directory");
        }
    }
}

/// Write a file and flush it to disk.
pub(crate) fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(Error::io("create", path))?;
    file.write_all(bytes).map_err(Error::io("write", path))?;
    file.sync_all().map_err(Error::io("sync", path))
}

fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(Error::io("sync", path))
}

/// Make a tree durable: fsync each file and directory of a small tree (an
/// image or kernel entry); syncfs for a big one (the root tree has tens of
/// thousands of files, and one syncfs beats that many fsyncs).
fn sync_tree(path: &Path) -> Result<()> {
    const MANY: usize = 256;
    if count_entries(path, MANY) >= MANY {
        let dir = File::open(path).map_err(Error::io("open", path))?;
        return nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
            .map_err(|e| Error::io("sync", path)(e.into()));
    }
    fsync_each(path)
}

fn count_entries(path: &Path, limit: usize) -> usize {
    let mut count = 1;
    if let Ok(dir) = fs::read_dir(path) {
        for entry in dir.flatten() {
            if count >= limit {
                break;
            }
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            count += if is_dir {
                count_entries(&entry.path(), limit - count)
            } else {
                1
            };
        }
    }
    count
}

fn fsync_each(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(Error::io("stat", path))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)
            .map_err(Error::io("read", path))?
            .flatten()
        {
            fsync_each(&entry.path())?;
        }
        sync_path(path)
    } else if meta.is_file() {
        sync_path(path)
    } else {
        Ok(())
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Remove a directory tree, first detaching any mounts inside it (debootstrap
/// mounts /proc and /sys in its target; a crash leaves them there), so the
/// removal never descends into a live filesystem.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    for mount in mounts_under(&dir) {
        tracing::info!(mount = %mount.display(), "detaching a mount left in a build directory");
        nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| Error::io("unmount", &mount)(e.into()))?;
    }
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", &dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_input_and_its_name() {
        let base = key(&[("a", "1"), ("b", "2")]);
        assert_eq!(base, key(&[("a", "1"), ("b", "2")]));
        assert_eq!(base.len(), 16);
        assert_ne!(base, key(&[("a", "1"), ("b", "3")]));
        assert_ne!(base, key(&[("a", "1"), ("c", "2")]));
        assert_ne!(base, key(&[("a", "12"), ("b", "")]));
        assert_ne!(base, key(&[("a", "1")]));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape_mountinfo(r"/x\0"), r"/x\0");
    }

    #[test]
    fn staging_is_removed_unless_published() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(data.path()).unwrap();
        let lock = store.lock(&mut |_| {}).unwrap();
        let dropped = store.staging(&lock, "x").unwrap();
        let dropped_path = dropped.path().to_path_buf();
        fs::write(dropped_path.join("f"), b"1").unwrap();
        drop(dropped);
        assert!(!dropped_path.exists());

        let kept = store.staging(&lock, "y").unwrap();
        fs::create_dir(kept.path().join("inner")).unwrap();
        fs::write(kept.path().join("inner/f"), b"2").unwrap();
        let kept_path = kept.path().to_path_buf();
        kept.publish("inner", &store.image_dir("k")).unwrap();
        assert_eq!(fs::read(store.image_dir("k").join("f")).unwrap(), b"2");
        assert!(
            !kept_path.exists(),
            "the rest of the staging directory goes away"
        );

        store.set_current("k").unwrap();
        assert_eq!(store.current().unwrap(), store.image_dir("k"));
    }

    #[test]
    fn stale_builds_are_cleared_under_the_lock() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(data.path()).unwrap();
        let stale = data.path().join("images/tmp/tree.123.456/root/etc");
        fs::create_dir_all(&stale).unwrap();
        let lock = store.lock(&mut |_| {}).unwrap();
        store.clear_stale(&lock).unwrap();
        assert_eq!(
            fs::read_dir(data.path().join("images/tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn stale_build_with_a_mount_inside_is_detached_then_removed() {
        ember_testkit::require!(ember_testkit::is_root(), "needs root to mount a tmpfs");
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(data.path()).unwrap();
        let proc_dir = data.path().join("images/tmp/tree.1.2/root/proc");
        fs::create_dir_all(&proc_dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &proc_dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        fs::write(proc_dir.join("inside-the-mount"), b"x").unwrap();
        let lock = store.lock(&mut |_| {}).unwrap();
        store.clear_stale(&lock).unwrap();
        assert!(!data.path().join("images/tmp/tree.1.2").exists());
        assert!(mounts_under(data.path()).is_empty());
    }

    #[test]
    fn a_second_locker_waits_and_says_so() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(data.path()).unwrap();
        let held = store.lock(&mut |_| {}).unwrap();
        let other = store.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            // flock locks belong to the open file description, so a second
            // open in another thread contends like another process would.
            let mut events = Vec::new();
            let lock = other.lock(&mut |p| {
                events.push(p);
                tx.send(()).unwrap();
            });
            (lock.is_ok(), events)
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("waiter reports waiting");
        drop(held);
        let (locked, events) = waiter.join().unwrap();
        assert!(locked);
        assert!(matches!(
            events.as_slice(),
            [Progress::WaitingForLock { .. }]
        ));
    }
}
