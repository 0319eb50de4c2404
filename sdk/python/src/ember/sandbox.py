"""The synchronous client: :class:`Sandbox` with its :class:`Commands` and
:class:`Files`, and :class:`Client` for the calls that are not about one
sandbox (listing, snapshots). The asyncio twins live in :mod:`ember.aio`.

Example::

    from ember import Sandbox

    with Sandbox.create(timeout=300) as sb:
        r = sb.commands.run("python3 -c 'print(1+1)'")
        print(r.stdout, r.exit_code)
"""

from __future__ import annotations

import builtins
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from . import _api, errors
from ._config import resolve
from ._exec import MAX_RECONNECTS, EventLog, StreamBroken
from ._forward import PortForward
from ._transport import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, Transport, backoff
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

OutputCallback = Callable[[str], Any]

#: Exec streams may be silent for as long as the command is.
STREAM_TIMEOUT = httpx.Timeout(None, connect=10.0)
_PAGE = 500


class _class_or_instance:
    """A method that works on the class (``Sandbox.resume(id)``) and on an
    instance (``sandbox.resume()``), each with its own implementation."""

    def __init__(self, on_class: Callable[..., Any], on_instance: Callable[..., Any]) -> None:
        self.on_class = on_class
        self.on_instance = on_instance
        functools.update_wrapper(self, on_class)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        if obj is None:
            return functools.partial(self.on_class, owner)
        return functools.partial(self.on_instance, obj)


