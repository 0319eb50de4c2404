//! Root tests of real slots: namespaces, veths, nftables and TCP between
//! them. A namespace joined to the slot by a veth named `tap0` stands in for
//! the VM. Each test owns a unique prefix and address pool, so nextest can
//! run them in parallel.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ember_net::{
    Applier, EgressPolicy, GuestDevice, HostPlan, Ipv4Cidr, NetError, PoolConfig, RulesetInputs,
    SlotPlan, SlotPool,
};
use ember_testkit::require;
use ember_types::guest::{AGENT_PORT, GATEWAY_IP};

macro_rules! require_root_net {
    () => {
        let missing = missing_precondition();
        require!(missing.is_none(), "{}", missing.unwrap_or_default());
    };
}

fn sock(addr: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(addr), port)
}

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().unwrap()
}

#[test]
fn host_reaches_each_guest_at_its_slot_address() {
    require_root_net!();
    let t = TestPool::new(1);
    let (a, guest_a) = t.acquire_with_guest(EgressPolicy::default(), "a");
    let (b, guest_b) = t.acquire_with_guest(EgressPolicy::default(), "b");
    assert_ne!(a.address(), b.address());

    // Both guests have the same address; each server says which it is.
    let guest_sock = sock(ember_types::guest::GUEST_IP, AGENT_PORT);
    let _sa = Server::start(Some(&guest_a.path()), guest_sock, "guest-a");
    let _sb = Server::start(Some(&guest_b.path()), guest_sock, "guest-b");
    assert_eq!(greeting(None, a.agent_addr()).unwrap(), "guest-a");
    assert_eq!(greeting(None, b.agent_addr()).unwrap(), "guest-b");
    // Any guest TCP port, not just the agent's.
    let _other = Server::start(
        Some(&guest_b.path()),
        sock(ember_types::guest::GUEST_IP, 8080),
        "b-8080",
    );
    assert_eq!(greeting(None, b.guest_addr(8080)).unwrap(), "b-8080");

    // What the kernel runs is exactly what was planned and golden-tested.
    assert_eq!(a.read_ruleset().unwrap(), a.plan().ruleset.render());
    let net = a.vmm_net();
    assert_eq!(net.tap, "tap0");
    assert_eq!(net.guest_mac, "02:fc:00:00:00:01");
    assert_eq!(net.netns, a.netns_path());
    assert!(net.netns.exists());

    a.release().unwrap();
    b.release().unwrap();
    assert_eq!(t.leftovers(), Leftovers::default());
}

