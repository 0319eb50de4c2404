"""The asyncio client: :class:`AsyncSandbox`, :class:`AsyncCommands`,
:class:`AsyncFiles` and :class:`AsyncClient`, the twins of :mod:`ember.sandbox`
with the same names, arguments, results and errors. Output callbacks may be
plain functions or coroutine functions.

Example::

    from ember import AsyncSandbox

    async with await AsyncSandbox.create() as sb:
        r = await sb.commands.run("echo hi")
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from . import _api, errors
from ._config import resolve
from ._exec import MAX_RECONNECTS, EventLog, StreamBroken
from ._forward import AsyncPortForward
from ._transport import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, AsyncTransport, backoff
from .models import (
    CommandResult,
    DeletedSnapshot,
    FileInfo,
    MetricSample,
    ProcessInfo,
    SandboxInfo,
    SandboxState,
    SnapshotInfo,
    TemplateBuildInfo,
    WatchEvent,
)
from .sandbox import _PAGE, STREAM_TIMEOUT, _class_or_instance

AsyncOutputCallback = Callable[[str], Any]


class AsyncClient:
    """A connection to one Ember server with one API key (asyncio)."""

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self._t = AsyncTransport(resolve(api_url, api_key), timeout=timeout, max_retries=max_retries)

    @property
    def api_url(self) -> str:
        return self._t.settings.api_url

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def create_sandbox(
        self,
        template: str = "base",
        *,
        timeout: int = 300,
        metadata: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        on_timeout: Literal["kill", "pause"] = "kill",
        allow_out: Sequence[str] | None = None,
        deny_out: Sequence[str] | None = None,
        cold: bool = False,
        public: bool = False,
        auto_resume: bool = False,
    ) -> AsyncSandbox:
        body = _api.create_body(
            template=template,
            timeout=timeout,
            metadata=metadata,
            env=env,
            vcpus=vcpus,
            memory_mib=memory_mib,
            on_timeout=on_timeout,
            allow_out=allow_out,
            deny_out=deny_out,
            cold=cold,
            public=public,
            auto_resume=auto_resume,
        )
        resp = await self._t.request("POST", "/v1/sandboxes", json=body)
        return AsyncSandbox(SandboxInfo.from_json(resp.json()), self)

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        resp = await self._t.request("GET", _api.sandbox_path(sandbox_id), safe=True)
        return SandboxInfo.from_json(resp.json())

    async def connect(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(await self.get_sandbox(sandbox_id), self)

    async def list_sandboxes(
        self,
        *,
        state: str | Sequence[str] | None = None,
        template: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> builtins.list[SandboxInfo]:
        out: builtins.list[SandboxInfo] = []
        token: str | None = None
        while True:
            params = _api.list_params(
                state=state, template=template, metadata=metadata, page_size=_PAGE, page_token=token
            )
            page = (await self._t.request("GET", "/v1/sandboxes", params=params, safe=True)).json()
            out.extend(SandboxInfo.from_json(s) for s in page.get("sandboxes", []))
            token = page.get("next_page_token")
            if limit is not None and len(out) >= limit:
                return out[:limit]
            if not token:
                return out

    async def pause_sandbox(self, sandbox_id: str) -> SandboxInfo:
        resp = await self._t.request("POST", f"{_api.sandbox_path(sandbox_id)}/pause")
        return await self._settle(resp, "paused", "pausing")

    async def resume_sandbox(
        self, sandbox_id: str, *, timeout: int | None = None, env: Mapping[str, str] | None = None
    ) -> SandboxInfo:
        body: dict[str, Any] = {"env": dict(env or {})}
        if timeout is not None:
            body["timeout_s"] = int(timeout)
        resp = await self._t.request("POST", f"{_api.sandbox_path(sandbox_id)}/resume", json=body)
        return await self._settle(resp, "running", "resuming")

    async def _settle(self, resp: httpx.Response, wanted: str, verb: str) -> SandboxInfo:
        """The sandbox a pause or resume answered; after a 202 (a large
        sandbox, still in progress on its host) poll it until it settles."""
        info = SandboxInfo.from_json(resp.json())
        if resp.status_code != 202:
            return info
        deadline = time.monotonic() + _api.SETTLE_LIMIT_S
        while not _api.settled(info, wanted, verb):
            if time.monotonic() > deadline:
                raise errors.TimeoutError(
                    f"sandbox {info.id} is still {verb} after {_api.SETTLE_LIMIT_S:.0f} s"
                )
            await asyncio.sleep(_api.SETTLE_POLL_S)
            info = await self.get_sandbox(info.id)
        return info

    async def set_sandbox_network(
        self,
        sandbox_id: str,
        *,
        allow_out: Sequence[str] | None = None,
        deny_out: Sequence[str] | None = None,
    ) -> SandboxInfo:
        """Replace a running or paused sandbox's egress rules (CIDRs); the
        lists given replace the old ones whole (safe to repeat)."""
        resp = await self._t.request(
            "PUT",
            f"{_api.sandbox_path(sandbox_id)}/network",
            json={"allow_out": list(allow_out or []), "deny_out": list(deny_out or [])},
            safe=True,
        )
        return SandboxInfo.from_json(resp.json())

    async def set_sandbox_ingress(
        self, sandbox_id: str, *, public: bool | None = None, auto_resume: bool | None = None
    ) -> SandboxInfo:
        """Make a sandbox's ports public (no traffic token needed) or private,
        and choose whether a request to a port of it, paused, resumes it;
        ``None`` keeps a setting as it is (safe to repeat)."""
        resp = await self._t.request(
            "PUT",
            f"{_api.sandbox_path(sandbox_id)}/ingress",
            json=_api.ingress_body(public, auto_resume),
            safe=True,
        )
        return SandboxInfo.from_json(resp.json())

    async def set_sandbox_timeout(self, sandbox_id: str, timeout: int) -> SandboxInfo:
        resp = await self._t.request(
            "POST",
            f"{_api.sandbox_path(sandbox_id)}/timeout",
            json={"timeout_s": int(timeout)},
            safe=True,
        )
        return SandboxInfo.from_json(resp.json())

    async def kill_sandbox(self, sandbox_id: str) -> bool:
        try:
            await self._t.request("DELETE", _api.sandbox_path(sandbox_id), safe=True)
            return True
        except errors.NotFound:
            return False
        except errors.Conflict:
            info = await self.get_sandbox(sandbox_id)
            if info.state in (SandboxState.DESTROYED, SandboxState.DESTROYING):
                return False
            raise

    async def snapshot_sandbox(self, sandbox_id: str, name: str) -> SnapshotInfo:
        """Freeze a running sandbox into the template ``name``. A snapshot the
        server answers 202 (a large sandbox, still snapshotting) is polled
        until the sandbox runs again; then the template is there, or the
        snapshot failed and :class:`errors.EmberError` says so."""
        resp = await self._t.request(
            "POST", f"{_api.sandbox_path(sandbox_id)}/snapshots", json={"name": name}
        )
        if resp.status_code != 202:
            return SnapshotInfo.from_json(resp.json())
        info = SandboxInfo.from_json(resp.json())
        deadline = time.monotonic() + _api.SETTLE_LIMIT_S
        while info.state == SandboxState.SNAPSHOTTING:
            if time.monotonic() > deadline:
                raise errors.TimeoutError(
                    f"sandbox {info.id} is still snapshotting after {_api.SETTLE_LIMIT_S:.0f} s"
                )
            await asyncio.sleep(_api.SETTLE_POLL_S)
            info = await self.get_sandbox(info.id)
        try:
            return await self.get_snapshot(name)
        except errors.NotFound:
            raise errors.EmberError(
                f"the snapshot of sandbox {info.id} as {name!r} did not complete "
                f"(the server's log says why); the sandbox is {info.state.value}"
            ) from None

    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        resp = await self._t.request("GET", "/v1/snapshots", safe=True)
        return [SnapshotInfo.from_json(s) for s in resp.json().get("snapshots", [])]

    async def get_snapshot(self, name: str) -> SnapshotInfo:
        resp = await self._t.request("GET", _api.snapshot_path(name), safe=True)
        return SnapshotInfo.from_json(resp.json())

    async def delete_snapshot(self, name: str) -> DeletedSnapshot:
        resp = await self._t.request("DELETE", _api.snapshot_path(name))
        return DeletedSnapshot.from_json(resp.json())

    async def build_template(
        self, name: str, *, on_log: Any = None, wait: bool = True, **options: Any
    ) -> TemplateBuildInfo:
        """The asyncio twin of :meth:`ember.Client.build_template` (same
        options); ``on_log`` may be a coroutine function."""
        keys = (
            "image",
            "dockerfile",
            "context",
            "start_cmd",
            "ready_cmd",
            "ready_port",
            "ready_timeout",
            "vcpus",
            "memory_mib",
            "build_args",
            "registry_username",
            "registry_password",
        )
        unknown = set(options) - set(keys)
        if unknown:
            raise TypeError(f"unknown options: {sorted(unknown)}")
        body = _api.template_build_body(name, **{k: options.get(k) for k in keys})
        resp = await self._t.request("POST", "/v1/templates", json=body)
        build = TemplateBuildInfo.from_json(resp.json())
        if not wait:
            return build
        offset, log = 0, []
        while True:
            path = _api.template_build_path(name, build.build_id, offset)
            resp = await self._t.request("GET", path, safe=True)
            build = TemplateBuildInfo.from_json(resp.json())
            if build.log:
                log.append(build.log)
                if on_log is not None:
                    r = on_log(build.log)
                    if inspect.isawaitable(r):
                        await r
            offset = build.log_offset
            if build.done:
                import dataclasses

                build = dataclasses.replace(build, log="".join(log))
                if build.status == "failed":
                    raise errors.BuildFailed(build)
                return build
            await asyncio.sleep(_api.BUILD_POLL_S)


def _client(client: AsyncClient | None, api_url: str | None, api_key: str | None) -> tuple[AsyncClient, bool]:
    if client is not None:
        return client, False
    return AsyncClient(api_url, api_key), True


# `AsyncSandbox.resume(id)`: bound to the class by _class_or_instance.
async def _resume_async_sandbox(
    cls: type[AsyncSandbox],
    sandbox_id: str,
    *,
    timeout: int | None = None,
    env: Mapping[str, str] | None = None,
    api_url: str | None = None,
    api_key: str | None = None,
    client: AsyncClient | None = None,
) -> AsyncSandbox:
    c, owned = _client(client, api_url, api_key)
    try:
        info = await c.resume_sandbox(sandbox_id, timeout=timeout, env=env)
    except BaseException:
        if owned:
            await c.close()
        raise
    return cls(info, c, owns_client=owned)


class AsyncSandbox:
    """A sandbox (asyncio). ``async with`` kills it on exit."""

    def __init__(self, info: SandboxInfo, client: AsyncClient, *, owns_client: bool = False) -> None:
        self.info = info
        self._client = client
        self._owns_client = owns_client
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def client(self) -> AsyncClient:
        return self._client

    @property
    def traffic_token(self) -> str:
        """Grants access to this sandbox's ports only: header ``X-Ember-Traffic-Token``."""
        return self.info.traffic_token

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, state={self.info.state.value!r})"

    @classmethod
    async def create(
        cls,
        template: str = "base",
        *,
        timeout: int = 300,
        metadata: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        on_timeout: Literal["kill", "pause"] = "kill",
        allow_out: Sequence[str] | None = None,
        deny_out: Sequence[str] | None = None,
        cold: bool = False,
        public: bool = False,
        auto_resume: bool = False,
        api_url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
    ) -> AsyncSandbox:
        c, owned = _client(client, api_url, api_key)
        try:
            sb = await c.create_sandbox(
                template,
                timeout=timeout,
                metadata=metadata,
                env=env,
                vcpus=vcpus,
                memory_mib=memory_mib,
                on_timeout=on_timeout,
                allow_out=allow_out,
                deny_out=deny_out,
                cold=cold,
                public=public,
                auto_resume=auto_resume,
            )
        except BaseException:
            if owned:
                await c.close()
            raise
        return cls(sb.info, c, owns_client=owned)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
    ) -> AsyncSandbox:
        c, owned = _client(client, api_url, api_key)
        try:
            info = await c.get_sandbox(sandbox_id)
        except BaseException:
            if owned:
                await c.close()
            raise
        return cls(info, c, owns_client=owned)

    async def _resume_instance(
        self, *, timeout: int | None = None, env: Mapping[str, str] | None = None
    ) -> AsyncSandbox:
        self.info = await self._client.resume_sandbox(self.id, timeout=timeout, env=env)
        return self

    #: ``await AsyncSandbox.resume(sandbox_id)`` returns a new sandbox object;
    #: ``await sandbox.resume()`` resumes this one and returns it.
    resume = _class_or_instance(_resume_async_sandbox, _resume_instance)

    async def refresh(self) -> SandboxInfo:
        self.info = await self._client.get_sandbox(self.id)
        return self.info

    async def pause(self) -> SandboxInfo:
        self.info = await self._client.pause_sandbox(self.id)
        return self.info

    async def snapshot(self, name: str) -> SnapshotInfo:
        return await self._client.snapshot_sandbox(self.id, name)

    async def set_timeout(self, timeout: int) -> SandboxInfo:
        self.info = await self._client.set_sandbox_timeout(self.id, timeout)
        return self.info

    async def set_network(
        self, *, allow_out: Sequence[str] | None = None, deny_out: Sequence[str] | None = None
    ) -> SandboxInfo:
        """Replace the egress rules: a running sandbox's at once, a paused
        one's for its resume."""
        self.info = await self._client.set_sandbox_network(self.id, allow_out=allow_out, deny_out=deny_out)
        return self.info

    def url(self, port: int) -> str:
        """The URL where ``port`` of the sandbox is served (from the cached
        :attr:`info`, no request): see :meth:`ember.Sandbox.url`."""
        return _api.port_url(self.info, self._client.api_url, port)

    def get_host(self, port: int) -> str:
        """:meth:`url` without its scheme and trailing slash, as E2B's
        ``get_host`` (meant for a server with an ingress domain): see
        :meth:`ember.Sandbox.get_host`."""
        return _api.port_host(self.url(port))

    async def set_ingress(
        self, *, public: bool | None = None, auto_resume: bool | None = None
    ) -> SandboxInfo:
        """Make the ports public or private, and choose whether a request to a
        port while the sandbox is paused resumes it; ``None`` keeps a setting."""
        self.info = await self._client.set_sandbox_ingress(self.id, public=public, auto_resume=auto_resume)
        return self.info

    async def port_forward(
        self, remote_port: int, local_port: int = 0, host: str = "127.0.0.1"
    ) -> AsyncPortForward:
        """Listen on ``host:local_port`` and tunnel each connection to
        ``remote_port`` inside the sandbox: see
        :meth:`ember.Sandbox.port_forward`. ``async with`` it, or ``await
        fwd.close()``."""
        t = self._client._t
        return await AsyncPortForward.start(
            t.settings.api_url, t.settings.api_key, self.id, _api._port(remote_port), local_port, host
        )

    async def link(self, port: int, path: str = "/") -> str:
        """A one-time link for a browser to ``path`` on ``port``: see
        :meth:`ember.Sandbox.link`."""
        resp = await self._client._t.request(
            "POST", f"{_api.sandbox_path(self.id)}/links", json=_api.link_body(port, path)
        )
        return str(resp.json()["url"])

    async def get_metrics(self) -> builtins.list[MetricSample]:
        """Recent CPU, memory, disk and network use, oldest first."""
        resp = await self._client._t.request("GET", f"{_api.sandbox_path(self.id)}/metrics", safe=True)
        return [MetricSample.from_json(s) for s in resp.json().get("samples", [])]

    async def kill(self) -> bool:
        return await self._client.kill_sandbox(self.id)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            # Shielded: a cancelled task still destroys its sandbox.
            await asyncio.shield(self.kill())
        except errors.EmberError:
            if exc is None:
                raise
        finally:
            await self.close()

    @classmethod
    async def list(
        cls,
        *,
        state: str | Sequence[str] | None = None,
        template: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
    ) -> builtins.list[SandboxInfo]:
        c, owned = _client(client, api_url, api_key)
        try:
            return await c.list_sandboxes(state=state, template=template, metadata=metadata, limit=limit)
        finally:
            if owned:
                await c.close()


