//! Slot allocation: which process owns which slot, safely across processes
//! on one host, and recovery of what crashed processes left behind.
//!
//! Ownership is an `flock` on `<run_dir>/<prefix>-<n>.lock`, held for the
//! slot's life. The kernel drops it when the holder dies, so a slot whose
//! lock is free but whose namespace exists was abandoned: the next `acquire`
//! that lands on it cleans it first, and `reclaim_stale` cleans all of them.
//! A slot can outlive its process on purpose (the host agent restarts while
//! VMs run): the new process re-takes it with `adopt` — which must happen
//! before `reclaim_stale` or any other process's `acquire`, or the slot
//! counts as abandoned.
//!
//! The host-wide rules exist exactly while some namespace of the pool does.
//! Creating the first namespace and removing the last one both happen under
//! `<run_dir>/<prefix>.lock`, so that decision never races.
//!
//! Everything here blocks (commands, file locks); async callers use
//! `spawn_blocking`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_types::guest::{AGENT_PORT, TAP_NAME, guest_mac_string};

use crate::apply::{Applier, host_ipv4_addrs, link_names};
use crate::error::{NetError, Result};
use crate::layout::{NETNS_DIR, PoolConfig, PoolLayout};
use crate::lock::LockFile;
use crate::plan::{GuestDevice, HostPlan, RulesetInputs, SlotPlan, slot_ruleset};
use crate::policy::EgressPolicy;

/// The slots of one pool on this host.
#[derive(Debug, Clone)]
pub struct SlotPool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    layout: PoolLayout,
    host: HostPlan,
    applier: Applier,
}

/// What a VMM needs to attach a sandbox to its slot (the pieces of
/// `ember_vmm::spec::NetSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmNet {
    /// TAP device inside the namespace.
    pub tap: String,
    /// `02:fc:00:00:00:01` form.
    pub guest_mac: String,
    /// `/run/netns/<name>`: run the VMM in this namespace.
    pub netns: PathBuf,
}

/// One sandbox's network slot, owned by this process until released
/// (explicitly, or on drop) or detached.
#[derive(Debug)]
pub struct Slot {
    shared: Arc<Shared>,
    plan: SlotPlan,
    policy: EgressPolicy,
    /// `None` once released or detached.
    lock: Option<LockFile>,
}

impl SlotPool {
    /// Validates the configuration and creates the run directory; touches
    /// nothing else.
    pub fn new(config: PoolConfig) -> Result<Self> {
        Self::with_applier(config, Applier::default())
    }

    pub fn with_applier(config: PoolConfig, applier: Applier) -> Result<Self> {
        let layout = PoolLayout::new(&config)?;
        std::fs::create_dir_all(layout.run_dir())
            .map_err(|e| NetError::io("cannot create run directory", layout.run_dir(), e))?;
        let host = HostPlan::new(&layout);
        Ok(SlotPool {
            shared: Arc::new(Shared {
                layout,
                host,
                applier,
            }),
        })
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.shared.layout
    }

    /// A fresh slot with a TAP device for a VMM.
    pub fn acquire(&self, policy: EgressPolicy) -> Result<Slot> {
        self.acquire_with(policy, GuestDevice::Tap)
    }

    /// A fresh slot with the given guest device (see [`GuestDevice::Veth`]
    /// for tests without a VM). Takes the lowest free index; leftovers of a
    /// crashed holder of that index are removed first.
    pub fn acquire_with(&self, policy: EgressPolicy, guest: GuestDevice) -> Result<Slot> {
        let layout = &self.shared.layout;
        let host_addrs = host_ipv4_addrs()?;
        for index in 0..layout.capacity() {
            let Some(lock) = LockFile::try_acquire(&layout.slot_lock_path(index))? else {
                continue;
            };
            let inputs = RulesetInputs {
                policy: &policy,
                host_addrs: &host_addrs,
            };
            let plan = SlotPlan::new(layout, index, inputs, guest);
            return match self.shared.set_up(&plan) {
                Ok(()) => {
                    tracing::info!(
                        slot = index,
                        netns = %plan.netns,
                        address = %plan.ns_link.addr,
                        "network slot acquired"
                    );
                    Ok(Slot {
                        shared: self.shared.clone(),
                        plan,
                        policy,
                        lock: Some(lock),
                    })
                }
                Err(e) => {
                    if let Err(cleanup) = self.shared.tear_down(&plan, lock) {
                        tracing::warn!(slot = index, error = %cleanup, "cleanup after failed slot setup failed");
                    }
                    Err(e)
                }
            };
        }
        Err(NetError::Exhausted {
            capacity: layout.capacity(),
            pool: layout.pool().to_string(),
            prefix: layout.prefix().to_string(),
        })
    }

