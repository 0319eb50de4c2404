//! Directory watches (`GET /files/watch`): inotify on a directory (and,
//! when recursive, on every directory below it, including ones made while
//! it runs), relayed as NDJSON [`WatchEvent`] lines until the client goes.
//!
//! Watches are added with the acting user's file-system identity
//! ([`fsid::run_as`]), so the kernel's own read-permission check decides
//! what a user may watch.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ember_guest_api::{WatchEvent, WatchEventKind};
use futures::Stream;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use crate::error::AgentError;
use crate::fsid;
use crate::users::Identity;

/// Most directories one recursive watch covers.
pub const MAX_DIRS: usize = 8192;

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_ONLYDIR
}

struct Fd(Arc<Inotify>);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watch descriptors and the directory (relative to the root) each covers.
type Dirs = HashMap<WatchDescriptor, PathBuf>;

/// Add watches for `dir` (at `rel` below the root) and, if `recursive`,
/// for every directory below it; as the acting user. Returns the entries
/// found below `rel` (relative path, is a directory): for a directory made
/// while the watch runs, what was put in it before its own watch was in
/// place, which the caller reports as created.
fn add_tree(
    ino: &Inotify,
    dirs: &mut Dirs,
    root: &Path,
    rel: PathBuf,
    recursive: bool,
) -> Result<Vec<(PathBuf, bool)>, AgentError> {
    let mut found = Vec::new();
    let mut todo = vec![rel];
    while let Some(rel) = todo.pop() {
        if dirs.len() >= MAX_DIRS {
            return Err(AgentError::InvalidRequest(format!(
                "{} holds more than {MAX_DIRS} directories; watch a smaller tree",
                root.display()
            )));
        }
        let abs = root.join(&rel);
        let wd = match ino.add_watch(&abs, mask()) {
            Ok(wd) => wd,
            // A subdirectory gone (or unreadable) since it was seen: not watched.
            Err(e) if !rel.as_os_str().is_empty() => {
                tracing::debug!(dir = %abs.display(), error = %e, "not watched");
                continue;
            }
            Err(e) => {
                return Err(AgentError::io(
                    format!("watch {}", abs.display()),
                    std::io::Error::from(e),
                ));
            }
        };
        dirs.insert(wd, rel.clone());
        if recursive && let Ok(entries) = std::fs::read_dir(&abs) {
            for entry in entries.flatten() {
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                let child = rel.join(entry.file_name());
                if is_dir {
                    todo.push(child.clone());
                }
                found.push((child, is_dir));
            }
        }
    }
    Ok(found)
}

fn line(kind: WatchEventKind, name: String, is_dir: bool) -> Bytes {
    let mut v = serde_json::to_vec(&WatchEvent { kind, name, is_dir }).unwrap_or_default();
    v.push(b'\n');
    v.into()
}

fn kind_of(mask: AddWatchFlags) -> Option<WatchEventKind> {
    Some(if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
        WatchEventKind::Overflow
    } else if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
        WatchEventKind::Create
    } else if mask.contains(AddWatchFlags::IN_MODIFY) {
        WatchEventKind::Write
    } else if mask.contains(AddWatchFlags::IN_DELETE) {
        WatchEventKind::Remove
    } else if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
        WatchEventKind::Rename
    } else if mask.contains(AddWatchFlags::IN_ATTRIB) {
        WatchEventKind::Chmod
    } else {
        return None;
    })
}

