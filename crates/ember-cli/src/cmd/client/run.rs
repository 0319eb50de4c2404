//! `ember run`'s server mode: a throwaway sandbox created through the API,
//! one command run in it with its output streamed, the command's exit code,
//! and the sandbox destroyed afterwards — also on failure and on Ctrl-C
//! (even one that arrives while the sandbox is still being created).
//!
//! The sandbox's idle timeout is short and pushed forward while the command
//! runs, so a killed `ember run` leaves nothing behind for long.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use ember_control::wire::{
    CreateSandboxRequest, NetworkPolicy, OnTimeout, Sandbox, TimeoutRequest,
};
use tracing::debug;

use super::api::{Api, typed};
use super::exec::{self, Input, OnInterrupt};
use super::sandbox::sandbox_path;
use super::{ClientArgs, config, exit, output};

/// The sandbox expires this long after `ember run` stops pushing its
/// deadline (a killed `ember run`).
const IDLE_TIMEOUT_S: u64 = 120;
const KEEPALIVE: Duration = Duration::from_secs(30);

/// What `ember run` was asked to do.
#[derive(Debug, Clone)]
pub struct RemoteRun {
    pub api: ClientArgs,
    pub template: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub timeout_s: Option<u64>,
    pub command: Vec<String>,
}

pub async fn run(r: RemoteRun) -> ExitCode {
    let api = match config::endpoint(&r.api).and_then(|e| Api::new(&e)) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("ember run: {e}");
            return ExitCode::from(exit::EMBER_FAILED);
        }
    };
    let body = CreateSandboxRequest {
        template: r.template.clone(),
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        timeout_s: IDLE_TIMEOUT_S,
        on_timeout: OnTimeout::Kill,
        metadata: BTreeMap::from([("created_by".to_owned(), "ember run".to_owned())]),
        env: BTreeMap::new(),
        network: NetworkPolicy::default(),
        cold: false,
        public: false,
        auto_resume: false,
    };
    let bar = output::spinner(format!("starting a sandbox on {}", api.base()));
    let created = {
        let create = api.post("/v1/sandboxes", &body);
        tokio::pin!(create);
        let mut interrupted = false;
        let result = loop {
            tokio::select! {
                r = &mut create => break r,
                _ = tokio::signal::ctrl_c(), if !interrupted => {
                    // Dropping the request would leave a sandbox nobody knows of.
                    interrupted = true;
                    bar.set_message("interrupted; waiting for the sandbox to remove it");
                }
            }
        };
        (result, interrupted)
    };
    bar.finish_and_clear();
    let (result, interrupted) = created;
    let sandbox: Sandbox = match result.and_then(|v| typed("the new sandbox", &v)) {
        Ok(sb) => sb,
        Err(e) => {
            eprintln!("ember run: creating a sandbox: {e}");
            return ExitCode::from(exit::EMBER_FAILED);
        }
    };
    let id = sandbox.id;
    debug!(sandbox = %id, server = api.base(), "sandbox ready");

    let code = if interrupted {
        exit::INTERRUPTED
    } else {
        let keepalive = tokio::spawn(keep_alive(api.clone(), id.clone()));
        let (cmd, args) = r.command.split_first().expect("clap requires a command");
        let command = exec::Command {
            cmd: cmd.clone(),
            args: args.to_vec(),
            env: r.env.clone(),
            cwd: r.cwd.clone(),
            user: r.user.clone(),
            timeout_s: r.timeout_s,
            input: if std::io::stdin().is_terminal() {
                Input::None
            } else {
                Input::Forward
            },
            on_interrupt: OnInterrupt::Return,
            tag: Some("ember run".to_owned()),
        };
        let outcome = exec::run(&api, &id, &command).await;
        keepalive.abort();
        match outcome {
            Ok(code) => {
                if code == exit::INTERRUPTED {
                    eprintln!("ember run: interrupted, tearing the sandbox down");
                }
                code
            }
            Err(e) => {
                eprintln!("ember run: {}", super::describe(&e));
                exit::EMBER_FAILED
            }
        }
    };
    if let Err(e) = api.delete(&sandbox_path(&id)).await {
        eprintln!(
            "ember run: cleanup: destroying {id}: {e} (it expires by itself within {IDLE_TIMEOUT_S} s)"
        );
    }
    ExitCode::from(code)
}

/// Push the sandbox's deadline forward while the command runs.
async fn keep_alive(api: Api, id: String) {
    let path = format!("{}/timeout", sandbox_path(&id));
    let body = TimeoutRequest {
        timeout_s: IDLE_TIMEOUT_S,
    };
    loop {
        tokio::time::sleep(KEEPALIVE).await;
        if let Err(e) = api.post(&path, &body).await {
            debug!(error = %e, sandbox = %id, "keeping the sandbox alive failed");
        }
    }
}
