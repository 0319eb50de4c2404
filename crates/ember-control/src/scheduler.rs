//! Placement: which host gets a new sandbox. A pure function over snapshots
//! of the hosts; no I/O, no waiting. No room anywhere is an answer (the API
//! says 503 `no_capacity`), never a queue.
//!
//! The capacity the scheduler sees can be a moment stale; the store re-checks
//! it in the same statement that reserves the sandbox's row
//! ([`crate::store::CapacityCheck`]), and the API tries the next candidate
//! when that check loses a race.
//!
//! Builds live on the host that wrote them (v1 does not move builds between
//! hosts), so a sandbox from a template can only start where the template's
//! build is, and a resume goes back to the host that paused it.

use std::collections::HashSet;

/// What the scheduler knows about one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    pub id: String,
    pub healthy: bool,
    pub vcpus_total: u64,
    pub memory_mib_total: u64,
    pub vcpus_used: u64,
    pub memory_mib_used: u64,
    /// Builds stored on the host.
    pub builds: HashSet<String>,
}

impl HostSnapshot {
    fn fits(&self, vcpus: u32, memory_mib: u32) -> bool {
        self.vcpus_used + u64::from(vcpus) <= self.vcpus_total
            && self.memory_mib_used + u64::from(memory_mib) <= self.memory_mib_total
    }

    /// Free memory after placing, a tie-breaker that spreads load.
    fn memory_left(&self, memory_mib: u32) -> u64 {
        self.memory_mib_total
            .saturating_sub(self.memory_mib_used + u64::from(memory_mib))
    }
}

/// What a new sandbox needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The build it starts from; `None` for a cold boot of the base image.
    pub build_id: Option<String>,
}

/// Why nothing could be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoCapacity {
    /// No host is registered and healthy.
    NoHosts,
    /// The build is on no healthy host.
    BuildNowhere { build_id: String },
    /// Hosts exist but none has room.
    Full { vcpus: u32, memory_mib: u32 },
    /// The one host that can take it (the one holding its build) is down.
    HostDown { host_id: String },
}

impl std::fmt::Display for NoCapacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoCapacity::NoHosts => f.write_str("no healthy host is registered"),
            NoCapacity::BuildNowhere { build_id } => {
                write!(f, "no healthy host holds build {build_id}")
            }
            NoCapacity::Full { vcpus, memory_mib } => write!(
                f,
                "no host has {vcpus} vCPUs and {memory_mib} MiB free; try again later or ask for less"
            ),
            NoCapacity::HostDown { host_id } => write!(
                f,
                "host {host_id}, which holds this sandbox's build, is not reachable; try again later"
            ),
        }
    }
}

