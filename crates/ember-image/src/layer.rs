//! Applying container image layers (tar streams) onto a directory tree, the
//! way an overlay filesystem would stack them: whiteouts delete, opaque
//! markers hide what lower layers put in a directory, and ownership, modes,
//! extended attributes, hard links and device nodes survive.
//!
//! The layers come from whoever made the image, so every name in them is
//! data. Paths are resolved with `openat2(RESOLVE_IN_ROOT)` against the tree's
//! own root: a symlink in the image means what it means inside the guest
//! (`/etc` is the image's `/etc`), never the host's. A name with a `..`
//! component is refused outright. Nothing is ever opened through a path
//! that could leave the tree.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Why a layer could not be applied. `path` is the entry's name inside the
/// layer, as the image spells it.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("entry `{path}` climbs out of the image root with `..`")]
    Escapes { path: String },
    #[error("hard link `{path}` points at `{target}`, which climbs out of the image root")]
    LinkEscapes { path: String, target: String },
    #[error("hard link `{path}` points at `{target}`, which {reason}")]
    BadLink {
        path: String,
        target: String,
        reason: String,
    },
    #[error("entry `{path}`: {action}: {source}")]
    Io {
        path: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("not a tar stream: {0}")]
    Tar(#[source] io::Error),
}

/// What applying one layer did, for the build's progress lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    pub hard_links: u64,
    pub devices: u64,
}

/// A tree being assembled from layers. Run as root to keep ownership and
/// make device nodes; as another user both are skipped (and counted as
/// errors only if the layer needs them).
pub struct Tree {
    root: OwnedFd,
    path: PathBuf,
    privileged: bool,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree").field("path", &self.path).finish()
    }
}

