//! A minimal userfaultfd page server for restore tests: it speaks
//! Firecracker's handshake (a JSON list of memory regions plus the
//! userfaultfd, sent over a Unix socket) and answers every fault by copying
//! the page from a snapshot memory file. The real page server lives in
//! `ember-uffd`; this one only has to be correct.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[derive(Debug, serde::Deserialize)]
struct Region {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
}

#[derive(Debug)]
pub struct PageServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Listen on `socket` and serve pages of `memory_file` to the first VMM
    /// that connects.
    pub fn start(socket: &Path, memory_file: &Path) -> Self {
        let listener = UnixListener::bind(socket).expect("bind page server socket");
        listener.set_nonblocking(true).unwrap();
        let file = std::fs::File::open(memory_file).expect("open snapshot memory");
        // SAFETY: a read-only private mapping of a file the test owns and
        // does not change while the server runs.
        let memory = unsafe { memmap2::Mmap::map(&file) }.expect("map snapshot memory");
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, faults) = (stop.clone(), faults.clone());
            std::thread::spawn(move || serve(listener, memory, &stop, &faults))
        };
        Self {
            socket: socket.to_owned(),
            stop,
            faults,
            thread: Some(thread),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Page faults served so far.
    pub fn faults(&self) -> usize {
        self.faults.load(Ordering::SeqCst)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(listener: UnixListener, memory: memmap2::Mmap, stop: &AtomicBool, faults: &AtomicUsize) {
    let start = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) || start.elapsed() > Duration::from_secs(60) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("page server accept: {e}"),
        }
    };
    let (regions, uffd) = handshake(&stream);
    let total: u64 = regions.iter().map(|r| r.size).sum();
    assert_eq!(
        total,
        memory.len() as u64,
        "memory file size differs from guest memory"
    );
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n <= 0 {
            continue;
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reading one uffd_msg into a buffer of its size.
        let read = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if read == 0 {
            return;
        }
        if read < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            // The VMM is gone.
            return;
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let address = u64::from_le_bytes(msg[16..24].try_into().unwrap());
        let region = regions
            .iter()
            .find(|r| address >= r.base_host_virt_addr && address < r.base_host_virt_addr + r.size)
            .expect("fault outside guest memory");
        let page = address & !(region.page_size - 1);
        let offset = region.offset + (page - region.base_host_virt_addr);
        let mut copy = UffdioCopy {
            dst: page,
            src: memory.as_ptr() as u64 + offset,
            len: region.page_size,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one uffdio_copy; src points
        // into our mapping of the memory file, dst into the faulting range.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut copy) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                // Someone else populated it, or the mapping changed under us: the
                // fault is re-raised if still needed.
                Some(libc::EEXIST) | Some(libc::EAGAIN) => continue,
                // The VMM's memory is gone.
                Some(libc::ESRCH) | Some(libc::ENOENT) => return,
                _ => panic!("UFFDIO_COPY at {page:#x}: {err}"),
            }
        }
        faults.fetch_add(1, Ordering::SeqCst);
    }
}

fn handshake(stream: &std::os::unix::net::UnixStream) -> (Vec<Region>, OwnedFd) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    stream.set_nonblocking(false).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .expect("receive the uffd handshake");
    let mut fd = None;
    for c in msg.cmsgs().expect("control messages") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            fd = fds.first().copied();
        }
    }
    let len = msg.bytes;
    let fd = fd.expect("the handshake carries the userfaultfd");
    // SAFETY: the kernel installed this descriptor for us with SCM_RIGHTS.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let regions: Vec<Region> =
        serde_json::from_slice(&buf[..len]).expect("the handshake is a JSON list of regions");
    (regions, uffd)
}
