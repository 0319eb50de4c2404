//! The page server: accept the VMM's handshake, then serve its guest memory
//! until the VMM exits, the server is told to stop, or a page cannot be
//! served (then the VMM is killed: fail closed).
//!
//! Threads. A few *workers* wait on the userfaultfd (each through its own
//! epoll with `EPOLLEXCLUSIVE`, so one fault wakes one worker), read one
//! event at a time and serve it themselves, so faults from several vCPUs
//! are served in parallel and none waits behind another's disk read
//! (optionally one worker polls for a moment after a fault before
//! sleeping; see [`Config::spin`]). Optional *prefetch threads* copy
//! a recorded working set in its first-touch order, in batches of a few MiB
//! (sorted and coalesced within a batch) and copies of up to 1 MiB. The
//! calling thread waits for the VMM to exit (its pidfd).
//!
//! Serving a fault: find the region, turn the address into an image offset,
//! claim the page (an atomic bit; a second fault on a claimed page is left
//! to the claimer, whose copy wakes it), claim the still-unclaimed pages of
//! a read-ahead window (the aligned 64 KiB around the page; where a recent
//! window ended, a sequential stream, twice that window, up to 1 MiB; while
//! a working set is prefetched, only its pages), resolve each claimed run
//! through the image into file-contiguous pieces, and `UFFDIO_COPY` each
//! piece straight from the data file's mapping (one copy, from the page
//! cache); zeros go in with `UFFDIO_ZEROPAGE`. A read through the mapping
//! that fails (`EFAULT`: the file shrank or the disk failed) is retried with
//! `pread`; if that fails too, the server fails closed.
//!
//! REMOVE events (balloon, free page reporting) mark their pages removed:
//! from then on those pages are served as zeros. A copy that finds a REMOVE
//! queued (`EAGAIN`) reads events, re-resolves and retries. One race is
//! left, and counted (`stale_after_remove`): the kernel drops the pages
//! right after the event is read, so a speculative copy (read-ahead,
//! prefetch) resolved before the event and landing after the drop leaves
//! the build's old bytes, not zeros, in memory the guest has given away.
//! The guest does not read freed memory before reusing it, the bytes are
//! its own, and no kernel call can take the page back; so it is not
//! repaired.
//!
//! Dirty tracking (optional) re-registers the regions for write-protect
//! faults (`UFFDIO_REGISTER` acts on the address space of the process that
//! created the userfaultfd, so this works on Firecracker's fd as sent),
//! copies every page in write-protected, and on the first write to a page
//! marks it dirty and lifts the protection. Pages the guest gave back
//! (REMOVE) are reported dirty too: they no longer hold the build's data.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::bitmap::AtomicBitmap;
use crate::handshake::{self, GuestRegion, Peer};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::source::{Extent, Image};
use crate::uffd::{self, CopyOutcome, Event, Userfaultfd};
use crate::working_set::{Recorder, WorkingSet};
use crate::{Error, control};

const PAGE_4K: u64 = 4096;
const PAGE_2M: u64 = 2 << 20;

/// How a page server behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes populated per fault in 4 KiB regions: the aligned window around
    /// the faulting page, limited to pages not yet populated. 4096 = none.
    pub readahead: u64,
    /// Largest window for a sequential stream: a fault where a recent
    /// window ended doubles that window, up to this. Equal to `readahead`
    /// for a fixed window.
    pub readahead_max: u64,
    /// Threads serving faults.
    pub workers: usize,
    /// A recorded working set to prefetch, if any.
    pub prefetch: Option<WorkingSet>,
    /// Working-set bytes sorted and coalesced together per prefetch batch.
    pub prefetch_batch: u64,
    /// Largest single prefetch copy: a fault on a page being prefetched
    /// waits for its chunk.
    pub prefetch_chunk: u64,
    /// Threads copying the working set.
    pub prefetch_threads: usize,
    /// How far (bytes) ahead of the prefetch threads the working set is
    /// requested from the disk (`POSIX_FADV_WILLNEED`), so a snapshot that
    /// is not in the page cache is read with a deep queue instead of one
    /// copy at a time. 0 turns it off.
    pub prefetch_disk_ahead: u64,
    /// Record the working set and write it here (atomically) at the end.
    pub record_working_set: Option<PathBuf>,
    /// Track the pages the guest writes.
    pub dirty_tracking: bool,
    /// Serve the control protocol on this Unix socket.
    pub control_socket: Option<PathBuf>,
    /// Write the final metrics as JSON here (atomically) at the end.
    pub metrics_file: Option<PathBuf>,
    /// How long to wait for the VMM to connect and send its handshake.
    pub handshake_timeout: Duration,
    /// Attempts to read a source range before failing closed.
    pub source_attempts: u32,
    /// Map the source range into the page tables (`MADV_POPULATE_READ`)
    /// before each 4 KiB-page copy. Always done for huge pages.
    pub populate_source: bool,
    /// After serving a fault, one worker keeps polling for this long before
    /// sleeping, so a burst of faults does not pay a wakeup each. Off by
    /// default: measured on a contended host, the polling thread takes the
    /// CPU the faulting vCPU needs and restores got 2-3x slower.
    pub spin: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            readahead: 64 * 1024,
            readahead_max: 1 << 20,
            workers: 4,
            prefetch: None,
            prefetch_batch: 4 << 20,
            prefetch_chunk: 1 << 20,
            prefetch_threads: 2,
            prefetch_disk_ahead: 256 << 20,
            record_working_set: None,
            dirty_tracking: false,
            control_socket: None,
            metrics_file: None,
            handshake_timeout: Duration::from_secs(60),
            source_attempts: 3,
            populate_source: false,
            spin: Duration::ZERO,
        }
    }
}

/// A page server listening for its VMM.
#[derive(Debug)]
pub struct PageServer {
    image: Image,
    config: Config,
    listener: Option<UnixListener>,
    control: Option<UnixListener>,
    socket_path: PathBuf,
}

