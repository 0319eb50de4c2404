//! The QEMU process: spawning it where it belongs, signalling it without
//! racing pid reuse, and noticing when it exits.
//!
//! QEMU runs in its own session (a Ctrl-C at Ember's terminal must not reach
//! it), inside the VM's network namespace, and deliberately without
//! `PR_SET_PDEATHSIG`: VMs outlive a host-agent restart and are adopted by the
//! next agent. A process is addressed through a pidfd, so a signal never hits
//! an unrelated process that reused the pid. Exit is observed by waiting on
//! our own child, or, for an adopted process that is not our child, by the
//! pidfd becoming readable (polling `kill(pid, 0)` where pidfds are missing).
//!
//! This module does not build the command line or talk QMP.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Result, VmmError};

/// One QEMU process and its exit status once known.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    /// `None` on kernels without pidfds (before 5.3): signals go by pid.
    pidfd: Option<OwnedFd>,
    exit: watch::Receiver<Option<String>>,
}

impl Process {
    /// Start `binary args…` with stdout and stderr appended to `log`, in
    /// `netns`, placed (view or jail) as `placement` says. `binary` is the
    /// path as the placed process sees it.
    pub fn spawn(
        binary: &Path,
        args: &[OsString],
        log: &Path,
        netns: Option<&Path>,
        placement: Option<crate::layout::Placement>,
    ) -> Result<Process> {
        let log_file = File::create(log).map_err(|source| VmmError::Io {
            context: format!("creating {}", log.display()),
            source,
        })?;
        let log_err = log_file.try_clone().map_err(|source| VmmError::Io {
            context: format!("duplicating {}", log.display()),
            source,
        })?;
        // Opened before fork: the child may only make async-signal-safe calls.
        let netns = netns
            .map(|path| {
                File::open(path).map_err(|source| VmmError::Io {
                    context: format!("opening network namespace {}", path.display()),
                    source,
                })
            })
            .transpose()?;
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());

