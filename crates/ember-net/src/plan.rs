//! Plans: everything a slot or the host needs, as plain data built by pure
//! functions — namespace and link names, addresses, routes, sysctls and the
//! nftables rulesets — plus their rendering to the exact `ip -batch` and
//! `nft -f` input the applier feeds in. Executing a plan is `apply`'s job.
//!
//! Packet paths a slot's ruleset implements (`veth0` is the namespace's end
//! of the veth, `tap0` the guest's link):
//! - host → guest: arrives on `veth0` for the slot address, DNAT-ed to
//!   `GUEST_IP`, forwarded to `tap0`; replies are un-NAT-ed by conntrack.
//! - guest → world: every packet from `tap0` walks `guest_out` (the policy),
//!   leaves through `veth0` SNAT-ed to the slot address; the host then
//!   masquerades it onto its uplink.
//! - guest → the namespace itself: refused in `input`.
//!
//! Established guest flows are re-checked against the policy on every packet
//! (only the replies coming back are accepted by state), so a policy change
//! also cuts flows opened before it.
//!
//! Refused IPv4 traffic is REJECT-ed (TCP reset, else ICMP admin-prohibited)
//! rather than silently dropped: the guest's connect fails at once with a
//! clear error instead of hanging until a timeout. IPv6 from the guest is
//! dropped outright in v1.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ember_types::guest::{self, GATEWAY_IP, GUEST_IP, GUEST_PREFIX_LEN, TAP_NAME};

use crate::cidr::{AddrSet, Ipv4Cidr};
use crate::layout::{NETNS_DIR, PoolLayout, SlotAddresses};
use crate::nft::{
    Chain, ChainKind, ChainPolicy, CtState, Family, Hook, HookPoint, Match, Rule, Table, Verdict,
};
use crate::policy::EgressPolicy;

/// The namespace's end of the slot veth (the same in every slot).
pub const NS_LINK_NAME: &str = "veth0";
/// The nftables table inside every slot namespace.
pub const SLOT_TABLE_NAME: &str = "ember";

/// Destinations a guest may not reach unless its policy allows them:
/// private, shared, link-local, loopback, "this network", multicast and
/// reserved space.
pub const SPECIAL_RANGES: [Ipv4Cidr; 9] = [
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(0, 0, 0, 0), 8),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(10, 0, 0, 0), 8),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(100, 64, 0, 0), 10),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(127, 0, 0, 0), 8),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(169, 254, 0, 0), 16),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(172, 16, 0, 0), 12),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(192, 168, 0, 0), 16),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(224, 0, 0, 0), 4),
    Ipv4Cidr::new_unchecked(Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// What sits behind `tap0` inside the slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GuestDevice {
    /// A persistent TAP device the VMM attaches to (production).
    #[default]
    Tap,
    /// For tests without a VM: `tap0` is one end of a veth pair whose other
    /// end, `peer_name`, is created in the existing namespace `peer_netns`
    /// (a name under `/run/netns`), which stands in for the guest. The rest
    /// of the plan is identical.
    Veth {
        peer_netns: String,
        peer_name: String,
    },
}

/// An interface and the address it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAddress {
    pub name: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl LinkAddress {
    fn cidr_text(&self) -> String {
        format!("{}/{}", self.addr, self.prefix_len)
    }
}

/// A sysctl to set, in whichever namespace the plan says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sysctl {
    /// Dotted name, e.g. `net.ipv4.ip_forward`.
    pub key: &'static str,
    pub value: &'static str,
}

impl Sysctl {
    pub const IP_FORWARD: Sysctl = Sysctl {
        key: "net.ipv4.ip_forward",
        value: "1",
    };

    /// Its file under `/proc/sys`. Network sysctls resolve against the
    /// namespace of the thread that opens the file.
    pub fn path(&self) -> PathBuf {
        Path::new("/proc/sys").join(self.key.replace('.', "/"))
    }
}

/// Everything one slot consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlan {
    pub index: u32,
    /// Name under `/run/netns`.
    pub netns: String,
    /// The host's end of the veth, in the host namespace.
    pub host_link: LinkAddress,
    /// The namespace's end of the veth; its address is the slot address.
    pub ns_link: LinkAddress,
    /// `tap0` with the gateway address.
    pub guest_link: LinkAddress,
    pub guest_device: GuestDevice,
    /// The namespace's default route (the host end of the veth).
    pub default_gateway: Ipv4Addr,
    /// Set inside the namespace.
    pub ns_sysctls: Vec<Sysctl>,
    /// The namespace's nftables table (NAT and egress filter).
    pub ruleset: Table,
}

