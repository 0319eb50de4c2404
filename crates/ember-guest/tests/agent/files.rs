//! Files: streaming round trips, modes, stat/list, errors, users, concurrency.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use ember_guest_api::*;
use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::common::{Agent, assert_code};

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

async fn read_all(
    client: &GuestClient,
    path: &str,
    user: Option<&UserSpec>,
) -> Result<Vec<u8>, GuestError> {
    let content = client.read_file(path, user).await?;
    let chunks: Vec<bytes::Bytes> = content.try_collect().await?;
    Ok(chunks.concat())
}

/// Deterministic pseudo-random bytes, generated as they are read, so the
/// test itself never holds the whole file either.
struct Noise {
    state: u64,
    left: u64,
}

impl tokio::io::AsyncRead for Noise {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize & !7;
        let n = if n == 0 {
            (self.left as usize).min(buf.remaining())
        } else {
            n
        };
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            out.extend_from_slice(&self.state.to_le_bytes());
        }
        out.truncate(n);
        buf.put_slice(&out);
        self.left -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn large_file_round_trip_streams_without_buffering() {
    const SIZE: u64 = 64 << 20;
    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let path = s(&dir.path().join("big/random.bin"));
    let baseline_kib = agent.peak_rss_kib();

    // Hash what is uploaded as it is generated.
    let mut expected = Sha256::new();
    let mut generator = Noise {
        state: 0x9e37_79b9_7f4a_7c15,
        left: SIZE,
    };
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = generator.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        expected.update(&chunk[..n]);
    }
    let expected = expected.finalize();

    let info = client
        .write_file(
            &path,
            &WriteOptions::default(),
            Noise {
                state: 0x9e37_79b9_7f4a_7c15,
                left: SIZE,
            },
        )
        .await
        .unwrap();
    assert_eq!(info.size, SIZE);
    assert_eq!(info.kind, FileKind::File);

    let content = client.read_file(&path, None).await.unwrap();
    assert_eq!(content.size(), Some(SIZE));
    let mut reader = content.into_async_read();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    assert_eq!(total, SIZE);
    assert_eq!(hasher.finalize(), expected, "checksum after the round trip");

    let peak_kib = agent.peak_rss_kib();
    let growth_kib = peak_kib.saturating_sub(baseline_kib);
    eprintln!(
        "64 MiB round trip: agent peak RSS {peak_kib} KiB (baseline {baseline_kib} KiB, growth {growth_kib} KiB = {:.1}% of the file)",
        growth_kib as f64 * 100.0 / (SIZE / 1024) as f64
    );
    assert!(
        growth_kib < SIZE / 1024 / 4,
        "agent RSS grew by {growth_kib} KiB moving a {} KiB file: it buffers",
        SIZE / 1024
    );
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["random.bin"]);
}

#[tokio::test]
async fn write_modes_and_replacement() {
    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let path = s(&dir.path().join("f"));
    let info = client
        .write_file(&path, &WriteOptions::default(), &b"one"[..])
        .await
        .unwrap();
    assert_eq!(info.mode, 0o644);
    let info = client
        .write_file(
            &path,
            &WriteOptions {
                mode: Some(0o600),
                ..Default::default()
            },
            &b"two!"[..],
        )
        .await
        .unwrap();
    assert_eq!((info.mode, info.size), (0o600, 4));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    // Replacing without a mode keeps the file's mode.
    client
        .write_file(&path, &WriteOptions::default(), &b"three"[..])
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    assert_eq!(read_all(&client, &path, None).await.unwrap(), b"three");
    // Empty files work.
    let empty = s(&dir.path().join("empty"));
    client
        .write_file(&empty, &WriteOptions::default(), &b""[..])
        .await
        .unwrap();
    assert_eq!(read_all(&client, &empty, None).await.unwrap(), b"");
    // Without parents a missing directory is an error.
    let nested = s(&dir.path().join("a/b/c"));
    assert_code(
        client
            .write_file(
                &nested,
                &WriteOptions {
                    parents: Some(false),
                    ..Default::default()
                },
                &b"x"[..],
            )
            .await,
        ErrorCode::NotFound,
    );
    client
        .write_file(&nested, &WriteOptions::default(), &b"x"[..])
        .await
        .unwrap();
    assert_code(
        client
            .write_file(&s(dir.path()), &WriteOptions::default(), &b"x"[..])
            .await,
        ErrorCode::IsADirectory,
    );
}

