//! Pool configuration and the pure arithmetic of a pool: how many slots it
//! has, each slot's /30 and addresses, and every name a slot leaves on the
//! host (namespace, host-side veth, lock file) so they can be recognised
//! again after a crash. Nothing here touches the system.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::cidr::Ipv4Cidr;
use crate::error::NetError;

/// Linux's limit on interface names (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// How a pool of slots is named and addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Starts every name the pool creates on the host (namespaces, links,
    /// the host nftables table, lock files), so pools never touch each
    /// other's leftovers. Lowercase letters and digits, starting with a
    /// letter. Two pools on one host must not use prefixes where one is the
    /// other followed by `h` (their host links would match each other's
    /// `<prefix>h*` patterns).
    pub prefix: String,
    /// Carved into one /30 per slot: 16384 slots for the default /16.
    pub pool: Ipv4Cidr,
    /// Holds the lock files that make allocation safe across processes.
    pub run_dir: PathBuf,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            prefix: "ember".into(),
            pool: Ipv4Cidr::new_unchecked(Ipv4Addr::new(10, 200, 0, 0), 16),
            run_dir: PathBuf::from("/run/ember/net"),
        }
    }
}

/// The addresses of one slot: its /30, the host end (.1) and the
/// namespace end (.2) of the veth between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAddresses {
    pub subnet: Ipv4Cidr,
    pub host: Ipv4Addr,
    pub netns: Ipv4Addr,
}

/// A validated pool: names and addresses of every slot in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLayout {
    prefix: String,
    pool: Ipv4Cidr,
    run_dir: PathBuf,
    capacity: u32,
}

/// Ranges a pool must not use: the guest's own link, and addresses that do
/// not route as unicast.
const FORBIDDEN_POOL_RANGES: [(Ipv4Cidr, &str); 4] = [
    (
        Ipv4Cidr::new_unchecked(Ipv4Addr::new(169, 254, 0, 0), 16),
        "169.254.0.0/16 (the guest's link is there)",
    ),
    (
        Ipv4Cidr::new_unchecked(Ipv4Addr::new(127, 0, 0, 0), 8),
        "127.0.0.0/8",
    ),
    (
        Ipv4Cidr::new_unchecked(Ipv4Addr::new(0, 0, 0, 0), 8),
        "0.0.0.0/8",
    ),
    (
        Ipv4Cidr::new_unchecked(Ipv4Addr::new(224, 0, 0, 0), 3),
        "224.0.0.0/3 (multicast and reserved)",
    ),
];

impl PoolLayout {
    pub fn new(config: &PoolConfig) -> Result<Self, NetError> {
        let invalid = |reason: String| NetError::InvalidConfig { reason };
        let prefix = &config.prefix;
        let well_formed = prefix
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !well_formed {
            return Err(invalid(format!(
                "prefix {prefix:?} must be lowercase letters and digits, starting with a letter"
            )));
        }
        let pool = config.pool;
        if pool.prefix_len() > 30 {
            return Err(invalid(format!(
                "pool {pool} is too small: each slot needs a /30, use a prefix length of 30 or less"
            )));
        }
        if let Some((_, name)) = FORBIDDEN_POOL_RANGES
            .iter()
            .find(|(r, _)| r.overlaps(&pool))
        {
            return Err(invalid(format!(
                "pool {pool} overlaps {name}; choose a private range such as 10.200.0.0/16"
            )));
        }
        let capacity = 1u32 << (30 - pool.prefix_len());
        let layout = PoolLayout {
            prefix: prefix.clone(),
            pool,
            run_dir: config.run_dir.clone(),
            capacity,
        };
        let longest = layout.host_link_name(capacity - 1);
        if longest.len() > MAX_IFNAME_LEN {
            let room = MAX_IFNAME_LEN - (longest.len() - prefix.len());
            return Err(invalid(format!(
                "prefix {prefix:?} is too long for pool {pool}: interface {longest:?} exceeds \
                 {MAX_IFNAME_LEN} characters; use a prefix of at most {room} characters or a smaller pool"
            )));
        }
        Ok(layout)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn pool(&self) -> Ipv4Cidr {
        self.pool
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Number of slots (one /30 each).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn check_index(&self, index: u32) -> Result<(), NetError> {
        if index < self.capacity {
            Ok(())
        } else {
            Err(NetError::NoSuchSlot {
                index,
                capacity: self.capacity,
            })
        }
    }

    /// Slot `index`'s /30 is the pool's `index`-th; the caller checks the index.
    pub fn addresses(&self, index: u32) -> SlotAddresses {
        debug_assert!(index < self.capacity);
        let base = u32::from(self.pool.addr()) + index * 4;
        SlotAddresses {
            subnet: Ipv4Cidr::new_unchecked(Ipv4Addr::from(base), 30),
            host: Ipv4Addr::from(base + 1),
            netns: Ipv4Addr::from(base + 2),
        }
    }

    /// `<prefix>-<index>`.
    pub fn netns_name(&self, index: u32) -> String {
        format!("{}-{index}", self.prefix)
    }

    pub fn netns_path(&self, index: u32) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns_name(index))
    }

    /// `<prefix>h<index>`: the host's end of the slot's veth.
    pub fn host_link_name(&self, index: u32) -> String {
        format!("{}h{index}", self.prefix)
    }

    /// nftables interface pattern matching every host link of this pool.
    pub fn host_link_pattern(&self) -> String {
        format!("{}h*", self.prefix)
    }

    /// Name of the host-wide nftables table (`ip` family).
    pub fn host_table_name(&self) -> &str {
        &self.prefix
    }

