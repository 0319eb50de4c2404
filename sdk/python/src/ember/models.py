"""Typed views of the API's JSON: sandboxes, snapshots, files, processes and
command results. Parsing is lenient about additions (unknown fields are
ignored, an unknown state is :attr:`SandboxState.UNKNOWN`) so an older SDK
keeps working against a newer server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _time(v: Any) -> datetime | None:
    if not isinstance(v, str) or not v:
        return None
    return datetime.fromisoformat(v)


def _req_time(v: Any) -> datetime:
    t = _time(v)
    if t is None:
        raise ValueError(f"expected a timestamp, got {v!r}")
    return t


class SandboxState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    SNAPSHOTTING = "snapshotting"
    DESTROYING = "destroying"
    FAILED = "failed"
    DESTROYED = "destroyed"
    #: A state this SDK does not know (a newer server's).
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: Any) -> SandboxState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True, slots=True)
class OperationTiming:
    """Where a sandbox's last create, fork, resume or pause spent its time:
    ``phases`` are ``(name, ms)`` in the order they ended (concurrent ones
    overlap; ``host.*`` phases are inside ``host``)."""

    operation: str
    total_ms: float
    phases: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OperationTiming:
        return cls(
            operation=d.get("operation", ""),
            total_ms=float(d.get("total_ms", 0.0)),
            phases=[(p["phase"], float(p["ms"])) for p in d.get("phases") or []],
        )


def _operation(d: dict[str, Any] | None) -> OperationTiming | None:
    return OperationTiming.from_json(d) if d else None


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    id: str
    state: SandboxState
    template: str
    vcpus: int
    memory_mib: int
    #: Seconds of inactivity before ``on_timeout`` applies.
    timeout: int
    on_timeout: str
    created_at: datetime
    state_changed_at: datetime
    metadata: dict[str, str] = field(default_factory=dict)
    allow_out: list[str] = field(default_factory=list)
    deny_out: list[str] = field(default_factory=list)
    host_id: str | None = None
    expires_at: datetime | None = None
    failure_reason: str | None = None
    #: Only from :meth:`Sandbox.create`: a token for this sandbox's exec and
    #: files. A secret: left out of the repr.
    access_token: str | None = field(default=None, repr=False)
    #: Its last completed create, fork, resume or pause, phase by phase.
    last_operation: OperationTiming | None = None
    #: Its ports are reachable without the traffic token.
    public: bool = False
    #: A request to one of its ports while it is paused resumes it.
    auto_resume: bool = False
    #: Grants access to its ports only (not exec or files): send it as the
    #: header ``X-Ember-Traffic-Token``. A secret: left out of the repr.
    traffic_token: str = field(default="", repr=False)
    #: The server's ingress domain; None when it has none (ports are then
    #: served on the API, under ``/v1/sandboxes/{id}/ports/{port}/``).
    domain: str | None = None
    #: Where its ports are served, ``{port}`` standing for the port number: a
    #: full URL, or a path on the API (see :meth:`Sandbox.url`). Empty from a
    #: server without ports.
    port_url: str = ""
    #: While it runs on a host that serves ports itself: that host's URL for
    #: them (``{port}`` for the number); takes the traffic token only.
    direct_port_url: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SandboxInfo:
        network = d.get("network") or {}
        return cls(
            id=d["id"],
            state=SandboxState.parse(d.get("state")),
            template=d.get("template", ""),
            vcpus=int(d.get("vcpus", 0)),
            memory_mib=int(d.get("memory_mib", 0)),
            timeout=int(d.get("timeout_s", 0)),
            on_timeout=d.get("on_timeout", "kill"),
            created_at=_req_time(d.get("created_at")),
            state_changed_at=_req_time(d.get("state_changed_at")),
            metadata=dict(d.get("metadata") or {}),
            allow_out=list(network.get("allow_out") or []),
            deny_out=list(network.get("deny_out") or []),
            host_id=d.get("host_id"),
            expires_at=_time(d.get("expires_at")),
            failure_reason=d.get("failure_reason"),
            access_token=d.get("access_token"),
            last_operation=_operation(d.get("last_operation")),
            public=bool(d.get("public")),
            auto_resume=bool(d.get("auto_resume")),
            traffic_token=str(d.get("traffic_token") or ""),
            domain=d.get("domain") or None,
            port_url=str(d.get("port_url") or ""),
            direct_port_url=d.get("direct_port_url"),
        )


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A named template frozen from a sandbox."""

    name: str
    build_id: str
    vcpus: int
    memory_mib: int
    size_bytes: int
    created_at: datetime
    source_sandbox_id: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotInfo:
        return cls(
            name=d["name"],
            build_id=d.get("build_id", ""),
            vcpus=int(d.get("vcpus", 0)),
            memory_mib=int(d.get("memory_mib", 0)),
            size_bytes=int(d.get("size_bytes", 0)),
            created_at=_req_time(d.get("created_at")),
            source_sandbox_id=d.get("source_sandbox_id"),
        )


