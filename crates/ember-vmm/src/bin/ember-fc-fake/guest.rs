//! The fake's guest memory: allocated at start, the kernel's ELF segments
//! loaded into it, dumped to snapshot memory files the way Firecracker dumps
//! them, and rebuilt from them on load (mapped private from a file, or
//! served page by page through a real userfaultfd by a page server).
//!
//! Two page sets stand in for KVM's bookkeeping: `dirty` (pages written
//! since the last snapshot or restore; KVM's dirty log when tracking is on)
//! and `touched` (pages ever written; what `mincore` finds when tracking is
//! off, Firecracker's fallback for diff snapshots).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use memmap2::{MmapMut, MmapOptions};

use crate::api::SnapshotType;

pub const PAGE: usize = 4096;
/// The guest word the fake's "vCPU" increments while the VM runs.
pub const TICK_ADDR: usize = 0x1000;
/// The pages the "vCPU" walks through, one per tick (below the kernel).
pub const WALK_ADDR: usize = 0x2000;
pub const WALK_PAGES: usize = 64;
/// Firecracker's lowest address for an ELF kernel (1 MiB).
const HIMEM_START: u64 = 0x10_0000;

#[derive(Debug)]
pub struct Memory {
    map: MmapMut,
    dirty: Vec<bool>,
    touched: Vec<bool>,
    pub track_dirty: bool,
    /// Keeps the userfaultfd (and so the registration) alive.
    _uffd: Option<OwnedFd>,
}

impl Memory {
    pub fn anonymous(size: usize, track_dirty: bool) -> std::io::Result<Self> {
        let map = MmapMut::map_anon(size)?;
        Ok(Self::over(map, track_dirty, None))
    }

    fn over(map: MmapMut, track_dirty: bool, uffd: Option<OwnedFd>) -> Self {
        let pages = map.len() / PAGE;
        Self {
            map,
            dirty: vec![false; pages],
            touched: vec![false; pages],
            track_dirty,
            _uffd: uffd,
        }
    }

    /// Map a snapshot memory file private (copy-on-write), as Firecracker's
    /// `File` backend does.
    pub fn from_file(path: &Path, size: usize, track_dirty: bool) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| {
            format!("Error creating guest memory from file: Failed to load guest memory: {e}")
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < size as u64 {
            return Err("Error creating guest memory from file: Failed to restore guest memory: Total sum of memory regions exceeds largest possible file offset".into());
        }
        // SAFETY: a private mapping: writes go to our copy, never to the file;
        // the test owns the file and does not truncate it while we run.
        let map = unsafe { MmapOptions::new().len(size).map_copy(&file) }
            .map_err(|e| format!("Error creating guest memory from file: {e}"))?;
        Ok(Self::over(map, track_dirty, None))
    }