#[tokio::test]
async fn stat_and_list_describe_entries() {
    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("file.txt"), b"12345").unwrap();
    std::fs::set_permissions(d.join("file.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("file.txt", d.join("link")).unwrap();

    let st = client.stat(&s(&d.join("file.txt")), None).await.unwrap();
    let meta = std::fs::metadata(d.join("file.txt")).unwrap();
    assert_eq!(st.name, "file.txt");
    assert_eq!((st.kind, st.size, st.mode), (FileKind::File, 5, 0o640));
    assert_eq!((st.uid, st.gid), (meta.uid(), meta.gid()));
    assert_eq!(
        st.mtime_unix_ns,
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
    );
    let link = client.stat(&s(&d.join("link")), None).await.unwrap();
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(link.symlink_target.as_deref(), Some("file.txt"));

    let entries = client.list_dir(&s(d), None).await.unwrap();
    let summary: Vec<(&str, FileKind)> =
        entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        summary,
        [
            ("file.txt", FileKind::File),
            ("link", FileKind::Symlink),
            ("sub", FileKind::Dir)
        ]
    );
    assert_eq!(entries[0].size, 5);
    assert_eq!(entries[1].symlink_target.as_deref(), Some("file.txt"));
    assert_eq!(entries[2].path, s(&d.join("sub")));
    let root = client.stat("/", None).await.unwrap();
    assert_eq!((root.name.as_str(), root.kind), ("/", FileKind::Dir));
}

