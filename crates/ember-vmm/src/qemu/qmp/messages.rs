//! QMP's wire vocabulary: the commands Ember sends, the replies it reads, and
//! the asynchronous events QEMU emits. Pure data; the client is in the parent
//! module.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A QMP command with typed arguments and reply.
///
/// The command serialises to its `arguments` object; a unit struct
/// (serialising to `null`) sends none.
pub trait Command: Serialize {
    const NAME: &'static str;
    type Response: DeserializeOwned;
}

/// The `{}` that most commands return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Empty {}

macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident = $name:literal -> $resp:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Response = $resp;
        }
    };
}

unit_command!(
    /// Leaves the greeting's capabilities-negotiation mode; nothing else works before it.
    QmpCapabilities = "qmp_capabilities" -> Empty
);
unit_command!(
    /// Pause all vCPUs (idempotent).
    Stop = "stop" -> Empty
);
unit_command!(
    /// Resume vCPUs.
    Cont = "cont" -> Empty
);
unit_command!(QueryStatus = "query-status" -> StatusInfo);
unit_command!(QueryMigrate = "query-migrate" -> MigrationInfo);
unit_command!(QueryVersion = "query-version" -> VersionInfo);
unit_command!(
    /// Press the ACPI power button.
    SystemPowerdown = "system_powerdown" -> Empty
);
unit_command!(
    /// Exit QEMU at once, without telling the guest.
    Quit = "quit" -> Empty
);

/// Start an outgoing migration (here: the device state of a snapshot).
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    pub uri: String,
}
impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Response = Empty;
}

/// Start the incoming migration of a VM launched with `-incoming defer`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}
impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Response = Empty;
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<CapabilityState>,
}
impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Response = Empty;
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CapabilityState {
    pub capability: MigrationCapability,
    pub state: bool,
}

/// The migration capabilities Ember uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    /// Skip RAM blocks backed by shared files: the RAM file already is the
    /// memory snapshot.
    XIgnoreShared,
    /// Emit `MIGRATION` events on every state change (off by default).
    Events,
}

/// Parameters left `None` are not changed.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Bytes per second; QEMU's default (128 MiB/s) throttles even a small
    /// device-state stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
}
impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Response = Empty;
}

/// Name the file descriptor sent with this command (SCM_RIGHTS) so that a
/// later `fd:<fdname>` URI can use it.
#[derive(Debug, Clone, Serialize)]
pub struct GetFd {
    pub fdname: String,
}
impl Command for GetFd {
    const NAME: &'static str = "getfd";
    type Response = Empty;
}

/// Close a descriptor passed with [`GetFd`] that no command consumed.
#[derive(Debug, Clone, Serialize)]
pub struct CloseFd {
    pub fdname: String,
}
impl Command for CloseFd {
    const NAME: &'static str = "closefd";
    type Response = Empty;
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: RunState,
}

/// QEMU's run states (`RunState` in the QAPI schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    #[serde(other)]
    Unknown,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Debug => "debug",
            RunState::Inmigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::Postmigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
            RunState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Absent before any migration was started.
    pub status: Option<MigrationStatus>,
    pub error_desc: Option<String>,
    /// Milliseconds (outgoing migrations only).
    pub total_time: Option<u64>,
}

/// `MigrationStatus` in the QAPI schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// No further state change will happen without a new command.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    pub package: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The first message on a QMP connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Greeting {
    pub version: VersionInfo,
    #[serde(default)]
    pub capabilities: Vec<Value>,
}

/// An asynchronous event, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// QEMU's wall-clock time of the event, since the Unix epoch.
    pub timestamp: Option<Duration>,
    pub event: Event,
}

/// The events Ember acts on; everything else is kept as [`Event::Other`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stop,
    Resume,
    Shutdown { guest: bool, reason: String },
    Powerdown,
    Reset,
    Migration(MigrationStatus),
    MigrationPass(u64),
    Other { name: String, data: Value },
}

impl QmpEvent {
    /// Build an event from its wire form (`event`, optional `data` and
    /// `timestamp`). Unknown or oddly shaped events become [`Event::Other`]:
    /// an event Ember does not understand is never a protocol error.
    pub(super) fn from_wire(name: &str, data: Value, timestamp: Option<&Value>) -> QmpEvent {
        let timestamp = timestamp.and_then(|t| {
            let secs = t.get("seconds")?.as_u64()?;
            let micros = t.get("microseconds")?.as_u64()?;
            Some(Duration::from_secs(secs) + Duration::from_micros(micros))
        });
        let typed = match name {
            "STOP" => Some(Event::Stop),
            "RESUME" => Some(Event::Resume),
            "POWERDOWN" => Some(Event::Powerdown),
            "RESET" => Some(Event::Reset),
            "SHUTDOWN" => (|| {
                Some(Event::Shutdown {
                    guest: data.get("guest")?.as_bool()?,
                    reason: data.get("reason")?.as_str()?.to_owned(),
                })
            })(),
            "MIGRATION" => data
                .get("status")
                .cloned()
                .and_then(|s| serde_json::from_value(s).ok())
                .map(Event::Migration),
            "MIGRATION_PASS" => data
                .get("pass")
                .and_then(Value::as_u64)
                .map(Event::MigrationPass),
            _ => None,
        };
        let event = typed.unwrap_or_else(|| Event::Other {
            name: name.to_owned(),
            data,
        });
        QmpEvent { timestamp, event }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_serialise_to_qmp_argument_objects() {
        let caps = MigrateSetCapabilities {
            capabilities: vec![CapabilityState {
                capability: MigrationCapability::XIgnoreShared,
                state: true,
            }],
        };
        assert_eq!(
            serde_json::to_value(&caps).unwrap(),
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
        );
        let params = MigrateSetParameters {
            max_bandwidth: Some(1 << 40),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&params).unwrap(),
            json!({"max-bandwidth": 1u64 << 40})
        );
        assert_eq!(serde_json::to_value(Stop).unwrap(), Value::Null);
    }

    #[test]
    fn replies_parse_including_unknown_states() {
        let s: StatusInfo = serde_json::from_value(
            json!({"status": "inmigrate", "running": false, "singlestep": false}),
        )
        .unwrap();
        assert_eq!(s.status, RunState::Inmigrate);
        let s: StatusInfo =
            serde_json::from_value(json!({"status": "from-the-future", "running": true})).unwrap();
        assert_eq!(s.status, RunState::Unknown);
        let m: MigrationInfo = serde_json::from_value(
            json!({"status": "failed", "error-desc": "disk full", "ram": {"total": 1}}),
        )
        .unwrap();
        assert_eq!(m.status, Some(MigrationStatus::Failed));
        assert_eq!(m.error_desc.as_deref(), Some("disk full"));
        let m: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(m.status, None);
    }

    #[test]
    fn events_are_typed_or_kept_whole() {
        let ts = json!({"seconds": 10, "microseconds": 5});
        let e = QmpEvent::from_wire("MIGRATION", json!({"status": "completed"}), Some(&ts));
        assert_eq!(e.event, Event::Migration(MigrationStatus::Completed));
        assert_eq!(e.timestamp, Some(Duration::from_micros(10_000_005)));
        let e = QmpEvent::from_wire(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-shutdown"}),
            None,
        );
        assert_eq!(
            e.event,
            Event::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
        // A known name with an unexpected payload is kept, not dropped.
        let e = QmpEvent::from_wire("MIGRATION", json!({"state": 1}), None);
        assert!(matches!(e.event, Event::Other { ref name, .. } if name == "MIGRATION"));
    }
}