class Client:
    """A connection to one Ember server with one API key.

    ``api_url`` and ``api_key`` default to ``EMBER_API_URL`` / ``EMBER_API_KEY``,
    then ``~/.config/ember/config.toml``. ``timeout`` bounds each plain call
    (exec streams wait as long as their command runs); ``max_retries`` applies
    to safe calls only.
    """

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self._t = Transport(resolve(api_url, api_key), timeout=timeout, max_retries=max_retries)

    @property
    def api_url(self) -> str:
        return self._t.settings.api_url

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- sandboxes

    def create_sandbox(
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
    ) -> Sandbox:
        """Create a sandbox (never retried: a retry could create two)."""
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
        resp = self._t.request("POST", "/v1/sandboxes", json=body)
        return Sandbox(SandboxInfo.from_json(resp.json()), self)

    def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        resp = self._t.request("GET", _api.sandbox_path(sandbox_id), safe=True)
        return SandboxInfo.from_json(resp.json())

    def connect(self, sandbox_id: str) -> Sandbox:
        """A :class:`Sandbox` for an existing sandbox."""
        return Sandbox(self.get_sandbox(sandbox_id), self)

    def list_sandboxes(
        self,
        *,
        state: str | Sequence[str] | None = None,
        template: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> builtins.list[SandboxInfo]:
        """Your team's sandboxes, newest first (destroyed ones only when
        ``state`` asks for them), following pages up to ``limit``."""
        out: builtins.list[SandboxInfo] = []
        token: str | None = None
        while True:
            params = _api.list_params(
                state=state, template=template, metadata=metadata, page_size=_PAGE, page_token=token
            )
            page = self._t.request("GET", "/v1/sandboxes", params=params, safe=True).json()
            out.extend(SandboxInfo.from_json(s) for s in page.get("sandboxes", []))
            token = page.get("next_page_token")
            if limit is not None and len(out) >= limit:
                return out[:limit]
            if not token:
                return out

    def pause_sandbox(self, sandbox_id: str) -> SandboxInfo:
        resp = self._t.request("POST", f"{_api.sandbox_path(sandbox_id)}/pause")
        return self._settle(resp, "paused", "pausing")

    def resume_sandbox(
        self, sandbox_id: str, *, timeout: int | None = None, env: Mapping[str, str] | None = None
    ) -> SandboxInfo:
        body: dict[str, Any] = {"env": dict(env or {})}
        if timeout is not None:
            body["timeout_s"] = int(timeout)
        resp = self._t.request("POST", f"{_api.sandbox_path(sandbox_id)}/resume", json=body)
        return self._settle(resp, "running", "resuming")

    def _settle(self, resp: httpx.Response, wanted: str, verb: str) -> SandboxInfo:
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
            time.sleep(_api.SETTLE_POLL_S)
            info = self.get_sandbox(info.id)
        return info

    def set_sandbox_network(
        self,
        sandbox_id: str,
        *,
        allow_out: Sequence[str] | None = None,
        deny_out: Sequence[str] | None = None,
    ) -> SandboxInfo:
        """Replace a running or paused sandbox's egress rules (CIDRs); the
        lists given replace the old ones whole (safe to repeat)."""
        resp = self._t.request(
            "PUT",
            f"{_api.sandbox_path(sandbox_id)}/network",
            json={"allow_out": list(allow_out or []), "deny_out": list(deny_out or [])},
            safe=True,
        )
        return SandboxInfo.from_json(resp.json())

    def set_sandbox_ingress(
        self, sandbox_id: str, *, public: bool | None = None, auto_resume: bool | None = None
    ) -> SandboxInfo:
        """Make a sandbox's ports public (no traffic token needed) or private,
        and choose whether a request to a port of it, paused, resumes it;
        ``None`` keeps a setting as it is (safe to repeat)."""
        resp = self._t.request(
            "PUT",
            f"{_api.sandbox_path(sandbox_id)}/ingress",
            json=_api.ingress_body(public, auto_resume),
            safe=True,
        )
        return SandboxInfo.from_json(resp.json())

    def set_sandbox_timeout(self, sandbox_id: str, timeout: int) -> SandboxInfo:
        """The sandbox now expires ``timeout`` seconds from now (safe to repeat)."""
        resp = self._t.request(
            "POST",
            f"{_api.sandbox_path(sandbox_id)}/timeout",
            json={"timeout_s": int(timeout)},
            safe=True,
        )
        return SandboxInfo.from_json(resp.json())

    def kill_sandbox(self, sandbox_id: str) -> bool:
        """Destroy a sandbox. False if it was already gone (destroyed or unknown)."""
        try:
            self._t.request("DELETE", _api.sandbox_path(sandbox_id), safe=True)
            return True
        except errors.NotFound:
            return False
        except errors.Conflict:
            # 409 also answers a repeated delete (the first may have been ours).
            if self.get_sandbox(sandbox_id).state in (SandboxState.DESTROYED, SandboxState.DESTROYING):
                return False
            raise

    def snapshot_sandbox(self, sandbox_id: str, name: str) -> SnapshotInfo:
        """Freeze a running sandbox into the template ``name``. A snapshot the
        server answers 202 (a large sandbox, still snapshotting) is polled
        until the sandbox runs again; then the template is there, or the
        snapshot failed and :class:`errors.EmberError` says so."""
        resp = self._t.request("POST", f"{_api.sandbox_path(sandbox_id)}/snapshots", json={"name": name})
        if resp.status_code != 202:
            return SnapshotInfo.from_json(resp.json())
        info = SandboxInfo.from_json(resp.json())
        deadline = time.monotonic() + _api.SETTLE_LIMIT_S
        while info.state == SandboxState.SNAPSHOTTING:
            if time.monotonic() > deadline:
                raise errors.TimeoutError(
                    f"sandbox {info.id} is still snapshotting after {_api.SETTLE_LIMIT_S:.0f} s"
                )
            time.sleep(_api.SETTLE_POLL_S)
            info = self.get_sandbox(info.id)
        try:
            return self.get_snapshot(name)
        except errors.NotFound:
            raise errors.EmberError(
                f"the snapshot of sandbox {info.id} as {name!r} did not complete "
                f"(the server's log says why); the sandbox is {info.state.value}"
            ) from None

    # -------------------------------------------------------------- snapshots

    def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        resp = self._t.request("GET", "/v1/snapshots", safe=True)
        return [SnapshotInfo.from_json(s) for s in resp.json().get("snapshots", [])]

    def get_snapshot(self, name: str) -> SnapshotInfo:
        resp = self._t.request("GET", _api.snapshot_path(name), safe=True)
        return SnapshotInfo.from_json(resp.json())

    def delete_snapshot(self, name: str) -> DeletedSnapshot:
        """Delete a template: the name goes now, its data once nothing uses it."""
        resp = self._t.request("DELETE", _api.snapshot_path(name))
        return DeletedSnapshot.from_json(resp.json())

    # -------------------------------------------------------------- templates

    def build_template(
        self,
        name: str,
        *,
        image: str | None = None,
        dockerfile: str | None = None,
        context: str | None = None,
        start_cmd: str | None = None,
        ready_cmd: str | None = None,
        ready_port: int | None = None,
        ready_timeout: int | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        build_args: Mapping[str, str] | None = None,
        registry_username: str | None = None,
        registry_password: str | None = None,
        on_log: OutputCallback | None = None,
        wait: bool = True,
    ) -> TemplateBuildInfo:
        """Build the template ``name`` from a container image (``image=
        "docker://…"``) or a Dockerfile (its text or path; ``context`` is the
        directory COPY reads). The server runs it in a sandbox and snapshots
        it once ``start_cmd`` (default: the Dockerfile's CMD) passes the ready
        check (``ready_cmd`` exits 0, or ``ready_port`` accepts connections).
        ``on_log`` receives the log as it grows. Waits for the end unless
        ``wait=False``; raises :class:`errors.BuildFailed` if it fails."""
        body = _api.template_build_body(
            name,
            image=image,
            dockerfile=dockerfile,
            context=context,
            start_cmd=start_cmd,
            ready_cmd=ready_cmd,
            ready_port=ready_port,
            ready_timeout=ready_timeout,
            vcpus=vcpus,
            memory_mib=memory_mib,
            build_args=build_args,
            registry_username=registry_username,
            registry_password=registry_password,
        )
        build = TemplateBuildInfo.from_json(self._t.request("POST", "/v1/templates", json=body).json())
        if not wait:
            return build
        return self.wait_template_build(name, build.build_id, on_log=on_log)

    def get_template_build(self, name: str, build_id: str, offset: int = 0) -> TemplateBuildInfo:
        resp = self._t.request("GET", _api.template_build_path(name, build_id, offset), safe=True)
        return TemplateBuildInfo.from_json(resp.json())

    def wait_template_build(
        self, name: str, build_id: str, *, on_log: OutputCallback | None = None
    ) -> TemplateBuildInfo:
        """Follow a build to its end; the result carries the whole log."""
        offset, log = 0, []
        while True:
            build = self.get_template_build(name, build_id, offset)
            if build.log:
                log.append(build.log)
                if on_log is not None:
                    on_log(build.log)
            offset = build.log_offset
            if build.done:
                import dataclasses

                build = dataclasses.replace(build, log="".join(log))
                if build.status == "failed":
                    raise errors.BuildFailed(build)
                return build
            time.sleep(_api.BUILD_POLL_S)


def _client(client: Client | None, api_url: str | None, api_key: str | None) -> tuple[Client, bool]:
    if client is not None:
        return client, False
    return Client(api_url, api_key), True


# `Sandbox.resume(id)`: bound to the class by _class_or_instance.
def _resume_sandbox(
    cls: type[Sandbox],
    sandbox_id: str,
    *,
    timeout: int | None = None,
    env: Mapping[str, str] | None = None,
    api_url: str | None = None,
    api_key: str | None = None,
    client: Client | None = None,
) -> Sandbox:
    c, owned = _client(client, api_url, api_key)
    try:
        info = c.resume_sandbox(sandbox_id, timeout=timeout, env=env)
    except BaseException:
        if owned:
            c.close()
        raise
    return cls(info, c, owns_client=owned)


class Sandbox:
    """A sandbox: a microVM running commands and holding files.

    Used as a context manager it is killed on exit, however the block ends.
    """

    def __init__(self, info: SandboxInfo, client: Client, *, owns_client: bool = False) -> None:
        self.info = info
        self._client = client
        self._owns_client = owns_client
        self.commands = Commands(self)
        self.files = Files(self)

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def client(self) -> Client:
        return self._client

    @property
    def traffic_token(self) -> str:
        """Grants access to this sandbox's ports only (not exec or files): send
        it as the header ``X-Ember-Traffic-Token``. Not needed when the
        sandbox is public."""
        return self.info.traffic_token

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, state={self.info.state.value!r})"

    @classmethod
    def create(
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
        client: Client | None = None,
    ) -> Sandbox:
        """Create a sandbox from ``template`` (``"base"``: the base image).

        ``timeout`` is in seconds of inactivity; ``env`` applies to every
        process in it. ``public`` makes its ports reachable without the
        :attr:`traffic_token`; with ``auto_resume`` a request to a port while
        it is paused resumes it.
        """
        c, owned = _client(client, api_url, api_key)
        try:
            sb = c.create_sandbox(
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
                c.close()
            raise
        return cls(sb.info, c, owns_client=owned)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
    ) -> Sandbox:
        """A :class:`Sandbox` for an existing sandbox."""
        c, owned = _client(client, api_url, api_key)
        try:
            info = c.get_sandbox(sandbox_id)
        except BaseException:
            if owned:
                c.close()
            raise
        return cls(info, c, owns_client=owned)

    def _resume_instance(
        self, *, timeout: int | None = None, env: Mapping[str, str] | None = None
    ) -> Sandbox:
        self.info = self._client.resume_sandbox(self.id, timeout=timeout, env=env)
        return self

    #: ``Sandbox.resume(sandbox_id, timeout=None, env=None)`` returns a new
    #: :class:`Sandbox`; ``sandbox.resume()`` resumes this one and returns it.
    resume = _class_or_instance(_resume_sandbox, _resume_instance)

    def refresh(self) -> SandboxInfo:
        """Fetch the sandbox's current state."""
        self.info = self._client.get_sandbox(self.id)
        return self.info

    def pause(self) -> SandboxInfo:
        """Pause: memory and disk are saved; it holds no CPU or memory until resumed."""
        self.info = self._client.pause_sandbox(self.id)
        return self.info

    def snapshot(self, name: str) -> SnapshotInfo:
        """Freeze this sandbox into the template ``name``; it keeps running."""
        return self._client.snapshot_sandbox(self.id, name)

    def set_timeout(self, timeout: int) -> SandboxInfo:
        self.info = self._client.set_sandbox_timeout(self.id, timeout)
        return self.info

    def set_network(
        self, *, allow_out: Sequence[str] | None = None, deny_out: Sequence[str] | None = None
    ) -> SandboxInfo:
        """Replace the egress rules: a running sandbox's at once, a paused
        one's for its resume."""
        self.info = self._client.set_sandbox_network(self.id, allow_out=allow_out, deny_out=deny_out)
        return self.info

    def url(self, port: int) -> str:
        """The URL where ``port`` of the sandbox is served, e.g.
        ``http://8000-sb-....sandboxes.example/`` (on a server with an ingress
        domain) or ``{api_url}/v1/sandboxes/{id}/ports/8000/``. A request
        needs the :attr:`traffic_token` unless the sandbox is public."""
        return _api.port_url(self.info, self._client.api_url, port)

    def get_host(self, port: int) -> str:
        """:meth:`url` without its scheme and trailing slash, as E2B's
        ``get_host``: ``8000-sb-....sandboxes.example`` on a server with an
        ingress domain (what it is meant for); without one, the API's host
        and the port's path (``127.0.0.1:3000/v1/sandboxes/{id}/ports/8000``)."""
        return _api.port_host(self.url(port))

    def set_ingress(self, *, public: bool | None = None, auto_resume: bool | None = None) -> SandboxInfo:
        """Make the ports public (no traffic token needed) or private, and
        choose whether a request to a port while the sandbox is paused resumes
        it; ``None`` keeps a setting as it is."""
        self.info = self._client.set_sandbox_ingress(self.id, public=public, auto_resume=auto_resume)
        return self.info

    def port_forward(self, remote_port: int, local_port: int = 0, host: str = "127.0.0.1") -> PortForward:
        """Listen on ``host:local_port`` (0: a free port, see
        ``.local_port``) and tunnel each connection to ``remote_port`` inside
        the sandbox through the API, for any TCP protocol (a database, SSH,
        HTTP). Use it as a context manager, or call ``close()``::

            with sb.port_forward(5432) as fwd:
                psycopg.connect(host="127.0.0.1", port=fwd.local_port, ...)
        """
        t = self._client._t
        return PortForward(
            t.settings.api_url, t.settings.api_key, self.id, _api._port(remote_port), local_port, host
        )

    def link(self, port: int, path: str = "/") -> str:
        """A one-time link for a browser to ``path`` on ``port``: opening it
        authorises that browser for the port (a cookie) and redirects to the
        page. It expires after a short while, or its first use. Needs a server
        with an ingress domain (else :class:`errors.Conflict`,
        ``no_ingress_domain``)."""
        resp = self._client._t.request(
            "POST", f"{_api.sandbox_path(self.id)}/links", json=_api.link_body(port, path)
        )
        return str(resp.json()["url"])

    def get_metrics(self) -> builtins.list[MetricSample]:
        """Recent CPU, memory, disk and network use, oldest first (every 5 s,
        the last 10 minutes). The sandbox must be running."""
        resp = self._client._t.request("GET", f"{_api.sandbox_path(self.id)}/metrics", safe=True)
        return [MetricSample.from_json(s) for s in resp.json().get("samples", [])]

    def kill(self) -> bool:
        """Destroy the sandbox. False if it was already gone."""
        return self._client.kill_sandbox(self.id)

    def close(self) -> None:
        """Release this object's connections (the sandbox keeps running)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        except errors.EmberError:
            if exc is None:
                raise
            # The block's own exception matters more than a failed cleanup.
        finally:
            self.close()

    @classmethod
    def list(
        cls,
        *,
        state: str | Sequence[str] | None = None,
        template: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
    ) -> builtins.list[SandboxInfo]:
        """Your team's sandboxes, newest first, filtered."""
        c, owned = _client(client, api_url, api_key)
        try:
            return c.list_sandboxes(state=state, template=template, metadata=metadata, limit=limit)
        finally:
            if owned:
                c.close()


