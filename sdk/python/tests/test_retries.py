"""The retry policy over real HTTP, sync and asyncio.

A live Ember server cannot be made to drop a connection or answer 503 to a
read on cue, so these tests use a small scripted HTTP server on loopback
that answers each request as told and records what it received. The same
calls run against a live server in test_live_*.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import ember

SANDBOX = {
    "id": "sb-00000000000000000001",
    "state": "running",
    "template": "base",
    "vcpus": 1,
    "memory_mib": 512,
    "metadata": {},
    "network": {"allow_out": [], "deny_out": []},
    "timeout_s": 300,
    "on_timeout": "kill",
    "created_at": "2024-05-01T12:00:03Z",
    "state_changed_at": "2024-05-01T12:00:03Z",
}

Reply = tuple[int, dict | None, float]  # status, JSON body, delay before answering


class Scripted:
    """Answers requests from per-route scripts; the last reply repeats."""

    def __init__(self) -> None:
        self.scripts: dict[tuple[str, str], list[Reply]] = {}
        self.seen: list[tuple[str, str]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _answer(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                route = (self.command, self.path.split("?")[0])
                scripted.seen.append(route)
                script = scripted.scripts.get(route) or [
                    (404, {"code": "not_found", "message": "unscripted"}, 0)
                ]
                status, body, delay = script.pop(0) if len(script) > 1 else script[0]
                if delay:
                    time.sleep(delay)
                data = json.dumps(body).encode() if body is not None else b""
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting

            do_GET = do_POST = do_DELETE = do_PUT = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def script(self, method: str, path: str, *replies: Reply) -> None:
        self.scripts[(method, path)] = list(replies)

    def count(self, method: str, path: str) -> int:
        return self.seen.count((method, path))


@pytest.fixture
def srv() -> Iterator[Scripted]:
    s = Scripted()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


SB = f"/v1/sandboxes/{SANDBOX['id']}"
UNAVAILABLE = (503, {"code": "no_capacity", "message": "busy"}, 0.0)
BAD_GATEWAY = (502, {"code": "host_error", "message": "host down"}, 0.0)


def client(srv: Scripted, **kw: object) -> ember.Client:
    return ember.Client(srv.url, "key", **kw)  # type: ignore[arg-type]


def test_reads_are_retried_on_unavailable_answers(srv: Scripted) -> None:
    srv.script("GET", SB, UNAVAILABLE, BAD_GATEWAY, (200, SANDBOX, 0))
    with client(srv) as c:
        assert c.get_sandbox(SANDBOX["id"]).id == SANDBOX["id"]
    assert srv.count("GET", SB) == 3


def test_retries_are_bounded(srv: Scripted) -> None:
    srv.script("GET", SB, BAD_GATEWAY)
    with client(srv, max_retries=2) as c, pytest.raises(ember.ServerError):
        c.get_sandbox(SANDBOX["id"])
    assert srv.count("GET", SB) == 3


def test_create_exec_and_pause_are_never_retried(srv: Scripted) -> None:
    srv.script("POST", "/v1/sandboxes", UNAVAILABLE, (201, SANDBOX, 0))
    srv.script("POST", f"{SB}/exec", BAD_GATEWAY, (200, {"pid": 1}, 0))
    srv.script("POST", f"{SB}/pause", BAD_GATEWAY, (200, SANDBOX, 0))
    with client(srv) as c:
        with pytest.raises(ember.CapacityError):
            c.create_sandbox()
        sb = ember.Sandbox(ember.SandboxInfo.from_json(SANDBOX), c)
        with pytest.raises(ember.ServerError):
            sb.commands.run("true")
        with pytest.raises(ember.ServerError):
            sb.pause()
    assert srv.count("POST", "/v1/sandboxes") == 1
    assert srv.count("POST", f"{SB}/exec") == 1
    assert srv.count("POST", f"{SB}/pause") == 1


def test_a_slow_read_is_retried_but_a_slow_write_is_not(srv: Scripted) -> None:
    srv.script("GET", SB, (200, SANDBOX, 1.5), (200, SANDBOX, 0))
    srv.script("POST", f"{SB}/pause", (200, SANDBOX, 1.5))
    with client(srv, timeout=0.5) as c:
        assert c.get_sandbox(SANDBOX["id"]).id == SANDBOX["id"]
        with pytest.raises(ember.TimeoutError):
            c.pause_sandbox(SANDBOX["id"])
    assert srv.count("GET", SB) == 2
    assert srv.count("POST", f"{SB}/pause") == 1


def test_kill_is_idempotent(srv: Scripted) -> None:
    gone = dict(SANDBOX, state="destroyed")
    srv.script("DELETE", SB, (409, {"code": "conflict", "message": "it is destroyed"}, 0))
    srv.script("GET", SB, (200, gone, 0))
    with client(srv) as c:
        assert c.kill_sandbox(SANDBOX["id"]) is False
    srv.script("DELETE", SB, (409, {"code": "conflict", "message": "it is pausing"}, 0))
    srv.script("GET", SB, (200, dict(SANDBOX, state="pausing"), 0))
    with client(srv) as c, pytest.raises(ember.Conflict):
        c.kill_sandbox(SANDBOX["id"])


def test_a_pause_answered_202_is_polled_until_it_settles(
    srv: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ember._api, "SETTLE_POLL_S", 0.01)
    pausing, paused = dict(SANDBOX, state="pausing"), dict(SANDBOX, state="paused")
    srv.script("POST", f"{SB}/pause", (202, pausing, 0))
    srv.script("GET", SB, (200, pausing, 0), (200, pausing, 0), (200, paused, 0))
    with client(srv) as c:
        assert c.pause_sandbox(SANDBOX["id"]).state == ember.SandboxState.PAUSED
    assert srv.count("GET", SB) == 3
    # A resume that settles back where it started says so, with the reason.
    srv.script("POST", f"{SB}/resume", (202, dict(SANDBOX, state="resuming"), 0))
    srv.script("GET", SB, (200, dict(paused, failure_reason="no capacity on its host"), 0))
    with client(srv) as c, pytest.raises(ember.ServerError, match="no capacity on its host"):
        c.resume_sandbox(SANDBOX["id"])

    async def go() -> ember.SandboxInfo:
        srv.script("POST", f"{SB}/pause", (202, pausing, 0))
        srv.script("GET", SB, (200, pausing, 0), (200, paused, 0))
        async with ember.AsyncClient(srv.url, "key") as c:
            return await c.pause_sandbox(SANDBOX["id"])

    assert run_async(go).state == ember.SandboxState.PAUSED  # type: ignore[attr-defined]


def test_a_snapshot_answered_202_is_polled_then_fetched(
    srv: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ember._api, "SETTLE_POLL_S", 0.01)
    snapshotting = dict(SANDBOX, state="snapshotting")
    snap = {
        "name": "tpl",
        "build_id": "b1",
        "vcpus": 1,
        "memory_mib": 512,
        "size_bytes": 1,
        "created_at": "2026-12-06T00:00:00Z",
    }
    srv.script("POST", f"{SB}/snapshots", (202, snapshotting, 0))
    srv.script("GET", SB, (200, snapshotting, 0), (200, SANDBOX, 0))
    srv.script("GET", "/v1/snapshots/tpl", (200, snap, 0))
    with client(srv) as c:
        assert c.snapshot_sandbox(SANDBOX["id"], "tpl").build_id == "b1"
    assert srv.count("GET", SB) == 2
    # The sandbox runs again but no snapshot appeared: it failed, and says so.
    srv.script("POST", f"{SB}/snapshots", (202, snapshotting, 0))
    srv.script("GET", SB, (200, SANDBOX, 0))
    with client(srv) as c, pytest.raises(ember.EmberError, match="did not complete"):
        c.snapshot_sandbox(SANDBOX["id"], "gone")

    async def go() -> ember.SnapshotInfo:
        srv.script("POST", f"{SB}/snapshots", (202, snapshotting, 0))
        srv.script("GET", SB, (200, SANDBOX, 0))
        srv.script("GET", "/v1/snapshots/tpl", (200, snap, 0))
        async with ember.AsyncClient(srv.url, "key") as c:
            return await c.snapshot_sandbox(SANDBOX["id"], "tpl")

    assert run_async(go).name == "tpl"  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nobody_listening_is_a_connect_error_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with ember.Client(url, "key", max_retries=2) as c, pytest.raises(ember.ConnectError) as e:
        c.create_sandbox()  # unsafe, but nothing was sent: retried too
    assert url in str(e.value)
    assert time.monotonic() - started >= 0.25, "it backed off between attempts"


def run_async(fn: Callable[[], object]) -> object:
    return asyncio.run(fn())  # type: ignore[arg-type]


def test_async_client_has_the_same_policy(srv: Scripted) -> None:
    srv.script("GET", SB, UNAVAILABLE, (200, SANDBOX, 0))
    srv.script("POST", "/v1/sandboxes", UNAVAILABLE)

    async def go() -> None:
        async with ember.AsyncClient(srv.url, "key") as c:
            assert (await c.get_sandbox(SANDBOX["id"])).state is ember.SandboxState.RUNNING
            with pytest.raises(ember.CapacityError):
                await c.create_sandbox()

    run_async(go)
    assert srv.count("GET", SB) == 2
    assert srv.count("POST", "/v1/sandboxes") == 1
