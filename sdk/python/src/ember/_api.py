"""The REST API's paths and request bodies, shared by the sync and asyncio
clients so both speak exactly the same protocol."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from . import errors
from .models import SandboxInfo, WatchEvent


def template_build_path(name: str, build_id: str, offset: int = 0) -> str:
    return f"/v1/templates/{quote(name, safe='')}/builds/{quote(build_id, safe='')}?offset={int(offset)}"


#: How often a template build is polled for progress.
BUILD_POLL_S = 0.5


def template_build_body(
    name: str,
    *,
    image: str | None,
    dockerfile: str | None,
    context: str | None,
    start_cmd: str | None,
    ready_cmd: str | None,
    ready_port: int | None,
    ready_timeout: int | None,
    vcpus: int | None,
    memory_mib: int | None,
    build_args: Mapping[str, str] | None,
    registry_username: str | None,
    registry_password: str | None,
) -> dict[str, Any]:
    """The body of ``POST /v1/templates``. ``dockerfile`` is the Dockerfile's
    text or a path to one; ``context`` a directory, packed here as a tar
    (default: the Dockerfile's directory when a path was given)."""
    import base64
    import io
    import os
    import tarfile

    if (image is None) == (dockerfile is None):
        raise errors.InvalidRequest("give image= (docker://…) or dockerfile=, exactly one")
    body: dict[str, Any] = {"name": name}
    if image is not None:
        body["image"] = image
    if dockerfile is not None:
        text = dockerfile
        if "\n" not in dockerfile and os.path.isfile(dockerfile):
            with open(dockerfile, encoding="utf-8") as f:
                text = f.read()
            if context is None:
                context = os.path.dirname(os.path.abspath(dockerfile))
        body["dockerfile"] = text
        if context is not None:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                tar.add(context, arcname=".")
            body["context_tar_base64"] = base64.b64encode(buf.getvalue()).decode()
    for key, value in (
        ("start_cmd", start_cmd),
        ("ready_cmd", ready_cmd),
        ("ready_port", ready_port),
        ("ready_timeout_s", ready_timeout),
        ("vcpus", vcpus),
        ("memory_mib", memory_mib),
        ("registry_username", registry_username),
        ("registry_password", registry_password),
    ):
        if value is not None:
            body[key] = value
    if build_args:
        body["build_args"] = dict(build_args)
    return body


def sandbox_path(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{quote(sandbox_id, safe='')}"


def snapshot_path(name: str) -> str:
    return f"/v1/snapshots/{quote(name, safe='')}"


def process_path(sandbox_id: str, pid: int) -> str:
    return f"{sandbox_path(sandbox_id)}/processes/{int(pid)}"


def create_body(
    *,
    template: str,
    timeout: int,
    metadata: Mapping[str, str] | None,
    env: Mapping[str, str] | None,
    vcpus: int | None,
    memory_mib: int | None,
    on_timeout: str,
    allow_out: Sequence[str] | None,
    deny_out: Sequence[str] | None,
    cold: bool = False,
    public: bool = False,
    auto_resume: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "template": template,
        "timeout_s": int(timeout),
        "on_timeout": on_timeout,
        "metadata": dict(metadata or {}),
        "env": dict(env or {}),
        "network": {"allow_out": list(allow_out or []), "deny_out": list(deny_out or [])},
    }
    if vcpus is not None:
        body["vcpus"] = vcpus
    if memory_mib is not None:
        body["memory_mib"] = memory_mib
    # Sent only when set: an older server rejects fields it does not know.
    if cold:
        body["cold"] = True
    if public:
        body["public"] = True
    if auto_resume:
        body["auto_resume"] = True
    return body


def ingress_body(public: bool | None, auto_resume: bool | None) -> dict[str, Any]:
    """``PUT /ingress``: a field left out keeps its value."""
    body: dict[str, Any] = {}
    if public is not None:
        body["public"] = bool(public)
    if auto_resume is not None:
        body["auto_resume"] = bool(auto_resume)
    return body


def _port(port: int) -> int:
    p = int(port)
    if not 1 <= p <= 65535:
        raise ValueError(f"a port is 1 to 65535, not {port!r}")
    return p


def link_body(port: int, path: str) -> dict[str, Any]:
    return {"port": _port(port), "path": path}


def port_url(info: SandboxInfo, api_url: str, port: int) -> str:
    """The URL of ``port`` of a sandbox: its ``port_url`` with the port put
    in, on the API's base URL when that is a path (the server has no
    ingress domain)."""
    if not info.port_url:
        raise errors.EmberError(
            f"the server did not say where sandbox {info.id}'s ports are served "
            "(it predates ports: upgrade it)"
        )
    url = info.port_url.replace("{port}", str(_port(port)))
    if url.startswith("/"):
        url = api_url.rstrip("/") + url
    return url


def port_host(url: str) -> str:
    """A port URL without its scheme and trailing slash: ``host[:port]`` on
    the host form, ``host[:port]/v1/sandboxes/{id}/ports/{port}`` on the
    path form."""
    parts = urlsplit(url)
    return parts.netloc + parts.path.rstrip("/")


def argv(cmd: str | Sequence[str]) -> tuple[str, list[str]]:
    """A string runs through ``/bin/sh -c``; a sequence is the argv itself."""
    if isinstance(cmd, str):
        return "/bin/sh", ["-c", cmd]
    items = [str(c) for c in cmd]
    if not items:
        raise ValueError("an empty command")
    return items[0], items[1:]


def exec_body(
    cmd: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    stdin: bool,
    background: bool,
    tag: str | None,
    pty: tuple[int, int] | None = None,
) -> dict[str, Any]:
    program, args = argv(cmd)
    body: dict[str, Any] = {
        "cmd": program,
        "args": args,
        "env": dict(env or {}),
        "stdin": stdin,
        "background": background,
    }
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = user
    if timeout is not None:
        body["timeout_ms"] = max(1, int(timeout * 1000))
    if tag is not None:
        body["tag"] = tag
    if pty is not None:
        rows, cols = pty
        body["pty"] = {"rows": int(rows), "cols": int(cols)}
    return body


def list_params(
    *,
    state: str | Sequence[str] | None,
    template: str | None,
    metadata: Mapping[str, str] | None,
    page_size: int,
    page_token: str | None,
) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = [("limit", str(page_size))]
    if state is not None:
        params.append(("state", state if isinstance(state, str) else ",".join(map(str, state))))
    if template is not None:
        params.append(("template", template))
    for k, v in (metadata or {}).items():
        params.append((f"metadata.{k}", v))
    if page_token:
        params.append(("page_token", page_token))
    return params


def file_params(path: str, **extra: Any) -> dict[str, str]:
    params = {"path": path}
    for k, v in extra.items():
        if v is None:
            continue
        params[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
    return params


def stdin_body(data: bytes | str, close: bool) -> dict[str, Any]:
    import base64

    raw = data.encode() if isinstance(data, str) else bytes(data)
    body: dict[str, Any] = {"close": close}
    if raw:
        body["data_b64"] = base64.b64encode(raw).decode()
    return body


#: A pause or resume the server answered 202 (still in progress) is polled
#: this often, for at most this long, until the sandbox settles.
SETTLE_POLL_S = 0.5
SETTLE_LIMIT_S = 3600.0


def settled(info: Any, wanted: str, verb: str) -> bool:
    """Whether a sandbox polled after a 202 has settled: True once it is
    ``wanted``; False while ``verb`` (pausing/resuming) is still going on.
    Raises if it settled elsewhere (failed, or back where it started)."""
    state = str(info.state)
    if state == wanted:
        return True
    if state == verb:
        return False
    reason = f": {info.failure_reason}" if info.failure_reason else ""
    raise errors.ServerError(
        f"sandbox {info.id} is {state} after the {verb.removesuffix('ing')} went on in the background{reason}"
    )


def watch_params(path: str, recursive: bool, user: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"path": path, "recursive": "true" if recursive else "false"}
    if user is not None:
        params["user"] = user
    return params


def watch_event(line: str) -> WatchEvent:
    """One line of a watch stream; an ``error`` line raises."""
    d = json.loads(line)
    if d.get("type") == "error":
        raise errors.ServerError(f"the watch broke: {d.get('message')}")
    return WatchEvent.from_json(d)
