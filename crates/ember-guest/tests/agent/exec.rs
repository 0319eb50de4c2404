//! Processes: output, exit, env, cwd, users, stdin, signals, timeouts,
//! streaming, background replay, foreground kill, PTYs, reaping.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ember_guest_api::*;
use futures::StreamExt;

use crate::common::{Agent, assert_code};

fn sh(script: &str) -> StartProcess {
    StartProcess {
        cmd: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    }
}

async fn run(client: &GuestClient, req: StartProcess) -> ProcessOutput {
    client
        .start_process(&req)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap()
}

/// Polls until the process has exited; returns its exit.
async fn exited(client: &GuestClient, pid: u32) -> ProcessExit {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let info = client.process(pid).await.unwrap();
        if let Some(exit) = info.exit {
            assert!(!info.running);
            return exit;
        }
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stdout_stderr_and_exit_code_are_separate() {
    let agent = Agent::start();
    let client = agent.init().await;
    let out = run(&client, sh("echo out; echo err >&2; exit 3")).await;
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit.exit_code, Some(3));
    assert_eq!(out.exit.signal, None);
    assert!(!out.exit.timed_out);
    let ok = run(
        &client,
        StartProcess {
            cmd: "true".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(ok.exit.success());
}

#[tokio::test]
async fn death_by_signal_is_reported() {
    let agent = Agent::start();
    let client = agent.init().await;
    let out = run(&client, sh("kill -TERM $$; sleep 5")).await;
    assert_eq!(out.exit.exit_code, None);
    assert_eq!(out.exit.signal, Some(libc::SIGTERM));
}

#[tokio::test]
async fn events_are_numbered_from_start_to_exit() {
    let agent = Agent::start();
    let client = agent.init().await;
    let mut events = client
        .start_process(&sh("echo a; echo b >&2"))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let mut kinds = Vec::new();
    while let Some(record) = events.next().await {
        let record = record.unwrap();
        seqs.push(record.seq);
        kinds.push(match record.event {
            ProcessEvent::Start { pid } => {
                assert_eq!(pid, events.pid());
                "start"
            }
            ProcessEvent::Stdout { .. } => "stdout",
            ProcessEvent::Stderr { .. } => "stderr",
            ProcessEvent::Exit(_) => "exit",
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(kinds.first(), Some(&"start"));
    assert_eq!(kinds.last(), Some(&"exit"));
    assert_eq!(events.last_seq(), seqs.len() as u64);
}

#[tokio::test]
async fn env_merges_builtin_init_and_call_values() {
    let agent = Agent::start();
    let client = agent.client();
    client
        .wait_ready(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    client
        .init(&InitRequest {
            token: "t".into(),
            env: Some(BTreeMap::from([
                ("FROM_INIT".into(), "init".into()),
                ("OVERRIDDEN".into(), "init".into()),
            ])),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut req = sh(
        "echo \"$FROM_INIT $OVERRIDDEN $CALL_ONLY $HOME $USER\"; echo \"$PATH\"; env | grep -c EMBER_GUEST_LOG || true",
    );
    req.env = BTreeMap::from([
        ("OVERRIDDEN".into(), "call".into()),
        ("CALL_ONLY".into(), "yes".into()),
    ]);
    let out = run(&client, req).await;
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "init call yes /root root");
    assert!(
        lines[1].contains("/usr/bin") && lines[1].contains("/bin"),
        "{}",
        lines[1]
    );
    assert_eq!(
        lines[2], "0",
        "the agent's own environment must not leak into processes"
    );
}

#[tokio::test]
async fn cwd_is_honoured_and_checked() {
    let agent = Agent::start();
    let client = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let mut req = StartProcess {
        cmd: "pwd".into(),
        ..Default::default()
    };
    req.cwd = Some(dir.path().to_str().unwrap().into());
    let out = run(&client, req.clone()).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        dir.path().to_str().unwrap()
    );

    req.cwd = Some("/no/such/dir".into());
    assert_code(client.start_process(&req).await, ErrorCode::NotFound);
    req.cwd = Some("relative/dir".into());
    assert_code(client.start_process(&req).await, ErrorCode::BadRequest);
    let file = dir.path().join("f");
    std::fs::write(&file, b"").unwrap();
    req.cwd = Some(file.to_str().unwrap().into());
    assert_code(client.start_process(&req).await, ErrorCode::NotADirectory);
}

#[tokio::test]
async fn unknown_programs_and_users_are_clean_errors() {
    let agent = Agent::start();
    let client = agent.init().await;
    let missing = StartProcess {
        cmd: "no-such-program-xyz".into(),
        ..Default::default()
    };
    assert_code(client.start_process(&missing).await, ErrorCode::NotFound);
    let missing_path = StartProcess {
        cmd: "/no/such/program".into(),
        ..Default::default()
    };
    assert_code(
        client.start_process(&missing_path).await,
        ErrorCode::NotFound,
    );
    let unknown_user = StartProcess {
        cmd: "true".into(),
        user: Some(UserSpec::name("no-such-user-xyz")),
        ..Default::default()
    };
    assert_code(
        client.start_process(&unknown_user).await,
        ErrorCode::NotFound,
    );
    let empty = StartProcess::default();
    assert_code(client.start_process(&empty).await, ErrorCode::BadRequest);
    let not_executable = StartProcess {
        cmd: "/etc/passwd".into(),
        ..Default::default()
    };
    assert_code(
        client.start_process(&not_executable).await,
        ErrorCode::PermissionDenied,
    );
    // The agent is still fine.
    assert!(
        run(
            &client,
            StartProcess {
                cmd: "true".into(),
                ..Default::default()
            }
        )
        .await
        .exit
        .success()
    );
}

#[tokio::test]
async fn user_sets_ids_groups_and_home() {
    ember_testkit::require!(ember_testkit::is_root(), "needs root to switch users");
    let etc = tempfile::tempdir().unwrap();
    std::fs::write(
        etc.path().join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:4242:4243:Alice:/home/alice:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(
        etc.path().join("group"),
        "root:x:0:\nteam:x:5000:alice\nother:x:5001:bob\n",
    )
    .unwrap();
    let agent = Agent::start_with(&["--users-dir", etc.path().to_str().unwrap()]);
    let client = agent.init().await;
    let mut req = sh("id -u; id -g; id -G; echo $HOME $USER");
    req.user = Some(UserSpec::name("alice"));
    let out = run(&client, req.clone()).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "4242\n4243\n4243 5000\n/home/alice alice\n"
    );

    req.user = Some(UserSpec::Uid(65534));
    let out = run(&client, req.clone()).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "65534\n65534\n65534\n/nonexistent nobody\n"
    );

    // A uid unknown to passwd runs with gid = uid.
    req.user = Some(UserSpec::Uid(7777));
    let out = run(&client, req).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "7777\n7777\n7777\n/\n"
    );

    // The user's own permissions apply to the working directory.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        private.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let mut denied = StartProcess {
        cmd: "true".into(),
        ..Default::default()
    };
    denied.user = Some(UserSpec::name("alice"));
    denied.cwd = Some(private.path().join("sub").to_str().unwrap().into());
    std::fs::create_dir(private.path().join("sub")).unwrap();
    assert_code(
        client.start_process(&denied).await,
        ErrorCode::PermissionDenied,
    );
}

#[tokio::test]
async fn stdin_round_trips_through_cat() {
    let agent = Agent::start();
    let client = agent.init().await;
    let events = client
        .start_process(&StartProcess {
            cmd: "cat".into(),
            stdin: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let pid = events.pid();
    assert_eq!(client.write_stdin(pid, "hello ").await.unwrap(), 6);
    let big = vec![b'z'; 1 << 20];
    assert_eq!(
        client
            .write_stdin_from(pid, std::io::Cursor::new(big.clone()))
            .await
            .unwrap(),
        big.len() as u64
    );
    client.close_stdin(pid).await.unwrap();
    let out = events.wait().await.unwrap();
    assert!(out.exit.success());
    assert_eq!(&out.stdout[..6], b"hello ");
    assert_eq!(&out.stdout[6..], &big[..]);
    // Closed, then exited: both refuse more input.
    assert_code(client.write_stdin(pid, "late").await, ErrorCode::Conflict);
    assert_code(client.close_stdin(pid).await, ErrorCode::Conflict);

    let no_stdin = client
        .start_process(&StartProcess {
            cmd: "cat".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let pid = no_stdin.pid();
    // stdin is /dev/null without "stdin": cat ends at once.
    assert!(no_stdin.wait().await.unwrap().exit.success());
    assert_code(client.write_stdin(pid, "x").await, ErrorCode::Conflict);
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let agent = Agent::start();
    let client = agent.init().await;
    let started = Instant::now();
    let mut req = sh("sleep 30 & sleep 30");
    req.timeout_ms = Some(300);
    let out = run(&client, req).await;
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.signal, Some(libc::SIGTERM));
    assert!(started.elapsed() < Duration::from_secs(10));

    // A process that ignores SIGTERM gets SIGKILL after the grace.
    let mut stubborn = sh("trap '' TERM; sleep 30");
    stubborn.timeout_ms = Some(200);
    let out = run(&client, stubborn).await;
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.signal, Some(libc::SIGKILL));

    // A process that finishes in time is not marked.
    let mut quick = sh("exit 0");
    quick.timeout_ms = Some(10_000);
    assert!(!run(&client, quick).await.exit.timed_out);
}

#[tokio::test]
async fn output_streams_while_the_process_runs() {
    let agent = Agent::start();
    let client = agent.init().await;
    let mut events = client
        .start_process(&sh("echo first; sleep 1; echo second"))
        .await
        .unwrap();
    let mut first_at = None;
    let mut exit_at = None;
    while let Some(record) = events.next().await {
        match record.unwrap().event {
            ProcessEvent::Stdout { data } if &data[..] == b"first\n" => {
                first_at = Some(Instant::now())
            }
            ProcessEvent::Exit(exit) => {
                assert!(exit.success());
                exit_at = Some(Instant::now());
            }
            _ => {}
        }
    }
    let gap = exit_at.unwrap() - first_at.expect("first line arrived as its own event");
    assert!(
        gap >= Duration::from_millis(700),
        "first line arrived only {gap:?} before the exit"
    );
}

#[tokio::test]
async fn background_processes_survive_disconnects_and_replay() {
    let agent = Agent::start();
    let client = agent.init().await;
    let mut req = sh("echo one; sleep 0.5; echo two; sleep 0.5; echo three");
    req.background = true;
    req.tag = Some("bg-test".into());
    let events = client.start_process(&req).await.unwrap();
    let pid = events.pid();
    drop(events);

    // Reattach while it runs: replay from the start, then follow live.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let live = client
        .process_events(pid, 0)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(live.stdout, b"one\ntwo\nthree\n");
    assert!(live.exit.success());

    // After the exit: a full replay, and a replay from the middle.
    let mut all = Vec::new();
    let mut replay = client.process_events(pid, 0).await.unwrap();
    while let Some(r) = replay.next().await {
        all.push(r.unwrap());
    }
    assert!(matches!(all[0].event, ProcessEvent::Start { pid: p } if p == pid));
    let one_seq = all
        .iter()
        .find(|r| matches!(&r.event, ProcessEvent::Stdout { data } if &data[..] == b"one\n"))
        .unwrap()
        .seq;
    let rest = client
        .process_events(pid, one_seq)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(rest.stdout, b"two\nthree\n");
    let info = client.process(pid).await.unwrap();
    assert_eq!(info.tag.as_deref(), Some("bg-test"));
    assert!(info.background && !info.running);
    assert_eq!(info.last_seq, all.last().unwrap().seq);
}

#[tokio::test]
async fn foreground_process_dies_with_its_client() {
    let agent = Agent::start();
    let client = agent.init().await;
    let events = client
        .start_process(&StartProcess {
            cmd: "sleep".into(),
            args: vec!["30".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let pid = events.pid();
    assert!(client.process(pid).await.unwrap().running);
    drop(events);
    let exit = exited(&client, pid).await;
    assert_eq!(exit.signal, Some(libc::SIGKILL));
}

#[tokio::test]
async fn signals_by_name_and_number() {
    let agent = Agent::start();
    let client = agent.init().await;
    let mut req = StartProcess {
        cmd: "sleep".into(),
        args: vec!["30".into()],
        ..Default::default()
    };
    req.background = true;
    let pid = client.start_process(&req).await.unwrap().pid();
    client
        .signal(
            pid,
            &SignalRequest {
                signal: SignalSpec::name("TERM"),
                group: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(exited(&client, pid).await.signal, Some(libc::SIGTERM));
    assert_code(
        client
            .signal(
                pid,
                &SignalRequest {
                    signal: SignalSpec::Number(9),
                    group: false,
                },
            )
            .await,
        ErrorCode::Conflict,
    );
    let pid = client.start_process(&req).await.unwrap().pid();
    assert_code(
        client
            .signal(
                pid,
                &SignalRequest {
                    signal: SignalSpec::name("BOGUS"),
                    group: false,
                },
            )
            .await,
        ErrorCode::BadRequest,
    );
    client
        .signal(
            pid,
            &SignalRequest {
                signal: SignalSpec::Number(libc::SIGKILL),
                group: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(exited(&client, pid).await.signal, Some(libc::SIGKILL));
    assert_code(
        client
            .signal(
                999_999_999,
                &SignalRequest {
                    signal: SignalSpec::name("KILL"),
                    group: false,
                },
            )
            .await,
        ErrorCode::NotFound,
    );
    assert_code(
        client.process_events(999_999_999, 0).await,
        ErrorCode::NotFound,
    );
}

/// Reads PTY output until `needle` appears (a terminal echoes input, so the
/// answer is searched after the echoed command).
async fn read_until(events: &mut ProcessEvents, seen: &mut String, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let record = tokio::time::timeout(left, events.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in terminal output {seen:?}"))
            .unwrap()
            .unwrap();
        if let ProcessEvent::Stdout { data } = record.event {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
}

#[tokio::test]
async fn pty_is_the_controlling_terminal_and_resizes() {
    let agent = Agent::start();
    let client = agent.init().await;
    let out = run(
        &client,
        StartProcess {
            cmd: "tty".into(),
            pty: Some(PtySize { rows: 24, cols: 80 }),
            ..Default::default()
        },
    )
    .await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(out.stderr.is_empty(), "PTY output is merged into stdout");

    let mut shell = client
        .start_process(&StartProcess {
            cmd: "sh".into(),
            pty: Some(PtySize { rows: 24, cols: 80 }),
            ..Default::default()
        })
        .await
        .unwrap();
    let pid = shell.pid();
    let mut seen = String::new();
    client
        .write_stdin(pid, "stty size; echo TERM=$TERM\n")
        .await
        .unwrap();
    read_until(&mut shell, &mut seen, "24 80").await;
    read_until(&mut shell, &mut seen, "TERM=xterm-256color").await;
    client
        .resize_pty(
            pid,
            PtySize {
                rows: 40,
                cols: 100,
            },
        )
        .await
        .unwrap();
    client.write_stdin(pid, "stty size\n").await.unwrap();
    read_until(&mut shell, &mut seen, "40 100").await;
    // ^D at an empty prompt ends the shell.
    client.close_stdin(pid).await.unwrap();
    let out = shell.wait().await.unwrap();
    assert!(out.exit.success(), "{:?}", out.exit);

    let plain = client
        .start_process(&StartProcess {
            cmd: "sleep".into(),
            args: vec!["5".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_code(
        client
            .resize_pty(plain.pid(), PtySize { rows: 1, cols: 1 })
            .await,
        ErrorCode::Conflict,
    );
}

#[tokio::test]
async fn list_shows_running_and_exited_processes() {
    let agent = Agent::start();
    let client = agent.init().await;
    let done = run(&client, sh("exit 7")).await;
    let mut req = StartProcess {
        cmd: "sleep".into(),
        args: vec!["30".into()],
        ..Default::default()
    };
    req.background = true;
    req.tag = Some("sleeper".into());
    let running = client.start_process(&req).await.unwrap().pid();
    let list = client.list_processes().await.unwrap();
    let exited = list.iter().find(|p| p.pid == done.pid).unwrap();
    assert!(!exited.running);
    assert_eq!(exited.exit.unwrap().exit_code, Some(7));
    assert_eq!(exited.cmd, "sh");
    let sleeper = list.iter().find(|p| p.pid == running).unwrap();
    assert!(sleeper.running && sleeper.exit.is_none());
    assert_eq!(sleeper.tag.as_deref(), Some("sleeper"));
    assert_eq!(sleeper.args, ["30"]);
}

#[tokio::test]
async fn orphans_are_reaped() {
    let agent = Agent::start();
    let client = agent.init().await;
    // The shell exits at once; its background children become orphans of the agent.
    let out = run(&client, sh("sleep 0.3 & sleep 0.3 & exit 0")).await;
    assert!(out.exit.success());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(agent.zombie_children(), Vec::<u32>::new());
    // And the agent's own children still get their statuses.
    assert_eq!(run(&client, sh("exit 4")).await.exit.exit_code, Some(4));
}

#[tokio::test]
async fn unread_output_is_dropped_oldest_first_with_a_lost_event() {
    let agent = Agent::start_with(&["--output-buffer-bytes", "4096"]);
    let client = agent.init().await;
    // Far more than the pipe holds, so the agent reads it in several chunks.
    let mut req = sh(
        "i=0; while [ $i -lt 3000 ]; do echo line-$i-padding-padding-padding-padding-padding-padding; i=$((i+1)); done",
    );
    req.background = true;
    let pid = client.start_process(&req).await.unwrap().pid();
    assert!(exited(&client, pid).await.success());
    let mut replay = client.process_events(pid, 0).await.unwrap();
    let first = replay.next().await.unwrap().unwrap();
    let ProcessEvent::Lost { first_seq } = first.event else {
        panic!("expected a lost event first, got {first:?}");
    };
    assert_eq!(first_seq, 1);
    let out = replay.wait().await.unwrap();
    assert!(out.exit.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.ends_with("line-2999-padding-padding-padding-padding-padding-padding\n"),
        "the newest output is kept: {:?}",
        &text[text.len().saturating_sub(200)..]
    );
    assert!(!text.contains("line-0-"), "the oldest output is gone");
    assert!(
        text.len() < 100_000,
        "at most about one buffer of output is kept, got {}",
        text.len()
    );
}

#[tokio::test]
async fn attached_reader_loses_nothing_with_a_tiny_buffer() {
    let agent = Agent::start_with(&["--output-buffer-bytes", "4096"]);
    let client = agent.init().await;
    let out = run(&client, sh("head -c 3000000 /dev/zero")).await;
    assert!(out.exit.success());
    assert_eq!(out.lost_events, 0);
    assert_eq!(out.stdout.len(), 3_000_000);
}

#[tokio::test]
async fn exited_processes_are_forgotten_oldest_first_beyond_the_budget() {
    let agent = Agent::start();
    let client = agent.init().await;
    let mut pids = Vec::new();
    // 20 exited processes holding ~1 MB of unread output each: over the 16 MiB budget.
    for _ in 0..20 {
        let mut req = sh("head -c 1000000 /dev/zero");
        req.background = true;
        let pid = client.start_process(&req).await.unwrap().pid();
        assert!(exited(&client, pid).await.success());
        pids.push(pid);
    }
    assert_code(client.process(pids[0]).await, ErrorCode::NotFound);
    assert_code(client.process_events(pids[0], 0).await, ErrorCode::NotFound);
    let newest = client
        .process_events(pids[19], 0)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(
        newest.stdout.len(),
        1_000_000,
        "the newest exited process keeps its output"
    );
    let listed = client.list_processes().await.unwrap().len();
    assert!((15..20).contains(&listed), "{listed} processes listed");
}
