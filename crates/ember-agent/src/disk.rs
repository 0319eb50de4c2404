//! Root disks: the read-only base each sandbox's disk layer sits on, and
//! disk diffs written into a new build at pause.
//!
//! A build's root filesystem is stored as diff blocks under a header. To
//! run a VM on it, the VMM needs a file: the *rootfs cache* holds one per
//! build (derived data, rebuilt on demand, deleted with the build):
//!
//! - `<build>.raw`: the whole image, materialised from the header (a
//!   reflinked or sparse copy).
//! - `<build>.qcow2`: the qcow2 overlay the sandbox that paused into this
//!   build was running on, kept at pause instead of deleted: over its own
//!   backing files it is exactly the build's content, so a resume needs no
//!   copy. A template gets a copy of its source's overlay, made while the
//!   source is paused for the snapshot, so its first fork needs no copy
//!   either. Chains grow by one per pause/resume cycle and are cut (a
//!   `.raw` materialised) past [`MAX_CHAIN`].
//! - `<build>.chain.json`: the layers under `<build>.qcow2`, as Ember made
//!   them. The overlay's own header names them too, but a VMM that served
//!   a guest could write that header: it is never read.
//!
//! Cache files are renamed into place without an fsync (syncing a kept
//! overlay would add its dirty pages to every pause): a crash of the agent
//! or a VMM leaves them whole in the page cache, but a power loss may not.
//! So the cache is trusted only within one boot of the host: it records the
//! kernel's boot ID, and an agent starting under another boot ID drops the
//! whole cache ([`drop_cache_after_reboot`]); every entry is rebuilt from
//! its build (synced and immutable) on demand.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ember_image::cow::{DiskFormat, OverlayExtent};
use ember_snapshot::{Base, BlockSet, BuildStore, BuildWriter, Header, ImageKind, WriteReport};
use ember_types::BuildId;
use ember_vmm::BackingFile;

use crate::agent::DISK_BLOCK;
use crate::error::AgentError;
use crate::runtime::DiskLayer;

/// Longest qcow2 backing chain a restore may stack a new overlay on.
pub const MAX_CHAIN: usize = 8;

pub fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cache").join("rootfs")
}

/// Where the flat copy of `build`'s root filesystem is cached.
pub fn flat_cache_path(data_dir: &Path, build: BuildId) -> PathBuf {
    cache_dir(data_dir).join(format!("{build}.raw"))
}

/// Where the kept qcow2 overlay holding `build`'s root filesystem is.
pub fn qcow2_cache_path(data_dir: &Path, build: BuildId) -> PathBuf {
    cache_dir(data_dir).join(format!("{build}.qcow2"))
}

/// Where the chain under `build`'s kept overlay is recorded.
fn chain_path(data_dir: &Path, build: BuildId) -> PathBuf {
    cache_dir(data_dir).join(format!("{build}.chain.json"))
}

const BOOT_ID_FILE: &str = ".boot_id";

/// This boot of the host kernel, or `None` where the kernel does not say.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Drop the rootfs cache unless it was written during this boot of the
/// host (see the module docs), then stamp it with this boot. Returns how
/// many files were dropped.
pub fn drop_cache_after_reboot(data_dir: &Path) -> Result<usize, AgentError> {
    drop_cache_unless_boot(data_dir, boot_id().as_deref())
}

fn drop_cache_unless_boot(data_dir: &Path, boot: Option<&str>) -> Result<usize, AgentError> {
    let dir = cache_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
    let stamp = dir.join(BOOT_ID_FILE);
    let recorded = std::fs::read_to_string(&stamp).ok();
    if boot.is_some() && recorded.as_deref().map(str::trim) == boot {
        return Ok(0);
    }
    let mut dropped = 0;
    for entry in std::fs::read_dir(&dir)
        .map_err(|e| AgentError::io(format!("read {}", dir.display()), e))?
        .flatten()
    {
        if entry.file_name() == BOOT_ID_FILE {
            continue;
        }
        let path = entry.path();
        std::fs::remove_file(&path)
            .map_err(|e| AgentError::io(format!("remove {}", path.display()), e))?;
        dropped += 1;
    }
    if let Some(boot) = boot {
        write_synced(&stamp, boot.as_bytes())?;
    }
    Ok(dropped)
}

/// A file a new disk layer can sit on: `path` read as `format`, over the
/// files `below` it (top first; empty for a raw file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBase {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub below: Vec<BackingFile>,
}