        let mut command = tokio::process::Command::new(binary);
        command
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and makes
        // system calls only (setsid, setns, then the placement's mounts,
        // chroot and uid changes) on data prepared above; it allocates
        // nothing. The namespace descriptor stays open in the child because
        // `netns` outlives `spawn`.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                match &placement {
                    Some(p) => p.enter(),
                    None => Ok(()),
                }
            });
        }
        // The binary was found before; a failure now is the exec or the
        // placement (a mount, the chroot, the uid change) in the child.
        let mut child = command.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound if !binary.exists() => VmmError::BinaryMissing {
                path: binary.to_path_buf(),
            },
            _ => VmmError::Spawn(e),
        })?;
        drop(netns);
        let pid = child
            .id()
            .expect("a child that was not yet awaited has a pid");
        // The child cannot be reaped before `wait` below runs, so the pid is
        // still ours when the pidfd is opened.
        let pidfd = pidfd_open(pid).ok();
        let (tx, rx) = watch::channel(None);
        // Not aborted on drop: a detached VM's exit must still be reaped.
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => describe(status),
                Err(e) => format!("unknown (waiting failed: {e})"),
            };
            tracing::debug!(pid, %status, "QEMU exited");
            let _ = tx.send(Some(status));
        });
        Ok(Process {
            pid,
            pidfd,
            exit: rx,
        })
    }

    /// Watch a process this one did not start. Fails if it is already gone.
    pub fn adopt(pid: u32) -> io::Result<Process> {
        if pid == 0 || pid > i32::MAX as u32 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let (tx, rx) = watch::channel(None);
        let not_ours = "exited (status unknown: not a child of this process)".to_owned();
        match pidfd_open(pid) {
            Ok(pidfd) => {
                let watched = pidfd.try_clone()?;
                // SAFETY: `watched` is an OwnedFd moved into the AsyncFd, so
                // the descriptor stays open and unchanged for its lifetime.
                let async_fd = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        watched,
                        tokio::io::Interest::READABLE,
                    )
                }
                .map_err(io::Error::from)?;
                tokio::spawn(async move {
                    // A pidfd turns readable when the process exits.
                    let _ = async_fd.readable().await;
                    let _ = tx.send(Some(not_ours));
                });
                Ok(Process {
                    pid,
                    pidfd: Some(pidfd),
                    exit: rx,
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                if !pid_alive(pid) {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                tokio::spawn(async move {
                    while pid_alive(pid) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let _ = tx.send(Some(not_ours));
                });
                Ok(Process {
                    pid,
                    pidfd: None,
                    exit: rx,
                })
            }
            Err(e) => Err(e),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    pub async fn wait(&self) -> String {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(status) => status.clone().expect("waited for Some"),
            // The watcher task was dropped with its runtime.
            Err(_) => "unknown (watcher stopped)".to_owned(),
        }
    }

    /// Wait for exit up to `limit`.
    pub async fn wait_timeout(&self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.wait()).await.ok()
    }

    pub fn kill(&self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Send `signal`; a process that already exited is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if self.exit_status().is_some() {
            return Ok(());
        }
        let rc = match &self.pidfd {
            // SAFETY: pidfd_send_signal with a valid pidfd, a signal number,
            // a null siginfo (meaning "as if by kill") and no flags.
            Some(pidfd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            },
            // SAFETY: kill(2) has no memory-safety preconditions.
            None => libc::c_long::from(unsafe { libc::kill(self.pid as libc::pid_t, signal) }),
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last `max_lines` lines of QEMU's log, for error messages.
pub fn log_tail(log: &Path, max_lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const WINDOW: u64 = 8192;
    let Ok(mut file) = File::open(log) else {
        return format!("(no log at {})", log.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
    let mut bytes = Vec::new();
    let _ = file.take(WINDOW).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(max_lines)..].join("\n");
    if tail.is_empty() {
        "(log is empty)".to_owned()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_processes_are_watched_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let p = Process::spawn(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "echo starting; echo failing >&2; exec sleep 30".into(),
            ],
            &log,
            None,
            None,
        )
        .unwrap();
        assert!(p.exit_status().is_none());
        // Its own session: the session id is its pid.
        let sid = std::fs::read_to_string(format!("/proc/{}/stat", p.pid())).unwrap();
        let fields: Vec<&str> = sid.rsplit_once(')').unwrap().1.split_whitespace().collect();
        assert_eq!(fields[3], p.pid().to_string(), "session id");
        // Kill only once the shell has written both lines.
        for _ in 0..250 {
            if log_tail(&log, 10) == "starting\nfailing" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p.kill().unwrap();
        assert_eq!(p.wait().await, "killed by signal 9");
        assert_eq!(p.exit_status().as_deref(), Some("killed by signal 9"));
        // Signalling an exited process is harmless.
        p.kill().unwrap();
        assert_eq!(log_tail(&log, 10), "starting\nfailing");
        assert_eq!(log_tail(&log, 1), "failing");
    }

    #[tokio::test]
    async fn exit_codes_and_missing_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = Process::spawn(
            Path::new("/bin/sh"),
            &["-c".into(), "exit 3".into()],
            &dir.path().join("log"),
            None,
            None,
        )
        .unwrap();
        assert_eq!(p.wait().await, "exited with code 3");
        let err = Process::spawn(
            Path::new("/nonexistent/qemu"),
            &[],
            &dir.path().join("log"),
            None,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, VmmError::BinaryMissing { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn adopted_processes_are_seen_exiting() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let adopted = Process::adopt(child.id()).unwrap();
        assert!(adopted.exit_status().is_none());
        adopted.kill().unwrap();
        // Reap it (as its parent, here the test); the pidfd fires on exit.
        let _ = child.wait();
        let status = adopted.wait_timeout(Duration::from_secs(5)).await.unwrap();
        assert!(status.contains("not a child"), "{status}");
        // Gone and reaped: nothing left to adopt.
        assert!(Process::adopt(child.id()).is_err());
    }
}