/// Start watching `root` as `id`; the stream's first line is `started`
/// (the watch is in place), then one line per change, until it is dropped.
pub async fn watch(
    id: &Identity,
    root: PathBuf,
    recursive: bool,
) -> Result<impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static, AgentError>
{
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| AgentError::io("inotify_init", std::io::Error::from(e)))?;
    let ino = Arc::new(ino);
    let dirs = {
        let (ino, root) = (ino.clone(), root.clone());
        fsid::run_as(id, move || {
            let mut dirs = Dirs::new();
            add_tree(&ino, &mut dirs, &root, PathBuf::new(), recursive)?;
            Ok(dirs)
        })
        .await?
    };
    // SAFETY: the Fd holds an Arc of the Inotify, so the descriptor stays
    // open and the same for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(Fd(ino.clone())) }
        .map_err(|e| AgentError::io("register the inotify descriptor", e.into_parts().1))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let _ = tx.try_send(line(WatchEventKind::Started, String::new(), false));
    let id = id.clone();
    tokio::spawn(async move {
        let mut dirs = dirs;
        loop {
            let mut guard = tokio::select! {
                _ = tx.closed() => return,
                g = fd.readable() => match g {
                    Ok(g) => g,
                    Err(_) => return,
                },
            };
            let events = match ino.read_events() {
                Ok(evs) => evs,
                Err(nix::errno::Errno::EAGAIN) => {
                    guard.clear_ready();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inotify read failed; the watch ends");
                    return;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    dirs.remove(&ev.wd);
                    continue;
                }
                let Some(kind) = kind_of(ev.mask) else {
                    continue;
                };
                let is_dir = ev.mask.contains(AddWatchFlags::IN_ISDIR);
                let rel = match (dirs.get(&ev.wd), &ev.name) {
                    (Some(dir), Some(name)) => dir.join(name),
                    (Some(dir), None) => dir.clone(),
                    (None, _) => PathBuf::new(),
                };
                let mut created_inside = Vec::new();
                if recursive && is_dir && kind == WatchEventKind::Create {
                    let (ino2, root2, rel2, mut d) = (
                        ino.clone(),
                        root.clone(),
                        rel.clone(),
                        std::mem::take(&mut dirs),
                    );
                    (dirs, created_inside) = match fsid::run_as(&id, move || {
                        let found = add_tree(&ino2, &mut d, &root2, rel2, true).unwrap_or_default();
                        Ok((d, found))
                    })
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                }
                let name = rel.to_string_lossy().into_owned();
                if tx.send(line(kind, name, is_dir)).await.is_err() {
                    return;
                }
                // What appeared in a new directory before its watch did (an
                // entry made in between may be reported twice).
                for (child, child_is_dir) in created_inside {
                    let name = child.to_string_lossy().into_owned();
                    if tx
                        .send(line(WatchEventKind::Create, name, child_is_dir))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(b), rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn superuser() -> Identity {
        Identity {
            uid: 0,
            gid: 0,
            groups: vec![0],
            name: Some("root".into()),
            home: "/root".into(),
            shell: "/bin/sh".into(),
        }
    }

    async fn next_event(
        s: &mut (impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Unpin),
    ) -> WatchEvent {
        let b = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
            .await
            .expect("an event within 5 s")
            .expect("the stream goes on")
            .unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_are_reported_relative_to_the_root_and_new_dirs_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let me = superuser();
        let mut s = Box::pin(watch(&me, root.clone(), true).await.unwrap());
        assert_eq!(next_event(&mut s).await.kind, WatchEventKind::Started);

        std::fs::write(root.join("a.txt"), b"x").unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(
            (ev.kind, ev.name.as_str()),
            (WatchEventKind::Create, "a.txt")
        );
        let ev = next_event(&mut s).await;
        assert_eq!(
            (ev.kind, ev.name.as_str()),
            (WatchEventKind::Write, "a.txt")
        );

        std::fs::create_dir(root.join("sub")).unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(
            (ev.kind, ev.name.as_str(), ev.is_dir),
            (WatchEventKind::Create, "sub", true)
        );
        std::fs::write(root.join("sub/b"), b"").unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(
            (ev.kind, ev.name.as_str()),
            (WatchEventKind::Create, "sub/b")
        );

        std::fs::rename(root.join("a.txt"), root.join("c.txt")).unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(
            (ev.kind, ev.name.as_str()),
            (WatchEventKind::Rename, "a.txt")
        );
        let ev = next_event(&mut s).await;
        assert_eq!(
            (ev.kind, ev.name.as_str()),
            (WatchEventKind::Create, "c.txt")
        );
        std::fs::remove_file(root.join("c.txt")).unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(
            (ev.kind, ev.name.as_str()),
            (WatchEventKind::Remove, "c.txt")
        );
    }

    #[tokio::test]
    async fn a_file_or_a_missing_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let me = superuser();
        assert!(watch(&me, dir.path().join("f"), false).await.is_err());
        assert!(watch(&me, dir.path().join("missing"), false).await.is_err());
    }
}