/// An entry's path as components under the root: leading `/` and `./`
/// dropped, `..` refused. `None` for the root itself.
fn clean(raw: &Path) -> Result<Option<PathBuf>, LayerError> {
    let mut out = PathBuf::new();
    for part in raw.components() {
        match part {
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(LayerError::Escapes {
                    path: raw.display().to_string(),
                });
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// `target` (a symlink's) read from the directory `base`, as a path from
/// the root: absolute targets start at the root, `..` stops there.
pub(crate) fn lexical(base: &Path, target: &Path) -> PathBuf {
    let mut out = if target.is_absolute() {
        PathBuf::new()
    } else {
        base.to_path_buf()
    };
    for part in target.components() {
        match part {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn cstr(name: &OsStr) -> CString {
    // Tar names cannot hold NUL bytes (they end at one).
    CString::new(name.as_bytes()).expect("tar names have no NUL")
}

impl Tree {
    /// Open `path`, an existing empty directory, as the root.
    pub fn open(path: &Path) -> io::Result<Tree> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(Tree {
            // SAFETY: `open` returned a new descriptor that nothing else owns.
            root: unsafe { OwnedFd::from_raw_fd(root) },
            path: path.to_owned(),
            privileged: nix::unistd::geteuid().is_root(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `openat2(root, path, RESOLVE_IN_ROOT)`: the image's symlinks are
    /// followed as the guest would, clamped to the tree.
    fn resolve(&self, path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
        if path.as_os_str().is_empty() {
            return self.root.try_clone();
        }
        let name = cstr(path.as_os_str());
        // SAFETY: open_how is plain integers; all-zero is its default.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | OFlag::O_CLOEXEC).bits() as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
        loop {
            // SAFETY: `name` and `how` outlive the call; the size is `how`'s.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.root.as_raw_fd(),
                    name.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if fd >= 0 {
                // SAFETY: the kernel returned a new descriptor.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EAGAIN) && err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }

    /// The directory `path` (resolved in the root), made with mode 0755 and
    /// its missing parents if it does not exist — a layer may name a file
    /// before (or without) its directory. A dangling symlink on the way gets
    /// its target made, inside the tree, as Docker does.
    fn dir(&self, path: &Path) -> io::Result<OwnedFd> {
        self.dir_within(path, 0)
    }

    fn dir_within(&self, path: &Path, depth: u32) -> io::Result<OwnedFd> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY;
        match self.resolve(path, flags) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && depth < 40 => {}
            other => return other,
        }
        let parent_path = path.parent().unwrap_or(Path::new(""));
        let parent = self.dir_within(parent_path, depth + 1)?;
        let name = path.file_name().ok_or(io::ErrorKind::NotFound)?;
        match nix::sys::stat::fstatat(Some(parent.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(Some(parent.as_raw_fd()), name)?;
                let target = lexical(parent_path, Path::new(&target));
                self.dir_within(&target, depth + 1)?;
            }
            Ok(_) => {}
            Err(Errno::ENOENT) => {
                match nix::sys::stat::mkdirat(
                    Some(parent.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        self.resolve(path, flags)
    }

    /// The directory `path` if it resolves to one; `None` if it does not
    /// exist (a whiteout of something never there).
    fn existing_dir(&self, path: &Path) -> io::Result<Option<OwnedFd>> {
        match self.resolve(path, OFlag::O_DIRECTORY | OFlag::O_RDONLY) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Make the directory `path` and its missing parents (0755), resolved
    /// inside the tree as the guest will see it.
    pub fn ensure_dir(&self, path: &str) -> io::Result<()> {
        self.dir(Path::new(path.trim_start_matches('/'))).map(drop)
    }

    /// Put `data` at `/<dir>/<name>` (root-owned, `mode`), replacing
    /// whatever the layers left at `/<dir>` — removed without following
    /// anything, so a symlink the image planted there leads nowhere.
    pub fn install(&self, dir: &str, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
        use std::io::Write;
        let dir = OsStr::new(dir);
        remove_at(self.root.as_fd(), dir)?;
        nix::sys::stat::mkdirat(
            Some(self.root.as_raw_fd()),
            dir,
            Mode::from_bits_truncate(0o755),
        )?;
        let sub = nix::fcntl::openat(
            Some(self.root.as_raw_fd()),
            dir,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: a new descriptor from openat.
        let sub = unsafe { OwnedFd::from_raw_fd(sub) };
        nix::sys::stat::fchmodat(
            Some(sub.as_raw_fd()),
            ".",
            Mode::from_bits_truncate(0o755),
            FchmodatFlags::FollowSymlink,
        )?;
        let fd = nix::fcntl::openat(
            Some(sub.as_raw_fd()),
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        // SAFETY: a new descriptor from openat.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(data)?;
        nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))?;
        Ok(())
    }

    /// Apply one layer's tar stream.
    pub fn apply(&self, layer: impl Read) -> Result<LayerStats, LayerError> {
        let mut stats = LayerStats::default();
        // What this layer itself wrote: an opaque marker hides only what
        // lower layers put in its directory.
        let mut written: HashSet<PathBuf> = HashSet::new();
        let mut archive = tar::Archive::new(layer);
        for entry in archive.entries().map_err(LayerError::Tar)? {
            let mut entry = entry.map_err(LayerError::Tar)?;
            let raw = entry.path().map_err(LayerError::Tar)?.into_owned();
            let Some(path) = clean(&raw)? else {
                continue; // the root directory's own entry
            };
            stats.entries += 1;
            let shown = path.display().to_string();
            let io_err = |action: &'static str| {
                let path = shown.clone();
                move |source: io::Error| LayerError::Io {
                    path,
                    action,
                    source,
                }
            };
            let parent_path = path.parent().unwrap_or(Path::new("")).to_path_buf();
            let name = path.file_name().expect("cleaned paths have a name");
            let name_bytes = name.as_bytes();

            if name_bytes == b".wh..wh..opq" {
                let dir = self
                    .existing_dir(&parent_path)
                    .map_err(io_err("open directory"))?;
                if let Some(dir) = dir {
                    clear_lower(&dir, &parent_path, &written).map_err(io_err("clear directory"))?;
                }
                stats.whiteouts += 1;
                continue;
            }
            if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
                let dir = self
                    .existing_dir(&parent_path)
                    .map_err(io_err("open directory"))?;
                if let Some(dir) = dir {
                    remove_at(dir.as_fd(), OsStr::from_bytes(hidden))
                        .map_err(io_err("whiteout"))?;
                }
                stats.whiteouts += 1;
                continue;
            }

            let header = entry.header().clone();
            let kind = header.entry_type();
            let parent = self.dir(&parent_path).map_err(io_err("open directory"))?;
            let pfd = parent.as_fd();
            let mode = header.mode().map_err(LayerError::Tar)? & 0o7777;

            // Whatever was there goes, unless a directory meets a directory
            // (then the lower one's contents stay, as in an overlay).
            let existing =
                nix::sys::stat::fstatat(Some(pfd.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .ok();
            let existing_dir = existing.is_some_and(|st| {
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
            });
            if existing.is_some() && !(kind.is_dir() && existing_dir) {
                remove_at(pfd, name).map_err(io_err("replace"))?;
            }

            let mut file: Option<File> = None;
            match kind {
                tar::EntryType::Directory => {
                    if !existing_dir {
                        nix::sys::stat::mkdirat(
                            Some(pfd.as_raw_fd()),
                            name,
                            Mode::from_bits_truncate(0o700),
                        )
                        .map_err(|e| io_err("mkdir")(e.into()))?;
                    }
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    let fd = nix::fcntl::openat(
                        Some(pfd.as_raw_fd()),
                        name,
                        OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_WRONLY
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    )
                    .map_err(|e| io_err("create")(e.into()))?;
                    // SAFETY: a new descriptor from openat.
                    let mut out = unsafe { File::from_raw_fd(fd) };
                    stats.bytes += io::copy(&mut entry, &mut out).map_err(io_err("write"))?;
                    file = Some(out);
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(LayerError::Tar)?
                        .unwrap_or_default()
                        .into_owned();
                    nix::unistd::symlinkat(&target, Some(pfd.as_raw_fd()), name)
                        .map_err(|e| io_err("symlink")(e.into()))?;
                }
                tar::EntryType::Link => {
                    let raw_target = entry
                        .link_name()
                        .map_err(LayerError::Tar)?
                        .unwrap_or_default()
                        .into_owned();
                    let target = clean(&raw_target)
                        .map_err(|_| LayerError::LinkEscapes {
                            path: shown.clone(),
                            target: raw_target.display().to_string(),
                        })?
                        .ok_or_else(|| LayerError::BadLink {
                            path: shown.clone(),
                            target: raw_target.display().to_string(),
                            reason: "is the root directory".into(),
                        })?;
                    let target_parent = self
                        .resolve(
                            target.parent().unwrap_or(Path::new("")),
                            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
                        )
                        .map_err(|e| LayerError::BadLink {
                            path: shown.clone(),
                            target: target.display().to_string(),
                            reason: format!("is not in the image so far ({e})"),
                        })?;
                    nix::unistd::linkat(
                        Some(target_parent.as_raw_fd()),
                        target.file_name().expect("cleaned"),
                        Some(pfd.as_raw_fd()),
                        name,
                        AtFlags::empty(),
                    )
                    .map_err(|e| LayerError::BadLink {
                        path: shown.clone(),
                        target: target.display().to_string(),
                        reason: format!("cannot be linked ({e})"),
                    })?;
                    stats.hard_links += 1;
                    written.insert(path);
                    // A hard link shares its target's inode and metadata.
                    continue;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    let (sflag, dev) = match kind {
                        tar::EntryType::Fifo => (SFlag::S_IFIFO, 0),
                        other => {
                            let major = header.device_major().ok().flatten().unwrap_or(0);
                            let minor = header.device_minor().ok().flatten().unwrap_or(0);
                            let flag = if other == tar::EntryType::Char {
                                SFlag::S_IFCHR
                            } else {
                                SFlag::S_IFBLK
                            };
                            (flag, nix::sys::stat::makedev(major.into(), minor.into()))
                        }
                    };
                    if sflag != SFlag::S_IFIFO && !self.privileged {
                        tracing::debug!(path = %shown, "skipping a device node: not root");
                        continue;
                    }
                    nix::sys::stat::mknodat(
                        Some(pfd.as_raw_fd()),
                        name,
                        sflag,
                        Mode::from_bits_truncate(0o600),
                        dev,
                    )
                    .map_err(|e| io_err("mknod")(e.into()))?;
                    if sflag != SFlag::S_IFIFO {
                        stats.devices += 1;
                    }
                }
                other => {
                    tracing::debug!(path = %shown, kind = ?other, "skipping an entry of a kind images do not carry");
                    continue;
                }
            }

            // Ownership first: chown clears setuid and setgid bits.
            if self.privileged {
                let uid = header.uid().map_err(LayerError::Tar)? as u32;
                let gid = header.gid().map_err(LayerError::Tar)? as u32;
                nix::unistd::fchownat(
                    Some(pfd.as_raw_fd()),
                    name,
                    Some(uid.into()),
                    Some(gid.into()),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io_err("chown")(e.into()))?;
            }
            if kind != tar::EntryType::Symlink {
                nix::sys::stat::fchmodat(
                    Some(pfd.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(mode),
                    FchmodatFlags::NoFollowSymlink,
                )
                .or_else(|e| match e {
                    // Kernels before 6.6 refuse the flag; the entry is ours
                    // and not a symlink, so following is the same.
                    Errno::EOPNOTSUPP => nix::sys::stat::fchmodat(
                        Some(pfd.as_raw_fd()),
                        name,
                        Mode::from_bits_truncate(mode),
                        FchmodatFlags::FollowSymlink,
                    ),
                    e => Err(e),
                })
                .map_err(|e| io_err("chmod")(e.into()))?;
            }
            if let Some(pax) = entry.pax_extensions().map_err(LayerError::Tar)? {
                let xattrs: Vec<(Vec<u8>, Vec<u8>)> = pax
                    .flatten()
                    .filter_map(|ext| {
                        let key = ext.key_bytes().strip_prefix(b"SCHILY.xattr.")?;
                        Some((key.to_vec(), ext.value_bytes().to_vec()))
                    })
                    .collect();
                if !xattrs.is_empty() && kind != tar::EntryType::Symlink {
                    let target = match file.take() {
                        Some(f) => OwnedFd::from(f),
                        None => nix::fcntl::openat(
                            Some(pfd.as_raw_fd()),
                            name,
                            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )
                        // SAFETY: a new descriptor from openat.
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                        .map_err(|e| io_err("open for xattrs")(e.into()))?,
                    };
                    for (key, value) in xattrs {
                        set_xattr(target.as_fd(), &key, &value).map_err(io_err("set xattr"))?;
                    }
                }
            }
            let mtime = header.mtime().unwrap_or(0) as i64;
            let when = TimeSpec::new(mtime, 0);
            // Best effort: a directory's time changes again as entries land in it.
            let _ = nix::sys::stat::utimensat(
                Some(pfd.as_raw_fd()),
                name,
                &when,
                &when,
                UtimensatFlags::NoFollowSymlink,
            );
            written.insert(path);
        }
        Ok(stats)
    }
}

fn set_xattr(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let key = CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid descriptor, NUL-terminated name, value pointer and length match.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Remove `name` in `dir` and, if it is a directory, everything under it,
/// never following a symlink. Absent is fine.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: a new descriptor from openat.
    let sub = unsafe { OwnedFd::from_raw_fd(sub) };
    for child in children(sub.as_fd())? {
        remove_at(sub.as_fd(), &child)?;
    }
    match nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::RemoveDir,
    ) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn children(dir: BorrowedFd<'_>) -> io::Result<Vec<std::ffi::OsString>> {
    let dup = nix::unistd::dup(dir.as_raw_fd())?;
    let mut listing = nix::dir::Dir::from_fd(dup)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

/// An opaque directory: drop every child that a lower layer put there.
fn clear_lower(dir: &OwnedFd, path: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for child in children(dir.as_fd())? {
        if !written.contains(&path.join(&child)) {
            remove_at(dir.as_fd(), &child)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tar stream built entry by entry.
    #[derive(Default)]
    struct Layer {
        builder: Option<tar::Builder<Vec<u8>>>,
    }

    impl Layer {
        fn b(&mut self) -> &mut tar::Builder<Vec<u8>> {
            self.builder
                .get_or_insert_with(|| tar::Builder::new(Vec::new()))
        }
        fn entry(&mut self, path: &str, kind: tar::EntryType, mode: u32, data: &[u8]) -> &mut Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(1000);
            h.set_gid(1001);
            h.set_size(data.len() as u64);
            h.set_mtime(1_600_000_000);
            // Raw names, so tests can write what a hostile image would.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            self.b().append(&h, data).unwrap();
            self
        }
        fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.entry(path, tar::EntryType::Regular, 0o644, data)
        }
        fn dir(&mut self, path: &str) -> &mut Self {
            self.entry(path, tar::EntryType::Directory, 0o755, b"")
        }
        fn link(&mut self, path: &str, kind: tar::EntryType, target: &str) -> &mut Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o777);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            h.set_size(0);
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            let t = target.as_bytes();
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
            h.set_cksum();
            self.b().append(&h, &b""[..]).unwrap();
            self
        }
        fn bytes(&mut self) -> Vec<u8> {
            self.builder.take().unwrap().into_inner().unwrap()
        }
    }

    fn tree() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let tree = Tree::open(&root).unwrap();
        (dir, tree)
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_directories() {
        let (_dir, tree) = tree();
        let root = tree.path().to_owned();
        tree.apply(
            &Layer::default()
                .dir("etc/")
                .file("etc/keep", b"keep")
                .file("etc/gone", b"gone")
                .dir("opt/")
                .file("opt/old", b"old")
                .dir("opt/sub/")
                .file("opt/sub/deep", b"deep")
                .bytes()[..],
        )
        .unwrap();
        let stats = tree
            .apply(
                &Layer::default()
                    .file("etc/.wh.gone", b"")
                    .dir("opt/")
                    .file("opt/.wh..wh..opq", b"")
                    .file("opt/new", b"new")
                    .bytes()[..],
            )
            .unwrap();
        assert_eq!(stats.whiteouts, 2);
        assert_eq!(std::fs::read(root.join("etc/keep")).unwrap(), b"keep");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("opt/old").exists());
        assert!(!root.join("opt/sub").exists());
        assert_eq!(std::fs::read(root.join("opt/new")).unwrap(), b"new");
    }

    #[test]
    fn opaque_marker_after_the_layers_own_entries_keeps_them() {
        let (_dir, tree) = tree();
        let root = tree.path().to_owned();
        tree.apply(&Layer::default().file("d/lower", b"1").bytes()[..])
            .unwrap();
        tree.apply(
            &Layer::default()
                .file("d/upper", b"2")
                .file("d/.wh..wh..opq", b"")
                .bytes()[..],
        )
        .unwrap();
        assert!(!root.join("d/lower").exists());
        assert!(root.join("d/upper").exists());
    }

    #[test]
    fn hard_links_symlinks_modes_and_replacement() {
        let (_dir, tree) = tree();
        let root = tree.path().to_owned();
        let stats = tree
            .apply(
                &Layer::default()
                    .entry("bin/tool", tar::EntryType::Regular, 0o4755, b"#!tool")
                    .link("bin/alias", tar::EntryType::Link, "bin/tool")
                    .link("bin/sym", tar::EntryType::Symlink, "/bin/tool")
                    .entry("run/pipe", tar::EntryType::Fifo, 0o644, b"")
                    .bytes()[..],
            )
            .unwrap();
        assert_eq!(stats.hard_links, 1);
        let tool = std::fs::symlink_metadata(root.join("bin/tool")).unwrap();
        let alias = std::fs::symlink_metadata(root.join("bin/alias")).unwrap();
        assert_eq!(tool.ino(), alias.ino());
        assert_eq!(tool.nlink(), 2);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(
                tool.permissions().mode() & 0o7777,
                0o4755,
                "setuid survives chown"
            );
            assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
        }
        assert_eq!(
            std::fs::read_link(root.join("bin/sym")).unwrap(),
            Path::new("/bin/tool")
        );
        assert!(
            std::fs::symlink_metadata(root.join("run/pipe"))
                .unwrap()
                .file_type()
                .is_fifo_like()
        );
        // A file replaces a symlink instead of writing through it.
        tree.apply(&Layer::default().file("bin/sym", b"plain").bytes()[..])
            .unwrap();
        assert_eq!(std::fs::read(root.join("bin/sym")).unwrap(), b"plain");
        assert_eq!(std::fs::read(root.join("bin/tool")).unwrap(), b"#!tool");
    }

    trait FifoLike {
        fn is_fifo_like(&self) -> bool;
    }
    impl FifoLike for std::fs::FileType {
        fn is_fifo_like(&self) -> bool {
            use std::os::unix::fs::FileTypeExt;
            self.is_fifo()
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_tree_never_on_the_host() {
        let (dir, tree) = tree();
        let root = tree.path().to_owned();
        // A host directory the layer aims at, absolutely and relatively.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        tree.apply(
            &Layer::default()
                .link("abs", tar::EntryType::Symlink, outside.to_str().unwrap())
                .link("rel", tar::EntryType::Symlink, "../../../../../../outside")
                .bytes()[..],
        )
        .unwrap();
        tree.apply(
            &Layer::default()
                .file("abs/planted", b"x")
                .file("rel/planted", b"y")
                .bytes()[..],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );
        // Both landed where the guest will see them: inside the tree.
        let inside = root.join(outside.strip_prefix("/").unwrap());
        assert_eq!(std::fs::read(inside.join("planted")).unwrap(), b"x");
        assert_eq!(std::fs::read(root.join("outside/planted")).unwrap(), b"y");
    }

    #[test]
    fn dot_dot_names_and_links_are_refused() {
        let (_dir, tree) = tree();
        let err = tree
            .apply(&Layer::default().file("a/../../etc/passwd", b"x").bytes()[..])
            .unwrap_err();
        assert!(matches!(err, LayerError::Escapes { .. }), "{err}");
        assert!(err.to_string().contains("a/../../etc/passwd"), "{err}");
        let err = tree
            .apply(
                &Layer::default()
                    .link("evil", tar::EntryType::Link, "../../etc/shadow")
                    .bytes()[..],
            )
            .unwrap_err();
        assert!(matches!(err, LayerError::LinkEscapes { .. }), "{err}");
        let err = tree
            .apply(
                &Layer::default()
                    .link("dangling", tar::EntryType::Link, "no/such/file")
                    .bytes()[..],
            )
            .unwrap_err();
        assert!(err.to_string().contains("no/such/file"), "{err}");
    }

    #[test]
    fn install_replaces_a_planted_symlink_without_following_it() {
        let (dir, tree) = tree();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"keep").unwrap();
        tree.apply(
            &Layer::default()
                .link(".ember", tar::EntryType::Symlink, outside.to_str().unwrap())
                .bytes()[..],
        )
        .unwrap();
        tree.install(".ember", "init", b"guest", 0o755).unwrap();
        assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        let ember = tree.path().join(".ember");
        assert!(std::fs::symlink_metadata(&ember).unwrap().is_dir());
        assert_eq!(std::fs::read(ember.join("init")).unwrap(), b"guest");
        let mode = std::fs::metadata(ember.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn a_working_dir_is_made_inside_the_tree_through_planted_links() {
        let (dir, tree) = tree();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        tree.apply(
            &Layer::default()
                .link("opt", tar::EntryType::Symlink, outside.to_str().unwrap())
                .bytes()[..],
        )
        .unwrap();
        tree.ensure_dir("/opt/app/work").unwrap();
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // The absolute link means the tree's own /<outside path>.
        let inside = tree.path().join(outside.strip_prefix("/").unwrap());
        assert!(inside.join("app/work").is_dir());
        tree.ensure_dir("/opt/app/work").unwrap();
    }

    #[test]
    fn a_whiteout_through_a_symlink_stays_in_the_tree() {
        let (dir, tree) = tree();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        tree.apply(
            &Layer::default()
                .link("up", tar::EntryType::Symlink, dir.path().to_str().unwrap())
                .bytes()[..],
        )
        .unwrap();
        tree.apply(&Layer::default().file("up/.wh.victim", b"").bytes()[..])
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
