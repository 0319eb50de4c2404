//! The host↔guest protocol: the wire types of the guest agent's HTTP API
//! (`ember-guest`, PID 1 of every Ember VM) and [`GuestClient`], the client
//! the host agent, `ember run` and the tests speak it with.
//!
//! This crate owns the protocol: the shapes on the wire, their error codes,
//! the event framing and the compatibility rule. It does not own the agent's
//! behaviour (that is `ember-guest`) nor how the host reaches the guest's
//! address (that is the host agent and `ember-net`).
//!
//! # Transport
//!
//! HTTP/1.1 over TCP to the guest's fixed address and port
//! (`ember_types::guest::{GUEST_IP, AGENT_PORT}`). Request and response bodies are JSON
//! (`Content-Type: application/json`) unless stated otherwise. Every JSON
//! body is an object at the top level, never a bare array or scalar, so that
//! fields can be added later.
//!
//! # Authentication and the token lifecycle
//!
//! Requests carry `Authorization: Bearer <token>`; the agent compares it in
//! constant time. A freshly booted agent has no token: it answers
//! `GET /health` and the first `POST /init` without one, and that first init
//! sets the token (the `token` field of its body). From then on every
//! request, `/health` and `/init` included, needs the current token. A later
//! `POST /init`, authenticated with the current token, may carry a different
//! `token`; the new one replaces the old at once. Restored snapshots and
//! forked templates get their fresh token this way: the host knows the token
//! the snapshot was taken with. A missing or wrong token is answered with
//! `401` and the error body below (code `unauthorized`).
//!
//! # Errors
//!
//! Every non-2xx response has the body `{"code": "<code>", "message": "..."}`.
//! `code` is machine-readable ([`ErrorCode`]); `message` is for people. The
//! codes and their HTTP statuses:
//!
//! | code | status | meaning |
//! |---|---|---|
//! | `bad_request` | 400 | malformed request: bad JSON, relative path, NUL in a path, bad mode, unknown signal |
//! | `unauthorized` | 401 | missing or wrong token, or not yet initialised |
//! | `permission_denied` | 403 | `EACCES`/`EPERM`/`EROFS` for the acting user |
//! | `not_found` | 404 | no such file, process, program, working directory or user |
//! | `already_exists` | 409 | `EEXIST`: mkdir of an existing path, rename onto an existing target without `overwrite` |
//! | `not_a_directory` | 409 | `ENOTDIR`: a directory was needed (list, a path component) |
//! | `is_a_directory` | 409 | `EISDIR`: a file was needed (read, write) |
//! | `directory_not_empty` | 409 | `ENOTEMPTY`: remove of a non-empty directory without `recursive` |
//! | `conflict` | 409 | the request does not fit the object's state: stdin not requested or closed, resize of a non-PTY process, rename across file systems |
//! | `disk_full` | 507 | `ENOSPC`/`EDQUOT` |
//! | `unavailable` | 503 | the agent is shutting down |
//! | `internal` | 500 | anything else; the message carries the cause |
//!
//! The file-system errors that describe state (`ENOTDIR`, `EISDIR`) use 409
//! rather than 400: the request was well formed, the file system disagreed.
//! Clients must accept codes they do not know (a newer agent may add some)
//! and fall back on the HTTP status; [`ErrorCode::Other`] keeps them.
//!
//! # Endpoints
//!
//! | method and path | request | response |
//! |---|---|---|
//! | `GET /health` | — | [`Health`] |
//! | `POST /init` | [`InitRequest`] | [`InitResponse`] |
//! | `POST /shutdown` | — | `202` `{}`; the agent then kills every process, syncs and powers off |
//! | `POST /processes` | [`StartProcess`] | `200` NDJSON event stream (below), or an error body before it |
//! | `GET /processes` | — | [`ProcessList`] |
//! | `GET /processes/{pid}` | — | [`ProcessInfo`] |
//! | `GET /processes/{pid}/events?after=<seq>` | — | NDJSON event stream: buffered events with `seq > after`, then live ones |
//! | `POST /processes/{pid}/stdin` | raw bytes (streamed, any length) | [`StdinWritten`] |
//! | `POST /processes/{pid}/stdin/close` | — | `{}` |
//! | `POST /processes/{pid}/signal` | [`SignalRequest`] | `{}` |
//! | `POST /processes/{pid}/resize` | [`PtySize`] | `{}` |
//! | `GET /files?path=&user=` | — | raw content, `Content-Type: application/octet-stream`, `Content-Length` set |
//! | `PUT /files?path=&mode=&parents=&user=` | raw content (streamed) | [`FileInfo`] of the written file |
//! | `GET /files/stat?path=&user=` | — | [`FileInfo`] |
//! | `GET /files/list?path=&user=` | — | [`DirListing`] |
//! | `POST /files/mkdir` | [`MkdirRequest`] | [`FileInfo`] |
//! | `DELETE /files?path=&recursive=&user=` | — | `{}` |
//! | `POST /files/rename` | [`RenameRequest`] | [`FileInfo`] of the new path |
//!
//! Paths are absolute (`bad_request` otherwise) and never contain NUL. Query
//! values are percent-encoded (`application/x-www-form-urlencoded`). `mode`
//! in a query is octal digits (`644`, `0755`); in JSON it is a number. `user`
//! (optional everywhere) is a user name or a numeric uid; a string of digits
//! means a uid. File calls with `user` run with that user's file-system
//! identity (uid, primary gid, supplementary groups from the guest's
//! `/etc/passwd` and `/etc/group`), so its permission errors are real and the
//! files it creates belong to it. Without `user` they run as root.
//!
//! `PUT /files` writes the body to a temporary file in the target's
//! directory (`.ember-tmp-<16 hex digits>`), fsyncs it and renames it over
//! the target, so a reader sees the old or the new content, never a mix.
//! Missing parent directories are created unless `parents=false`. Without
//! `mode`, a replaced file keeps its mode and a new one gets `644`. `stat` and
//! `list` describe a symlink itself (`lstat`), with its `symlink_target`.
//! `GET /files` of a pseudo-file that reports size 0 (procfs, sysfs) has no
//! `Content-Length` and streams until end of file; devices, FIFOs and
//! sockets are refused with `bad_request`. Names and paths are UTF-8; a file
//! name that is not is listed with U+FFFD replacement characters.
//!
//! # Process events (NDJSON)
//!
//! `POST /processes` and `GET /processes/{pid}/events` answer `200` with
//! `Content-Type: application/x-ndjson`: a sequence of lines, each one JSON
//! object ([`EventRecord`]) terminated by `\n` (UTF-8, no embedded newlines).
//! Readers ignore empty lines. Every line has `seq` (per process, starting at
//! 1, increasing by one per stored event) and `type`:
//!
//! ```text
//! {"seq":1,"type":"start","pid":4242}
//! {"seq":2,"type":"stdout","data":"aGVsbG8K"}
//! {"seq":3,"type":"stderr","data":"b29wcwo="}
//! {"seq":4,"type":"exit","exit_code":0,"signal":null,"core_dumped":false,"timed_out":false}
//! ```
//!
//! `data` is standard base64 (with padding) of the bytes exactly as the
//! process wrote them, in chunks of arbitrary size. `stdout` and `stderr`
//! events are in the order the agent read them, which across the two pipes
//! is only approximately the order they were written. A PTY process has a
//! single output stream, reported as `stdout`. `exit` is the last event;
//! exactly one of `exit_code` and `signal` is non-null; `timed_out` says the
//! agent killed it for exceeding `timeout_ms`. The stream ends after `exit`.
//! `exit` comes once the process has been reaped and its output pipes have
//! closed; if descendants keep them open, the agent stops collecting 200 ms
//! after the output falls quiet and reports the exit then.
//!
//! The agent keeps a bounded buffer of each process's events. A reader that
//! asks for events the buffer no longer holds first gets one
//! `{"seq":N,"type":"lost","first_seq":M}` line: events `M..=N` are gone; the
//! next line has `seq` `N+1`. A reader remembers the last `seq` it saw and
//! reconnects with `?after=<seq>` to continue exactly where it stopped.
//! While a client is attached to the stream, the agent stops reading the
//! process's output when the client falls a full buffer behind (the process
//! then blocks writing, as with any pipe), so an attached reader loses
//! nothing; a process with no reader attached never blocks and its oldest
//! output is dropped instead.
//!
//! The agent remembers up to 64 exited processes (for `GET /processes` and
//! late readers) while their buffered events total at most 16 MiB; the
//! oldest are forgotten first, after which their pid is `not_found`.
//!
//! A foreground process (`background: false`) is killed (`SIGKILL` to its
//! process group) when the client of its `POST /processes` stream
//! disconnects before the exit. A background process keeps running; any
//! client may attach to its events.
//!
//! # Compatibility rule
//!
//! A newer host must talk to an older guest agent: a paused sandbox or a
//! template keeps the agent binary it was snapshotted with, possibly for a
//! long time. Therefore:
//!
//! - **Only additive changes.** An endpoint, a field, an event type or an
//!   error code, once released, keeps its name, type and meaning. Nothing is
//!   removed or renamed; a field's type never changes.
//! - **New request fields are optional** and their absence means the old
//!   behaviour. An older agent ignores request fields it does not know, so a
//!   host must not send a field whose being ignored would be unsafe unless
//!   the agent advertises the capability that goes with it.
//! - **New response fields are optional** (`#[serde(default)]` here): a host
//!   reading an older agent's response finds them missing and uses the
//!   default. Readers ignore unknown fields (no `deny_unknown_fields`
//!   anywhere in this crate) and unknown event types ([`ProcessEvent::Unknown`],
//!   skipped by [`ProcessEvents`]).
//! - **New endpoints and behaviours are discovered**, not assumed:
//!   `GET /health` reports `protocol` ([`PROTOCOL_VERSION`], raised when an
//!   endpoint or behaviour is added) and `capabilities` (names from
//!   [`capability`]). A host checks [`Health::supports`] before using
//!   anything newer than protocol 1, and otherwise degrades or reports that
//!   the sandbox's agent is too old.
//! - Changes that cannot follow these rules need a new path (`/v2/...`)
//!   served next to the old one.

