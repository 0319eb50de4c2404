//! `ember-fc-fake`: a stand-in for the Firecracker binary, for tests on
//! machines where Firecracker cannot run a guest.
//!
//! It takes Firecracker's command line, serves Firecracker's API on the Unix
//! socket and holds the line Firecracker holds on everything the driver
//! depends on: request bodies (unknown fields and bad values are refused with
//! a 400 and a fault message, mostly word for word), the order of things
//! (nothing but the logger and metrics before a snapshot load, no snapshot
//! of a running VM, no machine config after start, no start without a
//! kernel), a failed snapshot load ending the process, and the files it
//! touches (the kernel, drives and TAP devices are opened, the vsock socket
//! is bound, snapshot memory files are written sparse with only dirty pages,
//! and loads read them back, through a real userfaultfd for the `Uffd`
//! backend).
//!
//! It does not run guest code. Its "guest" is guest memory with the kernel's
//! ELF segments loaded into it and one word (at [`guest::TICK_ADDR`]) that a
//! thread rewrites every few milliseconds while the VM runs, so snapshots
//! have something dirty (and a walk over 64 more pages, read and rewritten in
//! turn). On its serial console (stdout) it says `guest running` whenever
//! its vCPU starts or continues (what a host agent started with
//! `--guest-ready-serial` waits for) and reports memory checksums when it
//! snapshots and restores, so tests can check memory made the round trip. Boot arguments steer the simulated guest:
//! `ember_fake.vsock_listen=<port>[,<port>...]` makes those vsock ports
//! accept (and echo), and `ember_fake.ctrl_alt_del=exit` makes the guest
//! power off on Ctrl+Alt+Del.

mod api;
mod devices;
mod guest;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

/// The Firecracker version whose API this fake imitates.
pub const IMITATED_VERSION: &str = "1.16.1";

#[derive(Debug, Default)]
struct Args {
    api_sock: Option<PathBuf>,
    id: Option<String>,
    log_path: Option<PathBuf>,
    level: Option<String>,
    metrics_path: Option<PathBuf>,
    version: bool,
}

impl Args {
    /// Firecracker's flags: the ones the driver passes, and harmless others.
    fn parse(args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut out = Args::default();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("Argument '{name}' requires a value"))
            };
            match flag.as_str() {
                "--api-sock" => out.api_sock = Some(value("api-sock")?.into()),
                "--id" => out.id = Some(value("id")?),
                "--log-path" => out.log_path = Some(value("log-path")?.into()),
                "--level" => out.level = Some(value("level")?),
                "--metrics-path" => out.metrics_path = Some(value("metrics-path")?.into()),
                "--module" | "--start-time-us" | "--start-time-cpu-us" | "--parent-cpu-time-us" => {
                    value(&flag)?;
                }
                "--show-level" | "--show-log-origin" | "--no-seccomp" | "--boot-timer" => {}
                "--version" => out.version = true,
                other => return Err(format!("Found argument '{other}' which wasn't expected")),
            }
        }
        Ok(out)
    }
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("Arguments parsing error: {msg}");
            return ExitCode::from(1);
        }
    };
    if args.version {
        println!("Firecracker v{IMITATED_VERSION} (ember-fc-fake)");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> ExitCode {
    let Some(api_sock) = args.api_sock.clone() else {
        eprintln!("Error: no --api-sock given (this fake always serves the API)");
        return ExitCode::from(1);
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| "anonymous-instance".into());
    let log = vm::Log::open(args.log_path.as_deref(), &id);
    // Firecracker refuses to start when the socket path exists.
    let listener = match std::os::unix::net::UnixListener::bind(&api_sock) {
        Ok(l) => l,
        Err(_) => {
            eprintln!("Error: RunWithApi(FailedToBindSocket({api_sock:?}))");
            return ExitCode::from(1);
        }
    };
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: cannot listen on {}: {e}", api_sock.display());
            return ExitCode::from(1);
        }
    };
    let vm = Arc::new(Mutex::new(vm::Vm::new(id, log, args.metrics_path.clone())));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("Error: accepting an API connection: {e}");
                continue;
            }
        };
        let vm = vm.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let vm = vm.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(vm, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(vm: Arc<Mutex<vm::Vm>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return respond(StatusCode::BAD_REQUEST, Some(api::fault(e.to_string()))),
    };
    let mut vm = vm.lock().await;
    vm.log.line(&format!(
        "The API server received a {method} request on {path:?}."
    ));
    let reply = api::handle(&mut vm, &method, &path, &body).await;
    if let Some(code) = vm.exit_code.take() {
        // Like Firecracker after a failed snapshot load: answer, then exit.
        vm.log
            .line(&format!("Firecracker exiting with error. exit_code={code}"));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::process::exit(code);
        });
    }
    match reply {
        api::Reply::NoContent => respond(StatusCode::NO_CONTENT, None),
        api::Reply::Json(value) => respond(StatusCode::OK, Some(value)),
        api::Reply::Fault(message) => {
            vm.log.line(&format!(
                "Received Error. Status code: 400 Bad Request. Message: {message}"
            ));
            respond(StatusCode::BAD_REQUEST, Some(api::fault(message)))
        }
    }
}

fn respond(status: StatusCode, body: Option<serde_json::Value>) -> Response<Full<Bytes>> {
    let bytes = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flags_the_driver_passes() {
        let args = Args::parse(
            [
                "--id",
                "sb-1",
                "--api-sock",
                "/run/ember/vm/api.sock",
                "--log-path",
                "/run/ember/vm/vmm.log",
                "--level",
                "Info",
                "--show-level",
            ]
            .into_iter()
            .map(String::from),
        )
        .unwrap();
        assert_eq!(args.id.as_deref(), Some("sb-1"));
        assert_eq!(
            args.api_sock.as_deref(),
            Some(std::path::Path::new("/run/ember/vm/api.sock"))
        );
        let jailed = Args::parse(
            ["--id=sb-1", "--start-time-us=5"]
                .into_iter()
                .map(String::from),
        )
        .unwrap();
        assert_eq!(jailed.id.as_deref(), Some("sb-1"));
        assert!(Args::parse(["--bogus"].into_iter().map(String::from)).is_err());
        assert!(Args::parse(["--id"].into_iter().map(String::from)).is_err());
    }
}
