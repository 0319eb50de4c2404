//! The userfaultfd kernel interface: the ioctls, the message format and a thin
//! owned-fd wrapper. It knows nothing about builds, regions or policy; the
//! page server and the VMM-side stand-in both sit on top of it.
//!
//! Constants and layouts are those of `include/uapi/linux/userfaultfd.h`;
//! they are stable kernel ABI, so they are written out here rather than
//! generated.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub const UFFD_API: u64 = 0xaa;

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `ioctl` request numbers: `_IOWR(0xAA, nr, struct)` / `_IOR(0xAA, nr, struct)`.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
/// `/dev/userfaultfd`'s one ioctl: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa << 8;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`: 32 bytes, an event byte and a union of arguments.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(size_of::<RawMsg>() == 32);

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread of the registering process touched `address` and waits.
    PageFault { address: u64, flags: u64 },
    /// `madvise(MADV_DONTNEED)` (balloon, free page reporting) dropped
    /// `[start, end)`: its old contents are gone for good.
    Remove { start: u64, end: u64 },
    /// An event Ember never asks for (fork, remap, unmap); carried so the
    /// caller can log it instead of misreading it.
    Other { event: u8 },
}

impl Event {
    fn from_raw(m: &RawMsg) -> Event {
        match m.event {
            UFFD_EVENT_PAGEFAULT => Event::PageFault {
                flags: m.arg[0],
                address: m.arg[1],
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: m.arg[0],
                end: m.arg[1],
            },
            other => Event::Other { event: other },
        }
    }
}

/// What a `UFFDIO_COPY` achieved. The kernel reports partial progress in
/// the struct even when the ioctl fails, and the page server needs both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The whole range is now mapped.
    Done,
    /// Only the first `bytes` were copied (the next page was already there,
    /// or the copy was interrupted); the caller continues after them.
    Partial { bytes: u64 },
    /// The first page of the range is already mapped (`EEXIST`).
    Exists,
    /// An event that changes the address space is queued (`EAGAIN` with
    /// nothing copied): read events, then retry.
    MmapChanging,
    /// The registering process's address space is gone (`ESRCH`).
    ProcessGone,
    /// The destination is no longer a registered mapping (`ENOENT`).
    Unmapped,
}

/// An owned userfaultfd.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// A new, uninitialised userfaultfd for the calling process, non-blocking
    /// and close-on-exec (as Firecracker creates it). Tries `/dev/userfaultfd`
    /// first (kernel ≥ 6.1), then the `userfaultfd(2)` syscall.
    pub fn create() -> io::Result<Userfaultfd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if let Ok(dev) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns
            // a new fd or -1; `dev` is a valid open fd.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if fd >= 0 {
                // SAFETY: the ioctl returned a fresh fd that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(Userfaultfd { fd });
            }
        }
        // SAFETY: userfaultfd(2) takes flags by value and returns an fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Userfaultfd { fd })
    }

    /// Wrap a userfaultfd received from another process.
    pub fn from_owned(fd: OwnedFd) -> Userfaultfd {
        Userfaultfd { fd }
    }

    /// `UFFDIO_API`: request `features`; returns the features the kernel
    /// supports. Done once, by the process that created the fd.
    pub fn api(&self, features: u64) -> io::Result<u64> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_API, &mut api)?;
        Ok(api.features)
    }

    /// `UFFDIO_REGISTER` `[start, start+len)` with `mode`. The range lives in
    /// the address space of the process that *created* the fd, whoever calls
    /// this; so the page server can add write-protect tracking to memory the
    /// VMM registered for missing faults only.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
    }

    /// `UFFDIO_COPY` `len` bytes from `src` (in the caller's address space) to
    /// `dst`, waking the threads that wait on the range.
    pub fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        write_protect: bool,
    ) -> io::Result<CopyOutcome> {
        let mut copy = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: if write_protect {
                UFFDIO_COPY_MODE_WP
            } else {
                0
            },
            copy: 0,
        };
        match self.ioctl(UFFDIO_COPY, &mut copy) {
            Ok(()) => Ok(CopyOutcome::Done),
            Err(e) => Self::classify(e, copy.copy),
        }
    }

    /// `UFFDIO_ZEROPAGE`: map the shared zero page over `[dst, dst+len)`.
    /// Not available for hugetlbfs; copy from a zero buffer there.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<CopyOutcome> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        match self.ioctl(UFFDIO_ZEROPAGE, &mut z) {
            Ok(()) => Ok(CopyOutcome::Done),
            Err(e) => Self::classify(e, z.zeropage),
        }
    }

    fn classify(err: io::Error, progress: i64) -> io::Result<CopyOutcome> {
        match err.raw_os_error() {
            Some(libc::EAGAIN) if progress > 0 => Ok(CopyOutcome::Partial {
                bytes: progress as u64,
            }),
            Some(libc::EAGAIN) => Ok(CopyOutcome::MmapChanging),
            Some(libc::EEXIST) => Ok(CopyOutcome::Exists),
            Some(libc::ESRCH) => Ok(CopyOutcome::ProcessGone),
            Some(libc::ENOENT) => Ok(CopyOutcome::Unmapped),
            _ => Err(err),
        }
    }

    /// `UFFDIO_WRITEPROTECT`: set (`protect`) or clear write protection on
    /// `[start, start+len)`; clearing wakes the writers that wait on it.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<CopyOutcome> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        match self.ioctl(UFFDIO_WRITEPROTECT, &mut wp) {
            Ok(()) => Ok(CopyOutcome::Done),
            Err(e) => Self::classify(e, 0),
        }
    }

    /// `UFFDIO_WAKE`: wake threads waiting on `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, &mut range)
    }

    /// Read queued events into `out` (cleared first) without blocking;
    /// returns how many were read (0 when none are queued).
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> io::Result<usize> {
        out.clear();
        let mut buf = [RawMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: [0; 3],
        }; 16];
        let max = max.clamp(1, buf.len());
        // SAFETY: `buf` is valid for `max` messages; read(2) writes at most
        // that many bytes into it.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                max * size_of::<RawMsg>(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(err),
            };
        }
        let count = n as usize / size_of::<RawMsg>();
        out.extend(buf[..count].iter().map(Event::from_raw));
        Ok(count)
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the struct the request number encodes,
        // valid for reads and writes for the duration of the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/userfaultfd.h> on x86-64.
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }
}
