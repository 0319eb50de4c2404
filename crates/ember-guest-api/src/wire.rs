//! Request and response bodies of the guest agent's endpoints (see the crate
//! docs for which endpoint takes which). Pure data with serde; no I/O.
//!
//! Every optional or later-added field carries `#[serde(default)]` so that
//! both sides read the other's older shapes (the compatibility rule).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The agent's version (its crate version).
    pub version: String,
    /// The protocol version it speaks ([`crate::PROTOCOL_VERSION`] of its build).
    pub protocol: u32,
    /// Capability names ([`crate::capability`]).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Milliseconds since the agent started (the guest's monotonic clock, so
    /// it counts time the VM spent running, not paused).
    pub uptime_ms: u64,
    /// Whether a `POST /init` has set a token.
    pub initialized: bool,
}

impl Health {
    /// Whether the agent advertises `capability`.
    pub fn supports(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// `POST /init`. Idempotent: sending the same request twice leaves the guest
/// as one request would. Called after cold boot and after every restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    /// The token every later request must carry. Must be non-empty, at most
    /// 4096 bytes, visible ASCII (it travels in a header).
    pub token: String,
    /// Wall-clock time to set (`CLOCK_REALTIME`), nanoseconds since the Unix
    /// epoch. A restored guest's clock is stale until this is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_unix_ns: Option<u64>,
    /// Default environment of processes started from now on. Replaces the
    /// defaults of an earlier init; absent keeps them. A process's own `env`
    /// overrides these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Fresh randomness mixed into the guest kernel's RNG and credited
    /// (`RNDADDENTROPY`), so forks of one snapshot do not share random state.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_bytes_opt"
    )]
    pub entropy_b64: Option<Bytes>,
    /// Nameservers (IP addresses) for `/etc/resolv.conf`. Absent keeps the
    /// current ones (at boot: 1.1.1.1 and 8.8.8.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    /// Hostname to set; absent keeps the current one (at boot `ember`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// What `POST /init` did. An agent started for tests (`--no-system-setup`)
/// leaves the host's clock, hostname and RNG credit alone and says so here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitResponse {
    /// The wall clock was set from `time_unix_ns`.
    #[serde(default)]
    pub clock_set: bool,
    /// Bytes of entropy mixed into the kernel RNG.
    #[serde(default)]
    pub entropy_bytes: u64,
    /// The entropy was also credited to the kernel's entropy count.
    #[serde(default)]
    pub entropy_credited: bool,
    /// `/etc/resolv.conf` was rewritten.
    #[serde(default)]
    pub resolv_conf_written: bool,
    /// The hostname was set.
    #[serde(default)]
    pub hostname_set: bool,
    /// The request set a token different from the previous one.
    #[serde(default)]
    pub token_rotated: bool,
}

/// Whose identity a process or a file operation runs with: a user name from
/// the guest's `/etc/passwd`, or a numeric uid.
///
/// On the wire a number is a uid; a string of ASCII digits is also a uid; any
/// other string is a name. A uid absent from `/etc/passwd` runs with gid =
/// uid, no supplementary groups and `HOME=/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UserSpec {
    Name(String),
    Uid(u32),
}

impl UserSpec {
    pub fn name(name: impl Into<String>) -> Self {
        UserSpec::Name(name.into())
    }

    /// The form used in query strings: the name, or the uid's digits.
    pub fn to_query_value(&self) -> String {
        self.to_string()
    }
}

impl FromStr for UserSpec {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && let Ok(uid) = s.parse()
        {
            return Ok(UserSpec::Uid(uid));
        }
        Ok(UserSpec::Name(s.to_owned()))
    }
}

impl fmt::Display for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSpec::Name(n) => f.write_str(n),
            UserSpec::Uid(u) => write!(f, "{u}"),
        }
    }
}

impl Serialize for UserSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UserSpec::Name(n) => s.serialize_str(n),
            UserSpec::Uid(u) => s.serialize_u32(*u),
        }
    }
}

impl<'de> Deserialize<'de> for UserSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Uid(u32),
            Text(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Uid(u) => UserSpec::Uid(u),
            Raw::Text(t) => t.parse().unwrap_or(UserSpec::Name(t)),
        })
    }
}