impl PageServer {
    /// Listen on `socket`. The socket appears at its path only once it is
    /// listening (bound under a temporary name, then renamed), so a caller
    /// that sees the path may tell the VMM to connect. A stale socket left
    /// by a crashed server is replaced; a live one is refused.
    pub fn bind(socket: &Path, image: Image, config: Config) -> Result<PageServer, Error> {
        let io = |what: &str, source| Error::Io {
            what: format!("{what} {}", socket.display()),
            source,
        };
        if UnixStream::connect(socket).is_ok() {
            return Err(Error::SocketInUse(socket.to_owned()));
        }
        let dir = socket.parent().unwrap_or(Path::new("."));
        let name = socket
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("uffd.sock");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        // The control socket first: it is the one that can fail for a
        // reason the caller must fix, and the VMM must not connect before.
        let control = config
            .control_socket
            .as_deref()
            .map(control::bind)
            .transpose()?;
        let listener =
            UnixListener::bind(&tmp).map_err(|e| io("binding a temporary socket for", e))?;
        if let Err(e) = std::fs::rename(&tmp, socket) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("moving the listening socket to", e));
        }
        Ok(PageServer {
            image,
            config,
            listener: Some(listener),
            control,
            socket_path: socket.to_owned(),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Wait for the VMM, take its handshake and start serving. The socket
    /// file is removed once the one connection is accepted.
    pub fn accept(mut self) -> Result<Session, Error> {
        let listener = self.listener.take().expect("accept consumes the server");
        let stream = accept_within(&listener, self.config.handshake_timeout)?;
        drop(listener);
        let _ = std::fs::remove_file(&self.socket_path);
        let hs = handshake::receive(&stream, self.config.handshake_timeout)?;
        drop(stream);
        info!(
            build = self.image.name(),
            pid = hs.peer.pid,
            regions = hs.regions.len(),
            "VMM connected"
        );
        Session::start(
            self.image.clone(),
            self.config.clone(),
            hs,
            self.control.take(),
        )
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.socket_path);
        }
        if self.control.is_some()
            && let Some(path) = &self.config.control_socket
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn accept_within(listener: &UnixListener, timeout: Duration) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Handshake(format!(
                "no VMM connected within {timeout:?}"
            )));
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            )
        };
        if n > 0 {
            return listener.accept().map(|(s, _)| s).map_err(|e| Error::Io {
                what: "accepting the VMM's connection".into(),
                source: e,
            });
        }
    }
}

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The VMM exited.
    PeerExited,
    /// Told to stop ([`SessionHandle::terminate`]); the VMM was killed.
    Terminated,
}

/// What a session leaves behind.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    pub metrics: MetricsSnapshot,
    /// The working set written, if recording.
    pub working_set: Option<WorkingSet>,
}

/// One guest memory region and the state of its pages (in units of its
/// page size).
#[derive(Debug)]
struct RegionState {
    base: u64,
    size: u64,
    offset: u64,
    unit: u64,
    claimed: AtomicBitmap,
    removed: AtomicBitmap,
    dirty: Option<AtomicBitmap>,
    /// Pages of the working set being prefetched, if any.
    working_set: Option<AtomicBitmap>,
    /// Recent read-ahead windows: `(size << 32) | end page`.
    streams: [AtomicU64; STREAMS],
    next_stream: AtomicUsize,
}

impl RegionState {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }

    fn page_of(&self, addr: u64) -> usize {
        ((addr - self.base) / self.unit) as usize
    }

    fn addr(&self, page: usize) -> u64 {
        self.base + page as u64 * self.unit
    }

    fn image_offset(&self, page: usize) -> u64 {
        self.offset + page as u64 * self.unit
    }

    fn pages(&self) -> usize {
        (self.size / self.unit) as usize
    }

    /// The read-ahead window for a fault on `page`: the aligned `base`
    /// window around it, or, when the fault lands exactly where a recent
    /// window ended (a sequential stream), a window twice that stream's
    /// last one (up to `max`) starting at the page. (Growing the window
    /// where the surrounding memory is already mostly populated was tried:
    /// it halves faults for dense random access but copies 45% more for a
    /// sparse working set, the common case, and was dropped.)
    fn window(&self, page: usize, base: u64, max: u64) -> (usize, usize) {
        let base = (base / self.unit).max(1) as usize;
        let max = ((max / self.unit) as usize).max(base);
        if max > base {
            for slot in &self.streams {
                let v = slot.load(Ordering::Relaxed);
                let (end, size) = ((v & 0xffff_ffff) as usize, (v >> 32) as usize);
                if size > 0 && end == page {
                    let size = (size * 2).min(max);
                    let w1 = (page + size).min(self.pages());
                    slot.store(pack_stream(w1, size), Ordering::Relaxed);
                    return (page, w1);
                }
            }
        }
        let w0 = page - page % base;
        let w1 = (w0 + base).min(self.pages());
        if max > base {
            let i = self.next_stream.fetch_add(1, Ordering::Relaxed) % STREAMS;
            self.streams[i].store(pack_stream(w1, base), Ordering::Relaxed);
        }
        (w0, w1)
    }
}

/// Sequential streams remembered per region: about one per vCPU.
const STREAMS: usize = 8;

fn pack_stream(end: usize, size: usize) -> u64 {
    (size as u64) << 32 | (end as u64 & 0xffff_ffff)
}

/// Reads of the userfaultfd are serialised (they are short and never
/// block) so that a copy can tell whether a REMOVE event was read while it
/// was in flight: `seq` is odd while a read and its REMOVE marking are in
/// progress, and every REMOVE is logged with the `seq` of its read.
#[derive(Debug, Default)]
struct EventLog {
    removals: Mutex<VecDeque<(u64, Range<u64>)>>,
    seq: AtomicU64,
    removal_count: AtomicU64,
}

const REMOVAL_LOG: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Stamp {
    seq: u64,
    removals: u64,
}

impl EventLog {
    fn stamp(&self) -> Stamp {
        Stamp {
            seq: self.seq.load(Ordering::SeqCst),
            removals: self.removal_count.load(Ordering::SeqCst),
        }
    }

    /// Was a REMOVE overlapping `range` (host addresses) read since `since`?
    fn removed_since(&self, since: Stamp, range: Range<u64>) -> bool {
        let seq = self.seq.load(Ordering::SeqCst);
        if seq.is_multiple_of(2) && self.removal_count.load(Ordering::SeqCst) == since.removals {
            return false;
        }
        // Taking the lock waits out a read in progress.
        let log = self.removals.lock().expect("event log poisoned");
        let from = since.seq & !1;
        log.iter()
            .any(|(tag, r)| *tag > from && r.start < range.end && range.start < r.end)
    }
}

#[derive(Debug)]
struct Shared {
    image: Image,
    config: Config,
    uffd: Userfaultfd,
    regions: Vec<RegionState>,
    peer: Peer,
    metrics: Metrics,
    events: EventLog,
    recorder: Option<Recorder>,
    stop: AtomicBool,
    /// Held by the one worker that may poll instead of sleeping.
    spinner: AtomicBool,
    stop_fd: OwnedFd,
    ending: Mutex<Option<Ending>>,
    fatal: Mutex<Option<Error>>,
    zeros: ZeroBuffer,
}

