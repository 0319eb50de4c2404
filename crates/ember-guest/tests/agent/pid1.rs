//! The agent as a real PID 1: in a fresh PID namespace (the closest the
//! host gets to a VM without booting one), orphans come to it because it is
//! init, and SIGINT (what Ctrl-Alt-Del becomes) makes it stop everything and
//! power off, which in a PID namespace the kernel turns into the end of the
//! namespace with SIGINT as init's fate.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_guest_api::*;

fn child_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn zombie_children(pid: u32) -> Vec<u32> {
    child_pids(pid)
        .into_iter()
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test]
async fn as_pid1_it_reaps_orphans_and_powers_off_on_sigint() {
    ember_testkit::require!(ember_testkit::is_root(), "needs root for a PID namespace");
    ember_testkit::require!(
        std::path::Path::new("/usr/bin/unshare").exists(),
        "needs util-linux's unshare"
    );
    let mut unshare = Command::new("/usr/bin/unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_ember-guest"))
        .args(["--listen", "127.0.0.1:0", "--no-system-setup"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(unshare.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let agent_pid = child_pids(unshare.id())[0];

    let client = GuestClient::new(addr);
    client
        .init(&InitRequest {
            token: "pid1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = client
        .start_process(&StartProcess {
            cmd: "sh".into(),
            args: vec![
                "-c".into(),
                "sleep 0.3 & sleep 0.3 & echo $$; exit 5".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(
        out.exit.exit_code,
        Some(5),
        "its own child's status is not stolen"
    );
    assert!(
        out.pid < 100,
        "pids are those of the new namespace, got {}",
        out.pid
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        zombie_children(agent_pid),
        Vec::<u32>::new(),
        "orphans were not reaped"
    );

    let sleeper = client
        .start_process(&StartProcess {
            cmd: "sleep".into(),
            args: vec!["60".into()],
            background: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(client.process(sleeper.pid()).await.unwrap().running);

    // SAFETY: kill on a pid we just read from our own child's children.
    assert_eq!(unsafe { libc::kill(agent_pid as i32, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = unshare.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent did not power off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // reboot(RB_POWER_OFF) in a PID namespace ends it as if init died of SIGINT.
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    assert!(!std::path::Path::new(&format!("/proc/{agent_pid}")).exists());
}