    /// `<run_dir>/<prefix>-<index>.lock`, held for the slot's lifetime.
    pub fn slot_lock_path(&self, index: u32) -> PathBuf {
        self.run_dir.join(format!("{}-{index}.lock", self.prefix))
    }

    /// `<run_dir>/<prefix>.lock`, held while the host-wide rules are
    /// created or removed, so "last slot gone" is decided by one process.
    pub fn pool_lock_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.lock", self.prefix))
    }

    /// The index in a namespace name of this pool, if it is one.
    pub fn parse_netns_name(&self, name: &str) -> Option<u32> {
        self.parse_index(name.strip_prefix(&self.prefix)?.strip_prefix('-')?)
    }

    pub fn parse_host_link_name(&self, name: &str) -> Option<u32> {
        self.parse_index(name.strip_prefix(&self.prefix)?.strip_prefix('h')?)
    }

    pub fn parse_lock_file_name(&self, name: &str) -> Option<u32> {
        self.parse_netns_name(name.strip_suffix(".lock")?)
    }

    /// Canonical decimal only (no sign, no leading zeros), inside the pool:
    /// anything else was not made by this pool and is left alone.
    fn parse_index(&self, digits: &str) -> Option<u32> {
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        let index: u32 = canonical.then(|| digits.parse().ok()).flatten()?;
        (index < self.capacity).then_some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(prefix: &str, pool: &str) -> Result<PoolLayout, NetError> {
        PoolLayout::new(&PoolConfig {
            prefix: prefix.into(),
            pool: pool.parse().unwrap(),
            run_dir: "/run/ember/net".into(),
        })
    }

    #[test]
    fn default_pool_has_16384_slots_and_fits_names() {
        let l = PoolLayout::new(&PoolConfig::default()).unwrap();
        assert_eq!(l.capacity(), 16384);
        assert_eq!(l.host_link_name(16383), "emberh16383");
        assert!(l.host_link_name(16383).len() <= MAX_IFNAME_LEN);
        assert_eq!(l.netns_name(7), "ember-7");
        assert_eq!(l.netns_path(7), PathBuf::from("/run/netns/ember-7"));
        assert_eq!(
            l.slot_lock_path(7),
            PathBuf::from("/run/ember/net/ember-7.lock")
        );
        assert_eq!(
            l.pool_lock_path(),
            PathBuf::from("/run/ember/net/ember.lock")
        );
        assert_eq!(l.host_link_pattern(), "emberh*");
        assert_eq!(l.host_table_name(), "ember");
    }

    #[test]
    fn slot_n_gets_the_nth_slash_30() {
        let l = PoolLayout::new(&PoolConfig::default()).unwrap();
        let a = l.addresses(0);
        assert_eq!(a.subnet.to_string(), "10.200.0.0/30");
        assert_eq!(a.host, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(a.netns, Ipv4Addr::new(10, 200, 0, 2));
        let a = l.addresses(1);
        assert_eq!(
            (a.host, a.netns),
            ("10.200.0.5".parse().unwrap(), "10.200.0.6".parse().unwrap())
        );
        let a = l.addresses(64);
        assert_eq!(a.subnet.to_string(), "10.200.1.0/30");
        let last = l.addresses(16383);
        assert_eq!(last.subnet.to_string(), "10.200.255.252/30");
        assert_eq!(last.netns, Ipv4Addr::new(10, 200, 255, 254));
        assert!(l.pool().contains(last.netns));
        assert!(l.check_index(16384).is_err());
    }

    #[test]
    fn every_slot_is_distinct_and_inside_a_small_pool() {
        let l = layout("t", "10.9.8.0/26").unwrap();
        assert_eq!(l.capacity(), 16);
        let mut seen = std::collections::HashSet::new();
        for i in 0..l.capacity() {
            let a = l.addresses(i);
            assert!(l.pool().contains(a.host) && l.pool().contains(a.netns));
            assert!(a.subnet.contains(a.host) && a.subnet.contains(a.netns));
            assert!(seen.insert(a.subnet));
        }
    }

    #[test]
    fn names_parse_back_only_when_canonical_and_in_range() {
        let l = layout("ember", "10.200.0.0/24").unwrap();
        assert_eq!(l.parse_netns_name("ember-12"), Some(12));
        assert_eq!(l.parse_host_link_name("emberh12"), Some(12));
        assert_eq!(l.parse_lock_file_name("ember-0.lock"), Some(0));
        for other in [
            "ember-012",
            "ember-64",
            "ember-",
            "ember-x",
            "embe-1",
            "emberx-1",
            "ember-+1",
        ] {
            assert_eq!(l.parse_netns_name(other), None, "{other}");
        }
        assert_eq!(l.parse_host_link_name("emberhh1"), None);
        assert_eq!(l.parse_lock_file_name("ember.lock"), None);
    }

    #[test]
    fn bad_configs_say_what_to_change() {
        let err = |p, pool| layout(p, pool).unwrap_err().to_string();
        assert!(err("Ember", "10.200.0.0/16").contains("lowercase"));
        assert!(err("", "10.200.0.0/16").contains("lowercase"));
        assert!(err("e-x", "10.200.0.0/16").contains("lowercase"));
        assert!(err("ember", "10.200.0.0/31").contains("/30"));
        assert!(err("ember", "169.254.0.0/24").contains("guest"));
        let long = err("longprefix", "10.200.0.0/16");
        assert!(long.contains("at most 9 characters"), "{long}");
        // A shorter pool makes room for a longer prefix.
        assert!(layout("longprefix", "10.200.0.0/24").is_ok());
        assert!(layout("e", "10.0.0.0/8").is_ok());
    }
}