/// What a serving step asks of its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn stop(&self, ending: Option<Ending>) {
        if let Some(e) = ending {
            let mut slot = self.ending.lock().expect("ending poisoned");
            slot.get_or_insert(e);
        }
        self.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to an eventfd we own; it stays readable,
        // which wakes every thread that polls it.
        unsafe { libc::write(self.stop_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Give up: kill the VMM so the guest never runs on memory we could not
    /// serve, remember why, and stop.
    fn fail(&self, offset: u64, reason: String) -> Flow {
        let mut fatal = self.fatal.lock().expect("fatal poisoned");
        if fatal.is_none() {
            error!(
                build = self.image.name(),
                offset = format_args!("{offset:#x}"),
                pid = self.peer.pid,
                reason = %reason,
                "cannot serve guest memory; killing the VMM"
            );
            self.peer.kill();
            *fatal = Some(Error::FailedClosed {
                build: self.image.name().to_owned(),
                offset,
                reason,
                pid: self.peer.pid,
            });
        }
        drop(fatal);
        self.stop(None);
        Flow::Stop
    }

    fn peer_gone(&self) -> Flow {
        debug!(build = self.image.name(), "VMM address space is gone");
        self.stop(Some(Ending::PeerExited));
        Flow::Stop
    }

    fn region_of(&self, addr: u64) -> Option<&RegionState> {
        self.regions.iter().find(|r| r.contains(addr))
    }

    /// Mark `[start, end)` (host addresses) removed in every region it
    /// touches: those pages read as zeros from now on.
    fn mark_removed(&self, start: u64, end: u64) {
        Metrics::add(&self.metrics.remove_events, 1);
        Metrics::add(&self.metrics.bytes_removed, end.saturating_sub(start));
        for r in &self.regions {
            let lo = start.max(r.base);
            let hi = end.min(r.base + r.size);
            if lo >= hi {
                continue;
            }
            let pages = r.page_of(lo)..((hi - r.base).div_ceil(r.unit)) as usize;
            r.removed.set_range(pages.clone());
            r.claimed.clear_range(pages);
        }
    }
}

/// A read-only anonymous mapping that is never written: it reads as zeros
/// without using memory, and is the source for zero pages that cannot use
/// `UFFDIO_ZEROPAGE` (huge pages, write-protected copies).
#[derive(Debug)]
struct ZeroBuffer {
    ptr: *const u8,
    len: u64,
}

// SAFETY: the mapping is read-only and lives as long as the value.
unsafe impl Send for ZeroBuffer {}
// SAFETY: as above.
unsafe impl Sync for ZeroBuffer {}

impl ZeroBuffer {
    fn new(len: u64) -> std::io::Result<ZeroBuffer> {
        // SAFETY: a fresh private anonymous read-only mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ZeroBuffer {
            ptr: p.cast::<u8>().cast_const(),
            len,
        })
    }
}

impl Drop for ZeroBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, once.
        unsafe { libc::munmap(self.ptr.cast_mut().cast(), self.len as usize) };
    }
}

/// A running session: the serving threads and the VMM they serve.
#[derive(Debug)]
pub struct Session {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    base_working_set: Option<WorkingSet>,
}

/// A cheap handle for asking a running session things from other threads.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    shared: Arc<Shared>,
    base_working_set: Option<Arc<WorkingSet>>,
}