/// Terminal size of a PTY process (`pty` in [`StartProcess`], and the body of
/// `POST /processes/{pid}/resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// `POST /processes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartProcess {
    /// Program to run: a path (absolute, or relative to `cwd` when it contains
    /// `/`), or a name looked up in the process's `PATH`.
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Merged over the defaults: built-in (`PATH`, `HOME`, `USER`, `LOGNAME`,
    /// `SHELL`, and `TERM` for PTYs), then `/init`'s `env`, then this.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; default the user's home directory if it exists,
    /// else `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Default root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserSpec>,
    /// Kill the process group (`SIGTERM`, then `SIGKILL` after a grace of
    /// two seconds) this long after the start; the exit says `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Give the process a stdin pipe fed by `POST /processes/{pid}/stdin`;
    /// without it stdin is `/dev/null`. (A PTY process always has stdin.)
    #[serde(default)]
    pub stdin: bool,
    /// Run on a new PTY of this size, as its controlling terminal. Output
    /// arrives as `stdout` events; stdin writes go to the terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// Keep running when the client disconnects (foreground processes are
    /// killed then).
    #[serde(default)]
    pub background: bool,
    /// Free text reported back by `GET /processes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// How a process ended (the `exit` event, and [`ProcessInfo::exit`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessExit {
    /// The exit code, when the process exited normally.
    pub exit_code: Option<i32>,
    /// The signal number, when a signal killed it.
    pub signal: Option<i32>,
    #[serde(default)]
    pub core_dumped: bool,
    /// The agent killed it because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ProcessExit {
    /// Exited normally with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// One entry of `GET /processes`, and `GET /processes/{pid}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub pty: bool,
    /// The process has a stdin pipe (or PTY) that is still open.
    #[serde(default)]
    pub stdin_open: bool,
    /// Start time, milliseconds since the Unix epoch (guest clock).
    #[serde(default)]
    pub started_unix_ms: u64,
    /// Still running (`exit` is then absent).
    pub running: bool,
    #[serde(default)]
    pub exit: Option<ProcessExit>,
    /// `seq` of the newest event so far.
    #[serde(default)]
    pub last_seq: u64,
}

/// `GET /processes`: running processes and recently exited ones (the agent
/// keeps the most recent exits, oldest forgotten first).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

/// `POST /processes/{pid}/stdin`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdinWritten {
    /// Bytes written to the process's stdin.
    pub written: u64,
}

/// A signal by name (`"TERM"`, `"SIGTERM"`, case-insensitive) or number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SignalSpec {
    Number(i32),
    Name(String),
}

impl SignalSpec {
    pub fn name(name: impl Into<String>) -> Self {
        SignalSpec::Name(name.into())
    }
}

/// `POST /processes/{pid}/signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    pub signal: SignalSpec,
    /// Signal the whole process group instead of the process alone.
    #[serde(default)]
    pub group: bool,
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Devices, FIFOs, sockets.
    Other,
    /// A kind a newer agent reports that this crate does not know.
    #[serde(other)]
    Unknown,
}

/// `GET /files/stat`, entries of `GET /files/list`, and the result of writes,
/// mkdir and rename. Describes the path itself (`lstat`): a symlink is
/// reported as a symlink, with its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Absolute path.
    pub path: String,
    /// Last path component (`/` for the root).
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits including set-id and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_unix_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// `GET /files/list`: entries sorted by name, without `.` and `..`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirListing {
    pub path: String,
    pub entries: Vec<FileInfo>,
}

/// `POST /files/mkdir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    pub path: String,
    /// Permission bits of created directories; default `0o755`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Create missing parents and accept an existing directory (`mkdir -p`).
    #[serde(default)]
    pub parents: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserSpec>,
}

/// `POST /files/rename`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    pub from: String,
    pub to: String,
    /// Replace an existing `to`; without it an existing target is
    /// `already_exists`.
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserSpec>,
}