#[test]
fn guest_cannot_reach_host_namespace_or_other_slots() {
    require_root_net!();
    let t = TestPool::new(2);
    let (a, guest_a) = t.acquire_with_guest(EgressPolicy::default(), "a");
    let (b, guest_b) = t.acquire_with_guest(EgressPolicy::default(), "b");
    let g = Some(guest_a.path());
    let g = g.as_deref();

    // A host service on every address; the host itself can reach it.
    let host = Server::start(None, sock(Ipv4Addr::UNSPECIFIED, 0), "host");
    let port = host.addr.port();
    let veth_end = sock(a.host_address(), port);
    assert_eq!(greeting(None, veth_end).unwrap(), "host");
    assert_refused(g, veth_end, &host, "host veth address");
    match host_primary_addr() {
        Some(primary) => {
            let primary = sock(primary, port);
            assert_eq!(greeting(None, primary).unwrap(), "host");
            assert_refused(g, primary, &host, "host primary address");
        }
        None => eprintln!("no default route on this host: primary-address check not run"),
    }

    // The other sandbox, which the host can reach.
    let other = Server::start(
        Some(&guest_b.path()),
        sock(ember_types::guest::GUEST_IP, AGENT_PORT),
        "guest-b",
    );
    assert_eq!(greeting(None, b.agent_addr()).unwrap(), "guest-b");
    assert_refused(g, b.agent_addr(), &other, "other slot");
    // Its own slot address and the gateway are the namespace itself.
    let own = Server::start(
        Some(&guest_a.path()),
        sock(ember_types::guest::GUEST_IP, AGENT_PORT),
        "guest-a",
    );
    assert_refused(g, a.agent_addr(), &own, "own slot address");
    let ns_listener = Server::start(
        Some(&a.netns_path()),
        sock(Ipv4Addr::UNSPECIFIED, 7000),
        "ns",
    );
    assert_refused(g, sock(GATEWAY_IP, 7000), &ns_listener, "slot namespace");
    drop(ns_listener);

    // A UDP datagram to the host gets no further than TCP does.
    let udp_host = std::net::UdpSocket::bind(sock(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    udp_host
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let udp_port = udp_host.local_addr().unwrap().port();
    ember_net::in_netns(&guest_a.path(), || {
        let s = std::net::UdpSocket::bind(sock(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.send_to(b"hi", sock(a.host_address(), udp_port)).unwrap();
        Ok(())
    })
    .unwrap();
    let mut buf = [0u8; 8];
    assert!(
        udp_host.recv_from(&mut buf).is_err(),
        "UDP from the guest reached the host"
    );
}

#[test]
fn a_host_address_added_after_the_slot_is_refused_too() {
    require_root_net!();
    let t = TestPool::new(12);
    let host = Server::start(None, sock(Ipv4Addr::UNSPECIFIED, 0), "host");
    let (mut slot, guest) = t.acquire_with_guest(EgressPolicy::default(), "a");
    let g = Some(guest.path());
    let g = g.as_deref();
    // Benchmarking space (198.18.0.0/15): not private, so open by default
    // unless the host holds it.
    let r = random_u64();
    let added = Ipv4Addr::new(198, 18, (r & 0xff) as u8, 1 + ((r >> 8) % 250) as u8);
    let link = format!("{}d", t.prefix());
    sh(&format!(
        "ip link add {link} type veth peer name {link}p && ip addr add {added}/32 dev {link} \
         && ip link set {link} up && ip link set {link}p up"
    ));
    struct DelLink(String);
    impl Drop for DelLink {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _link = DelLink(link);
    let target = sock(added, host.addr.port());
    assert_eq!(greeting(None, target).unwrap(), "host");
    assert_refused(g, target, &host, "host address added after the slot");
    // Not even a tenant's allow_out opens the host.
    slot.set_policy(EgressPolicy {
        allow_out: vec![cidr("198.18.0.0/15")],
        deny_out: vec![],
    })
    .unwrap();
    assert_refused(g, target, &host, "host address with allow_out");
    // The host still reaches the guest (its replies are established flows).
    let _agent = Server::start(
        Some(&guest.path()),
        sock(ember_types::guest::GUEST_IP, AGENT_PORT),
        "agent",
    );
    assert_eq!(greeting(None, slot.agent_addr()).unwrap(), "agent");
}

#[test]
fn egress_follows_the_policy_live() {
    require_root_net!();
    let t = TestPool::new(3);
    // TEST-NET-2 stands in for the internet; a private range for a LAN.
    let world = World::new(t.prefix(), "p", cidr("198.51.100.48/28"));
    let lan = World::new(t.prefix(), "l", cidr("10.250.3.0/24"));
    let world_srv = Server::start(Some(&world.netns.path()), sock(world.addr, 80), "world");
    let lan_srv = Server::start(Some(&lan.netns.path()), sock(lan.addr, 80), "lan");
    let (mut slot, guest) = t.acquire_with_guest(EgressPolicy::default(), "a");
    let g = Some(guest.path());
    let g = g.as_deref();

    assert_eq!(greeting(g, world_srv.addr).unwrap(), "world");
    assert_refused(g, lan_srv.addr, &lan_srv, "private range by default");

    // A flow opened before a deny is cut by it, not just new ones.
    let flow = connect(g, world_srv.addr).unwrap();
    let mut reader = BufReader::new(flow.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    (&flow).write_all(b"ping\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");

    slot.set_policy(EgressPolicy {
        allow_out: vec![],
        deny_out: vec![cidr("198.51.100.0/24")],
    })
    .unwrap();
    assert_refused(g, world_srv.addr, &world_srv, "deny_out");
    (&flow).write_all(b"ping\n").unwrap();
    line.clear();
    let after = reader.read_line(&mut line);
    assert!(
        matches!(&after, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "established flow survived deny_out: {after:?} {line:?}"
    );

    slot.set_policy(EgressPolicy {
        allow_out: vec![cidr("10.250.3.0/24")],
        deny_out: vec![],
    })
    .unwrap();
    assert_eq!(greeting(g, lan_srv.addr).unwrap(), "lan");
    assert_eq!(greeting(g, world_srv.addr).unwrap(), "world");
    assert_eq!(slot.read_ruleset().unwrap(), slot.plan().ruleset.render());

    // deny_out comes before allow_out; 0.0.0.0/0 isolates fully, yet the
    // host still reaches the guest.
    slot.set_policy(EgressPolicy {
        allow_out: vec![cidr("10.250.3.0/24")],
        deny_out: vec![cidr("0.0.0.0/0")],
    })
    .unwrap();
    assert_refused(g, lan_srv.addr, &lan_srv, "deny_out before allow_out");
    assert_refused(g, world_srv.addr, &world_srv, "isolated");
    let agent = Server::start(
        Some(&guest.path()),
        sock(ember_types::guest::GUEST_IP, AGENT_PORT),
        "agent",
    );
    assert_eq!(greeting(None, slot.agent_addr()).unwrap(), "agent");
    drop(agent);

    // A slot created with a policy has it from the start.
    let (isolated, guest2) = t.acquire_with_guest(EgressPolicy::isolated(), "b");
    assert_refused(
        Some(&guest2.path()),
        world_srv.addr,
        &world_srv,
        "isolated at acquire",
    );
    assert_eq!(isolated.policy(), &EgressPolicy::isolated());
    drop(isolated);
    drop(slot);
    assert_eq!(t.leftovers(), Leftovers::default());
}

#[test]
fn release_leaves_nothing_behind() {
    require_root_net!();
    let t = TestPool::new(4);
    assert_eq!(t.leftovers(), Leftovers::default());
    let a = t.pool.acquire(EgressPolicy::default()).unwrap();
    let b = t.pool.acquire(EgressPolicy::default()).unwrap();
    let p = t.prefix();
    assert_eq!((a.index(), b.index()), (0, 1));
    let during = t.leftovers();
    assert_eq!(during.netns, vec![format!("{p}-0"), format!("{p}-1")]);
    assert_eq!(during.links, vec![format!("{p}h0"), format!("{p}h1")]);
    assert!(during.host_table);
    let host_table = sh(&format!("nft list table ip {p}"));
    assert_eq!(host_table, HostPlan::new(t.pool.layout()).table.render());
    // The pool lock file may or may not exist; the two slot locks must.
    assert!(during.lock_files.contains(&format!("{p}-0.lock")));
    assert!(during.lock_files.contains(&format!("{p}-1.lock")));
    // A real TAP device, as a VMM will open it.
    let tap = sh(&format!("ip -n {} -d link show tap0", a.netns_name()));
    assert!(tap.contains("tun type tap"), "{tap}");

    a.release().unwrap();
    let mid = t.leftovers();
    assert_eq!(mid.netns, vec![format!("{p}-1")]);
    assert!(mid.host_table, "host table removed while a slot is left");
    drop(b);
    assert_eq!(t.leftovers(), Leftovers::default());

    // A released index is reused.
    let again = t.pool.acquire(EgressPolicy::default()).unwrap();
    assert_eq!(again.index(), 0);
    drop(again);
    assert_eq!(t.leftovers(), Leftovers::default());
}

#[test]
fn half_applied_slot_is_cleaned_by_the_next_acquire() {
    require_root_net!();
    let t = TestPool::new(5);
    let p = t.prefix().to_string();
    // A crash after the namespace and veth were made, before addresses and
    // rules; the crashed process's lock file is left (unlocked) too.
    sh(&format!(
        "ip netns add {p}-0 && ip link add {p}h0 type veth peer name veth0 netns {p}-0"
    ));
    std::fs::write(t.config.run_dir.join(format!("{p}-0.lock")), "999999\n").unwrap();
    let (slot, guest) = t.acquire_with_guest(EgressPolicy::default(), "a");
    assert_eq!(slot.index(), 0, "the stale index is cleaned and reused");
    let _srv = Server::start(
        Some(&guest.path()),
        sock(ember_types::guest::GUEST_IP, AGENT_PORT),
        "guest",
    );
    assert_eq!(greeting(None, slot.agent_addr()).unwrap(), "guest");
    drop(slot);
    assert_eq!(t.leftovers(), Leftovers::default());
}

#[test]
fn applier_applies_a_slot_plan_repeatably_and_tears_it_down() {
    require_root_net!();
    let t = TestPool::new(9);
    let plan = SlotPlan::new(
        t.pool.layout(),
        3,
        RulesetInputs {
            policy: &EgressPolicy::default(),
            host_addrs: &ember_net::host_ipv4_addrs().unwrap(),
        },
        GuestDevice::Tap,
    );
    let applier = Applier::default();
    applier.apply_slot(&plan).unwrap();
    // Applying over a complete slot replaces it rather than failing.
    applier.apply_slot(&plan).unwrap();
    assert_eq!(applier.find_missing(&plan).unwrap(), None);
    assert_eq!(
        applier
            .read_slot_ruleset(&plan.netns_path(), &plan.ruleset)
            .unwrap(),
        plan.ruleset.render()
    );
    let forwarding = ember_net::in_netns(&plan.netns_path(), || {
        Ok(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap())
    })
    .unwrap();
    assert_eq!(forwarding.trim(), "1");
    let addr = sh(&format!("ip -n {} -4 -o addr show dev veth0", plan.netns));
    assert!(
        addr.contains(&format!("{}/30", plan.ns_link.addr)),
        "{addr}"
    );

    assert!(applier.teardown_slot(&plan.teardown()).unwrap());
    assert!(!applier.teardown_slot(&plan.teardown()).unwrap());
    assert_eq!(t.leftovers(), Leftovers::default());
}

#[test]
fn reclaim_stale_removes_abandoned_slots_but_not_live_ones() {
    require_root_net!();
    let t = TestPool::new(6);
    let p = t.prefix().to_string();
    let (live, live_guest) = t.acquire_with_guest(EgressPolicy::default(), "live");
    assert_eq!(live.index(), 0);
    let live_srv = Server::start(
        Some(&live_guest.path()),
        sock(ember_types::guest::GUEST_IP, AGENT_PORT),
        "live",
    );
    assert_eq!(greeting(None, live.agent_addr()).unwrap(), "live");

    // Slot 1: a whole slot whose process died without cleaning up.
    let mut crashed = helper(&t, "crash", 1);
    assert_eq!(read_slots(&mut crashed, 1), vec![1]);
    assert!(crashed.wait().unwrap().success());
    // Slot 2: half-applied (namespace only).
    sh(&format!("ip netns add {p}-2"));
    // Slot 3: the namespace's name is gone but a process still runs in it,
    // keeping the namespace and its host link alive.
    sh(&format!(
        "ip netns add {p}-3 && ip link add {p}h3 type veth peer name veth0 netns {p}-3"
    ));
    let mut pinned = Command::new("ip")
        .args(["netns", "exec", &format!("{p}-3"), "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    sh(&format!("ip netns del {p}-3"));
    assert!(t.leftovers().links.contains(&format!("{p}h3")));

    assert_eq!(t.pool.reclaim_stale().unwrap(), 3);
    let left = t.leftovers();
    assert_eq!(left.netns, vec![format!("{p}-0")]);
    assert_eq!(left.links, vec![format!("{p}h0")]);
    assert!(left.host_table);
    assert_eq!(
        left.lock_files
            .iter()
            .filter(|f| f.starts_with(&format!("{p}-")))
            .count(),
        1
    );
    // The live slot still works end to end.
    assert_eq!(greeting(None, live.agent_addr()).unwrap(), "live");
    assert_eq!(live.read_ruleset().unwrap(), live.plan().ruleset.render());

    drop((live_srv, live));
    let _ = pinned.kill();
    let _ = pinned.wait();
    // Nothing of ours left: the host table went with the last slot.
    assert_eq!(t.leftovers(), Leftovers::default());
    assert_eq!(t.pool.reclaim_stale().unwrap(), 0);
}

#[test]
fn adopt_retakes_a_slot_left_by_an_exited_process() {
    require_root_net!();
    let t = TestPool::new(7);
    let guest = Netns::new(&format!("{}gd", t.prefix()));
    let mut child = helper_with(&t, "detach", 1, &[("EMBER_NET_TEST_GUEST", &guest.name)]);
    let index = read_slots(&mut child, 1)[0];
    assert!(child.wait().unwrap().success());

    // Nobody holds it now, yet it is intact: adopt, with a new policy.
    let deny = EgressPolicy {
        allow_out: vec![],
        deny_out: vec![cidr("198.51.100.0/24")],
    };
    let slot = t.pool.adopt(index, deny.clone()).unwrap();
    assert_eq!(slot.policy(), &deny);
    assert_eq!(slot.read_ruleset().unwrap(), slot.plan().ruleset.render());
    assert!(matches!(
        t.pool.adopt(index, EgressPolicy::default()),
        Err(NetError::SlotBusy { .. })
    ));
    assert!(matches!(
        t.pool.adopt(5, EgressPolicy::default()),
        Err(NetError::SlotNotIntact { index: 5, .. })
    ));
    assert!(matches!(
        t.pool.adopt(64, EgressPolicy::default()),
        Err(NetError::NoSuchSlot { .. })
    ));

    let srv = Server::start(
        Some(&guest.path()),
        sock(ember_types::guest::GUEST_IP, AGENT_PORT),
        "survivor",
    );
    assert_eq!(greeting(None, slot.agent_addr()).unwrap(), "survivor");
    let world = World::new(t.prefix(), "p", cidr("198.51.100.112/28"));
    let wsrv = Server::start(Some(&world.netns.path()), sock(world.addr, 80), "world");
    assert_refused(Some(&guest.path()), wsrv.addr, &wsrv, "adopted policy");
    drop((srv, wsrv, world));
    slot.release().unwrap();
    assert_eq!(t.leftovers(), Leftovers::default());
}

#[test]
fn concurrent_processes_never_share_a_slot() {
    require_root_net!();
    let t = TestPool::new(8);
    const PER_PROCESS: usize = 6;
    let go = t.config.run_dir.join("go");
    let mut children: Vec<Child> = (0..2)
        .map(|_| {
            helper_with(
                &t,
                "hold",
                PER_PROCESS,
                &[("EMBER_NET_TEST_GO", go.to_str().unwrap())],
            )
        })
        .collect();
    for child in &mut children {
        wait_for_line(child, "READY");
    }
    // Both start allocating at once.
    std::fs::write(&go, "").unwrap();
    let mut all: Vec<u32> = children
        .iter_mut()
        .flat_map(|c| read_slots(c, PER_PROCESS))
        .collect();
    eprintln!("slots handed out: {all:?}");
    let count = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), count, "a slot was handed out twice: {all:?}");
    assert_eq!(t.leftovers().netns.len(), 2 * PER_PROCESS);
    for mut child in children {
        child.stdin.take().unwrap().write_all(b"release\n").unwrap();
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(t.leftovers(), Leftovers::default());
}

#[test]
fn bad_pool_config_is_refused_before_touching_anything() {
    let err = SlotPool::new(PoolConfig {
        prefix: "waytoolongprefix".into(),
        ..PoolConfig::default()
    })
    .unwrap_err();
    assert!(matches!(err, NetError::InvalidConfig { .. }), "{err}");
}

/// Not a test: the second process of the tests above, started from this
/// same binary. Modes (EMBER_NET_TEST_MODE): `hold` acquires N slots
/// (after EMBER_NET_TEST_GO exists), prints them, releases on a line on
/// stdin; `crash` acquires and exits without releasing; `detach` acquires
/// with a veth guest and detaches.
#[test]
#[ignore = "helper process for other tests"]
fn helper_process() {
    let env = |k: &str| std::env::var(k).unwrap();
    let pool = SlotPool::new(PoolConfig {
        prefix: env("EMBER_NET_TEST_PREFIX"),
        pool: env("EMBER_NET_TEST_POOL").parse().unwrap(),
        run_dir: env("EMBER_NET_TEST_RUN_DIR").into(),
    })
    .unwrap();
    let count: usize = env("EMBER_NET_TEST_COUNT").parse().unwrap();
    match env("EMBER_NET_TEST_MODE").as_str() {
        "hold" => {
            println!("READY");
            let go = std::path::PathBuf::from(env("EMBER_NET_TEST_GO"));
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let slots: Vec<_> = (0..count)
                .map(|_| pool.acquire(EgressPolicy::default()).unwrap())
                .collect();
            for s in &slots {
                println!("SLOT {}", s.index());
            }
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            for s in slots {
                s.release().unwrap();
            }
        }
        "crash" => {
            let slot = pool.acquire(EgressPolicy::default()).unwrap();
            println!("SLOT {}", slot.index());
            std::mem::forget(slot);
            std::process::exit(0);
        }
        "detach" => {
            let slot = pool
                .acquire_with(
                    EgressPolicy::default(),
                    GuestDevice::Veth {
                        peer_netns: env("EMBER_NET_TEST_GUEST"),
                        peer_name: "eth0".into(),
                    },
                )
                .unwrap();
            // The guest side, as the VM would have it.
            sh(&format!(
                "ip -n {g} link set lo up && ip -n {g} addr add {ip}/30 dev eth0 && \
                 ip -n {g} link set eth0 up && ip -n {g} route add default via {GATEWAY_IP}",
                g = env("EMBER_NET_TEST_GUEST"),
                ip = ember_types::guest::GUEST_IP,
            ));
            println!("SLOT {}", slot.detach());
        }
        other => panic!("unknown helper mode {other}"),
    }
}

fn helper(t: &TestPool, mode: &str, count: usize) -> Child {
    helper_with(t, mode, count, &[])
}

fn helper_with(t: &TestPool, mode: &str, count: usize, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["helper_process", "--exact", "--ignored", "--nocapture"])
        .env("EMBER_NET_TEST_MODE", mode)
        .env("EMBER_NET_TEST_COUNT", count.to_string())
        .env("EMBER_NET_TEST_PREFIX", &t.config.prefix)
        .env("EMBER_NET_TEST_POOL", t.config.pool.to_string())
        .env("EMBER_NET_TEST_RUN_DIR", &t.config.run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn wait_for_line(child: &mut Child, wanted: &str) {
    while let Some(line) = read_line(child) {
        if line == wanted {
            return;
        }
    }
    panic!("helper ended before printing {wanted}");
}

/// Reads `n` `SLOT <index>` lines from a helper (ignoring libtest's chatter).
fn read_slots(child: &mut Child, n: usize) -> Vec<u32> {
    let mut slots = Vec::new();
    while slots.len() < n {
        let line = read_line(child).expect("helper ended before printing its slots");
        if let Some(index) = line.strip_prefix("SLOT ") {
            slots.push(index.parse().unwrap());
        }
    }
    slots
}

/// One line of a helper's stdout. Byte by byte: a buffered reader dropped
/// between calls would swallow lines it had read ahead.
fn read_line(child: &mut Child) -> Option<String> {
    use std::io::Read;
    let stdout = child.stdout.as_mut().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stdout.read(&mut byte).unwrap() == 0 {
            return None;
        }
        if byte[0] == b'\n' {
            return Some(String::from_utf8_lossy(&line).trim().to_string());
        }
        line.push(byte[0]);
    }
}
