//! Routing and request bodies. The bodies are this fake's own types, written
//! from Firecracker's swagger and checked against the real binary's answers,
//! not shared with the driver: a field the driver misspells must be refused
//! here the way Firecracker refuses it.

use hyper::Method;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::vm::Vm;

pub enum Reply {
    NoContent,
    Json(Value),
    Fault(String),
}

pub fn fault(message: String) -> Value {
    json!({ "fault_message": message })
}

pub async fn handle(vm: &mut Vm, method: &Method, path: &str, body: &[u8]) -> Reply {
    let trimmed = path.trim_start_matches('/');
    let segments: Vec<&str> = trimmed.split('/').collect();
    let result: Result<Option<Value>, String> = match (method.as_str(), segments.as_slice()) {
        ("GET", [""]) => Ok(Some(vm.instance_info())),
        ("GET", ["version"]) => Ok(Some(
            json!({ "firecracker_version": crate::IMITATED_VERSION }),
        )),
        ("GET", ["vm", "config"]) => Ok(Some(vm.full_config())),
        ("GET", ["machine-config"]) => Ok(Some(vm.machine_config())),
        ("PUT", ["machine-config"]) => parse(body).and_then(|b| vm.put_machine_config(b)),
        ("PATCH", ["machine-config"]) => parse(body).and_then(|b| vm.patch_machine_config(b)),
        ("PUT", ["boot-source"]) => parse(body).and_then(|b| vm.put_boot_source(b)),
        ("PUT", ["drives", id]) => {
            parse_with_id(body, id, |d: &Drive| &d.drive_id).and_then(|b| vm.put_drive(b))
        }
        ("PATCH", ["drives", id]) => {
            parse_with_id(body, id, |d: &PartialDrive| &d.drive_id).and_then(|b| vm.patch_drive(b))
        }
        ("PUT", ["network-interfaces", id]) => {
            parse_with_id(body, id, |n: &NetworkInterface| &n.iface_id)
                .and_then(|b| vm.put_network_interface(b))
        }
        ("PATCH", ["network-interfaces", id]) => {
            parse_with_id(body, id, |n: &PartialNetworkInterface| &n.iface_id)
                .and_then(|b| vm.patch_network_interface(b))
        }
        ("PUT", ["vsock"]) => parse(body).and_then(|b| vm.put_vsock(b)),
        ("PUT", ["balloon"]) => parse(body).and_then(|b| vm.put_balloon(b)),
        ("PATCH", ["balloon"]) => parse(body).and_then(|b| vm.patch_balloon(b)),
        ("GET", ["balloon"]) => vm.balloon(),
        ("GET", ["balloon", "statistics"]) => vm.balloon_stats(),
        ("PATCH", ["balloon", "statistics"]) => parse(body).and_then(|b| vm.patch_balloon_stats(b)),
        ("PUT", ["entropy"]) => parse(body).and_then(|b| vm.put_entropy(b)),
        ("PUT", ["logger"]) => parse(body).and_then(|b| vm.put_logger(b)),
        ("PUT", ["metrics"]) => parse(body).and_then(|b| vm.put_metrics(b)),
        ("PUT", ["serial"]) => parse(body).and_then(|b| vm.put_serial(b)),
        ("PUT", ["actions"]) => parse(body).and_then(|b| vm.action(b)),
        ("PATCH", ["vm"]) => parse(body).and_then(|b| vm.patch_vm(b)),
        ("PUT", ["snapshot", "create"]) => parse(body).and_then(|b| vm.create_snapshot(b)),
        ("PUT", ["snapshot", "load"]) => match parse::<SnapshotLoad>(body) {
            Ok(b) => vm.load_snapshot(b).await,
            Err(e) => Err(e),
        },
        _ => Err(format!(
            "Invalid request method and/or path: {method} {trimmed}."
        )),
    };
    match result {
        Ok(None) => Reply::NoContent,
        Ok(Some(value)) => Reply::Json(value),
        Err(message) => Reply::Fault(message),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!("An error occurred when deserializing the json body of a request: {e}.")
    })
}

fn parse_with_id<T: DeserializeOwned>(
    body: &[u8],
    path_id: &str,
    body_id: impl Fn(&T) -> &String,
) -> Result<T, String> {
    let id_ok = !path_id.is_empty()
        && path_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !id_ok {
        return Err(
            "API Resource IDs can only contain alphanumeric characters and underscores.".into(),
        );
    }
    let parsed: T = parse(body)?;
    if body_id(&parsed) != path_id {
        return Err("The id from the path does not match the id from the body!".into());
    }
    Ok(parsed)
}

// --- Bodies (field order as Firecracker declares them, so serde's
// "expected one of" lists read the same) -----------------------------------

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, Default, PartialEq, Eq)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    TwoM,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed so bad values are refused; the fake has no use for them.
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<usize>,
    pub smt: Option<bool>,
    pub cpu_template: Option<String>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default)]
    pub initrd_path: Option<String>,
    #[serde(default)]
    pub boot_args: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
pub enum IoEngine {
    Sync,
    Async,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default)]
    pub partuuid: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub cache_type: Option<CacheType>,
    #[serde(default)]
    pub is_read_only: Option<bool>,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub io_engine: Option<IoEngine>,
    #[serde(default)]
    pub socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

fn mac<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value: Option<String> = Option::deserialize(d)?;
    if let Some(mac) = &value {
        let ok = mac.len() == 17
            && mac
                .split(':')
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(serde::de::Error::custom(
                "The provided MAC address is invalid.",
            ));
        }
    }
    Ok(value)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, deserialize_with = "mac")]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed so bad values are refused; the fake has no use for them.
pub struct Vsock {
    #[serde(default)]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed so bad values are refused; the fake has no use for them.
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed so bad values are refused; the fake has no use for them.
pub struct Entropy {
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

fn level<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value: Option<String> = Option::deserialize(d)?;
    if let Some(level) = &value {
        let known = ["error", "warning", "warn", "info", "debug", "trace", "off"];
        if !known.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(serde::de::Error::custom("Invalid LevelFilter"));
        }
    }
    Ok(value)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed so bad values are refused; the fake has no use for them.
pub struct Logger {
    #[serde(default)]
    pub log_path: Option<String>,
    #[serde(default, deserialize_with = "level")]
    pub level: Option<String>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    pub module: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed so bad values are refused; the fake has no use for them.
pub struct Serial {
    #[serde(default)]
    pub serial_out_path: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<TokenBucket>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum VmState {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmUpdate {
    pub state: VmState,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum SnapshotType {
    Full,
    Diff,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
    pub snapshot_path: String,
    pub mem_file_path: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum BackendType {
    File,
    Uffd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: BackendType,
    pub backend_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Parsed so bad values are refused; the fake has no use for them.
pub struct SnapshotLoad {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub resume_vm: Option<bool>,
    #[serde(default)]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}
