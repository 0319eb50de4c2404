//! Each sandbox's own root disk over an image's read-only `rootfs.ext4`:
//!
//! - [`qcow2_overlay`] for QEMU: a qcow2 file holding only the blocks the
//!   sandbox writes, backed by the raw base;
//! - [`raw_copy`] for backends that need a plain file (Firecracker): a
//!   reflink where the filesystem shares extents, else a sparse copy;
//! - [`written_blocks`]: which 4 KiB blocks an overlay holds, for the host
//!   agent's disk diffs.
//!
//! This module does not decide where disks live or when they are deleted
//! (the host agent does).

use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::Whence;
use serde::Deserialize;

use crate::host::QEMU_IMG;
use crate::{Error, Result};
pub use ember_jail::Confinement;
pub use ember_types::DiskFormat;

/// The granularity of [`written_blocks`].
pub const BLOCK_SIZE: u64 = 4096;

/// Create `overlay`, a qcow2 disk of `size` bytes backed by `base`, which
/// is read as `base_format`: a raw image, or another qcow2 overlay of
/// Ember's, making a chain. `base` is recorded by absolute path, with its
/// format, and must not change while the overlay exists.
///
/// Neither the format nor anything else is read from `base`: its bytes are
/// a guest's disk, or metadata a VMM that served a guest could write (a raw
/// base's first bytes may be a qcow2 header naming any host file). So the
/// caller states the format and the size, and `qemu-img` is told not to
/// open the base at all (`-u`). Whoever uses the overlay states the chain
/// under it too (a VMM is given every layer explicitly).
///
/// The overlay uses 128 KiB clusters with extended L2 entries: 32
/// sub-clusters of 4 KiB each, so a 4 KiB guest write allocates (and a diff
/// copies) 4 KiB, not a whole cluster.
pub fn qcow2_overlay(
    base: &Path,
    base_format: DiskFormat,
    size: u64,
    overlay: &Path,
) -> Result<()> {
    let base = base.canonicalize().map_err(Error::io("open", base))?;
    if overlay.exists() {
        return Err(Error::io("create", overlay)(
            io::ErrorKind::AlreadyExists.into(),
        ));
    }
    let mut cmd = QEMU_IMG.command()?;
    cmd.args([
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-F",
        base_format.as_str(),
        "-b",
    ])
    .arg(&base)
    .args(["-o", "cluster_size=128k,extended_l2=on"])
    .arg(overlay)
    .arg(size.to_string());
    QEMU_IMG.output(&mut cmd)?;
    Ok(())
}

/// How [`raw_copy`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The copy shares the source's extents until either is written
    /// (`FICLONE`: btrfs, XFS with reflink, bcachefs…). Instant.
    Reflink,
    /// The source's data ranges were copied and its holes left as holes.
    Sparse,
}

/// Copy the raw disk `src` to the new file `dst` (which must not exist),
/// as cheaply as the filesystem allows. On failure `dst` is removed.
///
/// Not synced: the copy is a sandbox's live disk, whose contents matter
/// only once a pause writes them into a build (which is synced), and
/// nothing derived from it is trusted after a reboot (caches are dropped).
/// Syncing took 0.44 s of a 0.62 s copy of the 249 MiB guest image — most
/// of a Firecracker resume.
pub fn raw_copy(src: &Path, dst: &Path) -> Result<CopyKind> {
    let source = File::open(src).map_err(Error::io("open", src))?;
    let target = File::options()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(Error::io("create", dst))?;
    let result = reflink(&source, &target).and_then(|cloned| {
        if cloned {
            return Ok(CopyKind::Reflink);
        }
        sparse_copy(&source, &target)?;
        Ok(CopyKind::Sparse)
    });
    let result = result.map_err(Error::io("copy to", dst));
    if result.is_err() {
        let _ = fs::remove_file(dst);
    }
    result
}

/// `FICLONE`; `Ok(false)` when the filesystem cannot share extents here.
fn reflink(source: &File, target: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor by value and reads no
    // memory; both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    match Errno::last() {
        Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS => {
            Ok(false)
        }
        errno => Err(errno.into()),
    }
}