/// What removing a slot means: its names are enough, so a teardown can be
/// built for a slot whose creator is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTeardown {
    /// Deleted explicitly: a process still running inside an orphaned
    /// namespace keeps it (and this link) alive after the name is removed.
    pub host_link: String,
    pub netns: String,
}

/// Host-wide setup shared by every slot of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// Set in the host namespace (and left set on teardown: other software
    /// may rely on forwarding too).
    pub sysctls: Vec<Sysctl>,
    /// Masquerade and forward rules for the pool.
    pub table: Table,
}

/// The inputs of a slot's ruleset that change over its life.
#[derive(Debug, Clone, Copy)]
pub struct RulesetInputs<'a> {
    pub policy: &'a EgressPolicy,
    /// Every IPv4 address on every host interface, read just before planning.
    pub host_addrs: &'a [Ipv4Addr],
}

impl SlotPlan {
    pub fn new(
        layout: &PoolLayout,
        index: u32,
        inputs: RulesetInputs<'_>,
        guest_device: GuestDevice,
    ) -> Self {
        let addrs = layout.addresses(index);
        SlotPlan {
            index,
            netns: layout.netns_name(index),
            host_link: LinkAddress {
                name: layout.host_link_name(index),
                addr: addrs.host,
                prefix_len: 30,
            },
            ns_link: LinkAddress {
                name: NS_LINK_NAME.into(),
                addr: addrs.netns,
                prefix_len: 30,
            },
            guest_link: LinkAddress {
                name: TAP_NAME.into(),
                addr: GATEWAY_IP,
                prefix_len: GUEST_PREFIX_LEN,
            },
            guest_device,
            default_gateway: addrs.host,
            ns_sysctls: vec![Sysctl::IP_FORWARD],
            ruleset: slot_ruleset(layout, &addrs, inputs),
        }
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    pub fn teardown(&self) -> SlotTeardown {
        SlotTeardown {
            host_link: self.host_link.name.clone(),
            netns: self.netns.clone(),
        }
    }

    /// `ip -batch` input run in the host namespace once the slot namespace
    /// exists: the veth pair, born with its peer already in the namespace.
    pub fn host_ip_batch(&self) -> String {
        let h = &self.host_link;
        format!(
            "link add {} type veth peer name {} netns {}\n\
             addr add {} dev {}\n\
             link set {} up\n",
            h.name,
            self.ns_link.name,
            self.netns,
            h.cidr_text(),
            h.name,
            h.name,
        )
    }

    /// `ip -n <netns> -batch` input: addresses, the guest link, the route.
    pub fn ns_ip_batch(&self) -> String {
        let n = &self.ns_link;
        let g = &self.guest_link;
        // Both ends of a tap guest's link have fixed MACs, so the guest's
        // neighbour entry here is permanent and a restored guest's cached
        // gateway entry stays right: the first packets to a booting or
        // just-restored guest wait for no ARP exchange (whose retries are
        // a second apart).
        let guest_neighbour = match &self.guest_device {
            GuestDevice::Tap => format!(
                "neigh replace {} lladdr {} dev {} nud permanent\n",
                GUEST_IP,
                guest::guest_mac_string(),
                g.name
            ),
            GuestDevice::Veth { .. } => String::new(),
        };
        let guest_device = match &self.guest_device {
            GuestDevice::Tap => format!(
                "tuntap add dev {name} mode tap\nlink set {name} address {}",
                guest::mac_string(&guest::GATEWAY_MAC),
                name = g.name
            ),
            GuestDevice::Veth {
                peer_netns,
                peer_name,
            } => format!(
                "link add {} type veth peer name {peer_name} netns {peer_netns}",
                g.name
            ),
        };
        format!(
            "link set lo up\n\
             addr add {} dev {}\n\
             link set {} up\n\
             {guest_device}\n\
             addr add {} dev {}\n\
             link set {} up\n\
             {guest_neighbour}\
             route add default via {}\n",
            n.cidr_text(),
            n.name,
            n.name,
            g.cidr_text(),
            g.name,
            g.name,
            self.default_gateway,
        )
    }
}

/// The slot namespace's table: NAT between the slot address and the guest,
/// and the guest's egress filter.
pub fn slot_ruleset(
    layout: &PoolLayout,
    addrs: &SlotAddresses,
    inputs: RulesetInputs<'_>,
) -> Table {
    let one = |addr: Ipv4Addr| AddrSet::new([Ipv4Cidr::host(addr)]);
    let veth = || NS_LINK_NAME.to_string();
    let tap = || TAP_NAME.to_string();
    let refuse = || Verdict::Goto("refuse".into());
    let to = |cidrs: Vec<Ipv4Cidr>| Match::Daddr {
        not: false,
        set: AddrSet::new(cidrs),
    };

    let prerouting = Chain {
        name: "prerouting".into(),
        hook: Some(Hook {
            kind: ChainKind::Nat,
            point: HookPoint::Prerouting,
            policy: ChainPolicy::Accept,
        }),
        rules: vec![
            Rule::new(
                vec![
                    Match::Iifname(veth()),
                    Match::Daddr {
                        not: false,
                        set: one(addrs.netns),
                    },
                ],
                Verdict::Dnat(GUEST_IP),
            )
            .commented("host reaches the guest at the slot address"),
        ],
    };

    let postrouting = Chain {
        name: "postrouting".into(),
        hook: Some(Hook {
            kind: ChainKind::Nat,
            point: HookPoint::Postrouting,
            policy: ChainPolicy::Accept,
        }),
        rules: vec![
            Rule::new(
                vec![
                    Match::Oifname {
                        not: false,
                        name: veth(),
                    },
                    Match::Saddr {
                        not: false,
                        set: one(GUEST_IP),
                    },
                ],
                Verdict::Snat(addrs.netns),
            )
            .commented("guest egress leaves as the slot address"),
        ],
    };

    let input = Chain {
        name: "input".into(),
        hook: Some(Hook {
            kind: ChainKind::Filter,
            point: HookPoint::Input,
            policy: ChainPolicy::Accept,
        }),
        rules: vec![
            Rule::new(vec![Match::Iifname(tap())], refuse())
                .commented("the guest may not reach the namespace itself"),
        ],
    };

    let forward = Chain {
        name: "forward".into(),
        hook: Some(Hook {
            kind: ChainKind::Filter,
            point: HookPoint::Forward,
            policy: ChainPolicy::Drop,
        }),
        rules: vec![
            Rule::new(vec![Match::CtState(vec![CtState::Invalid])], Verdict::Drop),
            Rule::new(
                vec![
                    Match::Iifname(veth()),
                    Match::Oifname {
                        not: false,
                        name: tap(),
                    },
                    Match::CtState(vec![CtState::Established, CtState::Related]),
                ],
                Verdict::Accept,
            )
            .commented("replies to the guest"),
            Rule::new(
                vec![
                    Match::Iifname(veth()),
                    Match::Oifname {
                        not: false,
                        name: tap(),
                    },
                    Match::CtStatusDnat,
                ],
                Verdict::Accept,
            )
            .commented("host to guest"),
            Rule::new(
                vec![Match::Iifname(tap())],
                Verdict::Goto("guest_out".into()),
            ),
        ],
    };

    let mut guest_out = vec![
        Rule::new(vec![Match::Ipv6], Verdict::Drop).commented("no guest IPv6 in v1"),
        Rule::new(
            vec![Match::Saddr {
                not: true,
                set: one(GUEST_IP),
            }],
            Verdict::Drop,
        )
        .commented("spoofed source"),
        Rule::new(
            vec![Match::Oifname {
                not: true,
                name: veth(),
            }],
            Verdict::Drop,
        ),
        Rule::new(vec![Match::CtStatusDnat], Verdict::Accept)
            .commented("guest side of host-opened connections"),
    ];
    // The host's own addresses and the other sandboxes come first: no
    // policy opens them (an `allow_out` of a LAN range must not expose the
    // host's services on its LAN address).
    let host: Vec<Ipv4Cidr> = inputs
        .host_addrs
        .iter()
        .copied()
        .map(Ipv4Cidr::host)
        .collect();
    if !host.is_empty() {
        guest_out.push(Rule::new(vec![to(host)], refuse()).commented("host addresses"));
    }
    guest_out.push(Rule::new(vec![to(vec![layout.pool()])], refuse()).commented("sandbox pool"));
    let policy = inputs.policy;
    if !policy.deny_out.is_empty() {
        guest_out
            .push(Rule::new(vec![to(policy.deny_out.clone())], refuse()).commented("deny_out"));
    }
    if !policy.allow_out.is_empty() {
        guest_out.push(
            Rule::new(vec![to(policy.allow_out.clone())], Verdict::Accept).commented("allow_out"),
        );
    }
    guest_out.push(
        Rule::new(vec![to(SPECIAL_RANGES.to_vec())], refuse())
            .commented("private and special ranges"),
    );
    guest_out.push(Rule::new(vec![], Verdict::Accept));

    let refuse_chain = Chain {
        name: "refuse".into(),
        hook: None,
        rules: vec![
            Rule::new(vec![Match::Ipv6], Verdict::Drop),
            Rule::new(vec![Match::Tcp], Verdict::RejectTcpReset),
            Rule::new(vec![], Verdict::RejectAdminProhibited),
        ],
    };

    Table {
        family: Family::Inet,
        name: SLOT_TABLE_NAME.into(),
        chains: vec![
            prerouting,
            postrouting,
            input,
            forward,
            Chain {
                name: "guest_out".into(),
                hook: None,
                rules: guest_out,
            },
            refuse_chain,
        ],
    }
}

impl HostPlan {
    /// The pool's host table: masquerade slot traffic onto whatever non-pool
    /// interface it leaves by, accept forwarding for it, and refuse to
    /// forward new connections into the pool from anywhere else.
    ///
    /// This table's accepts do not override other tables: nftables runs
    /// every base chain on a hook, and a drop in any of them is final. On a
    /// host whose own firewall drops forwarded traffic by default (Docker's
    /// `FORWARD` policy, a distribution firewall), that firewall must also
    /// accept traffic from and to the pool.
    pub fn new(layout: &PoolLayout) -> Self {
        let pool = || AddrSet::new([layout.pool()]);
        let links = layout.host_link_pattern();
        let postrouting = Chain {
            name: "postrouting".into(),
            hook: Some(Hook {
                kind: ChainKind::Nat,
                point: HookPoint::Postrouting,
                policy: ChainPolicy::Accept,
            }),
            rules: vec![Rule::new(
                vec![
                    Match::Saddr {
                        not: false,
                        set: pool(),
                    },
                    Match::Oifname {
                        not: true,
                        name: links.clone(),
                    },
                ],
                Verdict::Masquerade,
            )],
        };
        let forward = Chain {
            name: "forward".into(),
            hook: Some(Hook {
                kind: ChainKind::Filter,
                point: HookPoint::Forward,
                policy: ChainPolicy::Accept,
            }),
            rules: vec![
                Rule::new(
                    vec![
                        Match::Daddr {
                            not: false,
                            set: pool(),
                        },
                        Match::CtState(vec![CtState::Established, CtState::Related]),
                    ],
                    Verdict::Accept,
                ),
                Rule::new(
                    vec![
                        Match::Iifname(links),
                        Match::Saddr {
                            not: false,
                            set: pool(),
                        },
                    ],
                    Verdict::Accept,
                ),
                Rule::new(
                    vec![Match::Daddr {
                        not: false,
                        set: pool(),
                    }],
                    Verdict::Drop,
                )
                .commented("nobody else opens connections into sandboxes"),
                Rule::new(
                    vec![Match::Saddr {
                        not: false,
                        set: pool(),
                    }],
                    Verdict::Drop,
                )
                .commented("spoofed pool source"),
            ],
        };
        // Whatever addresses the host has now or gets later: a connection a
        // sandbox opens to the host itself arrives here, on a slot link, as
        // a new flow. Replies to the host's own connections into sandboxes
        // are established flows and pass.
        let from_slot_new = || {
            vec![
                Match::Iifname(layout.host_link_pattern()),
                Match::CtState(vec![CtState::New, CtState::Invalid]),
            ]
        };
        let input = Chain {
            name: "input".into(),
            hook: Some(Hook {
                kind: ChainKind::Filter,
                point: HookPoint::Input,
                policy: ChainPolicy::Accept,
            }),
            rules: vec![
                // (nft adds, and lists without, the TCP match a reset implies.)
                Rule::new(from_slot_new(), Verdict::RejectTcpReset)
                    .commented("sandboxes open no connection to the host itself"),
                Rule::new(from_slot_new(), Verdict::Drop),
            ],
        };
        HostPlan {
            sysctls: vec![Sysctl::IP_FORWARD],
            table: Table {
                family: Family::Ip,
                name: layout.host_table_name().into(),
                chains: vec![postrouting, input, forward],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MAX_IFNAME_LEN, PoolConfig};

    fn default_layout() -> PoolLayout {
        PoolLayout::new(&PoolConfig::default()).unwrap()
    }

    fn host_addrs() -> Vec<Ipv4Addr> {
        // Loopback, the uplink, and another slot's host end (in the pool).
        ["127.0.0.1", "192.0.2.2", "10.200.0.5"]
            .map(|a| a.parse().unwrap())
            .to_vec()
    }

    fn ruleset(policy: &EgressPolicy) -> String {
        let l = default_layout();
        let addrs = host_addrs();
        SlotPlan::new(
            &l,
            0,
            RulesetInputs {
                policy,
                host_addrs: &addrs,
            },
            GuestDevice::Tap,
        )
        .ruleset
        .render()
    }

    fn cidrs(list: &[&str]) -> Vec<Ipv4Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    /// The golden default ruleset; the policy variants below differ from it
    /// only in the marked lines of `guest_out`.
    const DEFAULT_RULESET: &str = r#"table inet ember {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "veth0" ip daddr 10.200.0.2 dnat ip to 169.254.0.21 comment "host reaches the guest at the slot address"
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "veth0" ip saddr 169.254.0.21 snat ip to 10.200.0.2 comment "guest egress leaves as the slot address"
	}

	chain input {
		type filter hook input priority filter; policy accept;
		iifname "tap0" goto refuse comment "the guest may not reach the namespace itself"
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state invalid drop
		iifname "veth0" oifname "tap0" ct state established,related accept comment "replies to the guest"
		iifname "veth0" oifname "tap0" ct status dnat accept comment "host to guest"
		iifname "tap0" goto guest_out
	}

	chain guest_out {
		meta nfproto ipv6 drop comment "no guest IPv6 in v1"
		ip saddr != 169.254.0.21 drop comment "spoofed source"
		oifname != "veth0" drop
		ct status dnat accept comment "guest side of host-opened connections"
		ip daddr { 10.200.0.5, 127.0.0.1, 192.0.2.2 } goto refuse comment "host addresses"
		ip daddr 10.200.0.0/16 goto refuse comment "sandbox pool"
		ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 } goto refuse comment "private and special ranges"
		accept
	}

