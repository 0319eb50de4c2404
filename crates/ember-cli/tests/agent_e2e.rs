//! The host agent end to end: a real `ember agent` process driven over
//! gRPC, real QEMU microVMs (TCG here), real network namespaces.
//!
//! Needs root and a built guest image. Every test checks at the end that
//! nothing of its sandboxes is left: no VMM or page-server process, no
//! namespace or host link of its pool, no RAM file, no disk layer.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use ember_proto::host as pb;
use support::agent::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The full lifecycle the issue asks for: create, exec, files and a
/// background process with an in-memory counter, then five pause/resume
/// cycles — each checks the VMM is gone and the slot free while paused, and
/// that files and the process's memory survived the resume.
#[test]
fn lifecycle_survives_five_pause_resume_cycles_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let mut agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let id = new_id();
        let sb = c.create_sandbox(create_request(&id)).await.unwrap().into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Running);
        assert_eq!((sb.vcpus, sb.memory_mib), (1, 512));

        let (out, _, code) = sh(&mut c, &id, "echo hello; echo oops >&2; exit 3").await;
        assert_eq!((out.as_str(), code), ("hello\n", 3));

        // A file, and a background process keeping a counter in memory
        // (a shell variable), printing it when poked with SIGUSR1.
        let (_, err, code) = sh(
            &mut c,
            &id,
            "echo persisted > /home/user/note.txt && sync",
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let counter = r#"
            n=0
            trap 'echo "$n" > /tmp/counter.out' USR1
            while true; do n=$((n+1)); sleep 0.05; done
        "#;
        let mut bg = c
            .exec(pb::ExecRequest {
                sandbox_id: id.clone(),
                cmd: "bash".into(),
                args: vec!["-c".into(), counter.into()],
                background: true,
                tag: "counter".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = bg.message().await.unwrap().unwrap();
        let Some(pb::exec_event::Event::StartedPid(pid)) = first.event else {
            panic!("first event is not the start: {first:?}");
        };
        drop(bg);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let counter_now = |c: Client| {
            let id = id.clone();
            async move {
                let mut c = c;
                let (out, err, code) = sh(
                    &mut c,
                    &id,
                    &format!("rm -f /tmp/counter.out; kill -USR1 {pid}; for i in $(seq 100); do [ -s /tmp/counter.out ] && break; sleep 0.05; done; cat /tmp/counter.out"),
                )
                .await;
                assert_eq!(code, 0, "{err}");
                out.trim().parse::<u64>().unwrap_or_else(|_| panic!("counter {out:?}"))
            }
        };
        let mut last = counter_now(c.clone()).await;
        assert!(last > 0);

        for cycle in 1..=5 {
            let paused = c
                .pause_sandbox(pb::SandboxRef { sandbox_id: id.clone() })
                .await
                .unwrap_or_else(|s| panic!("pause {cycle}: {s:?}\n{}", home.logs()))
                .into_inner();
            assert_eq!(state(&paused), pb::SandboxState::Paused);
            assert!(!paused.build_id.is_empty());
            // Paused = every resource freed.
            assert_clean(&home);
            let info = c.host_info(pb::HostInfoRequest {}).await.unwrap().into_inner();
            assert_eq!((info.vcpus_used, info.memory_mib_used), (0, 0));
            assert!(info.builds.contains(&paused.build_id));

            let resumed = c
                .resume_sandbox(pb::ResumeSandboxRequest {
                    sandbox_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("resume {cycle}: {s:?}\n{}", home.logs()))
                .into_inner();
            assert_eq!(state(&resumed), pb::SandboxState::Running);
            let (out, _, _) = sh(&mut c, &id, "cat /home/user/note.txt").await;
            assert_eq!(out, "persisted\n", "cycle {cycle}: file lost");
            let now = counter_now(c.clone()).await;
            assert!(
                now >= last,
                "cycle {cycle}: the background process lost its memory ({now} < {last})"
            );
            last = now;
            // The clock was set on resume (not left at the snapshot's time).
            let (out, _, _) = sh(&mut c, &id, "date +%s").await;
            let guest: i64 = out.trim().parse().unwrap();
            let host = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            assert!((guest - host).abs() < 5, "guest clock {guest} vs host {host}");
            // A write after each resume, read after the next one.
            let (_, err, code) = sh(&mut c, &id, &format!("echo {cycle} >> /home/user/cycles && sync")).await;
            assert_eq!(code, 0, "{err}");
        }
        let (out, _, _) = sh(&mut c, &id, "cat /home/user/cycles").await;
        assert_eq!(out, "1\n2\n3\n4\n5\n");

        c.destroy_sandbox(pb::SandboxRef { sandbox_id: id.clone() })
            .await
            .unwrap();
        let err = c
            .get_sandbox(pb::SandboxRef { sandbox_id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_clean(&home);
    });
    agent.stop();
}

/// A resumed guest's wall clock is the host's, not the snapshot's: after a
/// pause long enough that a stale clock would be 20 s behind, the guest's
/// `date` lies within a second of the host's time around the call.
#[test]
fn resumed_clock_is_within_a_second_after_a_long_pause_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let id = new_id();
        c.create_sandbox(create_request(&id)).await.unwrap();
        let sandbox = || pb::SandboxRef {
            sandbox_id: id.clone(),
        };
        c.pause_sandbox(sandbox())
            .await
            .unwrap_or_else(|s| panic!("pause: {s:?}\n{}", home.logs()));
        let pause = Duration::from_secs(20);
        tokio::time::sleep(pause).await;
        c.resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("resume: {s:?}\n{}", home.logs()));
        let unix = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        let before = unix();
        let (out, err, code) = sh(&mut c, &id, "date +%s.%N").await;
        let after = unix();
        assert_eq!(code, 0, "{err}");
        let guest: f64 = out.trim().parse().unwrap_or_else(|_| panic!("date: {out:?}"));
        eprintln!(
            "after a {pause:?} pause the guest clock is {:+.3} s from the host's (exec took {:.3} s)",
            guest - (before + after) / 2.0,
            after - before
        );
        assert!(
            guest > before - 1.0 && guest < after + 1.0,
            "guest clock {guest:.3} is more than 1 s outside the host's [{before:.3}, {after:.3}]"
        );
        c.destroy_sandbox(sandbox()).await.unwrap();
        assert_clean(&home);
    });
}