    /// Re-takes slot `index`, left running by a previous process (a host
    /// agent restart), if it is intact. Its ruleset is rebuilt from `policy`
    /// and the host's current addresses (both may have changed while
    /// nobody held the slot), and the host table is restored if missing.
    pub fn adopt(&self, index: u32, policy: EgressPolicy) -> Result<Slot> {
        let layout = &self.shared.layout;
        layout.check_index(index)?;
        let Some(lock) = LockFile::try_acquire(&layout.slot_lock_path(index))? else {
            return Err(NetError::SlotBusy { index });
        };
        let host_addrs = host_ipv4_addrs()?;
        let inputs = RulesetInputs {
            policy: &policy,
            host_addrs: &host_addrs,
        };
        let plan = SlotPlan::new(layout, index, inputs, GuestDevice::Tap);
        if let Some(missing) = self.shared.applier.find_missing(&plan)? {
            // Not ours to clean here: reclaim_stale or the next acquire will
            // (they find the slot by its namespace and link, not the lock file).
            lock.remove()?;
            return Err(NetError::SlotNotIntact { index, missing });
        }
        {
            let _pool = LockFile::acquire(&layout.pool_lock_path())?;
            self.shared.applier.apply_host(&self.shared.host)?;
        }
        self.shared
            .applier
            .replace_slot_ruleset(&plan.netns_path(), &plan.ruleset)?;
        tracing::info!(slot = index, netns = %plan.netns, "network slot adopted");
        Ok(Slot {
            shared: self.shared.clone(),
            plan,
            policy,
            lock: Some(lock),
        })
    }

    /// Removes every slot of this pool whose lock nobody holds (namespaces,
    /// links, lock files), then the host table if no slot is left. Run at
    /// host-agent start, after adopting the slots to keep. Returns how many
    /// abandoned slots were removed.
    pub fn reclaim_stale(&self) -> Result<usize> {
        let layout = &self.shared.layout;
        let mut candidates = std::collections::BTreeSet::new();
        candidates.extend(netns_indices(layout)?);
        candidates.extend(
            link_names()?
                .iter()
                .filter_map(|name| layout.parse_host_link_name(name)),
        );
        candidates.extend(
            read_dir_names(layout.run_dir())?
                .iter()
                .filter_map(|name| layout.parse_lock_file_name(name)),
        );
        let mut reclaimed = 0;
        for index in candidates {
            let Some(lock) = LockFile::try_acquire(&layout.slot_lock_path(index))? else {
                continue;
            };
            let plan = SlotPlan::new(
                layout,
                index,
                RulesetInputs {
                    policy: &EgressPolicy::default(),
                    host_addrs: &[],
                },
                GuestDevice::Tap,
            );
            if self.shared.applier.teardown_slot(&plan.teardown())? {
                reclaimed += 1;
                tracing::warn!(slot = index, netns = %plan.netns, "reclaimed abandoned network slot");
            }
            lock.remove()?;
        }
        self.shared.remove_host_if_unused()?;
        Ok(reclaimed)
    }

    /// Removes the pool's host table now, whatever slots still exist (their
    /// egress stops working). For uninstalling; `release` and
    /// `reclaim_stale` already remove it once the last slot is gone.
    pub fn remove_host_rules(&self) -> Result<()> {
        let layout = &self.shared.layout;
        let pool_lock = LockFile::acquire(&layout.pool_lock_path())?;
        self.shared.applier.teardown_host(&self.shared.host)?;
        pool_lock.remove()
    }
}

impl Shared {
    fn set_up(&self, plan: &SlotPlan) -> Result<()> {
        {
            let _pool = LockFile::acquire(&self.layout.pool_lock_path())?;
            if self.applier.teardown_slot(&plan.teardown())? {
                tracing::warn!(slot = plan.index, "removed leftovers of an abandoned slot");
            }
            self.applier.apply_host(&self.host)?;
            self.applier.create_netns(plan)?;
        }
        self.applier.apply_links(plan)?;
        self.applier.apply_slot_rules(plan)
    }

    /// Removes the slot, the host table if it was the pool's last, and the
    /// slot's lock file — in that order, so the index is not reused before
    /// it is clean.
    fn tear_down(&self, plan: &SlotPlan, lock: LockFile) -> Result<()> {
        self.applier.teardown_slot(&plan.teardown())?;
        self.remove_host_if_unused()?;
        lock.remove()
    }