class CommandHandle:
    """A command started with ``background=True``."""

    def __init__(self, sandbox: Sandbox, pid: int) -> None:
        self._sandbox = sandbox
        self.pid = pid

    def __repr__(self) -> str:
        return f"CommandHandle(sandbox={self._sandbox.id!r}, pid={self.pid})"

    def wait(
        self, *, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None
    ) -> CommandResult:
        """Follow its output from the start until it exits."""
        t = self._sandbox.client._t
        path = f"{_api.process_path(self._sandbox.id, self.pid)}/events"
        log = EventLog()
        log.pid = self.pid
        return _follow(
            t,
            lambda: t.stream("GET", path, params={"after": 0}, safe=True, timeout=STREAM_TIMEOUT),
            log,
            self._sandbox.id,
            on_stdout,
            on_stderr,
        )

    def send_stdin(self, data: bytes | str) -> None:
        self._sandbox.commands.send_stdin(self.pid, data)

    def close_stdin(self) -> None:
        self._sandbox.commands.send_stdin(self.pid, b"", close=True)

    def kill(self, signal: str = "KILL") -> None:
        self._sandbox.commands.kill(self.pid, signal)


class Commands:
    """Processes in a sandbox: ``sandbox.commands``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        tag: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        tag: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        tag: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> CommandResult | CommandHandle:
        """Run ``cmd`` (a string goes through ``/bin/sh -c``; a list is the argv).

        Waits for it and returns its :class:`CommandResult`, calling
        ``on_stdout``/``on_stderr`` with output as it arrives; raises
        :class:`ember.TimeoutError` (with ``.result``) if ``timeout`` seconds
        pass first. With ``background=True`` returns a :class:`CommandHandle`
        at once. A non-zero exit code is not an exception. ``pty=(rows,
        cols)`` gives it a terminal (its output arrives as stdout; resize it
        with :meth:`resize`).
        """
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
            resp = t.request("POST", path, json=body)
            return CommandHandle(sb, int(resp.json()["pid"]))
        return _follow(
            t,
            lambda: t.stream("POST", path, json=body, timeout=STREAM_TIMEOUT),
            EventLog(),
            sb.id,
            on_stdout,
            on_stderr,
        )

    def list(self) -> builtins.list[ProcessInfo]:
        """Processes started through the API, running or finished."""
        t = self._sandbox.client._t
        resp = t.request("GET", f"{_api.sandbox_path(self._sandbox.id)}/processes", safe=True)
        return [ProcessInfo.from_json(p) for p in resp.json().get("processes", [])]

    def connect(self, pid: int) -> CommandHandle:
        return CommandHandle(self._sandbox, pid)

    def send_stdin(self, pid: int, data: bytes | str, *, close: bool = False) -> None:
        """Write to a process started with ``stdin=True`` (not retried)."""
        t = self._sandbox.client._t
        t.request(
            "POST",
            f"{_api.process_path(self._sandbox.id, pid)}/stdin",
            json=_api.stdin_body(data, close),
        )

    def kill(self, pid: int, signal: str = "KILL") -> None:
        t = self._sandbox.client._t
        t.request(
            "POST",
            f"{_api.process_path(self._sandbox.id, pid)}/signal",
            json={"signal": signal},
        )

    def resize(self, pid: int, *, rows: int, cols: int) -> None:
        """Resize the terminal of a process started with ``pty``."""
        t = self._sandbox.client._t
        t.request(
            "POST",
            f"{_api.process_path(self._sandbox.id, pid)}/resize",
            json={"rows": int(rows), "cols": int(cols)},
            safe=True,
        )


def _follow(
    t: Transport,
    open_first: Callable[[], AbstractContextManager[httpx.Response]],
    log: EventLog,
    sandbox_id: str,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
) -> CommandResult:
    """Relay one command's events until it exits, resuming a broken stream."""
    opener = open_first
    reconnects = 0
    while True:
        try:
            with opener() as resp:
                for line in resp.iter_lines():
                    out = log.feed(line)
                    if out is not None:
                        cb = on_stdout if out.stream == "stdout" else on_stderr
                        if cb is not None:
                            cb(out.text)
                    if log.done:
                        return log.finish()
            broke = "the stream ended before the command exited"
        except StreamBroken as e:
            broke = str(e)
        except httpx.HTTPError as e:
            broke = repr(e)
        if log.pid is None or reconnects >= MAX_RECONNECTS:
            raise errors.ServerError(f"lost the command's output stream: {broke}")
        time.sleep(backoff(reconnects))
        reconnects += 1
        path = f"{_api.process_path(sandbox_id, log.pid)}/events"
        after = log.last_seq
        opener = functools.partial(
            t.stream, "GET", path, params={"after": after}, safe=True, timeout=STREAM_TIMEOUT
        )


