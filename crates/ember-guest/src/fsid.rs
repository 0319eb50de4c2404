//! Runs a blocking file-system closure with a user's file-system identity.
//!
//! The closure runs on a fresh thread that sets its own fsuid, fsgid and
//! supplementary groups (all per-thread credentials in Linux; the raw
//! `setgroups` syscall is used because glibc's wrapper changes every thread)
//! and unshares its fs context (so a `chdir` there stays there). The thread
//! exits afterwards, so the credentials never leak into the agent's other
//! work. Root operations skip the extra thread.

use std::io;

use crate::error::AgentError;
use crate::users::Identity;

/// Runs `f` as `identity` on a blocking thread.
pub async fn run_as<T, F>(identity: &Identity, f: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AgentError> + Send + 'static,
{
    let identity = identity.clone();
    tokio::task::spawn_blocking(move || {
        if identity.is_root() && identity.gid == 0 {
            return f();
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                become_fs_identity(&identity)
                    .map_err(|e| AgentError::io("switching file-system identity", e))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(AgentError::Internal("file operation panicked".into())))
        })
    })
    .await
    .map_err(|e| AgentError::Internal(format!("file operation task failed: {e}")))?
}

/// Only for a thread that exits right after its work (see the module docs).
fn become_fs_identity(id: &Identity) -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/umask/root
    // from the rest of the process; no memory is involved.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let groups: Vec<libc::gid_t> = id.groups.clone();
    // SAFETY: the raw syscall reads `groups.len()` gids from a live Vec; it
    // changes only the calling thread's credentials.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // setfsgid/setfsuid report the previous value, never an error; calling
    // them twice and reading back is the documented way to check.
    // SAFETY: plain syscalls on this thread's credentials.
    unsafe {
        libc::setfsgid(id.gid);
        libc::setfsuid(id.uid);
    }
    // SAFETY: as above.
    let (gid_now, uid_now) = unsafe { (libc::setfsgid(id.gid), libc::setfsuid(id.uid)) };
    if gid_now as u32 != id.gid || uid_now as u32 != id.uid {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}
