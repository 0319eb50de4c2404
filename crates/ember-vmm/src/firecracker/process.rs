//! Firecracker processes: starting one in its own session, network namespace
//! and mount namespace (the stable view from [`crate::layout`]), waiting for
//! its API socket, watching it exit, killing it, and re-attaching to one a
//! previous host agent started.
//!
//! Processes are signalled through a pidfd, so a recycled PID can never be
//! hit. A process we started is reaped by a watcher task that records its exit
//! status; an adopted one (not our child) can only be seen to exit.
//!
//! This module does not talk to the API beyond checking the socket accepts.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::layout::ViewPlan;
use crate::{Result, VmmError};

/// Everything needed to start one VMM process, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LaunchCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Network namespace to enter before exec (`None` under the jailer, which
    /// joins it itself).
    pub netns: Option<PathBuf>,
    pub view: ViewPlan,
    /// Ember's own jail (the view inside it) and the program's path in
    /// it, when the VM is confined and no jailer is configured.
    pub jail: Option<(crate::jail::JailPlan, PathBuf)>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// A running (or exited) VMM process.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    pid: u32,
    pidfd: OwnedFd,
    exit: watch::Receiver<Option<String>>,
}

/// Check a binary exists and is executable.
pub(crate) fn check_binary(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        _ => Err(VmmError::BinaryMissing {
            path: path.to_owned(),
        }),
    }
}