mod client;
mod error;
mod event;
mod wire;

pub use client::{FileContent, GuestClient, ProcessEvents, ProcessOutput, WatchEvents};
pub use error::{ErrorBody, ErrorCode, GuestError};
pub use event::{EventRecord, NdjsonDecoder, ProcessEvent, encode_event_line};
pub use wire::*;

/// The protocol version this crate speaks. Raised by one whenever an
/// endpoint, event type or behaviour is added; never lowered.
pub const PROTOCOL_VERSION: u32 = 2;

/// Capability names an agent lists in [`Health::capabilities`].
pub mod capability {
    /// `POST /processes` with streamed events, stdin, signals, list.
    pub const PROCESS: &str = "process";
    /// `pty` in [`crate::StartProcess`] and `POST /processes/{pid}/resize`.
    pub const PROCESS_PTY: &str = "process.pty";
    /// `GET /processes/{pid}/events?after=` replay and reattach.
    pub const PROCESS_EVENTS: &str = "process.events";
    /// The `/files` endpoints.
    pub const FILES: &str = "files";
    /// `user` on file calls.
    pub const FILES_USER: &str = "files.user";
    /// `POST /shutdown`.
    pub const SHUTDOWN: &str = "shutdown";

    /// `GET /files/watch` (protocol 2).
    pub const FILES_WATCH: &str = "files.watch";

    /// Everything protocol 1 offers.
    pub const ALL_V1: &[&str] = &[
        PROCESS,
        PROCESS_PTY,
        PROCESS_EVENTS,
        FILES,
        FILES_USER,
        SHUTDOWN,
    ];

    /// Everything protocol 2 offers: protocol 1's and directory watches.
    pub const ALL_V2: &[&str] = &[
        PROCESS,
        PROCESS_PTY,
        PROCESS_EVENTS,
        FILES,
        FILES_USER,
        SHUTDOWN,
        FILES_WATCH,
    ];
}