    /// Anonymous memory whose missing pages a page server fills: create a
    /// userfaultfd, register the memory, and hand both to the server over
    /// its socket, as Firecracker's `Uffd` backend does.
    pub fn from_uffd(socket: &Path, size: usize, track_dirty: bool) -> Result<Self, String> {
        let fail = |what: &str, e: std::io::Error| {
            format!("Error creating guest memory from uffd: {what}: {e}")
        };
        let map = MmapMut::map_anon(size).map_err(|e| fail("mmap", e))?;
        let uffd = uffd::create().map_err(|e| fail("Failed to create userfaultfd", e))?;
        uffd::register(&uffd, map.as_ptr() as u64, size as u64)
            .map_err(|e| fail("Failed to register memory", e))?;
        let stream = UnixStream::connect(socket)
            .map_err(|e| fail("Failed to connect to UDS Unix stream", e))?;
        let mappings = serde_json::json!([{
            "base_host_virt_addr": map.as_ptr() as u64,
            "size": size,
            "offset": 0,
            "page_size": PAGE,
            "page_size_kib": PAGE,
        }])
        .to_string();
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let fds = [uffd.as_raw_fd()];
        let iov = [std::io::IoSlice::new(mappings.as_bytes())];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| fail("Failed to send the mappings", e.into()))?;
        Ok(Self::over(map, track_dirty, Some(uffd)))
    }

    pub fn write(&mut self, addr: usize, bytes: &[u8]) {
        self.map[addr..addr + bytes.len()].copy_from_slice(bytes);
        let first = addr / PAGE;
        let last = (addr + bytes.len().max(1) - 1) / PAGE;
        for page in first..=last {
            self.dirty[page] = true;
            self.touched[page] = true;
        }
    }

    pub fn read_u64(&self, addr: usize) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.map[addr..addr + 8]);
        u64::from_le_bytes(word)
    }

    /// An order-sensitive checksum of all of memory (reading it faults in
    /// every page of a userfaultfd-backed memory).
    pub fn checksum(&self) -> u64 {
        self.map.chunks_exact(8).fold(0u64, |h, w| {
            h.rotate_left(7)
                .wrapping_add(u64::from_le_bytes(w.try_into().expect("8-byte chunk")))
        })
    }

    /// Load an ELF kernel's segments at their physical addresses, as
    /// Firecracker's loader does; returns the entry point.
    pub fn load_elf(&mut self, kernel: &mut File) -> Result<u64, String> {
        let bad = |what: &str| {
            format!(
                "Start microvm error: System configuration error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image: Kernel Loader: {what}"
            )
        };
        let mut header = [0u8; 64];
        kernel
            .seek(SeekFrom::Start(0))
            .map_err(|e| bad(&e.to_string()))?;
        kernel
            .read_exact(&mut header)
            .map_err(|_| bad("Unable to read ELF header"))?;
        if &header[..4] != b"\x7fELF" {
            return Err(bad("Invalid Elf magic number"));
        }
        if header[5] != 1 {
            return Err(bad("Unsupported ELF File byte order"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
        let u64_at =
            |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let entry = u64_at(&header, 24);
        let phoff = u64_at(&header, 32);
        let phentsize = u16_at(54);
        let phnum = u16_at(56);
        if phentsize != 56 {
            return Err(bad("Invalid ELF program header size"));
        }
        if entry < HIMEM_START {
            return Err(bad("Invalid entry address"));
        }
        for i in 0..u64::from(phnum) {
            let mut ph = [0u8; 56];
            kernel
                .seek(SeekFrom::Start(phoff + i * 56))
                .and_then(|_| kernel.read_exact(&mut ph))
                .map_err(|_| bad("Unable to read ELF program header"))?;
            let p_type = u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes"));
            let (offset, paddr, filesz) = (u64_at(&ph, 8), u64_at(&ph, 24), u64_at(&ph, 32));
            if p_type != 1 || filesz == 0 {
                continue;
            }
            let end = paddr.checked_add(filesz).ok_or_else(|| bad("Overflow"))?;
            if end > self.map.len() as u64 {
                return Err(bad("Failed to load kernel image into guest memory"));
            }
            let mut data = vec![0u8; filesz as usize];
            kernel
                .seek(SeekFrom::Start(offset))
                .and_then(|_| kernel.read_exact(&mut data))
                .map_err(|_| bad("Unable to read the kernel image"))?;
            self.write(paddr as usize, &data);
        }
        Ok(entry)
    }

    /// Write guest memory to a snapshot memory file: every page (Full), or
    /// only the dirty ones into a file of full size with holes elsewhere
    /// (Diff). An existing file of the right size is written into (that is
    /// how Firecracker merges a diff into a base), any other is truncated.
    pub fn dump(&mut self, path: &Path, kind: SnapshotType) -> Result<(), String> {
        let fail = |what: &str, e: std::io::Error| {
            format!(
                "Create snapshot error: Cannot perform {what} on the snapshot backing file: {e}"
            )
        };
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| fail("open", e))?;
        let size = self.map.len() as u64;
        if existed && file.metadata().map(|m| m.len()).unwrap_or(0) != size {
            file.set_len(0).map_err(|e| fail("truncate", e))?;
        }
        file.set_len(size).map_err(|e| fail("set_length", e))?;
        match kind {
            SnapshotType::Full => file.write_all(&self.map).map_err(|e| fail("write", e))?,
            SnapshotType::Diff => {
                let pages = if self.track_dirty {
                    &self.dirty
                } else {
                    &self.touched
                };
                for (page, _) in pages.iter().enumerate().filter(|(_, d)| **d) {
                    let at = page * PAGE;
                    file.seek(SeekFrom::Start(at as u64))
                        .and_then(|_| file.write_all(&self.map[at..at + PAGE]))
                        .map_err(|e| fail("write", e))?;
                }
            }
        }
        self.dirty.iter_mut().for_each(|d| *d = false);
        file.sync_all().map_err(|e| fail("sync_all", e))
    }
}

/// The userfaultfd calls the `Uffd` backend needs (the page server does the rest).
mod uffd {
    use super::*;

    const UFFD_API: u64 = 0xaa;
    const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
    const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
    const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

    #[repr(C)]
    struct UffdioApi {
        api: u64,
        features: u64,
        ioctls: u64,
    }

    #[repr(C)]
    struct UffdioRegister {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }

    pub fn create() -> std::io::Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd takes flags and returns a new descriptor or -1.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
        if fd < 0 {
            // Kernels that restrict the syscall still allow /dev/userfaultfd.
            let dev = File::open("/dev/userfaultfd")?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns
            // a new descriptor or -1.
            fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one uffdio_api.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }

    pub fn register(fd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
        let mut reg = UffdioRegister {
            start,
            len,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one uffdio_register;
        // the range is a live anonymous mapping we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_extents(path: &Path) -> Vec<(u64, u64)> {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len();
        let mut out = Vec::new();
        let mut at = 0i64;
        while (at as u64) < len {
            // SAFETY: lseek on an open descriptor.
            let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
            out.push((data as u64, (hole - data) as u64));
            at = hole;
        }
        out
    }

    #[test]
    fn diff_dump_holds_only_pages_written_since_the_last_dump() {
        let dir = tempfile::tempdir().unwrap();
        let mut mem = Memory::anonymous(64 * PAGE, true).unwrap();
        mem.write(5 * PAGE + 10, b"hello");
        mem.dump(&dir.path().join("full"), SnapshotType::Full)
            .unwrap();
        mem.write(TICK_ADDR, &7u64.to_le_bytes());
        mem.write(9 * PAGE - 2, &[1, 2, 3, 4]);
        let diff = dir.path().join("diff");
        mem.dump(&diff, SnapshotType::Diff).unwrap();
        assert_eq!(std::fs::metadata(&diff).unwrap().len(), 64 * PAGE as u64);
        assert_eq!(
            data_extents(&diff),
            vec![
                (PAGE as u64, PAGE as u64),
                (8 * PAGE as u64, 2 * PAGE as u64)
            ]
        );
    }

    #[test]
    fn untracked_diff_holds_every_page_ever_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut mem = Memory::anonymous(16 * PAGE, false).unwrap();
        mem.write(2 * PAGE, b"x");
        mem.dump(&dir.path().join("full"), SnapshotType::Full)
            .unwrap();
        mem.write(4 * PAGE, b"y");
        let diff = dir.path().join("diff");
        mem.dump(&diff, SnapshotType::Diff).unwrap();
        assert_eq!(
            data_extents(&diff),
            vec![
                (2 * PAGE as u64, PAGE as u64),
                (4 * PAGE as u64, PAGE as u64)
            ]
        );
    }

    #[test]
    fn file_backed_memory_reads_the_dump_and_keeps_writes_private() {
        let dir = tempfile::tempdir().unwrap();
        let mut mem = Memory::anonymous(8 * PAGE, true).unwrap();
        mem.write(3 * PAGE, b"pattern");
        let path = dir.path().join("mem");
        mem.dump(&path, SnapshotType::Full).unwrap();
        let mut restored = Memory::from_file(&path, 8 * PAGE, true).unwrap();
        assert_eq!(restored.checksum(), mem.checksum());
        restored.write(0, b"private");
        assert_eq!(&std::fs::read(&path).unwrap()[..7], &[0u8; 7]);
        assert!(Memory::from_file(&path, 16 * PAGE, true).is_err());
    }
}