impl VmmProcess {
    /// Start the process. Returns once it is running (not once its API is up:
    /// see [`VmmProcess::wait_for_socket`]).
    pub(crate) fn spawn(launch: &LaunchCommand) -> Result<Self> {
        check_binary(&launch.program)?;
        let netns = match &launch.netns {
            Some(path) => Some(File::open(path).map_err(|source| VmmError::Io {
                context: format!("opening network namespace {}", path.display()),
                source,
            })?),
            None => None,
        };
        launch.view.validate().map_err(VmmError::Config)?;
        launch
            .view
            .create_placeholders()
            .map_err(|source| VmmError::Io {
                context: format!(
                    "creating mount points for {}",
                    launch.view.run_dir.display()
                ),
                source,
            })?;
        let placement = match &launch.jail {
            None => crate::layout::Placement::View(launch.view.prepare().map_err(|source| {
                VmmError::Io {
                    context: "preparing the VMM's mount namespace".into(),
                    source,
                }
            })?),
            Some((jail, _)) => {
                crate::layout::Placement::Jail(jail.prepare().map_err(|source| VmmError::Io {
                    context: "preparing the VMM's jail".into(),
                    source,
                })?)
            }
        };
        let stdout = append(&launch.stdout)?;
        let stderr = append(&launch.stderr)?;

        let program = launch.jail.as_ref().map_or(&launch.program, |(_, p)| p);
        let mut command = tokio::process::Command::new(program);
        command
            .args(&launch.args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec. It only
        // makes system calls (setsid, setns, then the placement's unshare,
        // mounts, chroot and uid changes) on data prepared above, and
        // neither allocates nor takes locks.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid().map_err(errno)?;
                if let Some(ns) = &netns {
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(errno)?;
                }
                placement.enter()
            });
        }
        let mut child = command.spawn().map_err(VmmError::Spawn)?;
        let pid = child.id().ok_or_else(|| VmmError::Exited {
            status: "exited before it could be watched".into(),
            log_tail: String::new(),
        })?;
        // The child is not reaped before the watcher below waits for it, so
        // the PID cannot have been reused yet.
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(source) => {
                let _ = child.start_kill();
                return Err(VmmError::Io {
                    context: format!("opening a pidfd for process {pid}"),
                    source,
                });
            }
        };
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            tracing::debug!(pid, %status, "VMM process exited");
            let _ = tx.send(Some(status));
        });
        Ok(Self { pid, pidfd, exit })
    }

    /// Watch a process a previous host agent started.
    pub(crate) fn adopt(pid: u32) -> Result<Self> {
        let pidfd = pidfd_open(pid).map_err(|e| VmmError::Exited {
            status: format!("process {pid} is gone ({e})"),
            log_tail: String::new(),
        })?;
        let watched = pidfd.try_clone().map_err(|source| VmmError::Io {
            context: "duplicating a pidfd".into(),
            source,
        })?;
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays open
        // and unchanged until the AsyncFd is dropped.
        let watched = unsafe { AsyncFd::register_with_interest(watched, Interest::READABLE) }
            .map_err(|e| VmmError::Io {
                context: "watching a pidfd".into(),
                source: e.into_parts().1,
            })?;
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            // A pidfd becomes readable when its process exits.
            let _ = watched.readable().await;
            let _ = tx.send(Some(
                "exited (status unknown: adopted, not our child)".to_owned(),
            ));
        });
        Ok(Self { pid, pidfd, exit })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// A receiver that sees the exit status once the process is gone.
    pub(crate) fn exit_watch(&self) -> watch::Receiver<Option<String>> {
        self.exit.clone()
    }

    pub(crate) fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    pub(crate) async fn wait(&self) -> String {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(status) => status.clone().unwrap_or_default(),
            // The watcher task is gone without a word: the runtime is shutting down.
            Err(_) => "unknown (watcher stopped)".to_owned(),
        }
    }

    /// Wait for the process to exit, at most `timeout`.
    pub(crate) async fn wait_timeout(&self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }

    /// Send a signal. A process that already exited is not an error.
    pub(crate) fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd we own, a null siginfo
        // and no flags; it touches no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(err)
        }
    }

    pub(crate) fn kill(&self) -> std::io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Wait until `socket` accepts connections, the process exits, or
    /// `timeout` passes.
    pub(crate) async fn wait_for_socket(
        &self,
        socket: &Path,
        timeout: Duration,
        logs: &[&Path],
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return Err(VmmError::Exited {
                    status,
                    log_tail: log_tail(logs),
                });
            }
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                tracing::debug!(pid = self.pid, waited = ?start.elapsed(), "VMM API socket is up");
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(VmmError::SocketTimeout {
                    path: socket.to_owned(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Is `pid` a process whose command line carries `needle` as one argument?
pub(crate) fn cmdline_has(pid: u32, needle: &[&str]) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    args.windows(needle.len())
        .any(|w| w.iter().zip(needle).all(|(a, n)| *a == n.as_bytes()))
}

/// The last lines of the VMM's logs, for error messages.
pub(crate) fn log_tail(logs: &[&Path]) -> String {
    const BYTES: u64 = 2048;
    const LINES: usize = 8;
    let mut lines = Vec::new();
    for path in logs {
        let Ok(mut file) = File::open(path) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(BYTES)));
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        lines.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .take(LINES)
                .rev(),
        );
    }
    if lines.is_empty() {
        "(no log output)".into()
    } else {
        lines.join(" | ")
    }
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| VmmError::Io {
            context: format!("opening {}", path.display()),
            source,
        })
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn errno(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_matches_whole_adjacent_arguments() {
        let me = std::process::id();
        let exe = std::env::args().next().unwrap();
        assert!(cmdline_has(me, &[exe.as_str()]));
        assert!(!cmdline_has(me, &["--id", "nope-not-here"]));
        assert!(!cmdline_has(u32::MAX, &["x"]));
    }

    #[test]
    fn log_tail_takes_the_last_lines_of_each_log() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(
            &a,
            (0..20).map(|i| format!("line {i}\n")).collect::<String>(),
        )
        .unwrap();
        let tail = log_tail(&[&a, &dir.path().join("missing")]);
        assert!(tail.starts_with("line 12 |"), "{tail}");
        assert!(tail.ends_with("line 19"), "{tail}");
        assert_eq!(log_tail(&[]), "(no log output)");
    }

    #[tokio::test]
    async fn missing_binary_is_reported_as_such() {
        let err = check_binary(Path::new("/nonexistent/firecracker")).unwrap_err();
        assert!(matches!(err, VmmError::BinaryMissing { .. }), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let not_exec = dir.path().join("fc");
        std::fs::write(&not_exec, b"").unwrap();
        assert!(matches!(
            check_binary(&not_exec),
            Err(VmmError::BinaryMissing { .. })
        ));
    }
}