#[tokio::test]
async fn path_and_state_errors_have_their_codes() {
    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("file"), b"x").unwrap();
    let missing = s(&d.join("missing"));

    assert_code(client.read_file(&missing, None).await, ErrorCode::NotFound);
    assert_code(client.stat(&missing, None).await, ErrorCode::NotFound);
    assert_code(
        client.read_file("relative/path", None).await,
        ErrorCode::BadRequest,
    );
    assert_code(client.stat("relative", None).await, ErrorCode::BadRequest);
    assert_code(
        client.read_file(&format!("{}/a\0b", s(d)), None).await,
        ErrorCode::BadRequest,
    );
    assert_code(
        client
            .mkdir(&MkdirRequest {
                path: format!("{}/x\0", s(d)),
                ..Default::default()
            })
            .await,
        ErrorCode::BadRequest,
    );
    assert_code(client.read_file(&s(d), None).await, ErrorCode::IsADirectory);
    assert_code(
        client.list_dir(&s(&d.join("file")), None).await,
        ErrorCode::NotADirectory,
    );
    assert_code(
        client.stat(&s(&d.join("file/below")), None).await,
        ErrorCode::NotADirectory,
    );
    assert_code(
        client
            .write_file(
                &s(d),
                &WriteOptions {
                    mode: Some(0o17777),
                    ..Default::default()
                },
                &b""[..],
            )
            .await,
        ErrorCode::BadRequest,
    );

    // mkdir: parents, existing, -p semantics, mode.
    let deep = s(&d.join("a/b/c"));
    assert_code(
        client
            .mkdir(&MkdirRequest {
                path: deep.clone(),
                ..Default::default()
            })
            .await,
        ErrorCode::NotFound,
    );
    let made = client
        .mkdir(&MkdirRequest {
            path: deep.clone(),
            parents: true,
            mode: Some(0o700),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((made.kind, made.mode), (FileKind::Dir, 0o700));
    client
        .mkdir(&MkdirRequest {
            path: deep.clone(),
            parents: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_code(
        client
            .mkdir(&MkdirRequest {
                path: deep.clone(),
                ..Default::default()
            })
            .await,
        ErrorCode::AlreadyExists,
    );
    assert_code(
        client
            .mkdir(&MkdirRequest {
                path: s(&d.join("file")),
                parents: true,
                ..Default::default()
            })
            .await,
        ErrorCode::AlreadyExists,
    );

    // remove: non-empty directory needs recursive.
    let a = s(&d.join("a"));
    assert_code(
        client.remove(&a, false, None).await,
        ErrorCode::DirectoryNotEmpty,
    );
    client.remove(&a, true, None).await.unwrap();
    assert!(!d.join("a").exists());
    assert_code(
        client.remove(&missing, false, None).await,
        ErrorCode::NotFound,
    );
    client
        .remove(&s(&d.join("file")), false, None)
        .await
        .unwrap();
    assert_code(client.remove("/", true, None).await, ErrorCode::BadRequest);

    // rename: no silent overwrite.
    std::fs::write(d.join("from"), b"new").unwrap();
    std::fs::write(d.join("to"), b"old").unwrap();
    let rename = RenameRequest {
        from: s(&d.join("from")),
        to: s(&d.join("to")),
        ..Default::default()
    };
    assert_code(client.rename(&rename).await, ErrorCode::AlreadyExists);
    assert_eq!(std::fs::read(d.join("to")).unwrap(), b"old");
    let moved = client
        .rename(&RenameRequest {
            overwrite: true,
            ..rename.clone()
        })
        .await
        .unwrap();
    assert_eq!((moved.name.as_str(), moved.size), ("to", 3));
    assert_eq!(std::fs::read(d.join("to")).unwrap(), b"new");
    assert_code(client.rename(&rename).await, ErrorCode::NotFound);
    let fresh = RenameRequest {
        from: s(&d.join("to")),
        to: s(&d.join("fresh")),
        ..Default::default()
    };
    client.rename(&fresh).await.unwrap();
    assert!(d.join("fresh").exists() && !d.join("to").exists());
}

#[tokio::test]
async fn file_operations_run_with_the_users_identity() {
    ember_testkit::require!(
        ember_testkit::is_root(),
        "needs root to act as another user"
    );
    let agent = Agent::start();
    let client = agent.init().await;
    let nobody = UserSpec::name("nobody");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Others may pass through the directory but not list or change it.
    std::fs::write(d.join("secret"), b"s").unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(d.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret = s(&d.join("secret"));
    assert_code(
        client.read_file(&secret, Some(&nobody)).await,
        ErrorCode::PermissionDenied,
    );
    assert_code(
        client.list_dir(&s(d), Some(&nobody)).await,
        ErrorCode::PermissionDenied,
    );
    assert_code(
        client.watch(&s(d), false, Some(&nobody)).await,
        ErrorCode::PermissionDenied,
    );
    assert_code(
        client
            .write_file(
                &s(&d.join("new")),
                &WriteOptions {
                    user: Some(nobody.clone()),
                    ..Default::default()
                },
                &b"x"[..],
            )
            .await,
        ErrorCode::PermissionDenied,
    );
    assert_code(
        client.remove(&secret, false, Some(&nobody)).await,
        ErrorCode::PermissionDenied,
    );
    assert_code(
        client
            .mkdir(&MkdirRequest {
                path: s(&d.join("m")),
                user: Some(nobody.clone()),
                ..Default::default()
            })
            .await,
        ErrorCode::PermissionDenied,
    );
    // As root the same read works.
    assert_eq!(read_all(&client, &secret, None).await.unwrap(), b"s");

    // In a directory nobody owns, what nobody creates belongs to nobody.
    let home = d.join("nobody-home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let written = client
        .write_file(
            &s(&home.join("sub/f")),
            &WriteOptions {
                user: Some(nobody.clone()),
                ..Default::default()
            },
            &b"hi"[..],
        )
        .await
        .unwrap();
    assert_eq!((written.uid, written.gid), (65534, 65534));
    assert_eq!(std::fs::metadata(home.join("sub")).unwrap().uid(), 65534);
    let made = client
        .mkdir(&MkdirRequest {
            path: s(&home.join("dir")),
            user: Some(UserSpec::Uid(65534)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(made.uid, 65534);
    assert_eq!(
        read_all(&client, &s(&home.join("sub/f")), Some(&nobody))
            .await
            .unwrap(),
        b"hi"
    );
    // The agent's own identity was not changed by any of this.
    let st = client
        .write_file(
            &s(&d.join("root-file")),
            &WriteOptions::default(),
            &b"r"[..],
        )
        .await
        .unwrap();
    assert_eq!(st.uid, 0);
}

#[tokio::test]
async fn concurrent_uploads_do_not_mix() {
    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let uploads = (0..6u8).map(|i| {
        let client = client.clone();
        let path = s(&dir.path().join(format!("f{i}")));
        async move {
            let data = vec![i; (4 << 20) + i as usize];
            client
                .write_file(
                    &path,
                    &WriteOptions::default(),
                    std::io::Cursor::new(data.clone()),
                )
                .await
                .unwrap();
            (path, data)
        }
    });
    let written = futures::future::join_all(uploads).await;
    for (path, data) in written {
        let back = read_all(&client, &path, None).await.unwrap();
        assert_eq!(Sha256::digest(&back), Sha256::digest(&data), "{path}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("ember-tmp")
        })
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test]
async fn uploads_from_streams_and_failed_uploads_leave_nothing_behind() {
    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let path = s(&dir.path().join("f"));
    let chunks = futures::stream::iter(
        ["one ", "two ", "three"].map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
    );
    client
        .write_file_stream(&path, &WriteOptions::default(), chunks)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"one two three");

    // The source fails half-way: the old content stays, no temporary file remains.
    let failing = futures::stream::iter(vec![
        Ok(bytes::Bytes::from(vec![1u8; 1 << 20])),
        Err(std::io::Error::other("the source broke")),
    ]);
    let err = client
        .write_file_stream(&path, &WriteOptions::default(), failing)
        .await
        .unwrap_err();
    assert!(matches!(err, GuestError::Source { .. }), "{err:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if names == ["f"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "leftovers: {names:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"one two three");
}

#[tokio::test]
async fn pseudo_files_without_a_size_stream_to_the_end() {
    let agent = Agent::start();
    let client = agent.init().await;
    let path = format!("/proc/{}/status", agent.pid());
    let content = client.read_file(&path, None).await.unwrap();
    assert_eq!(
        content.size(),
        None,
        "procfs reports size 0: no Content-Length"
    );
    let chunks: Vec<bytes::Bytes> = content.try_collect().await.unwrap();
    let text = String::from_utf8(chunks.concat()).unwrap();
    assert!(text.starts_with("Name:\tember-guest\n"), "{text}");
}

#[tokio::test]
async fn a_watch_reports_changes_until_it_is_dropped() {
    use ember_guest_api::WatchEventKind;
    use futures::StreamExt;

    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut w = client.watch(&s(d), true, None).await.unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/new"), b"x").unwrap();
    // "new" may be made before the agent watches "sub": it is reported as
    // created either way (its write may then be folded into that).
    let mut seen = Vec::new();
    while !seen.contains(&(WatchEventKind::Create, "sub/new".to_owned())) {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), w.next())
            .await
            .expect("an event")
            .expect("the stream goes on")
            .unwrap();
        seen.push((ev.kind, ev.name));
    }
    assert_eq!(
        seen[0],
        (WatchEventKind::Create, "sub".to_owned()),
        "{seen:?}"
    );
    std::fs::remove_file(d.join("sub/new")).unwrap();
    loop {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), w.next())
            .await
            .expect("the removal")
            .expect("the stream goes on")
            .unwrap();
        if ev.kind == WatchEventKind::Remove {
            assert_eq!(ev.name, "sub/new");
            break;
        }
    }
    std::fs::write(d.join("plain"), b"").unwrap();
    assert_code(
        client.watch(&s(&d.join("plain")), false, None).await,
        ErrorCode::NotADirectory,
    );
}