impl LayerBase {
    /// A raw file: its bytes are a disk, whatever they say.
    pub fn raw(path: PathBuf) -> LayerBase {
        LayerBase {
            path,
            format: DiskFormat::Raw,
            below: Vec::new(),
        }
    }

    /// The chain a layer stacked on this base has under it, top first.
    pub fn chain(&self) -> Vec<BackingFile> {
        std::iter::once(BackingFile {
            path: self.path.clone(),
            format: self.format,
        })
        .chain(self.below.iter().cloned())
        .collect()
    }
}

/// A usable cached base for `build`, if there is one: its flat copy, or
/// its kept overlay when the recorded chain under it is intact and short
/// enough.
pub fn cached_base(data_dir: &Path, build: BuildId) -> Option<LayerBase> {
    let raw = flat_cache_path(data_dir, build);
    if raw.exists() {
        return Some(LayerBase::raw(raw));
    }
    let q = qcow2_cache_path(data_dir, build);
    let below = read_chain(data_dir, build)?;
    let usable = q.exists() && below.len() < MAX_CHAIN && below.iter().all(|b| b.path.exists());
    usable.then_some(LayerBase {
        path: q,
        format: DiskFormat::Qcow2,
        below,
    })
}

fn read_chain(data_dir: &Path, build: BuildId) -> Option<Vec<BackingFile>> {
    let text = std::fs::read(chain_path(data_dir, build)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Keep the disk a paused sandbox ran on as the cache of the build it
/// paused into (a rename: no copy), with the chain under it recorded. The
/// VM must be stopped. The file becomes root's and read-only: the next VM
/// to use it (as a backing layer) only reads it.
pub fn keep_as_cache(data_dir: &Path, disk: &DiskLayer, build: BuildId) -> Result<(), AgentError> {
    let (from, to) = match disk {
        DiskLayer::Qcow2 { overlay, .. } => (overlay, qcow2_cache_path(data_dir, build)),
        DiskLayer::Raw { path } => (path, flat_cache_path(data_dir, build)),
    };
    let dir = cache_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
    if let DiskLayer::Qcow2 { below, .. } = disk {
        let json = serde_json::to_vec(below).expect("backing files serialise");
        write_synced(&chain_path(data_dir, build), &json)?;
    }
    std::os::unix::fs::chown(from, Some(0), Some(0))
        .map_err(|e| AgentError::io(format!("chown {}", from.display()), e))?;
    shared_read_only(from)?;
    std::fs::rename(from, &to)
        .map_err(|e| AgentError::io(format!("move {} to the rootfs cache", from.display()), e))
}

/// Copy the qcow2 overlay a *paused* VM runs on into the cache of the
/// build just written from it (a template: the VM goes on running on its
/// overlay), with the chain under it recorded, so the template's first fork
/// finds a base instead of materialising the whole image. The overlay holds
/// only what the sandbox wrote, so this is small next to a flat copy.
/// Returns whether a copy was made: raw disks (Firecracker) are not copied
/// here (see `Agent::prepare_template_disk`).
pub fn copy_as_cache(
    data_dir: &Path,
    disk: &DiskLayer,
    build: BuildId,
) -> Result<bool, AgentError> {
    let DiskLayer::Qcow2 { overlay, below } = disk else {
        return Ok(false);
    };
    let dir = cache_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
    let tmp = dir.join(format!(".{build}.qcow2.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let copied = std::fs::copy(overlay, &tmp)
        .map_err(|e| AgentError::io(format!("copy {} to the rootfs cache", overlay.display()), e))
        .and_then(|_| shared_read_only(&tmp))
        .and_then(|()| {
            let json = serde_json::to_vec(below).expect("backing files serialise");
            write_synced(&chain_path(data_dir, build), &json)
        })
        .and_then(|()| {
            let to = qcow2_cache_path(data_dir, build);
            std::fs::rename(&tmp, &to)
                .map_err(|e| AgentError::io(format!("rename to {}", to.display()), e))
        });
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied.map(|()| true)
}

/// Mode 0444: a file sandboxes' VMMs read (as their own uids, through
/// their jails) and nobody writes. It is inside the data directory (0700),
/// so no other local user reaches it.
pub fn shared_read_only(path: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| AgentError::io(format!("chmod {}", path.display()), e))
}

/// Write `bytes` to `path` via a temporary file, fsync'd and renamed, the
/// directory synced.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        File::create(&tmp).map_err(|e| AgentError::io(format!("create {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| AgentError::io(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| AgentError::io(format!("rename to {}", path.display()), e))?;
    let dir = path.parent().expect("cache files live in a directory");
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AgentError::io(format!("sync {}", dir.display()), e))
}

/// Remove the cache files of deleted builds, and every cached overlay whose
/// backing chain runs through one of them (they are rebuilt on demand).
pub fn remove_caches(data_dir: &Path, deleted: &[BuildId]) {
    let mut gone: Vec<PathBuf> = Vec::new();
    for b in deleted {
        let _ = std::fs::remove_file(chain_path(data_dir, *b));
        for p in [
            flat_cache_path(data_dir, *b),
            qcow2_cache_path(data_dir, *b),
        ] {
            if std::fs::remove_file(&p).is_ok() {
                gone.push(p);
            }
        }
    }
    if gone.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(cache_dir(data_dir)) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Some(build) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".qcow2"))
            .and_then(|n| n.parse::<BuildId>().ok())
        else {
            continue;
        };
        let broken = match read_chain(data_dir, build) {
            Some(below) => below
                .iter()
                .any(|c| gone.contains(&c.path) || !c.path.exists()),
            None => true,
        };
        if broken {
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(chain_path(data_dir, build));
        }
    }
}

