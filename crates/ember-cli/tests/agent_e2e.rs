//! The host agent end to end: a real `ember agent` process driven over
//! gRPC, real QEMU microVMs (TCG here), real network namespaces.
//!
//! Needs root and a built guest image. Every test checks at the end that
//! nothing of its sandboxes is left: no VMM or page-server process, no
//! namespace or host link of its pool, no RAM file, no disk layer.

mod support;

use std::time::{Duration, Instant};

use ember_proto::host as pb;
use ember_testkit::{is_root, require};
use support::agent::*;

macro_rules! require_vm {
    () => {
        require!(
            is_root(),
            "needs root for network namespaces and TAP devices"
        );
        require!(
            image_dir().is_some(),
            "no guest image under {}: run `ember image build` first",
            data_dir().display()
        );
    };
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Nothing of `home`'s sandboxes remains (the agent itself may still run).
fn assert_clean(home: &AgentHome) {
    assert_eq!(home.processes(), Vec::<u32>::new(), "processes left");
    assert_eq!(home.namespaces(), Vec::<String>::new(), "namespaces left");
    assert_eq!(home.links(), Vec::<String>::new(), "host links left");
    assert_eq!(home.memory_files(), Vec::<String>::new(), "RAM files left");
    let vms = home.run_dir().join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run directories left: {left:?}");
    let sandboxes = home.data().join("sandboxes");
    let disks: Vec<_> = std::fs::read_dir(&sandboxes)
        .map(|d| {
            d.flatten()
                .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
                .map(|f| f.path())
                .filter(|p| p.extension().is_some_and(|x| x == "qcow2" || x == "raw"))
                .collect()
        })
        .unwrap_or_default();
    assert!(disks.is_empty(), "disk layers left: {disks:?}");
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
