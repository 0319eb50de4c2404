//! Which kernel modules the guest needs and the order to insert them in,
//! resolved from the kernel's own `modules.dep` (so paths and dependencies
//! follow whatever kernel package is installed, not a hard-coded list).
//!
//! Module names are compared with `-` and `_` treated alike, as the kernel
//! does (`virtio-rng.ko` is module `virtio_rng`).

use std::collections::{HashMap, HashSet};

use crate::{Error, Result};

/// A module the guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleRequest {
    pub name: &'static str,
    /// Boot cannot work without it (the root disk or network driver).
    pub required: bool,
}

const fn required(name: &'static str) -> ModuleRequest {
    ModuleRequest {
        name,
        required: true,
    }
}
const fn optional(name: &'static str) -> ModuleRequest {
    ModuleRequest {
        name,
        required: false,
    }
}

/// Virtio transport, block and network drivers (required); entropy,
/// vsock (Firecracker's host channel) and memory balloon (optional).
pub const GUEST_MODULES: &[ModuleRequest] = &[
    required("virtio_ring"),
    required("virtio"),
    required("virtio_mmio"),
    required("failover"),
    required("net_failover"),
    required("virtio_net"),
    required("virtio_blk"),
    optional("virtio_rng"),
    optional("vsock"),
    optional("vmw_vsock_virtio_transport_common"),
    optional("vmw_vsock_virtio_transport"),
    optional("virtio_balloon"),
];

/// The canonical name of a module: `-` → `_`, no directory, no `.ko…` suffix.
pub fn canonical_name(name_or_path: &str) -> String {
    let base = name_or_path.rsplit('/').next().unwrap_or(name_or_path);
    let stem = base.find(".ko").map_or(base, |i| &base[..i]);
    stem.replace('-', "_")
}

/// A module's file (relative to `lib/modules/<release>/`) and its direct
/// and indirect dependencies as `modules.dep` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepEntry {
    pub path: String,
    pub deps: Vec<String>,
}

/// `modules.dep`, keyed by canonical module name.
#[derive(Debug, Clone, Default)]
pub struct ModuleDeps {
    entries: HashMap<String, DepEntry>,
}

impl ModuleDeps {
    /// Parse `modules.dep` (`path: dep-path dep-path …` per line).
    pub fn parse(text: &str) -> Result<Self> {
        let mut entries = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or_else(|| Error::ModuleDeps {
                reason: format!("modules.dep line {}: no ':' after the module", n + 1),
            })?;
            let path = path.trim();
            if !path.contains(".ko") {
                return Err(Error::ModuleDeps {
                    reason: format!("modules.dep line {}: {path:?} is not a module file", n + 1),
                });
            }
            let deps = deps.split_whitespace().map(canonical_name).collect();
            entries.insert(
                canonical_name(path),
                DepEntry {
                    path: path.to_owned(),
                    deps,
                },
            );
        }
        Ok(ModuleDeps { entries })
    }

    pub fn get(&self, name: &str) -> Option<&DepEntry> {
        self.entries.get(&canonical_name(name))
    }
}

/// A module to insert, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModule {
    pub name: String,
    /// Relative to `lib/modules/<release>/`.
    pub path: String,
    pub required: bool,
}

/// The outcome of [`resolve`]: what to insert, and what the kernel already
/// has built in or lacks (optional modules only; a missing required one is
/// an error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    pub load_order: Vec<ResolvedModule>,
    pub builtin: Vec<String>,
    pub unavailable: Vec<String>,
}

/// Order `requests` and their dependencies so each module comes after
/// everything it depends on, keeping the requested order where the
/// dependencies allow. `builtin` holds the canonical names from
/// `modules.builtin`.
pub fn resolve(
    deps: &ModuleDeps,
    builtin: &HashSet<String>,
    requests: &[ModuleRequest],
) -> Result<Resolution> {
    let mut out = Resolution::default();
    let mut placed: HashMap<String, usize> = HashMap::new();
    for request in requests {
        let name = canonical_name(request.name);
        if builtin.contains(&name) {
            out.builtin.push(name);
            continue;
        }
        if deps.get(&name).is_none() {
            if request.required {
                return Err(Error::ModuleMissing { module: name });
            }
            out.unavailable.push(name);
            continue;
        }
        let mut visiting = Vec::new();
        place(
            deps,
            builtin,
            &name,
            request.required,
            &mut visiting,
            &mut placed,
            &mut out.load_order,
        )?;
    }
    Ok(out)
}