fn sparse_copy(source: &File, target: &File) -> io::Result<()> {
    let len = source.metadata()?.len();
    target.set_len(len)?;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut pos = 0i64;
    while pos < len {
        let data = match nix::unistd::lseek(source.as_raw_fd(), pos, Whence::SeekData) {
            Ok(at) => at,
            // No data after `pos`: the rest is a hole, which set_len made.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = nix::unistd::lseek(source.as_raw_fd(), data, Whence::SeekHole)?;
        copy_range(source, target, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

/// Copy `len` bytes at `offset` from `source` to the same offset of `target`.
fn copy_range(source: &File, target: &File, offset: i64, len: i64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (offset, offset);
    let end = offset + len;
    while off_in < end {
        let chunk = usize::try_from(end - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match nix::fcntl::copy_file_range(
            source.as_fd(),
            Some(&mut off_in),
            target.as_fd(),
            Some(&mut off_out),
            chunk,
        ) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            // Filesystems or kernels without copy_file_range across these files.
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL) => {
                return copy_range_by_reads(source, target, off_in, end - off_in);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_by_reads(source: &File, target: &File, offset: i64, len: i64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = u64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let end = at + u64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    while at < end {
        let n = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        source.read_exact_at(&mut buf[..n], at)?;
        target.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    /// 0: the overlay itself (its backing is never opened, see
    /// [`map_overlay`]).
    depth: u32,
    /// Allocated in the overlay (written since it was created).
    #[serde(default)]
    present: bool,
    /// Reads as zeros.
    #[serde(default)]
    zero: bool,
    /// Where the data is in the overlay file (absent for zeros).
    #[serde(default)]
    offset: Option<u64>,
}

impl MapEntry {
    /// Written in the overlay's own layer.
    fn written(&self) -> bool {
        self.depth == 0 && self.present && self.length > 0
    }
}

/// A range of guest-visible disk bytes that the overlay itself holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayExtent {
    /// Offset in the virtual disk.
    pub start: u64,
    pub length: u64,
    /// Where those bytes are in the overlay file; `None` when the overlay
    /// records them as zeros.
    pub file_offset: Option<u64>,
}

/// The extents `overlay`'s own layer holds (everything written since it was
/// created), with where each one's bytes are in the overlay file, so a
/// caller can read them without a qcow2 parser. Unaligned, as QEMU reports
/// them. The VM using it must be paused or stopped. The overlay's metadata
/// was written by a VMM that served a guest: `confinement` runs `qemu-img`
/// in a jail that sees nothing but the overlay (read-only).
pub fn overlay_extents(
    overlay: &Path,
    confinement: Option<&Confinement>,
) -> Result<Vec<OverlayExtent>> {
    Ok(map_overlay(overlay, confinement)?
        .into_iter()
        .filter(MapEntry::written)
        .map(|e| OverlayExtent {
            start: e.start,
            length: e.length,
            file_offset: if e.zero { None } else { e.offset },
        })
        .collect())
}

/// `qemu-img map` of the overlay's own layer: its backing is given as none
/// (the header's backing name is never followed), optionally in a jail.
fn map_overlay(overlay: &Path, confinement: Option<&Confinement>) -> Result<Vec<MapEntry>> {
    let spec = |file: &Path| {
        serde_json::json!({
            "driver": "qcow2",
            "file": {"driver": "file", "filename": file.to_string_lossy()},
            "backing": null,
        })
        .to_string()
    };
    let mut cmd = match confinement {
        None => {
            let mut cmd = QEMU_IMG.command()?;
            cmd.arg("map")
                .arg("--output=json")
                .arg("--force-share")
                .arg(format!("json:{}", spec(overlay)));
            cmd
        }
        Some(c) => {
            let inside = Path::new("/disk.qcow2");
            let mut plan = c.plan().bind(overlay, inside, false);
            let program = plan.executable(&QEMU_IMG.path()?);
            let jail = plan
                .prepare()
                .map_err(Error::io("prepare a jail for", overlay))?;
            let mut cmd = crate::host::Tool::command_of(&program);
            cmd.env_remove("DEBIAN_FRONTEND")
                .arg("map")
                .arg("--output=json")
                .arg("--force-share")
                .arg(format!("json:{}", spec(inside)));
            // SAFETY: `enter` makes system calls only, on data prepared
            // above, in the forked child before exec.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || jail.enter());
            }
            cmd
        }
    };
    let json = QEMU_IMG.output(&mut cmd)?;
    serde_json::from_str(&json).map_err(|e| Error::ToolOutput {
        tool: "qemu-img map".into(),
        reason: e.to_string(),
    })
}

/// The byte ranges of `overlay` written since it was created (data in its
/// top layer, including blocks written as zeroes), widened to whole 4 KiB
/// blocks, sorted and merged. The VM using it must be paused or stopped:
/// this reads the qcow2 metadata while another process may hold it.
pub fn written_blocks(
    overlay: &Path,
    confinement: Option<&Confinement>,
) -> Result<Vec<Range<u64>>> {
    Ok(top_layer_blocks(&map_overlay(overlay, confinement)?))
}

fn top_layer_blocks(entries: &[MapEntry]) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = entries
        .iter()
        .filter(|e| e.written())
        .map(|e| {
            let start = e.start / BLOCK_SIZE * BLOCK_SIZE;
            let end = (e.start + e.length).next_multiple_of(BLOCK_SIZE);
            start..end
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn entry(start: u64, length: u64, depth: u32) -> MapEntry {
        MapEntry {
            start,
            length,
            depth,
            present: true,
            zero: false,
            offset: None,
        }
    }

    #[test]
    fn top_layer_extents_become_merged_4k_ranges() {
        let entries = [
            entry(0, 4096, 1),
            entry(4096, 4096, 0),
            entry(8192, 4096, 0),
            entry(12288, 100, 1),
            entry(20000, 500, 0),
            entry(1 << 20, 0, 0),
        ];
        assert_eq!(top_layer_blocks(&entries), [4096..12288, 16384..24576]);
    }

    fn have_qemu_img() -> bool {
        QEMU_IMG.path().is_ok()
    }

    #[test]
    fn overlays_chain_over_overlays_and_the_chain_reads_back() {
        ember_testkit::require!(
            have_qemu_img(),
            "qemu-img not found: apt-get install qemu-utils"
        );
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let f = File::create(&base).unwrap();
        f.set_len(4 << 20).unwrap();
        drop(f);
        let mid = dir.path().join("mid.qcow2");
        qcow2_overlay(&base, DiskFormat::Raw, 4 << 20, &mid).unwrap();
        let top = dir.path().join("top.qcow2");
        qcow2_overlay(&mid, DiskFormat::Qcow2, 4 << 20, &top).unwrap();
        // A write to the middle layer shows through the top one.
        let io = |file: &Path, cmd: &str| {
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd])
                .arg(file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        io(&mid, "write -P 0x5a 8192 4096");
        let out = io(&top, "read -P 0x5a 8192 4096");
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert_eq!(written_blocks(&top, None).unwrap(), []);
    }

    #[test]
    fn overlay_reports_exactly_the_blocks_written() {
        ember_testkit::require!(
            have_qemu_img(),
            "qemu-img not found: apt-get install qemu-utils"
        );
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let f = File::create(&base).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(b"base data", 1 << 20).unwrap();
        drop(f);
        let overlay = dir.path().join("disk.qcow2");
        qcow2_overlay(&base, DiskFormat::Raw, 16 << 20, &overlay).unwrap();
        assert_eq!(written_blocks(&overlay, None).unwrap(), []);
        assert!(
            qcow2_overlay(&base, DiskFormat::Raw, 16 << 20, &overlay).is_err(),
            "an existing overlay is never replaced"
        );

        // Write through QEMU's own block layer, as a guest would.
        let out = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 4096 4096",
                "-c",
                "write -P 1 2097152 12288",
                "-c",
                "write -z 8388608 4096",
            ])
            .arg(&overlay)
            .output();
        let Ok(out) = out else {
            ember_testkit::report_skip(
                module_path!(),
                "qemu-io not found: apt-get install qemu-utils",
            );
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            written_blocks(&overlay, None).unwrap(),
            [
                4096..8192,
                2097152..2097152 + 12288,
                8388608..8388608 + 4096
            ]
        );
        assert_eq!(
            fs::read(&base).unwrap()[4096..8192],
            [0u8; 4096],
            "the base is untouched"
        );

        // Each extent's bytes are where `overlay_extents` says they are.
        let extents = overlay_extents(&overlay, None).unwrap();
        let file = File::open(&overlay).unwrap();
        let mut seen = Vec::new();
        for e in &extents {
            let mut buf = vec![0u8; e.length as usize];
            if let Some(off) = e.file_offset {
                file.read_exact_at(&mut buf, off).unwrap();
            }
            seen.push((
                e.start,
                e.length,
                buf.iter().all(|&b| b == 0),
                buf.first().copied(),
            ));
        }
        assert_eq!(
            seen,
            [
                (4096, 4096, false, Some(0xab)),
                (2097152, 12288, false, Some(1)),
                (8388608, 4096, true, Some(0)),
            ]
        );
    }

    /// The escape this module exists to prevent: a guest writes a qcow2
    /// header naming a host file over the first bytes of its disk; the disk
    /// is materialised as a raw file and a new overlay is stacked on it. The
    /// overlay must read the guest's own bytes, never the host file's, and
    /// the chain must end at the raw file without reading it.
    #[test]
    fn a_raw_base_holding_a_qcow2_header_is_read_as_its_bytes() {
        ember_testkit::require!(
            have_qemu_img(),
            "qemu-img not found: apt-get install qemu-utils"
        );
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("host-secret");
        fs::write(&secret, vec![b'S'; 1 << 20]).unwrap();
        // The "guest disk": a qcow2 image backed by the secret, as bytes.
        let base = dir.path().join("guest.raw");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(&base)
            .arg("1M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let guest_bytes = fs::read(&base).unwrap();
        File::options()
            .write(true)
            .open(&base)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();

        let overlay = dir.path().join("disk.qcow2");
        qcow2_overlay(&base, DiskFormat::Raw, 4 << 20, &overlay).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["dd", "-f", "qcow2", "-O", "raw", "bs=4096", "count=1"])
            .arg(format!("if={}", overlay.display()))
            .arg(format!("of={}", dir.path().join("first.blk").display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let first = fs::read(dir.path().join("first.blk")).unwrap();
        let n = guest_bytes.len().min(4096);
        assert_eq!(first[..n], guest_bytes[..n], "the guest's own bytes");
        assert!(
            !first.windows(64).any(|w| w.iter().all(|&b| b == b'S')),
            "the host file's bytes showed through the guest's disk"
        );
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2", "--backing-chain"])
            .arg(&overlay)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            !info.contains("host-secret"),
            "QEMU followed the guest's header: {info}"
        );
    }

    /// `qemu-img map` in a jail that sees only the overlay reports what it
    /// reports unconfined, and runs as the jail's uid.
    #[test]
    fn a_confined_map_sees_only_the_overlay_and_agrees() {
        ember_testkit::require!(
            have_qemu_img() && ember_testkit::is_root(),
            "needs qemu-img (apt-get install qemu-utils) and root"
        );
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        File::create(&base).unwrap().set_len(8 << 20).unwrap();
        let overlay = dir.path().join("disk.qcow2");
        qcow2_overlay(&base, DiskFormat::Raw, 8 << 20, &overlay).unwrap();
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 7 65536 8192"])
            .arg(&overlay)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // The overlay is the VM's: its uid may read it, nobody else.
        let identity = ember_jail::Identity {
            uid: 920_000_000,
            gid: 920_000_000,
        };
        ember_jail::jail::give(&overlay, identity).unwrap();
        let mountpoint = dir.path().join("jail");
        fs::create_dir(&mountpoint).unwrap();
        let confinement = Confinement {
            identity,
            jail_mountpoint: mountpoint,
            cgroup_procs: Vec::new(),
        };
        assert_eq!(
            written_blocks(&overlay, Some(&confinement)).unwrap(),
            written_blocks(&overlay, None).unwrap()
        );
        assert_eq!(written_blocks(&overlay, None).unwrap(), vec![65536..73728]);
    }

    #[test]
    fn raw_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 4 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let dst = dir.path().join("dst.raw");
        let kind = raw_copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        if kind == CopyKind::Sparse {
            use std::os::unix::fs::MetadataExt;
            let blocks = fs::metadata(&dst).unwrap().blocks() * 512;
            assert!(
                blocks < 1 << 20,
                "sparse copy allocated {blocks} bytes for 12 KiB of data"
            );
        }
        assert!(
            raw_copy(&src, &dst).is_err(),
            "an existing destination is never overwritten"
        );
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    }

    /// Reflink needs a filesystem that shares extents: a loop-mounted XFS.
    #[test]
    fn raw_copy_reflinks_on_xfs() {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root to loop-mount a filesystem"
        );
        let mkfs = ["/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        ember_testkit::require!(
            mkfs.is_some(),
            "mkfs.xfs not found: apt-get install xfsprogs"
        );
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        File::create(&img).unwrap().set_len(512 << 20).unwrap();
        let ok = std::process::Command::new(mkfs.unwrap())
            .args(["-q", "-m", "reflink=1"])
            .arg(&img)
            .status()
            .unwrap();
        assert!(ok.success());
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(ok.success());
        let result = std::panic::catch_unwind(|| {
            let src = mnt.join("src.raw");
            let f = File::create(&src).unwrap();
            f.write_all_at(&[3u8; 1 << 20], 0).unwrap();
            f.set_len(32 << 20).unwrap();
            drop(f);
            let dst = mnt.join("dst.raw");
            assert_eq!(raw_copy(&src, &dst).unwrap(), CopyKind::Reflink);
            assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        });
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        result.unwrap();
    }
}