	chain refuse {
		meta nfproto ipv6 drop
		meta l4proto tcp reject with tcp reset
		reject with icmpx admin-prohibited
	}
}
"#;

    #[test]
    fn golden_default_ruleset() {
        assert_eq!(ruleset(&EgressPolicy::default()), DEFAULT_RULESET);
    }

    fn with_policy_lines(lines: &str) -> String {
        DEFAULT_RULESET.replace(
            "\t\tip daddr 10.200.0.0/16 goto refuse comment \"sandbox pool\"\n",
            &format!("\t\tip daddr 10.200.0.0/16 goto refuse comment \"sandbox pool\"\n{lines}"),
        )
    }

    #[test]
    fn golden_allow_ruleset() {
        let policy = EgressPolicy {
            allow_out: cidrs(&["10.9.0.0/16", "192.168.7.0/24"]),
            deny_out: vec![],
        };
        assert_eq!(
            ruleset(&policy),
            with_policy_lines(
                "\t\tip daddr { 10.9.0.0/16, 192.168.7.0/24 } accept comment \"allow_out\"\n"
            )
        );
    }

    #[test]
    fn golden_deny_ruleset() {
        let policy = EgressPolicy::isolated();
        assert_eq!(
            ruleset(&policy),
            with_policy_lines("\t\tip daddr 0.0.0.0/0 goto refuse comment \"deny_out\"\n")
        );
    }

