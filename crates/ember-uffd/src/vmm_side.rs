//! Firecracker's half of a userfaultfd restore, done the way Firecracker
//! does it (`vmm/src/persist.rs`, `guest_memory_from_uffd`): map each guest
//! memory region anonymous and private with `MAP_NORESERVE` (plus
//! `MAP_HUGETLB | MAP_HUGE_2MB` for 2 MiB pages), create a non-blocking
//! userfaultfd asking for `UFFD_FEATURE_EVENT_REMOVE` only, register every
//! region for missing faults, connect to the page server and send the
//! region list and the fd. Tests and the benchmark use it to stand in for
//! Firecracker, and a fake VMM can too; it is not used in production.

use std::io;
use std::path::Path;

use crate::handshake::{self, GuestRegion};
use crate::uffd::{self, Userfaultfd};

/// Guest memory registered with a userfaultfd, as a VMM holds it.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<MappedRegion>,
    uffd: Userfaultfd,
}

#[derive(Debug)]
struct MappedRegion {
    ptr: *mut u8,
    size: u64,
    offset: u64,
    page_size: u64,
}

// SAFETY: the mappings are owned by the value and unmapped in Drop; the
// accessors below only hand out raw addresses and volatile accesses.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Map regions of `sizes` bytes (laid out back to back in the image, as
    /// Firecracker's `offset`s are) with `page_size` 4096 or 2 MiB, and
    /// register them with a fresh userfaultfd.
    pub fn new(sizes: &[u64], page_size: u64) -> io::Result<GuestMemory> {
        let huge = match page_size {
            4096 => 0,
            0x20_0000 => libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "page size must be 4096 or 2 MiB",
                ));
            }
        };
        let uffd = Userfaultfd::create()?;
        uffd.api(uffd::UFFD_FEATURE_EVENT_REMOVE)?;
        let mut regions = Vec::new();
        let mut offset = 0;
        for &size in sizes {
            // SAFETY: a fresh anonymous private mapping at a kernel-chosen address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | huge,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let region = MappedRegion {
                ptr: p.cast(),
                size,
                offset,
                page_size,
            };
            uffd.register(p as u64, size, uffd::UFFDIO_REGISTER_MODE_MISSING)?;
            regions.push(region);
            offset += size;
        }
        Ok(GuestMemory { regions, uffd })
    }

    /// The handshake's region list.
    pub fn regions(&self) -> Vec<GuestRegion> {
        self.regions
            .iter()
            .map(|r| GuestRegion {
                base_host_virt_addr: r.ptr as u64,
                size: r.size,
                offset: r.offset,
                page_size: r.page_size,
            })
            .collect()
    }

    /// Connect to the page server and send the handshake.
    pub fn send_handshake(&self, socket: &Path) -> io::Result<()> {
        handshake::send(socket, &self.regions(), &self.uffd)
    }

    /// Total bytes of guest memory.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The host address of image offset `offset`.
    pub fn addr_of(&self, offset: u64) -> *mut u8 {
        let r = self
            .regions
            .iter()
            .find(|r| offset >= r.offset && offset < r.offset + r.size)
            .expect("offset inside guest memory");
        r.ptr.wrapping_add((offset - r.offset) as usize)
    }

    /// Read the byte at image offset `offset` (faulting it in if missing).
    pub fn read_u8(&self, offset: u64) -> u8 {
        // SAFETY: `addr_of` points inside a live read/write mapping; a
        // volatile read keeps the access (and its fault) from being elided.
        unsafe { self.addr_of(offset).read_volatile() }
    }

    /// Write the byte at image offset `offset`.
    pub fn write_u8(&self, offset: u64, value: u8) {
        // SAFETY: as for `read_u8`; the mapping is writable.
        unsafe { self.addr_of(offset).write_volatile(value) }
    }

    /// Copy `buf.len()` bytes at image offset `offset` (within one region) out.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let src = self.addr_of(offset);
        let end = offset + buf.len() as u64;
        assert!(
            self.regions
                .iter()
                .any(|r| offset >= r.offset && end <= r.offset + r.size),
            "read must stay inside one region"
        );
        // SAFETY: the range lies inside one live mapping (asserted above)
        // and `buf` is a distinct allocation.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
    }

    /// Is the page at image offset `offset` resident (`mincore`)?
    pub fn is_resident(&self, offset: u64) -> bool {
        let r = self
            .regions
            .iter()
            .find(|r| offset >= r.offset && offset < r.offset + r.size)
            .expect("offset inside guest memory");
        let page = (offset - r.offset) / r.page_size * r.page_size;
        let mut vec = [0u8; 1];
        // SAFETY: mincore on one page of a live mapping, one result byte.
        let rc = unsafe {
            libc::mincore(
                r.ptr.wrapping_add(page as usize).cast(),
                4096,
                vec.as_mut_ptr(),
            )
        };
        rc == 0 && vec[0] & 1 != 0
    }

    /// Give `[offset, offset+len)` back as a balloon does:
    /// `madvise(MADV_DONTNEED)`, which queues a REMOVE event.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: the range lies inside a live mapping (addr_of checks the
        // start; callers keep it within one region).
        let rc = unsafe {
            libc::madvise(
                self.addr_of(offset).cast(),
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: each mapping was made in `new` with this size and is
            // unmapped once.
            unsafe { libc::munmap(r.ptr.cast(), r.size as usize) };
        }
    }
}

/// Huge pages taken from the kernel's pool for the lifetime of the value:
/// if fewer than wanted are free, `nr_hugepages` is raised by the shortfall
/// (root only) and lowered again on drop.
#[derive(Debug)]
pub struct HugePageReservation {
    added: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePageReservation {
    /// Make sure `pages` 2 MiB pages are free. `Err` says why they cannot be.
    pub fn reserve(pages: u64) -> Result<HugePageReservation, String> {
        let free = free_huge_pages().ok_or("cannot read HugePages_Free from /proc/meminfo")?;
        if free >= pages {
            return Ok(HugePageReservation { added: 0 });
        }
        let want = pages - free;
        let total: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .map_err(|e| format!("cannot read {NR_HUGEPAGES}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("bad {NR_HUGEPAGES}: {e}"))?;
        std::fs::write(NR_HUGEPAGES, (total + want).to_string())
            .map_err(|e| format!("cannot raise {NR_HUGEPAGES} (needs root): {e}"))?;
        let reservation = HugePageReservation { added: want };
        let now = free_huge_pages().unwrap_or(0);
        if now < pages {
            return Err(format!(
                "asked the kernel for {want} more huge pages but only {now} of {pages} are free (memory too fragmented?)"
            ));
        }
        Ok(reservation)
    }
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        if self.added == 0 {
            return;
        }
        if let Ok(total) = std::fs::read_to_string(NR_HUGEPAGES)
            && let Ok(total) = total.trim().parse::<u64>()
        {
            let _ = std::fs::write(NR_HUGEPAGES, total.saturating_sub(self.added).to_string());
        }
    }
}

fn free_huge_pages() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
}