#[test]
fn illegal_transitions_and_unknown_ids_are_clear_errors_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let unknown = new_id();
        let err = c
            .pause_sandbox(pb::SandboxRef {
                sandbox_id: unknown.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        assert!(err.message().contains(&unknown), "{}", err.message());
        let err = c
            .get_sandbox(pb::SandboxRef {
                sandbox_id: "../../etc".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

        let id = new_id();
        c.create_sandbox(create_request(&id)).await.unwrap();
        let err = c
            .resume_sandbox(pb::ResumeSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("running"), "{}", err.message());

        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        let err = c
            .pause_sandbox(pb::SandboxRef {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let err = c
            .exec(pb::ExecRequest {
                sandbox_id: id.clone(),
                cmd: "true".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("paused"), "{}", err.message());

        // Concurrent calls on one sandbox are serialised: of two resumes,
        // exactly one succeeds and the other finds it running.
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let req = pb::ResumeSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        };
        let (a, b) = tokio::join!(
            c1.resume_sandbox(req.clone()),
            c2.resume_sandbox(req.clone())
        );
        assert_eq!(
            [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count(),
            1,
            "{a:?} {b:?}"
        );
        let loser = a.err().or(b.err()).unwrap();
        assert_eq!(loser.code(), tonic::Code::FailedPrecondition);

        // Bad input.
        let err = c
            .create_sandbox(pb::CreateSandboxRequest {
                sandbox_id: new_id(),
                guest_token: "t".into(),
                memory_mib: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("memory_mib"), "{}", err.message());
        let err = c
            .create_sandbox(pb::CreateSandboxRequest {
                sandbox_id: new_id(),
                guest_token: "t".into(),
                network: Some(pb::NetworkPolicy {
                    allow_out: vec!["10.0.0.1/8".into()],
                    deny_out: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("allow_out"), "{}", err.message());
        let err = c
            .create_sandbox(pb::CreateSandboxRequest {
                sandbox_id: new_id(),
                guest_token: "t".into(),
                build_id: ember_types::BuildId::new().to_string(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

        c.destroy_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        assert_clean(&home);
    });
}

#[test]
fn wrong_host_token_is_refused_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    runtime().block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", agent.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = ember_proto::host::host_agent_client::HostAgentClient::with_interceptor(
            channel,
            Bearer("wrong".into()),
        );
        let err = c.host_info(pb::HostInfoRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    });
}

#[test]
fn killed_vmm_marks_the_sandbox_failed_and_reclaims_it_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let id = new_id();
        c.create_sandbox(create_request(&id)).await.unwrap();
        let vmms = home.processes();
        assert_eq!(vmms.len(), 1, "one VMM: {vmms:?}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(vmms[0] as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let sb = loop {
            let sb = c
                .get_sandbox(pb::SandboxRef {
                    sandbox_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if state(&sb) == pb::SandboxState::Failed || Instant::now() > deadline {
                break sb;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(state(&sb), pb::SandboxState::Failed, "{sb:?}");
        assert!(
            sb.failure_reason.contains("VMM exited"),
            "{}",
            sb.failure_reason
        );
        assert_clean(&home);
        let info = c
            .host_info(pb::HostInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((info.vcpus_used, info.memory_mib_used), (0, 0));
        c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
            .await
            .unwrap();
    });
}

/// Snapshot a running sandbox into a template, fork three sandboxes from
/// it at once: each sees the template's files and state, their writes are
/// their own, and the source keeps running.
#[test]
fn template_forks_share_the_frozen_state_but_not_their_writes_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let src = new_id();
        let mut req = create_request(&src);
        req.memory_mib = 384;
        c.create_sandbox(req).await.unwrap();
        let (_, err, code) = sh(
            &mut c,
            &src,
            "mkdir -p /srv && echo from-template > /srv/data && sync",
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let snap = c
            .create_snapshot(pb::CreateSnapshotRequest {
                sandbox_id: src.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("{s:?}\n{}", home.logs()))
            .into_inner();
        assert_eq!((snap.vcpus, snap.memory_mib), (1, 384));
        assert!(snap.stored_bytes > 0 && snap.memory_bytes == 384 << 20);
        // Ready to fork when the snapshot returns: the disk base forks sit
        // on is cached already (a copy of the paused source's overlay), so
        // the first fork does not materialise the image.
        let cached = home
            .data()
            .join("cache/rootfs")
            .join(format!("{}.qcow2", snap.build_id));
        assert!(
            cached.is_file(),
            "no template disk cache at {}",
            cached.display()
        );
        // The source keeps running and keeps its own state.
        let (out, _, _) = sh(&mut c, &src, "cat /srv/data; echo after > /srv/data").await;
        assert_eq!(out, "from-template\n");

        // Locked shape: other values are refused, naming the template's.
        let mut bad = create_request(&new_id());
        bad.build_id = snap.build_id.clone();
        bad.vcpus = 2;
        let err = c.create_sandbox(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("1 vCPUs and 384 MiB"),
            "{}",
            err.message()
        );

        let forks: Vec<String> = (0..3).map(|_| new_id()).collect();
        let creates = forks.iter().map(|id| {
            let mut c = c.clone();
            let mut req = create_request(id);
            req.build_id = snap.build_id.clone();
            async move { c.create_sandbox(req).await }
        });
        for r in futures::future::join_all(creates).await {
            let sb = r
                .unwrap_or_else(|s| panic!("fork: {s:?}\n{}", home.logs()))
                .into_inner();
            assert_eq!(state(&sb), pb::SandboxState::Running);
            assert_eq!((sb.vcpus, sb.memory_mib), (1, 384));
            assert_eq!(sb.source_build_id, snap.build_id);
            // Where the fork's time went, phase by phase, "total" last.
            let names: Vec<&str> = sb.phases.iter().map(|p| p.name.as_str()).collect();
            for phase in [
                "slot",
                "disk",
                "memory",
                "vmm.spawn",
                "vmm.load_state",
                "guest.init",
            ] {
                assert!(names.contains(&phase), "no {phase} phase in {names:?}");
            }
            let total = sb.phases.last().expect("phases");
            assert_eq!(total.name, "total");
            assert!(
                sb.phases.iter().all(|p| p.micros <= total.micros),
                "{:?}",
                sb.phases
            );
        }
        for (i, id) in forks.iter().enumerate() {
            let (out, _, _) = sh(
                &mut c,
                id,
                &format!("cat /srv/data; echo fork-{i} > /srv/data"),
            )
            .await;
            assert_eq!(out, "from-template\n", "fork {i}");
        }
        for (i, id) in forks.iter().enumerate() {
            let (out, _, _) = sh(&mut c, id, "cat /srv/data").await;
            assert_eq!(out, format!("fork-{i}\n"), "fork {i} saw another's write");
        }
        let (out, _, _) = sh(&mut c, &src, "cat /srv/data").await;
        assert_eq!(out, "after\n");
        // Forks get fresh randomness: their kernels' RNG output differs.
        let mut uuids = std::collections::HashSet::new();
        for id in &forks {
            let (out, _, _) = sh(&mut c, id, "cat /proc/sys/kernel/random/uuid").await;
            uuids.insert(out);
        }
        assert_eq!(uuids.len(), 3);

        // Deleting the template while a paused fork still references its
        // data keeps the data; the paused fork still resumes; the data goes
        // with the last user.
        let kept = forks[0].clone();
        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: kept.clone(),
        })
        .await
        .unwrap();
        for id in forks.iter().skip(1).chain([&src]) {
            c.destroy_sandbox(pb::SandboxRef {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap();
        }
        let del = c
            .delete_snapshot(pb::DeleteSnapshotRequest {
                build_id: snap.build_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            !del.data_freed,
            "the paused fork still needs the template's data"
        );
        let listed = c
            .list_snapshots(pb::ListSnapshotsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(listed.snapshots.is_empty());
        c.resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: kept.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", home.logs()));
        let (out, _, _) = sh(&mut c, &kept, "cat /srv/data").await;
        assert_eq!(out, "fork-0\n");
        c.destroy_sandbox(pb::SandboxRef { sandbox_id: kept })
            .await
            .unwrap();
        let builds = std::fs::read_dir(home.data().join("builds"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect::<Vec<_>>();
        // The base image's build and the warm base the template's source
        // made (its first plain create) are all that is left.
        let warm = home.warm_builds();
        assert_eq!(warm.len(), 1, "{warm:?}");
        assert_eq!(
            builds.len(),
            2,
            "only the base image's build and the warm base are left: {builds:?}"
        );
        assert!(builds.contains(&warm[0]), "{builds:?}");
        assert_clean(&home);
    });
}

/// A plain create forks from the warm base: the image booted once per
/// shape and snapshotted before its first `/init`, so nothing of the tenant
/// who paid for that boot (token, environment, files) is in it. A `cold`
/// create still boots, and the warm base outlives every sandbox.
#[test]
fn plain_creates_fork_a_warm_base_that_holds_nothing_of_a_tenant_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let names = |sb: &pb::Sandbox| -> Vec<String> {
            sb.phases.iter().map(|p| p.name.clone()).collect()
        };
        let secret = "tenant-a-secret-4f1d9c";
        let a = new_id();
        let mut req = create_request(&a);
        req.memory_mib = 256;
        req.env.insert("SECRET".into(), secret.into());
        let first = c
            .create_sandbox(req.clone())
            .await
            .unwrap_or_else(|s| panic!("{s:?}\n{}", home.logs()))
            .into_inner();
        // The first create of the shape boots, and makes the warm base
        // before handing the VM over.
        let phases = names(&first);
        assert!(phases.iter().any(|p| p == "vmm.snapshot"), "{phases:?}");
        assert!(!phases.iter().any(|p| p == "vmm.load_state"), "{phases:?}");
        assert!(first.source_build_id.is_empty(), "not a template fork");
        let warm: serde_json::Value = serde_json::from_slice(
            &std::fs::read(home.data().join("warm/1x256.json")).expect("warm record"),
        )
        .unwrap();
        let warm_build = warm["build"].as_str().unwrap().to_owned();
        assert_eq!(first.build_id, warm_build, "the VM descends from it");
        let (out, _, _) = sh(
            &mut c,
            &a,
            "echo $SECRET; echo mine > /home/user/a-file; sync",
        )
        .await;
        assert_eq!(out, format!("{secret}\n"));

        // Nothing of tenant A is in the warm base's memory.
        let memfile =
            std::fs::read(home.data().join("builds").join(&warm_build).join("memfile")).unwrap();
        assert!(memfile.len() > 1 << 20, "the warm base holds guest memory");
        for needle in [secret.as_bytes(), req.guest_token.as_bytes()] {
            assert!(
                !memfile.windows(needle.len()).any(|w| w == needle),
                "{:?} is in the warm base",
                String::from_utf8_lossy(needle)
            );
        }

        // The search would see it: A's own pause (after its /init) holds
        // its environment.
        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: a.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", home.logs()));
        let paused = c
            .get_sandbox(pb::SandboxRef {
                sandbox_id: a.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(paused.build_id, warm_build);
        let memfile = std::fs::read(
            home.data()
                .join("builds")
                .join(&paused.build_id)
                .join("memfile"),
        )
        .unwrap();
        assert!(
            memfile
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "A's pause should hold its environment"
        );

        // The next plain create forks from it: its own token and
        // environment, none of A's files.
        let b = new_id();
        let mut req = create_request(&b);
        req.memory_mib = 256;
        req.env.insert("SECRET".into(), "b".into());
        let second = c
            .create_sandbox(req)
            .await
            .unwrap_or_else(|s| panic!("{s:?}\n{}", home.logs()))
            .into_inner();
        let phases = names(&second);
        assert!(phases.iter().any(|p| p == "vmm.load_state"), "{phases:?}");
        assert!(!phases.iter().any(|p| p == "vmm.snapshot"), "{phases:?}");
        assert_eq!(second.build_id, warm_build);
        assert!(second.source_build_id.is_empty());
        let (out, _, _) = sh(
            &mut c,
            &b,
            "echo $SECRET; cat /home/user/a-file 2>&1 || true",
        )
        .await;
        assert!(out.starts_with("b\n"), "{out}");
        assert!(!out.contains("mine"), "A's file is in B: {out}");

        // A cold create boots.
        let cold = new_id();
        let mut req = create_request(&cold);
        req.memory_mib = 256;
        req.cold = true;
        let booted = c.create_sandbox(req).await.unwrap().into_inner();
        let phases = names(&booted);
        assert!(
            !phases
                .iter()
                .any(|p| p == "vmm.load_state" || p == "vmm.snapshot"),
            "{phases:?}"
        );
        assert!(booted.build_id.is_empty());
        let (_, _, code) = sh(&mut c, &cold, "true").await;
        assert_eq!(code, 0);

        for id in [a, b, cold] {
            c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
                .await
                .unwrap();
        }
        assert!(
            home.data().join("builds").join(&warm_build).is_dir(),
            "the warm base outlives its sandboxes"
        );
        assert_clean(&home);
    });
}

/// The memory-pressure guard: an agent told to keep more memory free than
/// the host has refuses creates and resumes with an error naming the
/// shortage and the flag, and loses nothing: the paused sandbox stays
/// paused and resumes once the agent runs with a sane reserve.
#[test]
fn memory_pressure_refuses_admission_and_loses_nothing_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let mut agent = home.start();
    let id = new_id();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let mut req = create_request(&id);
        req.memory_mib = 256;
        c.create_sandbox(req).await.unwrap();
        sh(&mut c, &id, "echo kept > /home/user/f && sync").await;
        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
    });
    agent.stop();
    // More than any host has: every admission is refused.
    let mut agent = home.start_with(&["--memory-reserve-mib", "100000000"]);
    runtime().block_on(async {
        let mut c = agent.client().await;
        let err = c
            .create_sandbox(create_request(&new_id()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        for words in [
            "short of memory",
            "MiB of host memory available",
            "--memory-reserve-mib",
        ] {
            assert!(
                err.message().contains(words),
                "{words:?} not in {}",
                err.message()
            );
        }
        let err = c
            .resume_sandbox(pb::ResumeSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        let sb = c
            .get_sandbox(pb::SandboxRef {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Paused);
        let info = c
            .host_info(pb::HostInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.vcpus_used, 0, "a refused admission holds nothing");
    });
    agent.stop();
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        c.resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", home.logs()));
        let (out, _, _) = sh(&mut c, &id, "cat /home/user/f").await;
        assert_eq!(out, "kept\n");
        c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
            .await
            .unwrap();
        assert_clean(&home);
    });
}

/// A namespace standing in for a network service outside the host: a veth
/// to the host with `net.1` on the host side and `net.2` inside, where a
/// TCP server answers "world".
struct World {
    ns: String,
    host_link: String,
    addr: std::net::Ipv4Addr,
    server: std::process::Child,
}

impl World {
    fn new(net: [u8; 3], port: u16) -> World {
        use std::process::Command;
        let tag: String = (0..4)
            .map(|_| (b'a' + rand::random::<u8>() % 26) as char)
            .collect();
        let ns = format!("world-{tag}");
        let host_link = format!("w{tag}h");
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let host_ip = format!("{}.{}.{}.1/24", net[0], net[1], net[2]);
        let ns_ip = format!("{}.{}.{}.2/24", net[0], net[1], net[2]);
        run(&["netns", "add", &ns]);
        run(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", "w0", "netns", &ns,
        ]);
        run(&["addr", "add", &host_ip, "dev", &host_link]);
        run(&["link", "set", &host_link, "up"]);
        run(&["-n", &ns, "addr", "add", &ns_ip, "dev", "w0"]);
        run(&["-n", &ns, "link", "set", "w0", "up"]);
        run(&["-n", &ns, "link", "set", "lo", "up"]);
        run(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &host_ip[..host_ip.len() - 3],
        ]);
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c"])
            .arg(format!(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0',{port}))\ns.listen(16)\nwhile True:\n  c,_=s.accept(); c.sendall(b'world\\n'); c.close()\n"
            ))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        World {
            ns,
            host_link,
            addr: std::net::Ipv4Addr::new(net[0], net[1], net[2], 2),
            server,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

/// Can the sandbox open a TCP connection to addr:port (3 s budget)?
async fn reaches(c: &mut Client, id: &str, addr: &str, port: u16) -> bool {
    let (out, _, _) = sh(
        c,
        id,
        &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/{port} && echo open' 2>/dev/null || echo closed"),
    )
    .await;
    out.trim() == "open"
}

/// From inside a sandbox: the host's own addresses, the host agent's
/// services, the other sandbox and private ranges are unreachable; an
/// allowed CIDR is reachable; the host reaches each guest on its own slot.
#[test]
fn sandboxes_cannot_reach_the_host_or_each_other_but_allowed_cidrs_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    // A private "world" network the default policy refuses.
    let net = [172, 31, rand::random::<u8>()];
    let world = World::new(net, 8080);
    // A host service on every host address.
    let host_server = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in host_server.incoming().flatten() {
            drop(s);
        }
    });
    runtime().block_on(async {
        let mut c = agent.client().await;
        let a = new_id();
        let mut req = create_request(&a);
        req.network = Some(pb::NetworkPolicy {
            allow_out: vec![format!("{}.{}.{}.0/24", net[0], net[1], net[2])],
            deny_out: vec![],
        });
        c.create_sandbox(req).await.unwrap();
        let b = new_id();
        c.create_sandbox(create_request(&b)).await.unwrap();

        // Sanity: the world server and the host server answer the host.
        assert!(std::net::TcpStream::connect((world.addr, 8080)).is_ok());

        // The allowed CIDR is reachable from A; B has the default policy.
        assert!(
            reaches(&mut c, &a, &world.addr.to_string(), 8080).await,
            "allowed CIDR"
        );
        let (out, _, _) = sh(
            &mut c,
            &a,
            &format!(
                "timeout 5 bash -c 'exec 3<>/dev/tcp/{}/8080; cat <&3'",
                world.addr
            ),
        )
        .await;
        assert_eq!(out, "world\n");
        assert!(
            !reaches(&mut c, &b, &world.addr.to_string(), 8080).await,
            "private range"
        );
        // Rules change on a running sandbox, both ways.
        let world_cidr = format!("{}.{}.{}.0/24", net[0], net[1], net[2]);
        c.set_network_policy(pb::SetNetworkPolicyRequest {
            sandbox_id: b.clone(),
            network: Some(pb::NetworkPolicy {
                allow_out: vec![world_cidr.clone()],
                deny_out: vec![],
            }),
        })
        .await
        .unwrap();
        assert!(
            reaches(&mut c, &b, &world.addr.to_string(), 8080).await,
            "allowed after SetNetworkPolicy"
        );
        c.set_network_policy(pb::SetNetworkPolicyRequest {
            sandbox_id: b.clone(),
            network: Some(pb::NetworkPolicy::default()),
        })
        .await
        .unwrap();
        assert!(
            !reaches(&mut c, &b, &world.addr.to_string(), 8080).await,
            "refused again after SetNetworkPolicy"
        );
        // A resume carries the rules it resumes under (the control plane
        // sends its own, within today's ceiling): a grant withdrawn while
        // the sandbox was paused no longer applies.
        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: a.clone(),
        })
        .await
        .unwrap();
        let resumed = c
            .resume_sandbox(pb::ResumeSandboxRequest {
                sandbox_id: a.clone(),
                network: Some(pb::NetworkPolicy::default()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resumed.state, pb::SandboxState::Running as i32);
        assert!(
            !reaches(&mut c, &a, &world.addr.to_string(), 8080).await,
            "the allow rule withdrawn at resume"
        );

        // Every address of the host, at the test's port and at the port of
        // the host agent's gRPC API.
        let agent_port: u16 = agent.addr.rsplit(':').next().unwrap().parse().unwrap();
        let out = std::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .unwrap();
        let host_addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter_map(|cidr| cidr.split('/').next())
            .map(str::to_owned)
            .collect();
        assert!(host_addrs.len() >= 2, "{host_addrs:?}");
        for addr in &host_addrs {
            for port in [host_port, agent_port] {
                for sb in [&a, &b] {
                    assert!(
                        !reaches(&mut c, sb, addr, port).await,
                        "{sb} reached host {addr}:{port}"
                    );
                }
            }
        }
        // The other sandbox's guest agent, through its slot address (the
        // host-side addresses of our pool's namespaces: .2 of each /30).
        let base: std::net::Ipv4Addr = home.pool.split('/').next().unwrap().parse().unwrap();
        let base = u32::from(base);
        for slot in 0..2u32 {
            let ns_addr = std::net::Ipv4Addr::from(base + 4 * slot + 2).to_string();
            for sb in [&a, &b] {
                assert!(
                    !reaches(&mut c, sb, &ns_addr, 49983).await,
                    "{sb} reached {ns_addr}"
                );
            }
            // The host itself does reach each guest agent there.
            assert!(std::net::TcpStream::connect((ns_addr.as_str(), 49983)).is_ok());
        }
        for sb in [a, b] {
            c.destroy_sandbox(pb::SandboxRef { sandbox_id: sb })
                .await
                .unwrap();
        }
        assert_clean(&home);
    });
    drop(world);
}

/// Kill the agent (SIGKILL) while one sandbox runs and one is paused, start
/// a new agent: the running one is re-adopted (same VM, its processes
/// intact) and the paused one resumes.
#[test]
fn agent_crash_loses_nothing_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let mut agent = home.start();
    let rt = runtime();
    let (running, paused, vmm) = rt.block_on(async {
        let mut c = agent.client().await;
        let running = new_id();
        c.create_sandbox(create_request(&running)).await.unwrap();
        let (_, err, code) = sh(
            &mut c,
            &running,
            "echo alive > /tmp/mark; sleep 1000 >/dev/null 2>&1 &",
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let paused = new_id();
        c.create_sandbox(create_request(&paused)).await.unwrap();
        sh(&mut c, &paused, "echo kept > /home/user/f && sync").await;
        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: paused.clone(),
        })
        .await
        .unwrap();
        let vmm = home.processes();
        assert_eq!(vmm.len(), 1, "{vmm:?}");
        (running, paused, vmm[0])
    });
    agent.kill();
    // The VM outlives its agent.
    assert!(std::path::Path::new(&format!("/proc/{vmm}")).exists());
    let agent = home.start();
    rt.block_on(async {
        let mut c = agent.client().await;
        let sb = c
            .get_sandbox(pb::SandboxRef {
                sandbox_id: running.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            state(&sb),
            pb::SandboxState::Running,
            "{sb:?}\n{}",
            home.logs()
        );
        assert_eq!(home.processes(), vec![vmm], "the same VM, not a new one");
        let (out, _, _) = sh(&mut c, &running, "cat /tmp/mark; pgrep -c -x sleep").await;
        assert_eq!(out, "alive\n1\n");
        let info = c
            .host_info(pb::HostInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                info.vcpus_used,
                info.sandboxes_running,
                info.sandboxes_paused
            ),
            (1, 1, 1)
        );

        c.resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: paused.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", home.logs()));
        let (out, _, _) = sh(&mut c, &paused, "cat /home/user/f").await;
        assert_eq!(out, "kept\n");
        for id in [running, paused] {
            c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
                .await
                .unwrap();
        }
        assert_clean(&home);
    });
}

/// A sandbox whose VMM died while no agent was running is marked failed by
/// the next agent, and what it held is reclaimed.
#[test]
fn vm_that_died_while_the_agent_was_down_is_failed_and_reclaimed_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let mut agent = home.start();
    let rt = runtime();
    let id = rt.block_on(async {
        let mut c = agent.client().await;
        let id = new_id();
        c.create_sandbox(create_request(&id)).await.unwrap();
        id
    });
    agent.kill();
    for pid in home.processes() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(300));
    let agent = home.start();
    rt.block_on(async {
        let mut c = agent.client().await;
        let sb = c
            .get_sandbox(pb::SandboxRef {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Failed);
        assert!(
            sb.failure_reason.contains("did not survive"),
            "{}",
            sb.failure_reason
        );
        assert_clean(&home);
        c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
            .await
            .unwrap();
    });
}

/// A corrupt build: resuming fails with an error naming the problem; the
/// sandbox stays paused and nothing else is affected.
#[test]
fn corrupt_build_fails_the_resume_cleanly_root_vm() {
    require_vm!();
    let home = AgentHome::new();
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let (victim, bystander) = (new_id(), new_id());
        c.create_sandbox(create_request(&victim)).await.unwrap();
        c.create_sandbox(create_request(&bystander)).await.unwrap();
        let sb = c
            .pause_sandbox(pb::SandboxRef {
                sandbox_id: victim.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        // Truncate the device state file of the paused sandbox's build.
        let vmstate = home
            .data()
            .join("builds")
            .join(&sb.build_id)
            .join("vmstate");
        let len = std::fs::metadata(&vmstate).unwrap().len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&vmstate)
            .unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        let err = c
            .resume_sandbox(pb::ResumeSandboxRequest {
                sandbox_id: victim.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        assert!(err.message().contains("restore"), "{}", err.message());
        let sb = c
            .get_sandbox(pb::SandboxRef {
                sandbox_id: victim.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Paused);
        assert!(
            sb.failure_reason.contains("last resume failed"),
            "{}",
            sb.failure_reason
        );
        // The bystander is untouched and the failed resume left nothing.
        let (out, _, _) = sh(&mut c, &bystander, "echo ok").await;
        assert_eq!(out, "ok\n");
        assert_eq!(home.processes().len(), 1);
        let info = c
            .host_info(pb::HostInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.vcpus_used, 1);
        for id in [victim, bystander] {
            c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
                .await
                .unwrap();
        }
        assert_clean(&home);
    });
}

/// The data directory on a small file system that fills up during a
/// pause: the pause fails cleanly, the sandbox keeps running (and can pause
/// once there is room again), and no half-written build is left.
#[test]
fn disk_full_during_pause_keeps_the_sandbox_running_root_vm() {
    require_vm!();
    use std::process::Command;
    let home = AgentHome::new();
    let img = home.dir.path().join("fs.img");
    let data = home.data();
    std::fs::create_dir_all(&data).unwrap();
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(600 << 20).unwrap();
    drop(f);
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&data)
            .status()
            .unwrap()
            .success()
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());
    let agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let id = new_id();
        // Booted, so its first pause writes all the memory it touched
        // (~80 MiB), far more than the room left below; a fork of the warm
        // base would write only its few MiB of changes.
        let mut req = create_request(&id);
        req.cold = true;
        c.create_sandbox(req).await.unwrap();
        sh(&mut c, &id, "echo before > /home/user/f && sync").await;
        // Leave almost no room.
        let filler = data.join("filler");
        let st = nix::sys::statvfs::statvfs(&data).unwrap();
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        let keep = 8 << 20;
        let out = Command::new("fallocate")
            .args(["-l", &(free.saturating_sub(keep)).to_string()])
            .arg(&filler)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let err = c
            .pause_sandbox(pb::SandboxRef {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert!(
            err.message().contains("No space left") || err.message().contains("space"),
            "{err:?}"
        );
        let sb = c
            .get_sandbox(pb::SandboxRef {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Running);
        let (out, _, _) = sh(&mut c, &id, "cat /home/user/f; echo after >> /home/user/f").await;
        assert_eq!(out, "before\n", "the sandbox keeps running");
        let leftovers: Vec<_> = std::fs::read_dir(data.join("builds"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        std::fs::remove_file(&filler).unwrap();
        c.pause_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
        c.resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let (out, _, _) = sh(&mut c, &id, "cat /home/user/f").await;
        assert_eq!(out, "before\nafter\n");
        c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
            .await
            .unwrap();
        assert_clean(&home);
    });
    drop(agent);
}

/// QEMU guests' RAM lives in files on the memory directory's file system:
/// the agent hands out no more guest memory than that file system holds,
/// and a create past it is refused with the numbers, not left to die of
/// SIGBUS when the guest touches its memory.
#[test]
fn guest_memory_is_bounded_by_the_ram_file_system_root_vm() {
    require_vm!();
    let mut home = AgentHome::new();
    let shm = home.dir.path().join("small-shm");
    std::fs::create_dir(&shm).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=300m,mode=0700", "tmpfs"])
        .arg(&shm)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a 300 MiB tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(shm.clone());
    home.memory_dir = shm.join("mem");
    let agent = home.start_with(&["--capacity-memory-mib", "8192"]);
    runtime().block_on(async {
        let mut c = agent.client().await;
        let info = c
            .host_info(pb::HostInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.memory_mib_total, 300, "capacity follows the tmpfs");
        let id = new_id();
        let mut req = create_request(&id);
        req.memory_mib = 512;
        let err = c.create_sandbox(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("512"), "{}", err.message());
        // One that fits runs.
        let mut req = create_request(&id);
        req.memory_mib = 256;
        c.create_sandbox(req)
            .await
            .unwrap_or_else(|s| panic!("create: {s:?}\n{}", home.logs()));
        let (out, _, code) = sh(&mut c, &id, "echo ok").await;
        assert_eq!((out.trim(), code), ("ok", 0));
        c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
            .await
            .unwrap();
        assert_clean(&home);
    });
}