    fn remove_host_if_unused(&self) -> Result<()> {
        let pool_lock = LockFile::acquire(&self.layout.pool_lock_path())?;
        if !netns_indices(&self.layout)?.is_empty() {
            return Ok(());
        }
        self.applier.teardown_host(&self.host)?;
        tracing::info!(table = %self.host.table.name, "removed host rules: no slots left");
        pool_lock.remove()
    }
}

impl Slot {
    pub fn index(&self) -> u32 {
        self.plan.index
    }

    /// Name under `/run/netns`.
    pub fn netns_name(&self) -> &str {
        &self.plan.netns
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        self.plan.netns_path()
    }

    /// The slot address: the namespace's end of the veth. The host reaches
    /// the guest here; the guest's egress leaves from here.
    pub fn address(&self) -> Ipv4Addr {
        self.plan.ns_link.addr
    }

    /// The host's end of the veth.
    pub fn host_address(&self) -> Ipv4Addr {
        self.plan.host_link.addr
    }

    /// Where the host connects to reach guest TCP `port`.
    pub fn guest_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.address()), port)
    }

    /// Where the host reaches the guest agent.
    pub fn agent_addr(&self) -> SocketAddr {
        self.guest_addr(AGENT_PORT)
    }

    pub fn tap_name(&self) -> &str {
        TAP_NAME
    }

    pub fn guest_mac(&self) -> String {
        guest_mac_string()
    }

    pub fn vmm_net(&self) -> VmmNet {
        VmmNet {
            tap: TAP_NAME.into(),
            guest_mac: guest_mac_string(),
            netns: self.netns_path(),
        }
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The plan this slot was built from (its ruleset reflects the latest
    /// policy change).
    pub fn plan(&self) -> &SlotPlan {
        &self.plan
    }

    /// Replaces the egress policy of the live slot in one nftables
    /// transaction; it applies to established flows too. The host's
    /// addresses are re-read, so addresses it gained since are denied from now on.
    pub fn set_policy(&mut self, policy: EgressPolicy) -> Result<()> {
        let host_addrs = host_ipv4_addrs()?;
        let layout = &self.shared.layout;
        let table = slot_ruleset(
            layout,
            &layout.addresses(self.plan.index),
            RulesetInputs {
                policy: &policy,
                host_addrs: &host_addrs,
            },
        );
        self.shared
            .applier
            .replace_slot_ruleset(&self.plan.netns_path(), &table)?;
        tracing::info!(slot = self.plan.index, ?policy, "egress policy replaced");
        self.plan.ruleset = table;
        self.policy = policy;
        Ok(())
    }

    /// The slot's table as the kernel has it now (`nft list` form).
    pub fn read_ruleset(&self) -> Result<String> {
        self.shared
            .applier
            .read_slot_ruleset(&self.plan.netns_path(), &self.plan.ruleset)
    }

    /// Removes the slot (and the host rules if it was the pool's last).
    pub fn release(mut self) -> Result<()> {
        self.release_inner()
    }

    /// Gives the slot up without removing it: it keeps working, and a later
    /// process takes it back with [`SlotPool::adopt`]. Returns its index.
    pub fn detach(mut self) -> u32 {
        // Dropping the lock file handle releases the flock; the file stays
        // so the slot is still recognisable.
        self.lock.take();
        tracing::info!(slot = self.plan.index, "network slot detached");
        self.plan.index
    }

    fn release_inner(&mut self) -> Result<()> {
        let Some(lock) = self.lock.take() else {
            return Ok(());
        };
        self.shared.tear_down(&self.plan, lock)?;
        tracing::info!(slot = self.plan.index, "network slot released");
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::error!(slot = self.plan.index, error = %e, "releasing network slot failed; reclaim_stale will retry");
        }
    }
}

/// Indices of this pool's named namespaces.
fn netns_indices(layout: &PoolLayout) -> Result<Vec<u32>> {
    Ok(read_dir_names(Path::new(NETNS_DIR))?
        .iter()
        .filter_map(|name| layout.parse_netns_name(name))
        .collect())
}

/// File names in `dir`; none if it does not exist.
fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetError::io("cannot list", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| NetError::io("cannot list", dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_pools_move_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Slot>();
        shareable::<SlotPool>();
    }

    #[test]
    fn new_pool_creates_only_its_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("net");
        let pool = SlotPool::new(PoolConfig {
            prefix: "u".into(),
            pool: "10.9.0.0/24".parse().unwrap(),
            run_dir: run_dir.clone(),
        })
        .unwrap();
        assert_eq!(pool.layout().capacity(), 64);
        assert!(run_dir.is_dir());
        assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), 0);
    }
}