class AsyncCommandHandle:
    """A command started with ``background=True`` (asyncio)."""

    def __init__(self, sandbox: AsyncSandbox, pid: int) -> None:
        self._sandbox = sandbox
        self.pid = pid

    def __repr__(self) -> str:
        return f"AsyncCommandHandle(sandbox={self._sandbox.id!r}, pid={self.pid})"

    async def wait(
        self,
        *,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
    ) -> CommandResult:
        t = self._sandbox.client._t
        path = f"{_api.process_path(self._sandbox.id, self.pid)}/events"
        log = EventLog()
        log.pid = self.pid
        return await _follow(
            t,
            lambda: t.stream("GET", path, params={"after": 0}, safe=True, timeout=STREAM_TIMEOUT),
            log,
            self._sandbox.id,
            on_stdout,
            on_stderr,
        )

    async def send_stdin(self, data: bytes | str) -> None:
        await self._sandbox.commands.send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        await self._sandbox.commands.send_stdin(self.pid, b"", close=True)

    async def kill(self, signal: str = "KILL") -> None:
        await self._sandbox.commands.kill(self.pid, signal)


class AsyncCommands:
    """Processes in a sandbox: ``sandbox.commands`` (asyncio)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        tag: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        tag: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        tag: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> CommandResult | AsyncCommandHandle:
        """See :meth:`ember.Commands.run`."""
        sb = self._sandbox
        t = sb.client._t
        body = _api.exec_body(
            cmd,
            env=env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin,
            background=background,
            tag=tag,
            pty=pty,
        )
        path = f"{_api.sandbox_path(sb.id)}/exec"
        if background:
            resp = await t.request("POST", path, json=body)
            return AsyncCommandHandle(sb, int(resp.json()["pid"]))
        return await _follow(
            t,
            lambda: t.stream("POST", path, json=body, timeout=STREAM_TIMEOUT),
            EventLog(),
            sb.id,
            on_stdout,
            on_stderr,
        )

    async def list(self) -> builtins.list[ProcessInfo]:
        t = self._sandbox.client._t
        resp = await t.request("GET", f"{_api.sandbox_path(self._sandbox.id)}/processes", safe=True)
        return [ProcessInfo.from_json(p) for p in resp.json().get("processes", [])]

    def connect(self, pid: int) -> AsyncCommandHandle:
        return AsyncCommandHandle(self._sandbox, pid)

    async def send_stdin(self, pid: int, data: bytes | str, *, close: bool = False) -> None:
        t = self._sandbox.client._t
        await t.request(
            "POST",
            f"{_api.process_path(self._sandbox.id, pid)}/stdin",
            json=_api.stdin_body(data, close),
        )

    async def kill(self, pid: int, signal: str = "KILL") -> None:
        t = self._sandbox.client._t
        await t.request(
            "POST",
            f"{_api.process_path(self._sandbox.id, pid)}/signal",
            json={"signal": signal},
        )

    async def resize(self, pid: int, *, rows: int, cols: int) -> None:
        """Resize the terminal of a process started with ``pty``."""
        t = self._sandbox.client._t
        await t.request(
            "POST",
            f"{_api.process_path(self._sandbox.id, pid)}/resize",
            json={"rows": int(rows), "cols": int(cols)},
            safe=True,
        )


async def _call(cb: AsyncOutputCallback | None, text: str) -> None:
    if cb is None:
        return
    r = cb(text)
    if inspect.isawaitable(r):
        await r


async def _follow(
    t: AsyncTransport,
    open_first: Callable[[], AbstractAsyncContextManager[httpx.Response]],
    log: EventLog,
    sandbox_id: str,
    on_stdout: AsyncOutputCallback | None,
    on_stderr: AsyncOutputCallback | None,
) -> CommandResult:
    opener = open_first
    reconnects = 0
    while True:
        try:
            async with opener() as resp:
                async for line in resp.aiter_lines():
                    out = log.feed(line)
                    if out is not None:
                        await _call(on_stdout if out.stream == "stdout" else on_stderr, out.text)
                    if log.done:
                        return log.finish()
            broke = "the stream ended before the command exited"
        except StreamBroken as e:
            broke = str(e)
        except httpx.HTTPError as e:
            broke = repr(e)
        if log.pid is None or reconnects >= MAX_RECONNECTS:
            raise errors.ServerError(f"lost the command's output stream: {broke}")
        await asyncio.sleep(backoff(reconnects))
        reconnects += 1
        path = f"{_api.process_path(sandbox_id, log.pid)}/events"
        opener = functools.partial(
            t.stream, "GET", path, params={"after": log.last_seq}, safe=True, timeout=STREAM_TIMEOUT
        )


class AsyncDirWatch:
    """A directory watch (:meth:`AsyncFiles.watch`), in place once made:
    ``async for`` its :class:`WatchEvent` s; ``aclose()`` (or leaving an
    ``async with`` block) ends it."""

    def __init__(self, cm: AbstractAsyncContextManager[httpx.Response]) -> None:
        self._cm = cm
        self._lines: AsyncIterator[str] | None = None

    async def _open(self) -> AsyncDirWatch:
        resp = await self._cm.__aenter__()
        self._lines = resp.aiter_lines()
        first = await self._next_event()
        if first is None or first.type != "started":
            await self.aclose()
            raise errors.ServerError(f"the watch did not start: {first!r}")
        return self

    async def _next_event(self) -> WatchEvent | None:
        assert self._lines is not None
        async for line in self._lines:
            if line.strip():
                return _api.watch_event(line)
        return None

    def __aiter__(self) -> AsyncDirWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        ev = await self._next_event()
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def aclose(self) -> None:
        await self._cm.__aexit__(None, None, None)

    async def __aenter__(self) -> AsyncDirWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncFiles:
    """Files in a sandbox: ``sandbox.files`` (asyncio)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @property
    def _t(self) -> AsyncTransport:
        return self._sandbox.client._t

    @property
    def _base(self) -> str:
        return f"{_api.sandbox_path(self._sandbox.id)}/files"

    async def read(self, path: str, *, user: str | None = None) -> bytes:
        resp = await self._t.request("GET", self._base, params=_api.file_params(path, user=user), safe=True)
        return resp.content

    async def read_text(self, path: str, *, encoding: str = "utf-8", user: str | None = None) -> str:
        return (await self.read(path, user=user)).decode(encoding)

    async def iter_bytes(self, path: str, *, user: str | None = None) -> AsyncIterator[bytes]:
        async with self._t.stream(
            "GET", self._base, params=_api.file_params(path, user=user), safe=True, timeout=STREAM_TIMEOUT
        ) as resp:
            async for chunk in resp.aiter_bytes():
                yield chunk

    async def write(
        self, path: str, data: bytes | str, *, mode: int | None = None, user: str | None = None
    ) -> FileInfo:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        resp = await self._t.request(
            "PUT",
            self._base,
            params=_api.file_params(path, user=user, mode=None if mode is None else format(mode, "o")),
            content=raw,
            headers={"content-type": "application/octet-stream"},
            safe=True,
        )
        return FileInfo.from_json(resp.json())

    async def list(self, path: str = "/", *, user: str | None = None) -> builtins.list[FileInfo]:
        resp = await self._t.request(
            "GET", f"{self._base}/list", params=_api.file_params(path, user=user), safe=True
        )
        return [FileInfo.from_json(e) for e in resp.json().get("entries", [])]

    async def stat(self, path: str, *, user: str | None = None) -> FileInfo:
        resp = await self._t.request(
            "GET", f"{self._base}/stat", params=_api.file_params(path, user=user), safe=True
        )
        return FileInfo.from_json(resp.json())

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            await self.stat(path, user=user)
            return True
        except errors.NotFound:
            return False

    async def make_dir(
        self, path: str, *, parents: bool = True, mode: int | None = None, user: str | None = None
    ) -> FileInfo:
        body: dict[str, Any] = {"path": path, "parents": parents}
        if mode is not None:
            body["mode"] = format(mode, "o")
        if user is not None:
            body["user"] = user
        resp = await self._t.request("POST", f"{self._base}/mkdir", json=body)
        return FileInfo.from_json(resp.json())

    async def watch(self, path: str, *, recursive: bool = False, user: str | None = None) -> AsyncDirWatch:
        """Watch directory ``path`` (with ``recursive``, every directory below
        it too); changes from when this returns are reported."""
        cm = self._t.stream(
            "GET",
            f"{self._base}/watch",
            params=_api.watch_params(path, recursive, user),
            safe=True,
            timeout=STREAM_TIMEOUT,
        )
        return await AsyncDirWatch(cm)._open()

    async def rename(
        self, src: str, dst: str, *, overwrite: bool = False, user: str | None = None
    ) -> FileInfo:
        """Move ``src`` to ``dst``; with ``overwrite`` an existing ``dst`` is
        replaced, else it is a :class:`errors.Conflict`."""
        body: dict[str, Any] = {"from": src, "to": dst, "overwrite": overwrite}
        if user is not None:
            body["user"] = user
        resp = await self._t.request("POST", f"{self._base}/rename", json=body)
        return FileInfo.from_json(resp.json())

    async def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        await self._t.request(
            "DELETE",
            self._base,
            params=_api.file_params(path, user=user, recursive=recursive or None),
        )