impl Session {
    /// Start serving the VMM of an already received handshake.
    fn start(
        image: Image,
        config: Config,
        hs: handshake::Handshake,
        control: Option<UnixListener>,
    ) -> Result<Session, Error> {
        let handshake::Handshake {
            regions,
            uffd,
            peer,
        } = hs;
        let uffd = Userfaultfd::from_owned(uffd);
        let regions = match validate_regions(&image, &regions, config.dirty_tracking) {
            Ok(r) => r,
            Err((offset, reason)) => {
                error!(build = image.name(), pid = peer.pid, reason = %reason, "VMM regions do not fit the build; killing the VMM");
                peer.kill();
                return Err(Error::FailedClosed {
                    build: image.name().to_owned(),
                    offset,
                    reason,
                    pid: peer.pid,
                });
            }
        };
        if config.dirty_tracking {
            for r in &regions {
                let mode = uffd::UFFDIO_REGISTER_MODE_MISSING | uffd::UFFDIO_REGISTER_MODE_WP;
                if let Err(e) = uffd.register(r.base, r.size, mode) {
                    peer.kill();
                    return Err(Error::FailedClosed {
                        build: image.name().to_owned(),
                        offset: r.offset,
                        reason: format!(
                            "cannot register the region for write-protect tracking: {e}"
                        ),
                        pid: peer.pid,
                    });
                }
            }
        }
        // SAFETY: eventfd takes an initial value and flags; returns a new fd.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            peer.kill();
            return Err(Error::Io {
                what: "creating an eventfd".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: eventfd returned a fresh fd.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let zero_len = PAGE_2M
            .max(config.readahead)
            .max(config.prefetch_chunk)
            .next_multiple_of(PAGE_2M);
        let zeros = ZeroBuffer::new(zero_len).map_err(|e| {
            peer.kill();
            Error::Io {
                what: "mapping the zero buffer".into(),
                source: e,
            }
        })?;
        let workers = config.workers.max(1);
        let recorder = config
            .record_working_set
            .as_ref()
            .map(|_| Recorder::new(workers + config.prefetch_threads.max(1)));
        let prefetch = config.prefetch.clone().filter(|ws| {
            let fits = ws.image_size == image.size();
            if !fits {
                warn!(
                    build = image.name(),
                    recorded = ws.image_size,
                    image = image.size(),
                    "working set was recorded against another image size; not prefetching"
                );
            }
            fits
        });
        let base_working_set = prefetch.clone();
        let mut regions = regions;
        if let Some(ws) = &prefetch {
            for r in &mut regions {
                let bits = AtomicBitmap::new(r.pages());
                for range in &ws.ranges {
                    let lo = range.start.max(r.offset);
                    let hi = range.end.min(r.offset + r.size);
                    if lo < hi {
                        bits.set_range(
                            ((lo - r.offset) / r.unit) as usize
                                ..(hi - r.offset).div_ceil(r.unit) as usize,
                        );
                    }
                }
                r.working_set = Some(bits);
            }
        }
        let shared = Arc::new(Shared {
            image,
            config,
            uffd,
            regions,
            peer,
            metrics: Metrics::default(),
            events: EventLog::default(),
            recorder,
            stop: AtomicBool::new(false),
            spinner: AtomicBool::new(false),
            stop_fd,
            ending: Mutex::new(None),
            fatal: Mutex::new(None),
            zeros,
        });
        shared.metrics.start_clock();
        let mut session = Session {
            shared,
            threads: Vec::new(),
            base_working_set,
        };
        if let Err(e) = session.spawn_threads(workers, prefetch, control) {
            let err = session.shared.fail(0, e.to_string());
            debug_assert_eq!(err, Flow::Stop);
            drop(session);
            return Err(e);
        }
        Ok(session)
    }

    fn spawn_threads(
        &mut self,
        workers: usize,
        prefetch: Option<WorkingSet>,
        control: Option<UnixListener>,
    ) -> Result<(), Error> {
        for id in 0..workers {
            let s = Arc::clone(&self.shared);
            self.threads
                .push(spawn(format!("uffd-worker-{id}"), move || {
                    worker_main(&s, id)
                })?);
        }
        if let Some(ws) = prefetch {
            let c = &self.shared.config;
            let threads = c.prefetch_threads.max(1);
            let plan = Arc::new(PrefetchPlan::new(
                &ws,
                c.prefetch_batch,
                c.prefetch_chunk,
                threads,
            ));
            if c.prefetch_disk_ahead > 0 {
                let s = Arc::clone(&self.shared);
                let plan = Arc::clone(&plan);
                self.threads.push(spawn("uffd-disk-ahead".into(), move || {
                    disk_ahead_main(&s, &plan)
                })?);
            }
            for t in 0..threads {
                let s = Arc::clone(&self.shared);
                let plan = Arc::clone(&plan);
                self.threads
                    .push(spawn(format!("uffd-prefetch-{t}"), move || {
                        prefetch_main(&s, workers + t, &plan)
                    })?);
            }
        }
        if let (Some(listener), Some(path)) = (control, self.shared.config.control_socket.clone()) {
            let handle = self.handle();
            self.threads.push(spawn("uffd-control".into(), move || {
                control::serve(listener, &path, &handle)
            })?);
        }
        Ok(())
    }

    pub fn handle(&self) -> SessionHandle {
        SessionHandle {
            shared: Arc::clone(&self.shared),
            base_working_set: self.base_working_set.clone().map(Arc::new),
        }
    }

    /// Stop serving and leave the VMM alive. Sound only when the VMM will
    /// never fault on its guest memory again (it has unmapped it), as when a
    /// benchmark plays the VMM in its own process; otherwise use
    /// [`SessionHandle::terminate`].
    pub fn detach(mut self) -> MetricsSnapshot {
        self.stop_threads();
        self.shared.metrics.snapshot()
    }

    fn stop_threads(&mut self) {
        self.shared.stop(None);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// The VMM's PID.
    pub fn peer_pid(&self) -> i32 {
        self.shared.peer.pid
    }

    /// Serve until the VMM exits, the session is terminated, or it fails
    /// closed; then write the working set and metrics (if configured).
    pub fn wait(mut self) -> Result<Outcome, Error> {
        let s = &self.shared;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: s.peer.pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: s.stop_fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                continue;
            }
            if fds[0].revents != 0 {
                info!(build = s.image.name(), pid = s.peer.pid, "VMM exited");
                s.stop(Some(Ending::PeerExited));
                break;
            }
            if fds[1].revents != 0 {
                break;
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let handle = self.handle();
        let s = &self.shared;
        let mut working_set = None;
        let mut result = Ok(());
        if let Some(path) = &s.config.record_working_set {
            let ws = handle.working_set();
            match ws.write_atomic(path) {
                Ok(()) => {
                    info!(build = s.image.name(), path = %path.display(), ranges = ws.ranges.len(), bytes = ws.bytes(), "wrote working set");
                    working_set = Some(ws);
                }
                Err(e) => {
                    error!(build = s.image.name(), error = %e, "cannot write working set");
                    result = Err(e);
                }
            }
        }
        let metrics = s.metrics.snapshot();
        info!(build = s.image.name(), metrics = %serde_json::to_string(&metrics).unwrap_or_default(), "page server done");
        if let Some(path) = &s.config.metrics_file {
            let json = serde_json::to_vec_pretty(&metrics).unwrap_or_default();
            if let Err(e) = crate::working_set::write_atomic(path, &json) {
                error!(build = s.image.name(), error = %e, "cannot write metrics file");
            }
        }
        if let Some(err) = s.fatal.lock().expect("fatal poisoned").take() {
            return Err(err);
        }
        result?;
        let ending = s
            .ending
            .lock()
            .expect("ending poisoned")
            .unwrap_or(Ending::Terminated);
        Ok(Outcome {
            ending,
            metrics,
            working_set,
        })
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::wait`] (an early return, a
    /// panic) can no longer serve its VMM, which would hang on its next
    /// fault: fail closed.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            if !self.shared.peer.has_exited() {
                warn!(
                    build = self.shared.image.name(),
                    pid = self.shared.peer.pid,
                    "page server dropped while its VMM runs; killing the VMM"
                );
                self.shared.peer.kill();
            }
            self.stop_threads();
        }
    }
}

impl SessionHandle {
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// Image byte ranges the guest wrote (or gave back) since the restore.
    pub fn dirty_ranges(&self) -> Result<Vec<Range<u64>>, Error> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in &self.shared.regions {
            let Some(dirty) = &r.dirty else {
                return Err(Error::DirtyTrackingOff);
            };
            let union = AtomicBitmap::new(r.pages());
            for run in dirty.runs().into_iter().chain(r.removed.runs()) {
                union.set_range(run);
            }
            for run in union.runs() {
                let range = r.image_offset(run.start)..r.image_offset(run.end);
                match out.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => out.push(range),
                }
            }
        }
        out.sort_by_key(|r| r.start);
        Ok(out)
    }

    /// The working set recorded so far (after the prefetched one, if any).
    pub fn working_set(&self) -> WorkingSet {
        let size = self.shared.image.size();
        match &self.shared.recorder {
            Some(rec) => rec.collect(size, self.base_working_set.as_deref()),
            None => WorkingSet {
                image_size: size,
                ranges: Vec::new(),
            },
        }
    }

    /// Write the working set recorded so far to its configured path.
    pub fn write_working_set(&self) -> Result<Option<(PathBuf, WorkingSet)>, Error> {
        let Some(path) = &self.shared.config.record_working_set else {
            return Ok(None);
        };
        let ws = self.working_set();
        ws.write_atomic(path)?;
        Ok(Some((path.clone(), ws)))
    }

    /// Stop serving. The VMM is killed first: without its page server it
    /// would hang on its next fault.
    pub fn terminate(&self) {
        info!(
            build = self.shared.image.name(),
            pid = self.shared.peer.pid,
            "terminating; killing the VMM"
        );
        self.shared.peer.kill();
        self.shared.stop(Some(Ending::Terminated));
    }

    pub fn build(&self) -> &str {
        self.shared.image.name()
    }

    /// Readable once the session is stopping.
    pub(crate) fn stop_fd(&self) -> RawFd {
        self.shared.stop_fd.as_raw_fd()
    }

    pub(crate) fn dirty_tracking(&self) -> bool {
        self.shared.config.dirty_tracking
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| Error::Io {
            what: "spawning a page server thread".into(),
            source: e,
        })
}

/// Check the VMM's regions against the image; on failure, the image offset
/// concerned and why.
fn validate_regions(
    image: &Image,
    regions: &[GuestRegion],
    dirty: bool,
) -> Result<Vec<RegionState>, (u64, String)> {
    if regions.is_empty() {
        return Err((0, "the VMM sent no memory regions".into()));
    }
    let mut out: Vec<RegionState> = Vec::with_capacity(regions.len());
    for r in regions {
        let unit = r.page_size;
        if unit != PAGE_4K && unit != PAGE_2M {
            return Err((r.offset, format!("unsupported page size {unit}")));
        }
        if r.size == 0
            || !r.size.is_multiple_of(unit)
            || !r.base_host_virt_addr.is_multiple_of(unit)
            || !r.offset.is_multiple_of(unit)
        {
            return Err((
                r.offset,
                format!("region {r:?} is not aligned to its page size"),
            ));
        }
        let end = r.offset.checked_add(r.size);
        if end.is_none_or(|e| e > image.size()) {
            return Err((
                r.offset,
                format!(
                    "region [{:#x}, {:#x}) extends past the image ({:#x} bytes): the build's header does not cover it",
                    r.offset,
                    r.offset.saturating_add(r.size),
                    image.size()
                ),
            ));
        }
        let host_end = r
            .base_host_virt_addr
            .checked_add(r.size)
            .ok_or((r.offset, "region wraps the address space".to_string()))?;
        if out
            .iter()
            .any(|o| o.base < host_end && r.base_host_virt_addr < o.base + o.size)
        {
            return Err((
                r.offset,
                "regions overlap in the VMM's address space".into(),
            ));
        }
        let pages = (r.size / unit) as usize;
        out.push(RegionState {
            base: r.base_host_virt_addr,
            size: r.size,
            offset: r.offset,
            unit,
            claimed: AtomicBitmap::new(pages),
            removed: AtomicBitmap::new(pages),
            dirty: dirty.then(|| AtomicBitmap::new(pages)),
            working_set: None,
            streams: Default::default(),
            next_stream: AtomicUsize::new(0),
        });
    }
    Ok(out)
}

/// Where a piece of a copy comes from.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Zero,
    /// A pointer into a data file's mapping, and the image offset it holds.
    Mapped(*const u8),
    /// The first bytes of the copier's bounce buffer.
    Bounce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Fault,
    Prefetch,
}

/// Per-thread serving state: faults read but not yet served, scratch
/// space, and a bounce buffer for reads that cannot go straight from a
/// file mapping.
struct Copier<'a> {
    s: &'a Shared,
    id: usize,
    queue: VecDeque<(u64, u64)>,
    events: Vec<Event>,
    after: Vec<Range<usize>>,
    before: Vec<Range<usize>>,
    bounce: Vec<u8>,
}

impl<'a> Copier<'a> {
    fn new(s: &'a Shared, id: usize) -> Copier<'a> {
        Copier {
            s,
            id,
            queue: VecDeque::new(),
            events: Vec::with_capacity(16),
            after: Vec::new(),
            before: Vec::new(),
            bounce: Vec::new(),
        }
    }

    /// Read up to `max` events: REMOVEs are applied at once, faults queued.
    fn read_events(&mut self, max: usize) -> Result<usize, Flow> {
        let s = self.s;
        let mut log = s.events.removals.lock().expect("event log poisoned");
        let seq = s.events.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let result = s.uffd.read_events(&mut self.events, max);
        for ev in &self.events {
            match *ev {
                Event::PageFault { address, flags } => self.queue.push_back((address, flags)),
                Event::Remove { start, end } => {
                    s.mark_removed(start, end);
                    if log.len() == REMOVAL_LOG {
                        log.pop_front();
                    }
                    log.push_back((seq, start..end));
                    s.events.removal_count.fetch_add(1, Ordering::SeqCst);
                }
                Event::Other { event } => warn!(
                    build = s.image.name(),
                    event, "ignoring unexpected userfaultfd event"
                ),
            }
        }
        s.events.seq.fetch_add(1, Ordering::SeqCst);
        drop(log);
        match result {
            Ok(n) => Ok(n),
            Err(e) => Err(s.fail(0, format!("reading the userfaultfd failed: {e}"))),
        }
    }

    fn serve_queued(&mut self) -> Flow {
        while let Some((addr, flags)) = self.queue.pop_front() {
            if self.s.stopping() || self.serve_fault(addr, flags) == Flow::Stop {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn serve_fault(&mut self, addr: u64, flags: u64) -> Flow {
        let started = Instant::now();
        let s = self.s;
        Metrics::add(&s.metrics.faults, 1);
        s.metrics.note_fault();
        let Some(r) = s.region_of(addr) else {
            return s.fail(
                0,
                format!("fault at address {addr:#x}, outside every guest memory region"),
            );
        };
        let page = r.page_of(addr);
        if flags & uffd::UFFD_PAGEFAULT_FLAG_WP != 0 {
            let flow = self.unprotect(r, page);
            s.metrics.record_latency(started.elapsed());
            return flow;
        }
        if !r.claimed.set(page) {
            // The bit may be stale: a REMOVE read but not yet applied (its
            // reader holds the event lock until it is), after which the
            // kernel dropped the page and the guest faulted on it again.
            // Wait out any such reader, then look again.
            drop(s.events.removals.lock().expect("event log poisoned"));
            if !r.claimed.set(page) {
                // Another thread is populating this page; its copy wakes us.
                Metrics::add(&s.metrics.faults_already_claimed, 1);
                return Flow::Continue;
            }
        }
        let write = flags & uffd::UFFD_PAGEFAULT_FLAG_WRITE != 0;
        let tracking = r.dirty.is_some();
        if write && let Some(d) = &r.dirty {
            d.set(page);
        }
        let (w0, w1) = if r.unit == PAGE_4K {
            r.window(page, s.config.readahead, s.config.readahead_max)
        } else {
            (page, page + 1)
        };
        let mut after = std::mem::take(&mut self.after);
        let mut before = std::mem::take(&mut self.before);
        after.clear();
        before.clear();
        match &r.working_set {
            // While a working set is prefetched, read ahead only within it:
            // pages outside it were not needed last time.
            Some(ws) if ws.get(page) => {
                for p in (page + 1..w1).filter(|p| ws.get(*p)) {
                    r.claimed.claim_range(p..p + 1, &mut after);
                }
                for p in (w0..page).filter(|p| ws.get(*p)) {
                    r.claimed.claim_range(p..p + 1, &mut before);
                }
            }
            _ => {
                r.claimed.claim_range(page + 1..w1, &mut after);
                r.claimed.claim_range(w0..page, &mut before);
            }
        }
        let mut main = page..page + 1;
        if after.first().is_some_and(|a| a.start == main.end) {
            main.end = after.remove(0).end;
        }
        if before.last().is_some_and(|b| b.end == main.start) {
            main.start = before.pop().expect("checked").start;
        }
        // Recorded before copying: the copy wakes the faulting thread, whose
        // next fault may be recorded by another worker before we return.
        self.record(r, main.clone());
        for run in after.iter().chain(before.iter()) {
            self.record(r, run.clone());
        }
        let mut flow = if write && tracking {
            // The page being written goes in writable; its neighbours
            // protected, so their first write is seen.
            let mut f = self.populate(r, page..page + 1, false, Purpose::Fault);
            if f == Flow::Continue && main.end > page + 1 {
                f = self.populate(r, page + 1..main.end, true, Purpose::Fault);
            }
            if f == Flow::Continue && main.start < page {
                f = self.populate(r, main.start..page, true, Purpose::Fault);
            }
            f
        } else {
            self.populate(r, main.clone(), tracking, Purpose::Fault)
        };
        s.metrics.record_latency(started.elapsed());
        for run in after.iter().chain(before.iter()) {
            if flow == Flow::Stop {
                break;
            }
            flow = self.populate(r, run.clone(), tracking, Purpose::Fault);
        }
        self.after = after;
        self.before = before;
        flow
    }

    fn record(&self, r: &RegionState, pages: Range<usize>) {
        if let Some(rec) = &self.s.recorder {
            rec.record(
                self.id,
                r.image_offset(pages.start)..r.image_offset(pages.end),
            );
        }
    }

    /// A write to a write-protected page: note it dirty, let it through.
    fn unprotect(&mut self, r: &RegionState, page: usize) -> Flow {
        let s = self.s;
        Metrics::add(&s.metrics.write_protect_faults, 1);
        if let Some(d) = &r.dirty {
            d.set(page);
        }
        loop {
            match s.uffd.write_protect(r.addr(page), r.unit, false) {
                Ok(CopyOutcome::MmapChanging) => {
                    Metrics::add(&s.metrics.eagain, 1);
                    if let Err(f) = self.drain() {
                        return f;
                    }
                }
                Ok(CopyOutcome::ProcessGone) => return s.peer_gone(),
                Ok(_) => return Flow::Continue,
                Err(e) => {
                    return s.fail(
                        r.image_offset(page),
                        format!("cannot lift write protection: {e}"),
                    );
                }
            }
        }
    }

    /// Read events after an `EAGAIN`, so the event that caused it is
    /// consumed (by us or by whoever holds the read lock).
    fn drain(&mut self) -> Result<(), Flow> {
        if self.read_events(16)? == 0 {
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Populate `pages` of `r` (all claimed by the caller) from the image.
    fn populate(
        &mut self,
        r: &RegionState,
        pages: Range<usize>,
        wp: bool,
        purpose: Purpose,
    ) -> Flow {
        let s = self.s;
        let stamp = s.events.stamp();
        let mut p = pages.start;
        while p < pages.end {
            let removed = r.removed.get(p);
            let mut q = p + 1;
            while q < pages.end && r.removed.get(q) == removed {
                q += 1;
            }
            let offset = r.image_offset(p);
            let want = (q - p) as u64 * r.unit;
            let (piece, len) = if removed {
                (Piece::Zero, want.min(s.zeros.len))
            } else {
                match self.resolve(r, offset, want, purpose) {
                    Ok(x) => x,
                    Err(flow) => return flow,
                }
            };
            match self.place(r, p, piece, len, wp, purpose) {
                Ok(done) => p += (done / r.unit) as usize,
                Err(flow) => return flow,
            }
        }
        let range = r.addr(pages.start)..r.addr(pages.end);
        if s.events.removed_since(stamp, range) {
            // See the module comment: counted, not repaired.
            Metrics::add(&s.metrics.stale_after_remove, 1);
            warn!(
                build = s.image.name(),
                offset = format_args!("{:#x}", r.image_offset(pages.start)),
                "copy raced a REMOVE event"
            );
        }
        Flow::Continue
    }

    /// What to copy for the image range at `offset` (at most `want`
    /// bytes): a piece and its length, a whole number of pages.
    fn resolve(
        &mut self,
        r: &RegionState,
        offset: u64,
        want: u64,
        purpose: Purpose,
    ) -> Result<(Piece, u64), Flow> {
        let s = self.s;
        let Some(extent) = s.image.locate(offset) else {
            return Err(s.fail(
                offset,
                "the build's header does not cover this offset".into(),
            ));
        };
        let len = extent.len().min(want);
        let whole = len - len % r.unit;
        if whole == 0 {
            // A huge page assembled from several extents.
            self.fill_bounce(offset, r.unit)?;
            return Ok((Piece::Bounce, r.unit));
        }
        match extent {
            Extent::Zero { .. } => Ok((Piece::Zero, whole.min(s.zeros.len))),
            Extent::File {
                file, file_offset, ..
            } => {
                let data = s.image.file(file);
                match data.and_then(|f| f.ptr(file_offset, whole)) {
                    Some(ptr) => {
                        if r.unit != PAGE_4K
                            || s.config.populate_source
                            || purpose == Purpose::Prefetch
                        {
                            data.expect("ptr came from it").populate(file_offset, whole);
                        }
                        Ok((Piece::Mapped(ptr), whole))
                    }
                    None => {
                        self.fill_bounce(offset, whole)?;
                        Ok((Piece::Bounce, whole))
                    }
                }
            }
        }
    }

    /// Read image bytes `[offset, offset+len)` into the bounce buffer with
    /// `pread`, retrying; fail closed if they cannot be read.
    fn fill_bounce(&mut self, offset: u64, len: u64) -> Result<(), Flow> {
        let s = self.s;
        if self.bounce.len() < len as usize {
            self.bounce.resize(len as usize, 0);
        }
        let mut last_error = String::new();
        for attempt in 0..s.config.source_attempts.max(1) {
            if attempt > 0 {
                Metrics::add(&s.metrics.source_retries, 1);
                std::thread::sleep(Duration::from_millis(10 << attempt));
            }
            match read_image(&s.image, offset, &mut self.bounce[..len as usize]) {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
        }
        Err(s.fail(
            offset,
            format!("cannot read the build's data: {last_error}"),
        ))
    }

    /// Copy `len` bytes of `piece` to pages starting at `page`. Returns the
    /// bytes dealt with (all of them, or fewer when an event requires the
    /// rest to be resolved again).
    fn place(
        &mut self,
        r: &RegionState,
        page: usize,
        mut piece: Piece,
        len: u64,
        wp: bool,
        purpose: Purpose,
    ) -> Result<u64, Flow> {
        let s = self.s;
        let mut done = 0u64;
        // Where the bounce buffer's data starts, in bytes from `page`.
        let mut bounce_base = 0u64;
        while done < len {
            let dst = r.addr(page) + done;
            let rest = len - done;
            let outcome = match piece {
                Piece::Zero if r.unit == PAGE_4K && !wp => s.uffd.zeropage(dst, rest),
                Piece::Zero => s.uffd.copy(dst, s.zeros.ptr, rest, wp),
                // SAFETY (pointer arithmetic): `done < len` and the mapping
                // covers `len` bytes from `ptr` (checked by `DataFile::ptr`).
                Piece::Mapped(ptr) => s.uffd.copy(dst, ptr.wrapping_add(done as usize), rest, wp),
                Piece::Bounce => s.uffd.copy(
                    dst,
                    self.bounce[(done - bounce_base) as usize..].as_ptr(),
                    rest,
                    wp,
                ),
            };
            match outcome {
                Ok(CopyOutcome::Done) => {
                    self.account(piece, rest, r.unit, purpose);
                    done = len;
                }
                Ok(CopyOutcome::Partial { bytes }) => {
                    self.account(piece, bytes, r.unit, purpose);
                    done += bytes;
                }
                Ok(CopyOutcome::Exists) => {
                    Metrics::add(&s.metrics.eexist, 1);
                    done += r.unit;
                }
                Ok(CopyOutcome::MmapChanging) => {
                    Metrics::add(&s.metrics.eagain, 1);
                    self.drain()?;
                    return Ok(done);
                }
                Ok(CopyOutcome::ProcessGone) => return Err(s.peer_gone()),
                Ok(CopyOutcome::Unmapped) => {
                    warn!(
                        build = s.image.name(),
                        offset = format_args!("{:#x}", r.image_offset(page)),
                        "VMM unmapped guest memory being served"
                    );
                    return Ok(len);
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EFAULT)
                        && matches!(piece, Piece::Mapped(_)) =>
                {
                    // Reading the file through its mapping failed (it
                    // shrank, or the disk erred): try pread, which reports.
                    Metrics::add(&s.metrics.source_retries, 1);
                    let offset = r.image_offset(page) + done;
                    self.fill_bounce(offset, rest)?;
                    piece = Piece::Bounce;
                    bounce_base = done;
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOMEM)
                        && matches!(piece, Piece::Mapped(_)) =>
                {
                    // The kernel could not get a temporary page to copy a
                    // source it had to fault in; a resident buffer needs none.
                    Metrics::add(&s.metrics.source_retries, 1);
                    let offset = r.image_offset(page) + done;
                    self.fill_bounce(offset, rest)?;
                    piece = Piece::Bounce;
                    bounce_base = done;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    return Err(s.fail(
                        r.image_offset(page) + done,
                        "out of memory for guest pages (for huge pages: the hugetlbfs pool is exhausted)".into(),
                    ));
                }
                Err(e) => {
                    return Err(s.fail(
                        r.image_offset(page) + done,
                        format!("UFFDIO_COPY failed: {e}"),
                    ));
                }
            }
        }
        Ok(done)
    }

    fn account(&self, piece: Piece, bytes: u64, unit: u64, purpose: Purpose) {
        let m = &self.s.metrics;
        let pages = bytes / unit;
        Metrics::add(&m.bytes_copied, bytes);
        match (piece, purpose) {
            (Piece::Zero, Purpose::Fault) => Metrics::add(&m.pages_zeroed, pages),
            (Piece::Zero, Purpose::Prefetch) => {
                Metrics::add(&m.pages_zeroed, pages);
                Metrics::add(&m.pages_prefetched, pages);
            }
            (_, Purpose::Fault) => Metrics::add(&m.pages_copied, pages),
            (_, Purpose::Prefetch) => Metrics::add(&m.pages_prefetched, pages),
        }
    }
}

/// Read image bytes `[offset, offset + buf.len())` with `pread`, walking
/// extents.
fn read_image(image: &Image, offset: u64, buf: &mut [u8]) -> Result<(), String> {
    let mut at = 0usize;
    while at < buf.len() {
        let off = offset + at as u64;
        let extent = image
            .locate(off)
            .ok_or_else(|| format!("offset {off:#x} is outside the image"))?;
        let n = (extent.len() as usize).min(buf.len() - at);
        match extent {
            Extent::Zero { .. } => buf[at..at + n].fill(0),
            Extent::File {
                file, file_offset, ..
            } => {
                let f = image
                    .file(file)
                    .ok_or_else(|| format!("data file {file} is missing"))?;
                f.read_exact_at(&mut buf[at..at + n], file_offset)
                    .map_err(|e| format!("{} at {file_offset:#x}: {e}", f.path().display()))?;
            }
        }
        at += n;
    }
    Ok(())
}

fn epoll_for(uffd: RawFd, stop: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes flags and returns a new fd.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: epoll_create1 returned a fresh fd.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for (fd, events) in [
        (uffd, (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32),
        (stop, libc::EPOLLIN as u32),
    ] {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: adding a valid fd to our epoll instance.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(ep)
}

fn worker_main(s: &Shared, id: usize) {
    let ep = match epoll_for(s.uffd.as_raw_fd(), s.stop_fd.as_raw_fd()) {
        Ok(ep) => ep,
        Err(e) => {
            s.fail(0, format!("cannot set up a worker: {e}"));
            return;
        }
    };
    let mut c = Copier::new(s, id);
    let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 2];
    let spin = s.config.spin;
    // When this worker last finished serving a fault.
    let mut served = Instant::now() - spin;
    while !s.stopping() {
        let busy = !c.queue.is_empty();
        if c.serve_queued() == Flow::Stop {
            break;
        }
        if busy {
            served = Instant::now();
        }
        match c.read_events(1) {
            Ok(0) => {}
            Ok(_) => continue,
            Err(_) => break,
        }
        // A guest whose fault was just served is likely to fault again
        // within microseconds; one worker polls for a moment instead of
        // sleeping, saving a wakeup per fault in bursts.
        if !spin.is_zero()
            && served.elapsed() < spin
            && s.spinner
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let mut got = false;
            while served.elapsed() < spin && !s.stopping() {
                match c.read_events(1) {
                    Ok(0) => std::hint::spin_loop(),
                    Ok(_) => {
                        got = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            s.spinner.store(false, Ordering::Release);
            if got {
                continue;
            }
        }
        // SAFETY: `ready` has room for 2 events.
        unsafe { libc::epoll_wait(ep.as_raw_fd(), ready.as_mut_ptr(), 2, -1) };
    }
}

/// The working set cut into copy-sized chunks, in batch order, shared by
/// the prefetch threads.
#[derive(Debug)]
struct PrefetchPlan {
    chunks: Vec<Range<u64>>,
    next: AtomicUsize,
    running: AtomicUsize,
    started: Instant,
}

impl PrefetchPlan {
    fn new(ws: &WorkingSet, batch: u64, chunk: u64, threads: usize) -> PrefetchPlan {
        let mut chunks = Vec::new();
        for batch in ws.batches(batch) {
            for range in batch {
                let mut at = range.start;
                while at < range.end {
                    let end = (at + chunk).min(range.end);
                    chunks.push(at..end);
                    at = end;
                }
            }
        }
        PrefetchPlan {
            chunks,
            next: AtomicUsize::new(0),
            running: AtomicUsize::new(threads),
            started: Instant::now(),
        }
    }
}

/// Request the working set from the disk in plan order, staying at most
/// `prefetch_disk_ahead` bytes ahead of the chunks the prefetch threads
/// have claimed. Pages already cached cost a page-cache lookup.
fn disk_ahead_main(s: &Shared, plan: &PrefetchPlan) {
    let limit = s.config.prefetch_disk_ahead;
    // Bytes of the plan up to the prefetch cursor, kept incrementally.
    let (mut consumed_chunks, mut consumed) = (0usize, 0u64);
    let mut advised = 0u64;
    for range in &plan.chunks {
        loop {
            if s.stopping() {
                return;
            }
            let next = plan.next.load(Ordering::Relaxed).min(plan.chunks.len());
            while consumed_chunks < next {
                let c = &plan.chunks[consumed_chunks];
                consumed += c.end - c.start;
                consumed_chunks += 1;
            }
            if advised < consumed + limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        s.image.advise_willneed(range.clone());
        advised += range.end - range.start;
    }
}

/// Copy working-set chunks ahead of faults until none are left, serving
/// any faults this thread happens to read first.
fn prefetch_main(s: &Shared, id: usize, plan: &PrefetchPlan) {
    let mut c = Copier::new(s, id);
    let tracking = s.config.dirty_tracking;
    let mut claimed = Vec::new();
    'chunks: loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        let Some(range) = plan.chunks.get(i) else {
            break;
        };
        if s.stopping() || c.serve_queued() == Flow::Stop {
            break;
        }
        for r in &s.regions {
            let lo = range.start.max(r.offset);
            let hi = range.end.min(r.offset + r.size);
            if lo >= hi {
                continue;
            }
            let pages =
                ((lo - r.offset) / r.unit) as usize..((hi - r.offset).div_ceil(r.unit)) as usize;
            claimed.clear();
            r.claimed.claim_range(pages, &mut claimed);
            for run in &claimed {
                if c.populate(r, run.clone(), tracking, Purpose::Prefetch) == Flow::Stop {
                    break 'chunks;
                }
            }
        }
    }
    c.serve_queued();
    if plan.running.fetch_sub(1, Ordering::AcqRel) == 1 {
        s.metrics.note_prefetch_done();
        info!(
            build = s.image.name(),
            pages = s.metrics.pages_prefetched.load(Ordering::Relaxed),
            elapsed_ms = plan.started.elapsed().as_millis() as u64,
            "prefetch done"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(pages: usize) -> RegionState {
        RegionState {
            base: 0x7000_0000_0000,
            size: pages as u64 * PAGE_4K,
            offset: 0,
            unit: PAGE_4K,
            claimed: AtomicBitmap::new(pages),
            removed: AtomicBitmap::new(pages),
            dirty: None,
            working_set: None,
            streams: Default::default(),
            next_stream: AtomicUsize::new(0),
        }
    }

    #[test]
    fn sequential_faults_double_the_window_up_to_the_cap_and_random_ones_do_not() {
        let r = region(4096);
        let (base, max) = (64 * 1024, 1 << 20);
        // First fault: the aligned base window (16 pages).
        assert_eq!(r.window(5, base, max), (0, 16));
        // Faults where each window ended: 32, 64, 128, 256 pages, then capped.
        assert_eq!(r.window(16, base, max), (16, 48));
        assert_eq!(r.window(48, base, max), (48, 112));
        assert_eq!(r.window(112, base, max), (112, 240));
        assert_eq!(r.window(240, base, max), (240, 496));
        assert_eq!(r.window(496, base, max), (496, 752));
        // A fault elsewhere starts over with the aligned base window.
        assert_eq!(r.window(3000, base, max), (2992, 3008));
        // The first stream is still remembered.
        assert_eq!(r.window(752, base, max), (752, 1008));
        // Windows stop at the region's end.
        assert_eq!(r.window(4090, base, max), (4080, 4096));
    }

    #[test]
    fn a_fixed_window_ignores_streams() {
        let r = region(64);
        assert_eq!(r.window(5, 16384, 16384), (4, 8));
        assert_eq!(r.window(8, 16384, 16384), (8, 12));
        assert_eq!(r.window(8, 4096, 4096), (8, 9));
    }
}