class DirWatch:
    """A directory watch (:meth:`Files.watch`), in place once made: iterate
    it for :class:`WatchEvent` s as they happen; ``close()`` (or leaving a
    ``with`` block) ends it."""

    def __init__(self, t: Transport, path: str, params: dict[str, Any]) -> None:
        self._cm = t.stream("GET", path, params=params, safe=True, timeout=STREAM_TIMEOUT)
        resp = self._cm.__enter__()
        self._lines = resp.iter_lines()
        first = self._next_event()
        if first is None or first.type != "started":
            self.close()
            raise errors.ServerError(f"the watch did not start: {first!r}")

    def _next_event(self) -> WatchEvent | None:
        for line in self._lines:
            if line.strip():
                return _api.watch_event(line)
        return None

    def __iter__(self) -> DirWatch:
        return self

    def __next__(self) -> WatchEvent:
        ev = self._next_event()
        if ev is None:
            raise StopIteration
        return ev

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Files:
    """Files in a sandbox: ``sandbox.files``. Paths are absolute."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @property
    def _t(self) -> Transport:
        return self._sandbox.client._t

    @property
    def _base(self) -> str:
        return f"{_api.sandbox_path(self._sandbox.id)}/files"

    def read(self, path: str, *, user: str | None = None) -> bytes:
        resp = self._t.request("GET", self._base, params=_api.file_params(path, user=user), safe=True)
        return resp.content

    def read_text(self, path: str, *, encoding: str = "utf-8", user: str | None = None) -> str:
        return self.read(path, user=user).decode(encoding)

    def iter_bytes(self, path: str, *, user: str | None = None) -> Iterator[bytes]:
        """Stream a large file in chunks."""
        with self._t.stream(
            "GET", self._base, params=_api.file_params(path, user=user), safe=True, timeout=STREAM_TIMEOUT
        ) as resp:
            yield from resp.iter_bytes()

    def write(
        self, path: str, data: bytes | str, *, mode: int | None = None, user: str | None = None
    ) -> FileInfo:
        """Create or replace a file (safe to retry: the same bytes again)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        resp = self._t.request(
            "PUT",
            self._base,
            params=_api.file_params(path, user=user, mode=None if mode is None else format(mode, "o")),
            content=raw,
            headers={"content-type": "application/octet-stream"},
            safe=True,
        )
        return FileInfo.from_json(resp.json())

    def list(self, path: str = "/", *, user: str | None = None) -> builtins.list[FileInfo]:
        resp = self._t.request(
            "GET", f"{self._base}/list", params=_api.file_params(path, user=user), safe=True
        )
        return [FileInfo.from_json(e) for e in resp.json().get("entries", [])]

    def stat(self, path: str, *, user: str | None = None) -> FileInfo:
        resp = self._t.request(
            "GET", f"{self._base}/stat", params=_api.file_params(path, user=user), safe=True
        )
        return FileInfo.from_json(resp.json())

    def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            self.stat(path, user=user)
            return True
        except errors.NotFound:
            return False

    def make_dir(
        self, path: str, *, parents: bool = True, mode: int | None = None, user: str | None = None
    ) -> FileInfo:
        body: dict[str, Any] = {"path": path, "parents": parents}
        if mode is not None:
            body["mode"] = format(mode, "o")
        if user is not None:
            body["user"] = user
        resp = self._t.request("POST", f"{self._base}/mkdir", json=body)
        return FileInfo.from_json(resp.json())

    def watch(self, path: str, *, recursive: bool = False, user: str | None = None) -> DirWatch:
        """Watch directory ``path`` (with ``recursive``, every directory below
        it too); changes from when this returns are reported."""
        return DirWatch(self._t, f"{self._base}/watch", _api.watch_params(path, recursive, user))

    def rename(self, src: str, dst: str, *, overwrite: bool = False, user: str | None = None) -> FileInfo:
        """Move ``src`` to ``dst``; with ``overwrite`` an existing ``dst`` is
        replaced, else it is a :class:`errors.Conflict`."""
        body: dict[str, Any] = {"from": src, "to": dst, "overwrite": overwrite}
        if user is not None:
            body["user"] = user
        resp = self._t.request("POST", f"{self._base}/rename", json=body)
        return FileInfo.from_json(resp.json())

    def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        self._t.request(
            "DELETE",
            self._base,
            params=_api.file_params(path, user=user, recursive=recursive or None),
        )


class Template:
    """Templates built from container images and Dockerfiles::

        from ember import Template

        Template.build("web", dockerfile="./Dockerfile", ready_port=8000, on_log=print)

    A template is a memory snapshot taken with its start command already
    serving; ``Sandbox.create(template="web")`` starts from it.
    """

    @staticmethod
    def build(
        name: str,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> TemplateBuildInfo:
        """:meth:`Client.build_template` on a client of its own (or ``client``)."""
        c, owned = _client(client, api_url, api_key)
        try:
            return c.build_template(name, **options)
        finally:
            if owned:
                c.close()