fn place(
    deps: &ModuleDeps,
    builtin: &HashSet<String>,
    name: &str,
    required: bool,
    visiting: &mut Vec<String>,
    placed: &mut HashMap<String, usize>,
    order: &mut Vec<ResolvedModule>,
) -> Result<()> {
    if let Some(&i) = placed.get(name) {
        // A required module's dependencies are required too.
        order[i].required |= required;
        return Ok(());
    }
    if visiting.iter().any(|v| v == name) {
        return Err(Error::ModuleDeps {
            reason: format!("dependency cycle through {name}"),
        });
    }
    let entry = deps.get(name).ok_or_else(|| Error::ModuleDeps {
        reason: format!(
            "{} depends on {name}, which modules.dep does not list",
            visiting.last().map_or("a module", String::as_str)
        ),
    })?;
    visiting.push(name.to_owned());
    for dep in &entry.deps {
        if !builtin.contains(dep) {
            place(deps, builtin, dep, required, visiting, placed, order)?;
        }
    }
    visiting.pop();
    placed.insert(name.to_owned(), order.len());
    order.push(ResolvedModule {
        name: name.to_owned(),
        path: entry.path.clone(),
        required,
    });
    Ok(())
}

/// Canonical names from `modules.builtin` (one module path per line).
pub fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(canonical_name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // From Debian's 6.1 cloud kernel, with the dependency lists in the
    // order depmod writes them (not load order).
    const SAMPLE_DEP: &str = "\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_balloon.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/fs/fuse/fuse.ko:
";

    fn names(r: &Resolution) -> Vec<&str> {
        r.load_order.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn guest_modules_load_in_dependency_order() {
        let deps = ModuleDeps::parse(SAMPLE_DEP).unwrap();
        let r = resolve(&deps, &HashSet::new(), GUEST_MODULES).unwrap();
        assert_eq!(
            names(&r),
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_blk",
                "virtio_rng",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_balloon",
            ]
        );
        let rng = &r.load_order[7];
        assert_eq!(rng.path, "kernel/drivers/char/hw_random/virtio-rng.ko");
        assert!(!rng.required);
        assert!(r.load_order[..7].iter().all(|m| m.required));
    }

    #[test]
    fn dependencies_come_first_whatever_the_request_order() {
        let deps = ModuleDeps::parse(SAMPLE_DEP).unwrap();
        let r = resolve(
            &deps,
            &HashSet::new(),
            &[
                required("virtio_net"),
                optional("vmw_vsock_virtio_transport"),
            ],
        )
        .unwrap();
        assert_eq!(
            names(&r),
            [
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
            ]
        );
        // Every module follows all of its dependencies.
        let pos = |n: &str| r.load_order.iter().position(|m| m.name == n).unwrap();
        for m in &r.load_order {
            for dep in &deps.get(&m.name).unwrap().deps {
                assert!(pos(dep) < pos(&m.name), "{dep} must load before {}", m.name);
            }
        }
        // The optional vsock transport pulls in virtio as a dependency, which
        // stays required because virtio_net needs it.
        assert!(r.load_order[pos("virtio")].required);
        assert!(!r.load_order[pos("vsock")].required);
        assert_eq!(r.load_order.len(), 8);
    }

    #[test]
    fn builtin_and_unavailable_modules_are_skipped_not_loaded() {
        let deps = ModuleDeps::parse(SAMPLE_DEP).unwrap();
        let builtin = parse_builtin(
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n",
        );
        let r = resolve(
            &deps,
            &builtin,
            &[
                required("virtio_blk"),
                optional("virtio_mem"),
                required("virtio"),
            ],
        )
        .unwrap();
        assert_eq!(names(&r), ["virtio_blk"]);
        assert_eq!(r.builtin, ["virtio"]);
        assert_eq!(r.unavailable, ["virtio_mem"]);
    }

    #[test]
    fn missing_required_module_and_cycles_are_errors() {
        let deps = ModuleDeps::parse(SAMPLE_DEP).unwrap();
        assert!(matches!(
            resolve(&deps, &HashSet::new(), &[required("virtio_scsi")]),
            Err(Error::ModuleMissing { module }) if module == "virtio_scsi"
        ));
        let cyclic = ModuleDeps::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        let err = resolve(&cyclic, &HashSet::new(), &[required("a")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel modules: dependency cycle through a"
        );
        let dangling = ModuleDeps::parse("a.ko: gone.ko\n").unwrap();
        assert!(matches!(
            resolve(&dangling, &HashSet::new(), &[required("a")]),
            Err(Error::ModuleDeps { reason }) if reason.contains("gone")
        ));
    }

    #[test]
    fn parse_rejects_garbage_and_names_are_canonical() {
        assert!(ModuleDeps::parse("no separator here").is_err());
        assert!(ModuleDeps::parse("notamodule: x.ko").is_err());
        assert_eq!(
            canonical_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
            "virtio_rng"
        );
        assert_eq!(canonical_name("virtio-rng"), "virtio_rng");
    }
}
