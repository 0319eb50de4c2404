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
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::Whence;
use serde::Deserialize;

use crate::host::QEMU_IMG;
use crate::{Error, Result};
pub use ember_types::DiskFormat;

/// The granularity of [`written_blocks`].
pub const BLOCK_SIZE: u64 = 4096;

/// Create `overlay`, a qcow2 disk backed by `base`, which is read as
/// `base_format`: a raw image, or another qcow2 overlay of Ember's, making a
/// chain. `base` is recorded by absolute path, with its format, and must not
/// change while the overlay exists.
///
/// The format is the caller's to state, never read from `base`: a raw base
/// holds a guest's disk, and a guest that wrote a qcow2 header at its start
/// would otherwise name any host file as the overlay's backing file.
///
/// The overlay uses 128 KiB clusters with extended L2 entries: 32
/// sub-clusters of 4 KiB each, so a 4 KiB guest write allocates (and a diff
/// copies) 4 KiB, not a whole cluster.
pub fn qcow2_overlay(base: &Path, base_format: DiskFormat, overlay: &Path) -> Result<()> {
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
        "-f",
        "qcow2",
        "-F",
        base_format.as_str(),
        "-b",
    ])
    .arg(&base)
    .args(["-o", "cluster_size=128k,extended_l2=on"])
    .arg(overlay);
    QEMU_IMG.output(&mut cmd)?;
    Ok(())
}

/// What a qcow2 image's header says it is backed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// The qcow2 header extension naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// How much of a header [`qcow2_backing`] reads: the header, its
/// extensions and the backing name all sit in the first cluster, and
/// Ember's overlays use 128 KiB clusters.
const HEADER_READ: usize = 128 << 10;

/// The backing file `path` names, with the format recorded for it; `None`
/// when it has none. `path` must be a qcow2 image Ember created (a sandbox's
/// overlay): its metadata is QEMU's, not the guest's. Never call this on a
/// raw image, whose bytes are the guest's.
pub fn qcow2_backing(path: &Path) -> Result<Option<Backing>> {
    use std::os::unix::fs::FileExt;
    let bad = |reason: String| Error::ToolOutput {
        tool: "qcow2 header".into(),
        reason: format!("{}: {reason}", path.display()),
    };
    let f = File::open(path).map_err(Error::io("open", path))?;
    let mut hdr = vec![0u8; HEADER_READ];
    let mut got = 0;
    while got < hdr.len() {
        match f.read_at(&mut hdr[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path)(e)),
        }
    }
    hdr.truncate(got);
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(hdr.get(at..at + 4)?.try_into().ok()?))
    };
    let be64 = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(hdr.get(at..at + 8)?.try_into().ok()?))
    };
    if hdr.get(..4) != Some(b"QFI\xfb".as_slice()) {
        return Err(bad("not a qcow2 image".into()));
    }
    let version = be32(4).ok_or_else(|| bad("header cut short".into()))?;
    let name_offset = be64(8).ok_or_else(|| bad("header cut short".into()))?;
    let name_len = be32(16).ok_or_else(|| bad("header cut short".into()))? as usize;
    if name_offset == 0 || name_len == 0 {
        return Ok(None);
    }
    let name = usize::try_from(name_offset)
        .ok()
        .and_then(|at| hdr.get(at..at.checked_add(name_len)?))
        .ok_or_else(|| {
            bad(format!(
                "backing file name of {name_len} bytes out of bounds"
            ))
        })?;
    let name =
        std::str::from_utf8(name).map_err(|_| bad("backing file name is not UTF-8".into()))?;

    // Header extensions follow the header (72 bytes in version 2; version 3
    // states its length), each `type, length, data` padded to 8 bytes.
    let mut at = match version {
        2 => 72,
        3 => be32(100).ok_or_else(|| bad("header cut short".into()))? as usize,
        v => return Err(bad(format!("qcow2 version {v}"))),
    };
    let mut format = None;
    loop {
        let (Some(kind), Some(len)) = (be32(at), be32(at + 4)) else {
            return Err(bad("header extensions run past the first cluster".into()));
        };
        let len = len as usize;
        if kind == 0 {
            break;
        }
        let data = hdr
            .get(at + 8..at + 8 + len)
            .ok_or_else(|| bad("header extension out of bounds".into()))?;
        if kind == EXT_BACKING_FORMAT {
            format = Some(match data {
                b"raw" => DiskFormat::Raw,
                b"qcow2" => DiskFormat::Qcow2,
                other => {
                    return Err(bad(format!(
                        "backing format {:?}",
                        String::from_utf8_lossy(other)
                    )));
                }
            });
        }
        at += 8 + len.next_multiple_of(8);
    }
    let format = format.ok_or_else(|| {
        bad("no backing format recorded (Ember states every format and never probes one)".into())
    })?;
    Ok(Some(Backing {
        path: PathBuf::from(name),
        format,
    }))
}

