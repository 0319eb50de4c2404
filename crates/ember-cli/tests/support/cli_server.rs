//! A real `ember server` process for the CLI client tests (`client_cli.rs`):
//! the control-plane tests' [`ServerSpec`] on an SQLite store of its own,
//! with its embedded host agent (real VMs) in an [`AgentHome`]'s
//! directories, network prefix and address pool, or without any agent for
//! tests that need no VM. Owns everything it started.

use super::agent::AgentHome;
use super::server::{ServerProc, ServerSpec, TestDb};

pub struct CliServer {
    // Field order is drop order: the server stops before its home (which
    // kills leftover VMMs and removes namespaces, links, nftables tables and
    // RAM files of its pool) and its database directory go.
    proc: ServerProc,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub admin_key: String,
    pub home: AgentHome,
    _db: TestDb,
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
        let db = TestDb::sqlite();
        let home = AgentHome::new();
        let proc = ServerSpec::new(&db, agent.then_some(&home)).start();
        CliServer {
            url: proc.base.clone(),
            admin_key: proc
                .admin_key
                .clone()
                .expect("a first start writes EMBER_ADMIN_KEY_FILE"),
            proc,
            home,
            _db: db,
        }
    }

    /// Everything the server logged.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// VMM and page-server processes of this server's sandboxes.
    pub fn vm_processes(&self) -> Vec<u32> {
        let me = self.proc.pid();
        self.home
            .processes()
            .into_iter()
            .filter(|p| *p != me)
            .collect()
    }
}
