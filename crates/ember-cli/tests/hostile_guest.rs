//! A hostile guest against a real `ember agent` with real QEMU microVMs:
//! the guest is root in its VM and tries to make the host act on bytes it
//! wrote. Each attack must leave the host intact and the guest with only
//! what it already had.
//!
//! Needs root and a built guest image.

#[macro_use]
mod support;

use ember_proto::host as pb;
use support::agent::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The first KiB of a qcow2 image whose backing file is `target`, read as
/// raw: the L1 table is moved into the header's own cluster (all zeros), so
/// every read falls through to `target`. ext4 leaves bytes 0–1023 of a disk
/// unused, so a guest can write this over its root disk and keep running.
/// Were the host ever to probe such a disk's format, QEMU would open
/// `target` — any host path — as the guest's disk.
fn qcow2_header_naming(target: &std::path::Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
        .args(["-F", "raw", "-b"])
        .arg(target)
        .arg(&img)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img create: {out:?}");
    let mut header = std::fs::read(&img).unwrap();
    header.truncate(512);
    // l1_table_offset (bytes 40..48) → 512: the zeroed second half.
    header[40..48].copy_from_slice(&512u64.to_be_bytes());
    header.resize(1024, 0);
    header
}

/// Processes with `path` open.
fn processes_holding(path: &std::path::Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path))
        {
            pids.push(pid);
        }
    }
    pids
}

/// The first KiB of the guest's disk as the device holds it now (direct
/// I/O: the guest's page cache, restored with its memory, would otherwise
/// answer from before the restore).
async fn first_kib(c: &mut Client, id: &str) -> String {
    let (out, err, code) = sh(
        c,
        id,
        "dd if=/dev/vda bs=1024 count=1 iflag=direct status=none | base64 -w0",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    out
}

async fn pause_resume(c: &mut Client, id: &str, home: &AgentHome) {
    c.pause_sandbox(pb::SandboxRef {
        sandbox_id: id.to_owned(),
    })
    .await
    .unwrap_or_else(|s| panic!("pause: {s:?}\n{}", home.logs()));
    c.resume_sandbox(pb::ResumeSandboxRequest {
        sandbox_id: id.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("resume: {s:?}\n{}", home.logs()));
}

/// The guest writes a qcow2 header naming a host file over its disk's
/// first bytes. Every path that stacks a new disk layer on a flat copy of
/// its disk — a fork of its template, a resume past the overlay chain's
/// limit, a resume after the rootfs cache was removed — must show the guest
/// its own bytes, never the host file's.
#[test]
fn a_qcow2_header_written_by_the_guest_never_opens_a_host_file_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let secret = home.dir.path().join("host-secret");
    std::fs::write(&secret, "EMBER-HOST-SECRET\n".repeat(4096)).unwrap();
    let header = qcow2_header_naming(&secret);
    let agent = home.start();
    runtime().block_on(async {
        use base64::Engine;
        let mut c = agent.client().await;
        let id = new_id();
        c.create_sandbox(create_request(&id))
            .await
            .unwrap_or_else(|s| panic!("create: {s:?}\n{}", home.logs()));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&header);
        let (_, err, code) = sh(
            &mut c,
            &id,
            &format!(
                "echo {b64} | base64 -d | dd of=/dev/vda bs=1024 count=1 conv=notrunc,fsync 2>&1 && sync"
            ),
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let own = first_kib(&mut c, &id).await;
        assert_eq!(own, b64, "the guest reads back what it wrote");

        // A template of it, and a fork: the fork's disk sits on a flat copy
        // of the template's.
        let snap = c
            .create_snapshot(pb::CreateSnapshotRequest {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("snapshot: {s:?}\n{}", home.logs()))
            .into_inner();
        let fork = new_id();
        let mut req = create_request(&fork);
        req.build_id = snap.build_id.clone();
        c.create_sandbox(req)
            .await
            .unwrap_or_else(|s| panic!("fork: {s:?}\n{}", home.logs()));
        assert_eq!(first_kib(&mut c, &fork).await, b64, "fork of a template");

        // Past the overlay chain's limit a resume materialises a flat copy.
        for cycle in 0..9 {
            pause_resume(&mut c, &id, &home).await;
            assert_eq!(first_kib(&mut c, &id).await, b64, "resume {cycle}");
        }

        // With the rootfs cache gone, a resume materialises one too.
        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        let cache = home.data().join("cache").join("rootfs");
        for e in std::fs::read_dir(&cache).unwrap().flatten() {
            std::fs::remove_file(e.path()).unwrap();
        }
        c.resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("resume without cache: {s:?}\n{}", home.logs()));
        assert_eq!(first_kib(&mut c, &id).await, b64, "resume without cache");

        // And nothing of the host file reached either guest's disk.
        for sb in [&id, &fork] {
            let (out, err, _) = sh(
                &mut c,
                sb,
                "dd if=/dev/vda bs=1M count=4 iflag=direct status=none | grep -c EMBER-HOST-SECRET; true",
            )
            .await;
            assert_eq!(out.trim(), "0", "{sb} read the host file: {err}");
        }
        // No process has the host file open.
        assert_eq!(processes_holding(&secret), Vec::<u32>::new());

        for sb in [&id, &fork] {
            c.destroy_sandbox(pb::SandboxRef {
                sandbox_id: sb.clone(),
            })
            .await
            .unwrap();
        }
        c.delete_snapshot(pb::DeleteSnapshotRequest {
            build_id: snap.build_id,
        })
        .await
        .unwrap();
        assert_clean(&home);
    });
}
