"""Ember's Python SDK: sandboxes in microVMs over Ember's REST API.

    from ember import Sandbox

    with Sandbox.create() as sb:
        print(sb.commands.run("python3 -c 'print(1+1)'").stdout)

The server and key come from ``api_url=``/``api_key=``, else
``EMBER_API_URL``/``EMBER_API_KEY``, else ``~/.config/ember/config.toml``.
:class:`AsyncSandbox` is the asyncio twin of :class:`Sandbox`.
"""

from .aio import AsyncClient, AsyncCommandHandle, AsyncCommands, AsyncFiles, AsyncSandbox
from .errors import (
    AuthError,
    BuildFailed,
    CapacityError,
    ConfigError,
    Conflict,
    ConnectError,
    EmberError,
    InvalidRequest,
    NotFound,
    ServerError,
    TimeoutError,
)
from .models import (
    CommandResult,
    DeletedSnapshot,
    FileInfo,
    FileType,
    MetricSample,
    OperationTiming,
    ProcessInfo,
    SandboxInfo,
    SandboxState,
    SnapshotInfo,
    TemplateBuildInfo,
    WatchEvent,
)
from .sandbox import Client, CommandHandle, Commands, Files, Sandbox, Template

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "AuthError",
    "BuildFailed",
    "CapacityError",
    "Client",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "ConfigError",
    "Conflict",
    "ConnectError",
    "DeletedSnapshot",
    "EmberError",
    "FileInfo",
    "WatchEvent",
    "FileType",
    "Files",
    "InvalidRequest",
    "MetricSample",
    "NotFound",
    "ProcessInfo",
    "Sandbox",
    "OperationTiming",
    "SandboxInfo",
    "SandboxState",
    "ServerError",
    "SnapshotInfo",
    "Template",
    "TemplateBuildInfo",
    "TimeoutError",
]
