//! Firecracker's API bodies as Rust types, named and shaped after the
//! definitions in Firecracker's swagger (`src/firecracker/swagger/firecracker.yaml`,
//! v1.16.1). Requests omit unset optional fields, because Firecracker treats a
//! present field as a choice (and rejects fields it does not know).
//! Responses tolerate fields added by later versions.
//!
//! Deliberately absent: the deprecated `vsock_id`, `mem_file_path` and
//! `enable_diff_snapshots` fields, CPU templates and custom CPU config, MMDS,
//! pmem, memory hotplug and balloon free-page hinting (Ember uses none of them).
//!
//! This module is wire types only: what to send when lives in the driver.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// A token bucket: `size` tokens refilled every `refill_time` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

/// Independent bytes/s (`bandwidth`) and ops/s (`ops`) limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}` (virtio-block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /drives/{drive_id}`: swap the backing file or the rate limiter
/// of a running VM's drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// The TAP device's name in the VMM's network namespace.
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    #[serde(rename = "2M")]
    TwoMiB,
}

/// `PUT /machine-config` (and `GET /machine-config`'s answer). A PUT resets
/// every optional field it leaves out to Firecracker's default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// `PATCH /machine-config`: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfigUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// `PUT /vsock`: a virtio-vsock device proxied through a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// `PUT /balloon` and `GET /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_s: Option<u16>,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

/// `GET /balloon/statistics`. The guest-reported fields are absent until
/// the guest's balloon driver reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(default)]
    pub swap_in: Option<u64>,
    #[serde(default)]
    pub swap_out: Option<u64>,
    #[serde(default)]
    pub major_faults: Option<u64>,
    #[serde(default)]
    pub minor_faults: Option<u64>,
    #[serde(default)]
    pub free_memory: Option<u64>,
    #[serde(default)]
    pub total_memory: Option<u64>,
    #[serde(default)]
    pub available_memory: Option<u64>,
    #[serde(default)]
    pub disk_caches: Option<u64>,
    #[serde(default)]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default)]
    pub hugetlb_failures: Option<u64>,
    #[serde(default)]
    pub oom_kill: Option<u64>,
    #[serde(default)]
    pub alloc_stall: Option<u64>,
    #[serde(default)]
    pub async_scan: Option<u64>,
    #[serde(default)]
    pub direct_scan: Option<u64>,
    #[serde(default)]
    pub async_reclaim: Option<u64>,
    #[serde(default)]
    pub direct_reclaim: Option<u64>,
}

/// `PUT /entropy`: a virtio-rng device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

impl LogLevel {
    /// The spelling Firecracker's `--level` flag takes.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
            LogLevel::Off => "Off",
        }
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub metrics_path: PathBuf,
}

/// `PUT /serial`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// The state `PATCH /vm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateUpdate {
    pub state: VmState,
}

/// The state `GET /` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstanceState::NotStarted => "not started",
            InstanceState::Running => "running",
            InstanceState::Paused => "paused",
        })
    }
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// `GET /vm/config`: the VM's whole configuration. Sections the VM does not
/// have are absent or null.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullVmConfiguration {
    #[serde(default, rename = "boot-source")]
    pub boot_source: Option<BootSource>,
    #[serde(default, rename = "machine-config")]
    pub machine_config: Option<MachineConfig>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(default, rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    pub vsock: Option<Vsock>,
    #[serde(default)]
    pub balloon: Option<Balloon>,
    #[serde(default)]
    pub entropy: Option<EntropyDevice>,
    #[serde(default)]
    pub logger: Option<Logger>,
    #[serde(default)]
    pub metrics: Option<Metrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create`. The VM must be paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// Where a loaded snapshot's guest memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    /// The memory file (`File`), or the page server's socket (`Uffd`).
    pub backend_path: PathBuf,
}

/// Point a restored network interface at another TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// Point a restored vsock device at another Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`. Only a fresh Firecracker process (nothing but the
/// logger and metrics configured) accepts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemoryBackend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// x86_64: advance kvmclock by the wall-clock time since the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

/// Firecracker's error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn optional_fields_are_omitted_not_null() {
        let body = serde_json::to_value(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: None,
            track_dirty_pages: Some(true),
            huge_pages: None,
        })
        .unwrap();
        assert_eq!(
            body,
            json!({"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": true})
        );
    }

    #[test]
    fn enums_use_firecracker_spellings() {
        assert_eq!(
            serde_json::to_value(HugePages::TwoMiB).unwrap(),
            json!("2M")
        );
        let info: InstanceInfo = serde_json::from_value(json!({
            "id": "sb-1", "state": "Not started", "vmm_version": "1.16.1", "app_name": "Firecracker"
        }))
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
        let load = serde_json::to_value(SnapshotLoadParams {
            snapshot_path: "/run/ember/vm/restore/vmstate".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::Uffd,
                backend_path: "/run/ember/vm/restore/page-server.sock".into(),
            },
            track_dirty_pages: Some(true),
            resume_vm: Some(false),
            network_overrides: vec![],
            vsock_override: None,
            clock_realtime: None,
        })
        .unwrap();
        assert_eq!(
            load,
            json!({
                "snapshot_path": "/run/ember/vm/restore/vmstate",
                "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/ember/vm/restore/page-server.sock"},
                "track_dirty_pages": true,
                "resume_vm": false
            })
        );
    }

    #[test]
    fn vm_config_answers_parse_with_sections_missing_or_null() {
        let cfg: FullVmConfiguration = serde_json::from_value(json!({
            "balloon": null, "drives": [],
            "boot-source": {"kernel_image_path": "/k", "initrd_path": null, "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32, "smt": false,
                               "track_dirty_pages": true, "huge_pages": "None"},
            "network-interfaces": [], "vsock": {"guest_cid": 3, "uds_path": "/v.sock"},
            "entropy": null, "pmem": [], "memory-hotplug": null
        }))
        .unwrap();
        assert_eq!(cfg.machine_config.unwrap().mem_size_mib, 32);
        assert_eq!(cfg.vsock.unwrap().guest_cid, 3);
        assert_eq!(cfg.boot_source.unwrap().initrd_path, None);
    }
}