/// Query of `GET /files`, `GET /files/stat` and `GET /files/list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathQuery {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Query of `GET /files/watch` (capability [`crate::capability::FILES_WATCH`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchQuery {
    /// The directory to watch.
    pub path: String,
    /// Also every directory below it, including ones made later.
    #[serde(default)]
    pub recursive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What happened to an entry of a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchEventKind {
    /// First line of every watch stream: the watch is in place; changes
    /// from here on are reported.
    Started,
    Create,
    Write,
    Remove,
    /// Moved away (its new name, if inside the watch, comes as `create`).
    Rename,
    Chmod,
    /// Changes were lost (the kernel's queue overflowed); list again.
    Overflow,
    /// A kind this reader does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

/// One line of `GET /files/watch`'s NDJSON stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    /// The entry's path relative to the watched directory (empty for
    /// `started` and `overflow`).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub is_dir: bool,
}

/// Query of `PUT /files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteQuery {
    pub path: String,
    /// Octal permission bits (`644`, `0755`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Create missing parent directories; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parents: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Query of `DELETE /files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveQuery {
    pub path: String,
    /// Remove a directory with its contents.
    #[serde(default)]
    pub recursive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Query of `GET /processes/{pid}/events`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    /// Send events with `seq` greater than this (0: from the start).
    #[serde(default)]
    pub after: u64,
}

/// Options of a file write (the client's view of [`WriteQuery`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    pub mode: Option<u32>,
    /// Default true (see [`WriteQuery::parents`]).
    pub parents: Option<bool>,
    pub user: Option<UserSpec>,
}

/// Standard base64 (with padding) for byte fields.
pub(crate) mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) mod base64_bytes_opt {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => super::base64_bytes::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::base64_bytes")] Bytes);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_spec_digits_are_a_uid_everywhere() {
        let from_json: UserSpec = serde_json::from_str("\"1000\"").unwrap();
        assert_eq!(from_json, UserSpec::Uid(1000));
        let from_number: UserSpec = serde_json::from_str("65534").unwrap();
        assert_eq!(from_number, UserSpec::Uid(65534));
        let name: UserSpec = serde_json::from_str("\"nobody\"").unwrap();
        assert_eq!(name, UserSpec::name("nobody"));
        assert_eq!(serde_json::to_string(&UserSpec::Uid(7)).unwrap(), "7");
        assert_eq!("12a".parse::<UserSpec>().unwrap(), UserSpec::name("12a"));
        // Too large for a uid: a name, which the agent will then not find.
        assert_eq!(
            "99999999999".parse::<UserSpec>().unwrap(),
            UserSpec::name("99999999999")
        );
    }

    #[test]
    fn start_process_needs_only_cmd() {
        let req: StartProcess = serde_json::from_str(r#"{"cmd":"true"}"#).unwrap();
        assert_eq!(req.cmd, "true");
        assert!(req.args.is_empty() && !req.background && !req.stdin && req.pty.is_none());
    }

    #[test]
    fn responses_tolerate_unknown_fields_and_missing_optional_ones() {
        // What an older agent sends (no capabilities) with a field from a newer one.
        let h: Health = serde_json::from_str(
            r#"{"version":"0.0.1","protocol":1,"uptime_ms":5,"initialized":false,"shiny":true}"#,
        )
        .unwrap();
        assert!(h.capabilities.is_empty() && !h.supports("process"));
        let kind: FileKind = serde_json::from_str("\"socketpair\"").unwrap();
        assert_eq!(kind, FileKind::Unknown);
        let init: InitResponse = serde_json::from_str("{}").unwrap();
        assert_eq!(init, InitResponse::default());
    }

    #[test]
    fn init_entropy_is_base64_on_the_wire() {
        let req = InitRequest {
            token: "t".into(),
            entropy_b64: Some(Bytes::from_static(b"\x00\x01\xff")),
            ..Default::default()
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["entropy_b64"], "AAH/");
        assert!(json.get("time_unix_ns").is_none());
        let back: InitRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);
        let bad = serde_json::from_str::<InitRequest>(r#"{"token":"t","entropy_b64":"!!"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn signal_spec_takes_names_and_numbers() {
        let r: SignalRequest = serde_json::from_str(r#"{"signal":"TERM"}"#).unwrap();
        assert_eq!(r.signal, SignalSpec::name("TERM"));
        assert!(!r.group);
        let r: SignalRequest = serde_json::from_str(r#"{"signal":9,"group":true}"#).unwrap();
        assert_eq!(r.signal, SignalSpec::Number(9));
        assert!(r.group);
    }
}
