//! Per-sandbox network slots: namespace, veth, TAP and nftables rules,
//! planned as data and applied as root.
//!
//! Each sandbox's VMM runs in its own network namespace (a *slot*). Inside
//! it, `tap0` carries the gateway address and the guest always has
//! `GUEST_IP`/`GUEST_MAC`, so any snapshot restores into any slot. A veth
//! pair with a per-slot /30 from the pool joins the slot to the host; the
//! host reaches the guest at the namespace end's address (DNAT), and guest
//! egress is SNAT-ed to it and masqueraded by the host, filtered by an
//! nftables table inside the slot that the guest cannot touch.
//!
//! - `layout`, `plan`, `nft`, `cidr`, `policy`: pure data and functions,
//!   tested without root.
//! - `apply`: the one place that changes the system.
//! - `pool`: allocation across processes, crash recovery.
//!
//! Operating notes:
//! - The host needs `net.ipv4.ip_forward=1`; the first slot sets it (and
//!   logs that it did) and nothing ever resets it.
//! - The host table `<prefix>` adds accepts for forwarding; a host firewall
//!   whose own forward chain drops by default must also accept the pool's
//!   traffic (see [`HostPlan::new`]). Its `input` chain refuses every new
//!   connection that arrives on a slot link: a sandbox reaches none of the
//!   host's addresses, including ones added after its slot was set up
//!   (the slot's own list of host addresses is a snapshot).
//! - A host agent that restarts while VMs run must [`SlotPool::adopt`] its
//!   slots before calling [`SlotPool::reclaim_stale`].
//! - Refused guest traffic gets a TCP reset or ICMP admin-prohibited at once.
//!   DNS servers on private ranges (a LAN resolver, the host's stub) are
//!   refused by default like any other private address.
//!
//! Not here: starting VMMs (they get [`VmmNet`]), DNS for the guest, IPv6
//! (dropped for guests in v1).

mod apply;
mod cidr;
mod error;
mod layout;
mod lock;
mod nft;
mod plan;
mod policy;
mod pool;

pub use apply::{Applier, host_ipv4_addrs, in_netns, link_exists};
pub use cidr::{AddrSet, Ipv4Cidr};
pub use error::{NetError, Result};
pub use layout::{MAX_IFNAME_LEN, NETNS_DIR, PoolConfig, PoolLayout, SlotAddresses};
pub use nft::{
    Chain, ChainKind, ChainPolicy, CtState, Family, Hook, HookPoint, Match, Rule, Table, Verdict,
};
pub use plan::{
    GuestDevice, HostPlan, LinkAddress, NS_LINK_NAME, RulesetInputs, SLOT_TABLE_NAME,
    SPECIAL_RANGES, SlotPlan, SlotTeardown, Sysctl, slot_ruleset,
};
pub use policy::EgressPolicy;
pub use pool::{Slot, SlotPool, VmmNet};