    #[test]
    fn golden_allow_and_deny_ruleset_denies_first() {
        let policy = EgressPolicy {
            allow_out: cidrs(&["10.9.0.0/16"]),
            deny_out: cidrs(&["10.9.3.0/24", "198.51.100.0/24"]),
        };
        assert_eq!(
            ruleset(&policy),
            with_policy_lines(
                "\t\tip daddr { 10.9.3.0/24, 198.51.100.0/24 } goto refuse comment \"deny_out\"\n\
                 \t\tip daddr 10.9.0.0/16 accept comment \"allow_out\"\n"
            )
        );
    }

    #[test]
    fn slot_n_plan_uses_its_own_addresses_and_names() {
        let l = default_layout();
        let addrs = host_addrs();
        let plan = SlotPlan::new(
            &l,
            300,
            RulesetInputs {
                policy: &EgressPolicy::default(),
                host_addrs: &addrs,
            },
            GuestDevice::Tap,
        );
        // 300 * 4 = 1200 = 4 * 256 + 176.
        assert_eq!(plan.host_link.addr, Ipv4Addr::new(10, 200, 4, 177));
        assert_eq!(plan.ns_link.addr, Ipv4Addr::new(10, 200, 4, 178));
        assert_eq!(plan.default_gateway, plan.host_link.addr);
        assert_eq!(plan.netns, "ember-300");
        assert_eq!(plan.netns_path(), PathBuf::from("/run/netns/ember-300"));
        for name in [
            &plan.host_link.name,
            &plan.ns_link.name,
            &plan.guest_link.name,
        ] {
            assert!(name.len() <= MAX_IFNAME_LEN, "{name}");
        }
        let rules = plan.ruleset.render();
        assert!(rules.contains("ip daddr 10.200.4.178 dnat ip to 169.254.0.21"));
        assert!(rules.contains("snat ip to 10.200.4.178"));
        assert_eq!(
            plan.host_ip_batch(),
            "link add emberh300 type veth peer name veth0 netns ember-300\n\
             addr add 10.200.4.177/30 dev emberh300\n\
             link set emberh300 up\n"
        );
        assert_eq!(
            plan.ns_ip_batch(),
            "link set lo up\n\
             addr add 10.200.4.178/30 dev veth0\n\
             link set veth0 up\n\
             tuntap add dev tap0 mode tap\n\
             link set tap0 address 02:fc:00:00:00:02\n\
             addr add 169.254.0.22/30 dev tap0\n\
             link set tap0 up\n\
             neigh replace 169.254.0.21 lladdr 02:fc:00:00:00:01 dev tap0 nud permanent\n\
             route add default via 10.200.4.177\n"
        );
        assert_eq!(
            plan.teardown(),
            SlotTeardown {
                host_link: "emberh300".into(),
                netns: "ember-300".into()
            }
        );
        assert_eq!(
            plan.ns_sysctls[0].path(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
    }

    #[test]
    fn veth_guest_device_changes_only_the_guest_link_lines() {
        let l = default_layout();
        let inputs = RulesetInputs {
            policy: &EgressPolicy::default(),
            host_addrs: &[],
        };
        let tap = SlotPlan::new(&l, 1, inputs, GuestDevice::Tap);
        let veth = SlotPlan::new(
            &l,
            1,
            inputs,
            GuestDevice::Veth {
                peer_netns: "guest-1".into(),
                peer_name: "eth0".into(),
            },
        );
        assert_eq!(tap.ruleset, veth.ruleset);
        assert_eq!(tap.host_ip_batch(), veth.host_ip_batch());
        // The veth peer's MAC is the kernel's choice: no fixed neighbour.
        assert_eq!(
            veth.ns_ip_batch(),
            tap.ns_ip_batch()
                .replace(
                    "tuntap add dev tap0 mode tap\nlink set tap0 address 02:fc:00:00:00:02",
                    "link add tap0 type veth peer name eth0 netns guest-1"
                )
                .replace(
                    "neigh replace 169.254.0.21 lladdr 02:fc:00:00:00:01 dev tap0 nud permanent\n",
                    ""
                )
        );
        // Without host addresses the rule is left out rather than empty.
        assert!(!tap.ruleset.render().contains("host addresses"));
    }

    #[test]
    fn special_ranges_are_the_apis() {
        // The API's egress ceiling and the slots' default denies are one list.
        let api: Vec<Ipv4Cidr> = ember_types::cidr::SPECIAL_RANGES
            .iter()
            .map(|(addr, len, _)| Ipv4Cidr::new(*addr, *len).unwrap())
            .collect();
        assert_eq!(api, SPECIAL_RANGES.to_vec());
    }

    #[test]
    fn golden_host_table() {
        let plan = HostPlan::new(&default_layout());
        assert_eq!(plan.sysctls, vec![Sysctl::IP_FORWARD]);
        assert_eq!(
            plan.table.render(),
            r#"table ip ember {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.200.0.0/16 oifname != "emberh*" masquerade
	}

	chain input {
		type filter hook input priority filter; policy accept;
		iifname "emberh*" ct state invalid,new reject with tcp reset comment "sandboxes open no connection to the host itself"
		iifname "emberh*" ct state invalid,new drop
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		ip daddr 10.200.0.0/16 ct state established,related accept
		iifname "emberh*" ip saddr 10.200.0.0/16 accept
		ip daddr 10.200.0.0/16 drop comment "nobody else opens connections into sandboxes"
		ip saddr 10.200.0.0/16 drop comment "spoofed pool source"
	}
}
"#
        );
    }
}