@dataclass(frozen=True, slots=True)
class TemplateBuildInfo:
    """A template build job (``Template.build``): its status, the step it is
    at, and its log (from the offset asked for)."""

    build_id: str
    name: str
    #: ``queued``, ``running``, ``ready`` or ``failed``.
    status: str
    source: str
    step: int
    steps_total: int
    step_text: str
    #: Leading steps the step cache held.
    cached_steps: int
    log: str
    #: Pass back as ``offset`` to get only the log that follows.
    log_offset: int
    created_at: datetime
    finished_at: datetime | None = None
    #: Why it failed: the step, its command, exit code and last output.
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in ("ready", "failed")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TemplateBuildInfo:
        return cls(
            build_id=d["build_id"],
            name=d["name"],
            status=d["status"],
            source=d.get("source", ""),
            step=int(d.get("step", 0)),
            steps_total=int(d.get("steps_total", 0)),
            step_text=d.get("step_text", ""),
            cached_steps=int(d.get("cached_steps", 0)),
            log=d.get("log", ""),
            log_offset=int(d.get("log_offset", 0)),
            created_at=_req_time(d.get("created_at")),
            finished_at=_time(d.get("finished_at")),
            error=d.get("error"),
        )


@dataclass(frozen=True, slots=True)
class DeletedSnapshot:
    name: str
    build_id: str
    #: False while sandboxes or other builds still use its data.
    data_freed: bool

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeletedSnapshot:
        return cls(d["name"], d.get("build_id", ""), bool(d.get("data_freed")))


class FileType(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change in a watched directory: ``type`` is ``create``, ``write``,
    ``remove``, ``rename`` (moved away), ``chmod`` or ``overflow`` (changes
    were lost: list again); ``name`` is relative to the watched directory."""

    type: str
    name: str
    is_dir: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WatchEvent:
        return cls(type=str(d.get("type", "")), name=str(d.get("name", "")), is_dir=bool(d.get("is_dir")))


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    name: str
    type: FileType
    size: int
    #: Permission bits, e.g. ``0o644``.
    mode: int
    modified_at: datetime | None
    uid: int
    gid: int
    symlink_target: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.type is FileType.DIRECTORY

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileInfo:
        try:
            kind = FileType(str(d.get("type")))
        except ValueError:
            kind = FileType.OTHER
        return cls(
            path=d["path"],
            name=d.get("name", ""),
            type=kind,
            size=int(d.get("size", 0)),
            mode=int(str(d.get("mode", "0")), 8),
            modified_at=_time(d.get("modified_at")),
            uid=int(d.get("uid", 0)),
            gid=int(d.get("gid", 0)),
            symlink_target=d.get("symlink_target"),
        )


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One moment of a running sandbox's use (sampled every 5 s)."""

    timestamp: datetime | None
    #: Share of one host core over the last interval (100 = one core).
    cpu_percent: float
    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int
    disk_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    pids: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetricSample:
        return cls(
            timestamp=_time(d.get("timestamp")),
            cpu_percent=float(d.get("cpu_percent", 0.0)),
            cpu_seconds=float(d.get("cpu_seconds", 0.0)),
            memory_bytes=int(d.get("memory_bytes", 0)),
            memory_limit_bytes=int(d.get("memory_limit_bytes", 0)),
            disk_bytes=int(d.get("disk_bytes", 0)),
            net_rx_bytes=int(d.get("net_rx_bytes", 0)),
            net_tx_bytes=int(d.get("net_tx_bytes", 0)),
            pids=int(d.get("pids", 0)),
        )


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A process started through the API."""

    pid: int
    cmd: str
    args: list[str]
    running: bool
    background: bool
    started_at: datetime | None
    tag: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessInfo:
        ex = d.get("exit") or {}
        return cls(
            pid=int(d["pid"]),
            cmd=d.get("cmd", ""),
            args=list(d.get("args") or []),
            running=bool(d.get("running")),
            background=bool(d.get("background")),
            started_at=_time(d.get("started_at")),
            tag=d.get("tag"),
            exit_code=ex.get("exit_code"),
            signal=ex.get("signal"),
            timed_out=bool(ex.get("timed_out", False)),
        )


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command printed and how it ended."""

    pid: int
    stdout: str
    stderr: str
    #: None when a signal killed it.
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0
