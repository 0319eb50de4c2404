//! The fake's devices: drive files and TAP devices opened the way
//! Firecracker opens them (so a missing drive or TAP fails where it would
//! fail), and the hybrid vsock socket with a simulated guest behind it.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

pub fn open_drive(path: &str, read_only: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| {
            format!("Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: {e} {path}")
        })
}

/// Open (as root: create) a TAP device in our network namespace, with the
/// flags Firecracker uses.
pub fn open_tap(name: &str) -> Result<File, String> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    let fail = |e: std::io::Error| format!("Open tap device failed: {e} ({name})");
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(fail(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(fail)?;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq (40 bytes, which
    // IfReq is) on a /dev/net/tun descriptor we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(tun)
}

/// What the simulated guest does with vsock connections.
#[derive(Debug, Default)]
pub struct GuestVsock {
    /// vCPUs running: a paused (or never started) guest answers nothing.
    pub running: Arc<AtomicBool>,
    /// Ports the guest accepts on (and echoes).
    pub listening: std::sync::Mutex<BTreeSet<u32>>,
    next_host_port: AtomicU32,
}

impl GuestVsock {
    pub fn new(running: Arc<AtomicBool>) -> Self {
        Self {
            running,
            listening: Default::default(),
            next_host_port: AtomicU32::new(1 << 30),
        }
    }
}

/// The host side of a vsock device: a listening Unix socket.
#[derive(Debug)]
pub struct VsockDevice {
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl VsockDevice {
    pub fn bind(uds_path: &Path, guest: Arc<GuestVsock>) -> Result<Self, String> {
        let listener = UnixListener::bind(uds_path).map_err(|e| {
            format!("Vsock config error: Cannot create backend for vsock device: UnixBind({e})")
        })?;
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(connection(stream, guest.clone()));
            }
        });
        Ok(Self { accept })
    }
}

async fn connection(mut stream: UnixStream, guest: Arc<GuestVsock>) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while request.len() < 32 {
        match stream.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => request.push(byte[0]),
            _ => return,
        }
    }
    let port = std::str::from_utf8(&request)
        .ok()
        .and_then(|r| r.strip_prefix("CONNECT "))
        .and_then(|p| p.trim().parse::<u32>().ok());
    let Some(port) = port else {
        return;
    };
    if !guest.running.load(Ordering::SeqCst) {
        // Nothing in the guest runs to answer: hold the connection open
        // until the host gives up.
        let mut sink = [0u8; 64];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    let accepts = guest
        .listening
        .lock()
        .expect("vsock ports lock")
        .contains(&port);
    if !accepts {
        // The guest resets the connection; Firecracker closes the socket.
        return;
    }
    let host_port = guest.next_host_port.fetch_add(1, Ordering::SeqCst);
    if stream
        .write_all(format!("OK {host_port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let (mut rx, mut tx) = stream.into_split();
    let _ = tokio::io::copy(&mut rx, &mut tx).await;
}