/// The qcow2 overlay `path` and the files under it, top first. The chain
/// is followed only through backings recorded as qcow2 and ends at the
/// first raw one, which is never read.
pub fn backing_chain(path: &Path) -> Result<Vec<PathBuf>> {
    let mut chain = vec![path.to_path_buf()];
    let mut top_is_qcow2 = true;
    while top_is_qcow2 {
        let Some(next) = qcow2_backing(chain.last().expect("non-empty"))? else {
            break;
        };
        if chain.len() > 64 || chain.contains(&next.path) {
            return Err(Error::ToolOutput {
                tool: "qcow2 header".into(),
                reason: format!("{}: backing chain loops or is too long", path.display()),
            });
        }
        top_is_qcow2 = next.format == DiskFormat::Qcow2;
        chain.push(next.path);
    }
    Ok(chain)
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
    let result = result
        .and_then(|kind| target.sync_all().map(|()| kind))
        .map_err(Error::io("copy to", dst));
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
    /// 0: allocated in the overlay itself; 1+: in a backing file.
    depth: u32,
    /// Reads as zeros.
    #[serde(default)]
    zero: bool,
    /// Where the data is in the file of layer `depth` (absent for zeros).
    #[serde(default)]
    offset: Option<u64>,
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
/// them. The VM using it must be paused or stopped.
pub fn overlay_extents(overlay: &Path) -> Result<Vec<OverlayExtent>> {
    Ok(map_overlay(overlay)?
        .into_iter()
        .filter(|e| e.depth == 0 && e.length > 0)
        .map(|e| OverlayExtent {
            start: e.start,
            length: e.length,
            file_offset: if e.zero { None } else { e.offset },
        })
        .collect())
}

fn map_overlay(overlay: &Path) -> Result<Vec<MapEntry>> {
    let mut cmd = QEMU_IMG.command()?;
    cmd.args(["map", "--output=json", "--force-share", "-f", "qcow2"])
        .arg(overlay);
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
pub fn written_blocks(overlay: &Path) -> Result<Vec<Range<u64>>> {
    Ok(top_layer_blocks(&map_overlay(overlay)?))
}

fn top_layer_blocks(entries: &[MapEntry]) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = entries
        .iter()
        .filter(|e| e.depth == 0 && e.length > 0)
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
        qcow2_overlay(&base, DiskFormat::Raw, &mid).unwrap();
        let top = dir.path().join("top.qcow2");
        qcow2_overlay(&mid, DiskFormat::Qcow2, &top).unwrap();
        assert_eq!(
            qcow2_backing(&top).unwrap(),
            Some(Backing {
                path: mid.canonicalize().unwrap(),
                format: DiskFormat::Qcow2
            })
        );
        assert_eq!(
            qcow2_backing(&mid).unwrap().map(|b| b.format),
            Some(DiskFormat::Raw)
        );
        let chain = backing_chain(&top).unwrap();
        assert_eq!(
            chain,
            [
                top.clone(),
                mid.canonicalize().unwrap(),
                base.canonicalize().unwrap()
            ]
        );
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
        assert_eq!(written_blocks(&top).unwrap(), []);
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
        qcow2_overlay(&base, DiskFormat::Raw, &overlay).unwrap();
        assert_eq!(written_blocks(&overlay).unwrap(), []);
        assert!(
            qcow2_overlay(&base, DiskFormat::Raw, &overlay).is_err(),
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
            written_blocks(&overlay).unwrap(),
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
        let extents = overlay_extents(&overlay).unwrap();
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
        qcow2_overlay(&base, DiskFormat::Raw, &overlay).unwrap();
        assert_eq!(
            backing_chain(&overlay).unwrap(),
            [overlay.clone(), base.canonicalize().unwrap()],
            "the chain ends at the raw base"
        );
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

    #[test]
    fn headers_without_a_recorded_backing_format_are_refused() {
        ember_testkit::require!(
            have_qemu_img(),
            "qemu-img not found: apt-get install qemu-utils"
        );
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        File::create(&base).unwrap().set_len(1 << 20).unwrap();
        // qemu-img 7.2 and 10 both refuse a backing without -F at create;
        // write one, then strip the extension's type so it reads as unknown.
        let img = dir.path().join("img.qcow2");
        qcow2_overlay(&base, DiskFormat::Raw, &img).unwrap();
        let mut bytes = fs::read(&img).unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == EXT_BACKING_FORMAT.to_be_bytes())
            .expect("backing format extension");
        bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        fs::write(&img, &bytes).unwrap();
        let err = qcow2_backing(&img).unwrap_err().to_string();
        assert!(err.contains("no backing format recorded"), "{err}");
        assert!(qcow2_backing(&base).is_err(), "a raw file is never parsed");
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
