//! A real `ember server` process for the CLI client tests (`client_cli.rs`): with its embedded host
//! agent (real VMs) in an [`AgentHome`]'s directories, network prefix and
//! address pool, or without any agent for tests that need no VM. The admin
//! key it prints on its first start is captured.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::agent::{AgentHome, image_dir};

pub struct CliServer {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub admin_key: String,
    /// Its directories; dropped after the server, removing what is left.
    pub home: AgentHome,
}

impl CliServer {
    /// A server with an embedded agent booting real VMs (needs root and the image).
    pub fn with_agent() -> CliServer {
        CliServer::start(true)
    }

    /// A server without a host agent: keys, teams, errors; no sandbox can start.
    pub fn without_agent() -> CliServer {
        CliServer::start(false)
    }

    fn start(agent: bool) -> CliServer {
        let home = AgentHome::new();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(["server", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(home.data());
        if agent {
            cmd.args(["--backend", "qemu"])
                .arg("--run-dir")
                .arg(home.run_dir())
                .arg("--memory-dir")
                .arg(&home.memory_dir)
                .arg("--image-dir")
                .arg(image_dir().expect("guest image"))
                .args(["--net-prefix", &home.prefix, "--net-pool", &home.pool]);
        } else {
            cmd.arg("--no-agent");
        }
        cmd.env("EMBER_LOG", "info")
            .env_remove("EMBER_JOIN_TOKEN")
            .env_remove("EMBER_DATABASE_URL")
            .env_remove("EMBER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ember server");
        let stderr = child.stderr.take().unwrap();
        let log_path = home
            .dir
            .path()
            .join(format!("agent-server-{}.log", child.id()));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = std::fs::File::create(&log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                let _ = tx.send(line);
            }
        });
        let mut admin_key = None;
        let url = loop {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(180)) else {
                let _ = child.kill();
                panic!("ember server did not start; log:\n{}", home.logs());
            };
            if let Some(k) = line.trim().strip_prefix("EMBER_ADMIN_KEY=") {
                admin_key = Some(k.to_owned());
            }
            if let Some(addr) = line.strip_prefix("ember server: listening on ") {
                break addr.trim().to_owned();
            }
        };
        CliServer {
            child: Some(child),
            url,
            admin_key: admin_key.expect("a first start prints EMBER_ADMIN_KEY"),
            home,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Everything the server logged.
    pub fn logs(&self) -> String {
        self.home.logs()
    }

    /// VMM and page-server processes of this server's sandboxes.
    pub fn vm_processes(&self) -> Vec<u32> {
        let me = self.pid();
        self.home
            .processes()
            .into_iter()
            .filter(|p| *p != me)
            .collect()
    }
}

impl Drop for CliServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `home` drops next: it kills leftover VMMs and removes namespaces,
        // links, nftables tables and RAM files of this server's pool.
    }
}
