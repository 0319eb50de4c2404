//! Fixtures for the root tests: unique pools, stand-in guests and "world"
//! hosts in namespaces, TCP servers that say who they are, and an inventory
//! of what a pool left on the host (read with plain commands and files, not
//! through the crate under test).

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ember_net::{EgressPolicy, GuestDevice, Ipv4Cidr, PoolConfig, Slot, SlotPool, in_netns};
use ember_types::guest::{GATEWAY_IP, GUEST_IP, GUEST_PREFIX_LEN, guest_mac_string};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether this machine can run the root tests; `None` if it can.
pub fn missing_precondition() -> Option<String> {
    if !ember_testkit::is_root() {
        return Some("needs root to create network namespaces and nftables rules".into());
    }
    let nft = Command::new("nft").arg("--version").output();
    if !nft.is_ok_and(|o| o.status.success()) {
        return Some("needs the nft command (apt-get install nftables)".into());
    }
    None
}

pub fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// A pool no other test (nextest runs each in its own process) shares:
/// a random 5-character prefix, the /24 `10.<200+test_no>.<random>.0`, and a
/// private run directory.
pub struct TestPool {
    pub config: PoolConfig,
    pub pool: SlotPool,
    _run_dir: tempfile::TempDir,
}

impl TestPool {
    pub fn new(test_no: u8) -> Self {
        let r = random_u64();
        let prefix = format!("t{:04x}", r & 0xffff);
        let third = ((r >> 16) & 0xff) as u8;
        let run_dir = tempfile::Builder::new()
            .prefix("ember-net-test")
            .tempdir()
            .unwrap();
        let config = PoolConfig {
            prefix,
            pool: Ipv4Cidr::new(Ipv4Addr::new(10, 200 + test_no, third, 0), 24).unwrap(),
            run_dir: run_dir.path().to_path_buf(),
        };
        let pool = SlotPool::new(config.clone()).unwrap();
        TestPool {
            config,
            pool,
            _run_dir: run_dir,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// A guest namespace plus a slot whose `tap0` leads into it, the guest
    /// side configured exactly as ember-guest configures a VM.
    pub fn acquire_with_guest(&self, policy: EgressPolicy, name: &str) -> (Slot, Netns) {
        let guest = Netns::new(&format!("{}g{name}", self.prefix()));
        let slot = self
            .pool
            .acquire_with(
                policy,
                GuestDevice::Veth {
                    peer_netns: guest.name.clone(),
                    peer_name: "eth0".into(),
                },
            )
            .unwrap();
        configure_guest(&guest);
        (slot, guest)
    }

    /// What this pool's slots left on the host.
    pub fn leftovers(&self) -> Leftovers {
        let p = self.prefix();
        Leftovers {
            netns: names_in("/run/netns", |n| n.starts_with(&format!("{p}-"))),
            links: names_in("/sys/class/net", |n| n.starts_with(&format!("{p}h"))),
            host_table: sh("nft list tables ip")
                .lines()
                .any(|l| l.trim() == format!("table ip {p}")),
            lock_files: names_in(&self.config.run_dir, |n| n.starts_with(p)),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Default)]
pub struct Leftovers {
    pub netns: Vec<String>,
    pub links: Vec<String>,
    pub host_table: bool,
    pub lock_files: Vec<String>,
}

fn names_in(dir: impl AsRef<Path>, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| keep(n))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Runs a shell command, panicking with its stderr on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_batch(args: &str, batch: &str) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ip {args} -batch -"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ip {args} -batch: {batch}");
}

/// A named namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        sh(&format!("ip netns add {name}"));
        Netns { name: name.into() }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn configure_guest(guest: &Netns) {
    ip_batch(
        &format!("-n {}", guest.name),
        &format!(
            "link set lo up\n\
             link set eth0 address {}\n\
             addr add {GUEST_IP}/{GUEST_PREFIX_LEN} dev eth0\n\
             link set eth0 up\n\
             route add default via {GATEWAY_IP}\n",
            guest_mac_string()
        ),
    );
}

/// A namespace standing in for a machine outside: joined to the host by a
/// veth, `subnet`'s .1 on the host end and .2 inside.
pub struct World {
    pub netns: Netns,
    pub host_link: String,
    pub addr: Ipv4Addr,
    pub host_end: Ipv4Addr,
}

impl World {
    pub fn new(prefix: &str, tag: &str, subnet: Ipv4Cidr) -> Self {
        let netns = Netns::new(&format!("{prefix}w{tag}"));
        let host_link = format!("{prefix}w{tag}");
        let base = u32::from(subnet.addr());
        let host_end = Ipv4Addr::from(base + 1);
        let addr = Ipv4Addr::from(base + 2);
        let len = subnet.prefix_len();
        ip_batch(
            "",
            &format!(
                "link add {host_link} type veth peer name eth0 netns {ns}\n\
                 addr add {host_end}/{len} dev {host_link}\n\
                 link set {host_link} up\n",
                ns = netns.name
            ),
        );
        ip_batch(
            &format!("-n {}", netns.name),
            &format!(
                "link set lo up\n\
                 addr add {addr}/{len} dev eth0\n\
                 link set eth0 up\n\
                 route add default via {host_end}\n"
            ),
        );
        World {
            netns,
            host_link,
            addr,
            host_end,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
    }
}

/// A TCP server that greets each client with its tag, then echoes lines.
/// Counts the connections it accepted, so a test can tell "refused by the
/// filter" from "refused by the server's host".
pub struct Server {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    listener: Arc<TcpListener>,
}

impl Server {
    /// Listens on `addr` inside `netns`, or in the host namespace for `None`.
    pub fn start(netns: Option<&Path>, addr: SocketAddr, tag: &str) -> Server {
        let listener = match netns {
            Some(ns) => in_netns(ns, || Ok(TcpListener::bind(addr))).unwrap(),
            None => TcpListener::bind(addr),
        }
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Arc::new(listener);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (l, count, tag) = (listener.clone(), accepted.clone(), tag.to_string());
        std::thread::spawn(move || {
            // Ends when `Drop` shuts the listener down.
            while let Ok((stream, _)) = l.accept() {
                count.fetch_add(1, Ordering::SeqCst);
                let tag = tag.clone();
                std::thread::spawn(move || echo(stream, &tag));
            }
        });
        Server {
            addr,
            accepted,
            listener,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Wakes the blocked accept (EINVAL), so the socket and the namespace
        // it pins go away with the server.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

fn echo(stream: TcpStream, tag: &str) {
    let mut writer = stream.try_clone().unwrap();
    if writeln!(writer, "{tag}").is_err() {
        return;
    }
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{line}").is_err() {
            return;
        }
    }
}

/// Connects from inside `netns` (or the host for `None`).
pub fn connect(netns: Option<&Path>, addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = match netns {
        Some(ns) => in_netns(ns, || {
            Ok(TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
        })
        .unwrap(),
        None => TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT),
    }?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    Ok(stream)
}

/// Connects and returns the server's greeting.
pub fn greeting(netns: Option<&Path>, addr: SocketAddr) -> io::Result<String> {
    let stream = connect(netns, addr)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Asserts the connection is refused at once (REJECT with a TCP reset), and
/// that `server`, which does listen there, never saw it.
pub fn assert_refused(netns: Option<&Path>, addr: SocketAddr, server: &Server, what: &str) {
    let before = server.accepted();
    let started = std::time::Instant::now();
    match greeting(netns, addr) {
        Ok(tag) => panic!("{what}: {addr} was reachable (greeting {tag:?})"),
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "{what}: {addr}: expected a fast refusal, got {e}"
        ),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{what}: refusal took {:?}",
        started.elapsed()
    );
    assert_eq!(server.accepted(), before, "{what}: the server accepted it");
}

/// The host's primary IPv4 address: the one on the default route's interface.
pub fn host_primary_addr() -> Option<Ipv4Addr> {
    let route = sh("ip -4 -o route show default");
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)?
        .to_string();
    let addrs = sh(&format!("ip -4 -o addr show dev {dev}"));
    let cidr = addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?;
    cidr.split('/').next()?.parse().ok()
}
