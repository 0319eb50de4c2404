//! Firecracker's userfaultfd handshake: after registering guest memory, the
//! VMM connects to the page server's Unix socket and sends, in one
//! `sendmsg`, a JSON array describing each guest memory region plus the
//! userfaultfd as `SCM_RIGHTS`; then it closes the connection. Nothing else
//! is ever said on that socket. This module owns both ends of that message
//! and the peer's identity (`SO_PEERCRED`, `SO_PEERPIDFD`); what the regions
//! mean is the server's business.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::Error;

/// One guest memory region as Firecracker describes it
/// (`GuestRegionUffdMapping` in its `vmm/src/persist.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// Where the region starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Region length in bytes.
    pub size: u64,
    /// Where the region's contents start in the guest memory image.
    pub offset: u64,
    /// The region's page size in bytes: 4096, or 2 MiB for hugetlbfs.
    /// (Firecracker also sends `page_size_kib`, deprecated and, despite its
    /// name, in bytes; it is ignored.)
    pub page_size: u64,
}

/// The handshake as it arrived.
#[derive(Debug)]
pub struct Handshake {
    pub regions: Vec<GuestRegion>,
    pub uffd: OwnedFd,
    pub peer: Peer,
}

/// The VMM process on the other end of the socket.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    /// A pidfd for `pid`, so that signalling it can never hit a recycled
    /// PID and its exit can be polled for.
    pub pidfd: OwnedFd,
}

impl Peer {
    /// SIGKILL the peer. Errors are ignored: if it is already gone the
    /// outcome is the same.
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number,
        // a null siginfo and zero flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    /// Has the peer exited? (A pidfd polls readable once its process exits.)
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents != 0
    }
}

/// The longest handshake message accepted. Firecracker sends one object per
/// region (a handful); this bounds what a confused peer can make us buffer.
const MAX_MESSAGE: usize = 64 * 1024;

/// Read the handshake from an accepted connection: the JSON may arrive in
/// several pieces; the fd arrives with the first. Gives up after `timeout`.
pub fn receive(stream: &UnixStream, timeout: Duration) -> Result<Handshake, Error> {
    let peer = peer_of(stream)?;
    let deadline = Instant::now() + timeout;
    let mut message = Vec::new();
    let mut uffd: Option<OwnedFd> = None;
    let mut chunk = vec![0u8; 8192];
    loop {
        let regions = if message.is_empty() {
            None
        } else {
            serde_json::from_slice::<Vec<GuestRegion>>(&message).ok()
        };
        if let (Some(regions), Some(_)) = (&regions, &uffd) {
            return Ok(Handshake {
                regions: regions.clone(),
                uffd: uffd.take().expect("checked above"),
                peer,
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Handshake(
                "timed out waiting for the regions and the userfaultfd".into(),
            ));
        }
        if !poll_readable(stream.as_raw_fd(), left)? {
            continue;
        }
        let (n, fd) = recv_with_fd(stream, &mut chunk)?;
        if let Some(fd) = fd {
            if uffd.is_some() {
                return Err(Error::Handshake(
                    "peer sent more than one file descriptor".into(),
                ));
            }
            uffd = Some(fd);
        }
        if n == 0 {
            let what = match (&uffd, message.is_empty()) {
                (None, _) => "no userfaultfd",
                (Some(_), true) => "no region description",
                (Some(_), false) => "a region description that is not valid JSON",
            };
            return Err(Error::Handshake(format!(
                "peer closed the connection after sending {what}"
            )));
        }
        message.extend_from_slice(&chunk[..n]);
        if message.len() > MAX_MESSAGE {
            return Err(Error::Handshake(format!(
                "region description exceeds {MAX_MESSAGE} bytes"
            )));
        }
    }
}

/// Send the handshake as Firecracker does: connect, one `sendmsg` with the
/// JSON and the fd, close. Used by the VMM-side stand-in in tests and the
/// benchmark, and by fake VMMs.
pub fn send(socket: &Path, regions: &[GuestRegion], uffd: impl AsFd) -> io::Result<()> {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(flatten)]
        region: &'a GuestRegion,
        page_size_kib: u64,
    }
    let wire: Vec<Wire> = regions
        .iter()
        .map(|r| Wire {
            region: r,
            page_size_kib: r.page_size,
        })
        .collect();
    let json = serde_json::to_vec(&wire).map_err(io::Error::other)?;
    let stream = UnixStream::connect(socket)?;
    let fds = [uffd.as_fd().as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&json)];
    let sent = socket::sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    if sent != json.len() {
        // A Unix stream socket takes a message this small whole; anything
        // else is a broken peer, and Firecracker would not retry either.
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            json.len()
        )));
    }
    Ok(())
}

fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>), Error> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(Error::Handshake(format!(
                    "receiving the handshake failed: {e}"
                )));
            }
        }
    };
    let mut fd = None;
    let mut extra = Vec::new();
    for c in msg
        .cmsgs()
        .map_err(|e| Error::Handshake(format!("bad control message: {e}")))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed `raw` in our fd table
                // for us; we are its only owner.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if fd.is_none() {
                    fd = Some(owned);
                } else {
                    extra.push(owned);
                }
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) || !extra.is_empty() {
        return Err(Error::Handshake(
            "peer sent more than one file descriptor".into(),
        ));
    }
    Ok((msg.bytes, fd))
}

fn poll_readable(fd: RawFd, timeout: Duration) -> Result<bool, Error> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Error::Handshake(format!("poll failed: {err}")));
    }
    Ok(n > 0)
}

/// The connecting process: a pidfd straight from the socket where the
/// kernel supports it (`SO_PEERPIDFD`, Linux 6.5), else `SO_PEERCRED`'s PID
/// opened with `pidfd_open`.
fn peer_of(stream: &UnixStream) -> Result<Peer, Error> {
    let cred = socket::getsockopt(&stream.as_fd(), socket::sockopt::PeerCredentials)
        .map_err(|e| Error::Handshake(format!("SO_PEERCRED failed: {e}")))?;
    let pid = cred.pid();
    let mut raw: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PEERPIDFD writes one int into `raw`; `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut raw as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let pidfd = if rc == 0 && raw >= 0 {
        // SAFETY: the kernel returned a new pidfd that we now own.
        unsafe { OwnedFd::from_raw_fd(raw) }
    } else {
        // SAFETY: pidfd_open takes a pid and flags by value.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(Error::Handshake(format!(
                "peer pid {pid} is already gone: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: pidfd_open returned a new fd that we now own.
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
    };
    Ok(Peer { pid, pidfd })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_region_json_parses_and_the_deprecated_field_is_ignored() {
        // The shape Firecracker sends (persist.rs, GuestRegionUffdMapping).
        let json = r#"[{"base_host_virt_addr":140000000000,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096},
                       {"base_host_virt_addr":150000000000,"size":2097152,"offset":134217728,"page_size":2097152,"page_size_kib":2097152}]"#;
        let regions: Vec<GuestRegion> = serde_json::from_str(json).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].offset, 134217728);
        assert_eq!(regions[1].page_size, 2 << 20);
    }

    #[test]
    fn handshake_carries_regions_fd_and_peer_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let regions = vec![GuestRegion {
            base_host_virt_addr: 0x7000_0000_0000,
            size: 1 << 20,
            offset: 0,
            page_size: 4096,
        }];
        let file = tempfile::tempfile().unwrap();
        send(&path, &regions, &file).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let hs = receive(&stream, Duration::from_secs(5)).unwrap();
        assert_eq!(hs.regions, regions);
        assert_eq!(hs.peer.pid, std::process::id() as i32);
        assert!(!hs.peer.has_exited());
        // The received fd is the same open file.
        let a = nix::sys::stat::fstat(file.as_raw_fd()).unwrap();
        let b = nix::sys::stat::fstat(hs.uffd.as_raw_fd()).unwrap();
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
    }

    #[test]
    fn a_peer_that_sends_no_fd_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        std::io::Write::write_all(&mut client, b"[]").unwrap();
        drop(client);
        let (stream, _) = listener.accept().unwrap();
        let err = receive(&stream, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("no userfaultfd"), "{err}");
    }
}