/// Write `build`'s root filesystem as one sparse file at `dst` (holes for
/// zero runs, reflinks where the file system shares extents), atomically.
pub fn materialize_flat(store: &BuildStore, build: BuildId, dst: &Path) -> Result<(), AgentError> {
    let dir = dst.parent().expect("cache files live in a directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
    let tmp = dir.join(format!(".{build}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let header = store
        .open_header(build, ImageKind::Rootfs)
        .map_err(AgentError::Store)?;
    store
        .materialize(&header, ImageKind::Rootfs, &tmp)
        .map_err(AgentError::Store)?;
    // Read-only: qcow2 overlays of many sandboxes read it; nothing writes it.
    shared_read_only(&tmp)?;
    std::fs::rename(&tmp, dst)
        .map_err(|e| AgentError::io(format!("rename to {}", dst.display()), e))
}

/// Store the blocks of `disk` that changed since `parent` as this build's
/// root filesystem. The VM must be paused.
pub fn write_disk_diff(
    store: &BuildStore,
    w: &mut BuildWriter,
    disk: &DiskLayer,
    parent: &Header,
    confinement: Option<&ember_jail::Confinement>,
) -> Result<WriteReport, AgentError> {
    match disk {
        DiskLayer::Raw { path } => w
            .write_image_from_full(ImageKind::Rootfs, Base::Parent(parent), path)
            .map_err(AgentError::Store),
        DiskLayer::Qcow2 { overlay, .. } => {
            let size = parent.size();
            // The overlay's metadata is the VMM's: what it claims past the
            // disk's end is dropped, not trusted.
            let extents: Vec<OverlayExtent> =
                ember_image::cow::overlay_extents(overlay, confinement)
                    .map_err(AgentError::Image)?
                    .into_iter()
                    .filter(|e| e.start < size)
                    .map(|mut e| {
                        e.length = e.length.min(size - e.start);
                        e
                    })
                    .collect();
            let dirty = dirty_blocks(&extents);
            let overlay_file = File::open(overlay)
                .map_err(|e| AgentError::io(format!("open {}", overlay.display()), e))?;
            // Below the overlay the disk reads as the parent build: a block
            // the guest wrote only partly takes the rest from there.
            let below = store
                .reader(parent.clone(), ImageKind::Rootfs)
                .map_err(AgentError::Store)?;
            w.write_image_from_blocks(
                ImageKind::Rootfs,
                Base::Parent(parent),
                size,
                &dirty,
                |offset, buf| read_layered(&extents, &overlay_file, &below, offset, buf),
            )
            .map_err(AgentError::Store)
        }
    }
}

/// What lies under an overlay: reads of the image it was created over.
trait Below {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl Below for ember_snapshot::ImageReader {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_at(buf, offset).map_err(std::io::Error::other)
    }
}

impl Below for File {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        read_or_zero(self, buf, offset)
    }
}

/// The 4 KiB blocks any overlay extent touches.
fn dirty_blocks(extents: &[OverlayExtent]) -> BlockSet {
    BlockSet::from_ranges(extents.iter().map(|e| {
        let first = e.start / DISK_BLOCK;
        let end = (e.start + e.length).div_ceil(DISK_BLOCK);
        first..end
    }))
}

/// Fill `buf` with the disk's bytes at `offset` as the guest sees them:
/// from the overlay where it holds data, zeros where it records zeros, the
/// base elsewhere (a block the guest wrote only partly).
fn read_layered(
    extents: &[OverlayExtent],
    overlay: &File,
    base: &dyn Below,
    offset: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let end = offset + buf.len() as u64;
    let mut at = offset;
    // Extents are sorted by start; find the first that ends after `offset`.
    let mut i = extents.partition_point(|e| e.start + e.length <= offset);
    while at < end {
        let next = extents.get(i).filter(|e| e.start < end);
        match next {
            Some(e) if e.start <= at => {
                let stop = (e.start + e.length).min(end);
                let dst = &mut buf[(at - offset) as usize..(stop - offset) as usize];
                match e.file_offset {
                    Some(file_off) => overlay.read_exact_at(dst, file_off + (at - e.start))?,
                    None => dst.fill(0),
                }
                at = stop;
                i += 1;
            }
            _ => {
                let stop = next.map_or(end, |e| e.start.min(end));
                let dst = &mut buf[(at - offset) as usize..(stop - offset) as usize];
                base.read_below(dst, at)?;
                at = stop;
            }
        }
    }
    Ok(())
}

/// `read_exact_at`, with bytes past the end of the file reading as zeros
/// (a sparse base may be shorter than the disk if its tail is a hole).
fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, file_offset: Option<u64>) -> OverlayExtent {
        OverlayExtent {
            start,
            length,
            file_offset,
        }
    }

    #[test]
    fn the_cache_is_dropped_when_the_host_has_rebooted() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        let b = BuildId::new();
        let cached = [
            flat_cache_path(data, b),
            qcow2_cache_path(data, b),
            chain_path(data, b),
        ];
        // First start: an unstamped cache (written before this rule, or
        // by a crash before the stamp) is not trusted.
        std::fs::create_dir_all(cache_dir(data)).unwrap();
        for p in &cached {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(drop_cache_unless_boot(data, Some("boot-1")).unwrap(), 3);
        assert!(cached.iter().all(|p| !p.exists()));
        // Same boot: kept.
        for p in &cached {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(drop_cache_unless_boot(data, Some("boot-1")).unwrap(), 0);
        assert!(cached.iter().all(|p| p.exists()));
        // Another boot: dropped, and the new boot stamped.
        assert_eq!(drop_cache_unless_boot(data, Some("boot-2")).unwrap(), 3);
        assert!(cached.iter().all(|p| !p.exists()));
        assert_eq!(
            std::fs::read_to_string(cache_dir(data).join(BOOT_ID_FILE)).unwrap(),
            "boot-2"
        );
        // A kernel that does not say its boot: never trusted.
        std::fs::write(&cached[0], b"x").unwrap();
        assert_eq!(drop_cache_unless_boot(data, None).unwrap(), 1);
    }

    #[test]
    fn partial_writes_dirty_whole_blocks() {
        let d = dirty_blocks(&[
            ext(512, 512, Some(0)),
            ext(8192, 8192, None),
            ext(20000, 1, Some(0)),
        ]);
        let runs: Vec<_> = d.runs().collect();
        assert_eq!(runs, vec![0..1, 2..5]);
    }

    #[test]
    fn layered_reads_take_overlay_zero_and_base_bytes_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base");
        let overlay_path = dir.path().join("overlay");
        std::fs::write(&base_path, vec![b'b'; 16384]).unwrap();
        // Overlay file: extent data stored at file offset 100.
        let mut ov = vec![0u8; 100];
        ov.extend(vec![b'o'; 1024]);
        std::fs::write(&overlay_path, ov).unwrap();
        let extents = [ext(1024, 1024, Some(100)), ext(4096, 512, None)];
        let base = File::open(&base_path).unwrap();
        let overlay = File::open(&overlay_path).unwrap();
        let mut buf = vec![0xffu8; 8192];
        read_layered(&extents, &overlay, &base, 0, &mut buf).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == b'b'));
        assert!(buf[1024..2048].iter().all(|&b| b == b'o'));
        assert!(buf[2048..4096].iter().all(|&b| b == b'b'));
        assert!(buf[4096..4608].iter().all(|&b| b == 0));
        assert!(buf[4608..].iter().all(|&b| b == b'b'));
        // A read starting inside an extent.
        let mut buf = vec![0u8; 512];
        read_layered(&extents, &overlay, &base, 1536, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == b'o'));
        // Past the end of a short base: zeros.
        let mut buf = vec![0xffu8; 4096];
        read_layered(&[], &overlay, &base, 16384, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