/// Candidate hosts for a new sandbox, best first: healthy, with room, holding
/// the build when there is one; most free memory first. The caller reserves
/// on the first and falls back to the next if that reservation loses a race.
pub fn candidates(hosts: &[HostSnapshot], demand: &Demand) -> Result<Vec<String>, NoCapacity> {
    let healthy: Vec<&HostSnapshot> = hosts.iter().filter(|h| h.healthy).collect();
    if healthy.is_empty() {
        return Err(NoCapacity::NoHosts);
    }
    let eligible: Vec<&HostSnapshot> = match &demand.build_id {
        Some(build) => {
            let with_build: Vec<_> = healthy
                .into_iter()
                .filter(|h| h.builds.contains(build))
                .collect();
            if with_build.is_empty() {
                return Err(NoCapacity::BuildNowhere {
                    build_id: build.clone(),
                });
            }
            with_build
        }
        None => healthy,
    };
    let mut fitting: Vec<&HostSnapshot> = eligible
        .into_iter()
        .filter(|h| h.fits(demand.vcpus, demand.memory_mib))
        .collect();
    if fitting.is_empty() {
        return Err(NoCapacity::Full {
            vcpus: demand.vcpus,
            memory_mib: demand.memory_mib,
        });
    }
    fitting.sort_by(|a, b| {
        b.memory_left(demand.memory_mib)
            .cmp(&a.memory_left(demand.memory_mib))
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(fitting.into_iter().map(|h| h.id.clone()).collect())
}

/// Can a paused sandbox resume on its own host now?
pub fn resume_fits(host: &HostSnapshot, vcpus: u32, memory_mib: u32) -> Result<(), NoCapacity> {
    if !host.healthy {
        return Err(NoCapacity::HostDown {
            host_id: host.id.clone(),
        });
    }
    if !host.fits(vcpus, memory_mib) {
        return Err(NoCapacity::Full { vcpus, memory_mib });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, vcpus: (u64, u64), mem: (u64, u64), builds: &[&str]) -> HostSnapshot {
        HostSnapshot {
            id: id.into(),
            healthy: true,
            vcpus_total: vcpus.0,
            vcpus_used: vcpus.1,
            memory_mib_total: mem.0,
            memory_mib_used: mem.1,
            builds: builds.iter().map(|b| b.to_string()).collect(),
        }
    }

    fn demand(vcpus: u32, memory_mib: u32, build: Option<&str>) -> Demand {
        Demand {
            vcpus,
            memory_mib,
            build_id: build.map(str::to_owned),
        }
    }

    #[test]
    fn no_hosts_is_no_capacity_not_a_wait() {
        assert_eq!(
            candidates(&[], &demand(1, 512, None)),
            Err(NoCapacity::NoHosts)
        );
        let mut h = host("a", (8, 0), (8192, 0), &[]);
        h.healthy = false;
        assert_eq!(
            candidates(&[h], &demand(1, 512, None)),
            Err(NoCapacity::NoHosts)
        );
    }

    #[test]
    fn a_host_without_room_is_skipped() {
        let hosts = [
            host("a", (4, 4), (8192, 0), &[]),
            host("b", (4, 0), (8192, 0), &[]),
        ];
        assert_eq!(
            candidates(&hosts, &demand(1, 512, None)).unwrap(),
            vec!["b"]
        );
        let hosts = [host("a", (4, 0), (1024, 800), &[])];
        assert_eq!(
            candidates(&hosts, &demand(1, 512, None)),
            Err(NoCapacity::Full {
                vcpus: 1,
                memory_mib: 512
            })
        );
    }

    #[test]
    fn exact_fit_is_allowed() {
        let hosts = [host("a", (4, 3), (1024, 512), &[])];
        assert_eq!(
            candidates(&hosts, &demand(1, 512, None)).unwrap(),
            vec!["a"]
        );
    }

    #[test]
    fn a_template_starts_only_where_its_build_is() {
        let hosts = [
            host("a", (64, 0), (65536, 0), &[]),
            host("b", (4, 0), (4096, 0), &["b1"]),
        ];
        assert_eq!(
            candidates(&hosts, &demand(1, 512, Some("b1"))).unwrap(),
            vec!["b"]
        );
        assert_eq!(
            candidates(&hosts, &demand(1, 512, Some("zz"))),
            Err(NoCapacity::BuildNowhere {
                build_id: "zz".into()
            })
        );
        let full = [
            host("b", (4, 4), (4096, 0), &["b1"]),
            host("a", (64, 0), (65536, 0), &[]),
        ];
        assert!(matches!(
            candidates(&full, &demand(1, 512, Some("b1"))),
            Err(NoCapacity::Full { .. })
        ));
    }

    #[test]
    fn most_free_memory_first_then_by_id() {
        let hosts = [
            host("a", (8, 0), (4096, 0), &[]),
            host("c", (8, 0), (8192, 0), &[]),
            host("b", (8, 0), (8192, 0), &[]),
        ];
        assert_eq!(
            candidates(&hosts, &demand(1, 512, None)).unwrap(),
            vec!["b", "c", "a"]
        );
    }

    #[test]
    fn resume_needs_a_healthy_host_with_room() {
        let h = host("a", (2, 1), (2048, 1024), &[]);
        assert_eq!(resume_fits(&h, 1, 1024), Ok(()));
        assert!(resume_fits(&h, 2, 512).is_err());
        let mut sick = h.clone();
        sick.healthy = false;
        assert_eq!(
            resume_fits(&sick, 1, 1),
            Err(NoCapacity::HostDown {
                host_id: "a".into()
            })
        );
    }
}
