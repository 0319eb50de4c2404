"""The SDK's pure parts: settings, error mapping, event folding, models,
request bodies and the retry decision. No server needed."""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import ember
from ember import _api, _config, errors
from ember._exec import EventLog, StreamBroken
from ember._transport import should_retry


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("EMBER_API_URL", raising=False)
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "ember").mkdir()
    return tmp_path / "ember" / "config.toml"


def test_arguments_beat_environment_beat_config_file(no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_env.write_text('api_url = "http://file:1/"\napi_key = "file-key"\n')
    s = _config.resolve()
    assert (s.api_url, s.api_key) == ("http://file:1", "file-key")
    monkeypatch.setenv("EMBER_API_URL", "http://env:2")
    monkeypatch.setenv("EMBER_API_KEY", "env-key")
    s = _config.resolve()
    assert (s.api_url, s.api_key) == ("http://env:2", "env-key")
    s = _config.resolve("http://arg:3", "arg-key")
    assert (s.api_url, s.api_key) == ("http://arg:3", "arg-key")


def test_defaults_and_a_missing_key_says_how_to_set_one(no_env: Path) -> None:
    with pytest.raises(ember.AuthError) as e:
        _config.resolve()
    assert "EMBER_API_KEY" in str(e.value)
    assert str(no_env) in str(e.value)
    assert _config.resolve(api_key="k").api_url == "http://127.0.0.1:3000"


def test_bad_config_files_are_config_errors(no_env: Path) -> None:
    no_env.write_text('api_ur = "x"\n')
    with pytest.raises(ember.ConfigError, match="api_ur"):
        _config.resolve()
    no_env.write_text("api_key = 3\n")
    with pytest.raises(ember.ConfigError, match="string"):
        _config.resolve()
    no_env.write_text("not toml [")
    with pytest.raises(ember.ConfigError):
        _config.resolve()
    with pytest.raises(ember.ConfigError, match="http"):
        _config.resolve("ftp://x", "k")


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_request", ember.InvalidRequest),
        (422, "template_locked", ember.InvalidRequest),
        (401, "unauthorized", ember.AuthError),
        (403, "forbidden", ember.AuthError),
        (404, "not_found", ember.NotFound),
        (409, "conflict", ember.Conflict),
        (503, "no_capacity", ember.CapacityError),
        (502, "host_error", ember.ServerError),
        (500, "internal", ember.ServerError),
        (418, "brand_new_code", ember.InvalidRequest),
        (599, "brand_new_code", ember.ServerError),
    ],
)
def test_api_error_codes_map_to_exceptions(status: int, code: str, cls: type) -> None:
    body = json.dumps({"code": code, "message": "what to change", "field": "timeout_s"}).encode()
    err = errors.error_from_body(status, body)
    assert type(err) is cls
    assert (err.status, err.code, err.message, err.field) == (status, code, "what to change", "timeout_s")
    assert isinstance(err, ember.EmberError)
    assert str(err) == f"what to change ({code})"


def test_non_json_errors_still_map_by_status() -> None:
    err = errors.error_from_body(404, b"<html>nope</html>")
    assert isinstance(err, ember.NotFound)
    assert "nope" in err.message
    assert isinstance(errors.error_from_body(502, b""), ember.ServerError)


def test_sdk_timeouts_and_connect_errors_are_also_builtin_ones() -> None:
    assert issubclass(ember.TimeoutError, builtins.TimeoutError)
    assert issubclass(ember.ConnectError, builtins.ConnectionError)


def lines(*events: dict) -> list[str]:
    return [json.dumps(e) for e in events]


def test_events_fold_into_a_result_and_replays_are_dropped() -> None:
    log = EventLog()
    out = []
    for line in lines(
        {"type": "started", "seq": 1, "pid": 42},
        {"type": "stdout", "seq": 2, "text": "hel"},
        {"type": "stderr", "seq": 3, "data_b64": base64.b64encode(b"\xff!").decode()},
        {"type": "stdout", "seq": 2, "text": "hel"},  # replayed after a reconnect
        {"type": "stdout", "seq": 4, "text": "lo\n"},
        {"type": "future_event", "seq": 5},
        {"type": "exit", "seq": 6, "exit_code": 3, "timed_out": False},
    ):
        o = log.feed(line)
        if o is not None:
            out.append((o.stream, o.text))
    assert log.done and log.pid == 42 and log.last_seq == 6
    r = log.finish()
    assert (r.pid, r.stdout, r.exit_code, r.signal, r.ok) == (42, "hello\n", 3, None, False)
    assert r.stderr_bytes == b"\xff!"
    assert out == [("stdout", "hel"), ("stderr", "\ufffd!"), ("stdout", "lo\n")]


def test_a_character_split_across_chunks_reaches_callbacks_whole() -> None:
    log = EventLog()
    snow = "☃".encode()
    texts = []
    for i, part in enumerate([snow[:1], snow[1:]], start=1):
        o = log.feed(json.dumps({"type": "stdout", "seq": i, "data_b64": base64.b64encode(part).decode()}))
        if o is not None:
            texts.append(o.text)
    assert texts == ["☃"]


def test_error_events_break_the_stream_and_timeouts_raise_with_the_output() -> None:
    log = EventLog()
    with pytest.raises(StreamBroken, match="host_error"):
        log.feed(json.dumps({"type": "error", "code": "host_error", "message": "gone"}))
    log = EventLog()
    log.feed(json.dumps({"type": "stdout", "seq": 1, "text": "partial"}))
    log.feed(json.dumps({"type": "exit", "seq": 2, "signal": 9, "timed_out": True}))
    with pytest.raises(ember.TimeoutError) as e:
        log.finish()
    assert e.value.result.stdout == "partial"
    assert e.value.result.signal == 9


def test_models_tolerate_what_a_newer_server_adds() -> None:
    info = ember.SandboxInfo.from_json(
        {
            "id": "sb-1",
            "state": "hibernating",
            "template": "base",
            "vcpus": 1,
            "memory_mib": 512,
            "metadata": {"a": "b"},
            "network": {"allow_out": ["10.0.0.0/8"], "deny_out": []},
            "timeout_s": 300,
            "on_timeout": "kill",
            "created_at": "2024-05-01T12:00:03.123Z",
            "state_changed_at": "2024-05-01T12:00:04Z",
            "brand_new_field": True,
        }
    )
    assert info.state is ember.SandboxState.UNKNOWN
    assert info.allow_out == ["10.0.0.0/8"]
    assert info.created_at.year == 2024 and info.created_at.tzinfo is not None
    f = ember.FileInfo.from_json(
        {
            "path": "/a",
            "name": "a",
            "type": "directory",
            "size": 0,
            "mode": "755",
            "modified_at": "",
            "uid": 0,
            "gid": 0,
        }
    )
    assert f.is_dir and f.mode == 0o755 and f.modified_at is None


def test_commands_and_bodies() -> None:
    assert _api.argv("echo hi | wc") == ("/bin/sh", ["-c", "echo hi | wc"])
    assert _api.argv(["python3", "-c", "print(1)"]) == ("python3", ["-c", "print(1)"])
    with pytest.raises(ValueError):
        _api.argv([])
    body = _api.exec_body(
        ["ls"], env=None, cwd="/tmp", user=None, timeout=1.5, stdin=False, background=True, tag=None
    )
    assert body == {
        "cmd": "ls",
        "args": [],
        "env": {},
        "stdin": False,
        "background": True,
        "cwd": "/tmp",
        "timeout_ms": 1500,
    }
    assert _api.sandbox_path("a/b") == "/v1/sandboxes/a%2Fb"
    params = _api.list_params(
        state=["running", "paused"], template=None, metadata={"k": "v"}, page_size=5, page_token="t"
    )
    assert params == [("limit", "5"), ("state", "running,paused"), ("metadata.k", "v"), ("page_token", "t")]
    assert _api.stdin_body("hi", True) == {"close": True, "data_b64": "aGk="}
    assert _api.stdin_body(b"", True) == {"close": True}


def test_only_safe_calls_are_retried_once_they_may_have_arrived() -> None:
    req = httpx.Request("GET", "http://x")
    connect = httpx.ConnectError("refused", request=req)
    read = httpx.ReadTimeout("slow", request=req)
    broken = httpx.RemoteProtocolError("cut", request=req)
    for safe in (True, False):
        assert should_retry(safe=safe, attempt=0, max_retries=3, exc=connect), "nothing was sent"
    assert should_retry(safe=True, attempt=0, max_retries=3, exc=read)
    assert not should_retry(safe=False, attempt=0, max_retries=3, exc=read)
    assert not should_retry(safe=False, attempt=0, max_retries=3, exc=broken)
    assert should_retry(safe=True, attempt=0, max_retries=3, status=503)
    assert not should_retry(safe=False, attempt=0, max_retries=3, status=503)
    assert not should_retry(safe=True, attempt=0, max_retries=3, status=409)
    assert not should_retry(safe=True, attempt=3, max_retries=3, exc=connect), "bounded"


# ------------------------------------------------------------------ ports

SANDBOX: dict[str, Any] = {
    "id": "sb-abc",
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
    "public": False,
    "auto_resume": False,
    "traffic_token": "traffic-secret-123",
    "port_url": "/v1/sandboxes/sb-abc/ports/{port}/",
}
HOST_FORM = {"domain": "sandboxes.test", "port_url": "http://{port}-sb-abc.sandboxes.test/"}
API_URL = "http://127.0.0.1:3000"


class FakeApi:
    """The sandbox calls of an Ember server, in memory, as an httpx transport;
    ``seen`` holds each request's method, path and JSON body."""

    def __init__(self, **sandbox: Any) -> None:
        self.sandbox = {**SANDBOX, **sandbox}
        self.seen: list[tuple[str, str, Any]] = []
        self.ingress_domain = True

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else None
        self.seen.append((req.method, req.url.path, body))
        route = (req.method, req.url.path)
        if route == ("POST", "/v1/sandboxes"):
            self.sandbox.update(public=body.get("public", False), auto_resume=body.get("auto_resume", False))
            return httpx.Response(201, json={**self.sandbox, "access_token": "access-secret-456"})
        if route == ("PUT", "/v1/sandboxes/sb-abc/ingress"):
            self.sandbox.update(body)
            return httpx.Response(200, json=self.sandbox)
        if route == ("POST", "/v1/sandboxes/sb-abc/links"):
            if not self.ingress_domain:
                return httpx.Response(409, json={"code": "no_ingress_domain", "message": "no domain"})
            url = f"http://{body['port']}-sb-abc.sandboxes.test{body['path']}?ember_link=t1"
            return httpx.Response(201, json={"url": url, "expires_at": "2024-05-01T12:01:03Z"})
        return httpx.Response(404, json={"code": "not_found", "message": "unscripted"})


def fake_client(api: FakeApi) -> ember.Client:
    c = ember.Client(API_URL, "key")
    c._t.client = httpx.Client(base_url=API_URL, headers=c._t.headers, transport=httpx.MockTransport(api))
    return c


def fake_async_client(api: FakeApi) -> ember.AsyncClient:
    c = ember.AsyncClient(API_URL, "key")
    c._t.client = httpx.AsyncClient(
        base_url=API_URL, headers=c._t.headers, transport=httpx.MockTransport(api)
    )
    return c


def test_port_fields_parse_and_an_older_server_leaves_them_out() -> None:
    info = ember.SandboxInfo.from_json({**SANDBOX, **HOST_FORM, "public": True, "auto_resume": True})
    assert (info.public, info.auto_resume, info.traffic_token) == (True, True, "traffic-secret-123")
    assert (info.domain, info.port_url) == ("sandboxes.test", "http://{port}-sb-abc.sandboxes.test/")
    old = {
        k: v for k, v in SANDBOX.items() if k not in ("public", "auto_resume", "traffic_token", "port_url")
    }
    info = ember.SandboxInfo.from_json(old)
    assert (info.public, info.auto_resume, info.traffic_token, info.domain, info.port_url) == (
        False,
        False,
        "",
        None,
        "",
    )
    sb = ember.Sandbox(info, ember.Client(API_URL, "key"))
    with pytest.raises(ember.EmberError, match="ports"):
        sb.url(8000)


def test_reprs_hold_no_tokens() -> None:
    info = ember.SandboxInfo.from_json({**SANDBOX, "access_token": "access-secret-456"})
    assert info.access_token == "access-secret-456" and info.traffic_token == "traffic-secret-123"
    shown = [
        repr(info),
        str(info),
        repr(ember.Sandbox(info, ember.Client(API_URL, "key"))),
        repr(ember.AsyncSandbox(info, ember.AsyncClient(API_URL, "key"))),
    ]
    for text in shown:
        assert "sb-abc" in text
        assert "traffic-secret" not in text and "access-secret" not in text, text


def test_url_and_host_on_the_host_form() -> None:
    info = ember.SandboxInfo.from_json({**SANDBOX, **HOST_FORM})
    for sb in (
        ember.Sandbox(info, ember.Client(API_URL, "key")),
        ember.AsyncSandbox(info, ember.AsyncClient(API_URL, "key")),
    ):
        assert sb.url(8000) == "http://8000-sb-abc.sandboxes.test/"
        assert sb.get_host(8000) == "8000-sb-abc.sandboxes.test"
        assert sb.traffic_token == "traffic-secret-123"
        with pytest.raises(ValueError):
            sb.url(0)
    on_a_port = ember.SandboxInfo.from_json({**SANDBOX, "port_url": "https://{port}-sb-abc.x.test:8443/"})
    sb = ember.Sandbox(on_a_port, ember.Client(API_URL, "key"))
    assert sb.url(3000) == "https://3000-sb-abc.x.test:8443/"
    assert sb.get_host(3000) == "3000-sb-abc.x.test:8443"


def test_url_and_host_on_the_path_form_are_on_the_api() -> None:
    info = ember.SandboxInfo.from_json(SANDBOX)
    for sb in (
        ember.Sandbox(info, ember.Client(API_URL + "/", "key")),
        ember.AsyncSandbox(info, ember.AsyncClient(API_URL, "key")),
    ):
        assert sb.url(8000) == "http://127.0.0.1:3000/v1/sandboxes/sb-abc/ports/8000/"
        assert sb.get_host(8000) == "127.0.0.1:3000/v1/sandboxes/sb-abc/ports/8000"


def test_create_sends_public_and_auto_resume_only_when_set() -> None:
    api = FakeApi()
    with fake_client(api) as c:
        sb = ember.Sandbox.create(client=c)
        assert "public" not in api.seen[-1][2] and "auto_resume" not in api.seen[-1][2]
        assert (sb.info.public, sb.info.auto_resume) == (False, False)
        sb = ember.Sandbox.create(client=c, public=True, auto_resume=True)
        assert api.seen[-1][:2] == ("POST", "/v1/sandboxes")
        assert (api.seen[-1][2]["public"], api.seen[-1][2]["auto_resume"]) == (True, True)
        assert (sb.info.public, sb.info.auto_resume) == (True, True)
        assert sb.info.access_token == "access-secret-456"
        assert "access-secret" not in repr(sb.info)

    async def main() -> None:
        api = FakeApi()
        async with fake_async_client(api) as c:
            sb = await ember.AsyncSandbox.create(client=c, public=True)
            assert api.seen[-1][2]["public"] is True and "auto_resume" not in api.seen[-1][2]
            assert sb.info.public and not sb.info.auto_resume
            sb = await c.create_sandbox(auto_resume=True)
            assert api.seen[-1][2]["auto_resume"] is True and "public" not in api.seen[-1][2]

    asyncio.run(main())


def test_set_ingress_sends_only_what_changes_and_updates_the_info() -> None:
    assert _api.ingress_body(None, None) == {}
    assert _api.ingress_body(False, True) == {"public": False, "auto_resume": True}
    api = FakeApi()
    with fake_client(api) as c:
        sb = ember.Sandbox(ember.SandboxInfo.from_json(SANDBOX), c)
        info = sb.set_ingress(public=True)
        assert api.seen[-1] == ("PUT", "/v1/sandboxes/sb-abc/ingress", {"public": True})
        assert info.public and not info.auto_resume and sb.info is info
        info = c.set_sandbox_ingress("sb-abc", auto_resume=True)
        assert api.seen[-1] == ("PUT", "/v1/sandboxes/sb-abc/ingress", {"auto_resume": True})
        assert info.public and info.auto_resume

    async def main() -> None:
        api = FakeApi()
        async with fake_async_client(api) as c:
            sb = ember.AsyncSandbox(ember.SandboxInfo.from_json(SANDBOX), c)
            info = await sb.set_ingress(auto_resume=True)
            assert api.seen[-1] == ("PUT", "/v1/sandboxes/sb-abc/ingress", {"auto_resume": True})
            assert info.auto_resume and not info.public and sb.info is info
            info = await c.set_sandbox_ingress("sb-abc", public=True, auto_resume=False)
            assert api.seen[-1][2] == {"public": True, "auto_resume": False}
            assert info.public and not info.auto_resume

    asyncio.run(main())


def test_link_asks_for_a_one_time_url() -> None:
    api = FakeApi()
    with fake_client(api) as c:
        sb = ember.Sandbox(ember.SandboxInfo.from_json({**SANDBOX, **HOST_FORM}), c)
        assert sb.link(8000) == "http://8000-sb-abc.sandboxes.test/?ember_link=t1"
        assert api.seen[-1] == ("POST", "/v1/sandboxes/sb-abc/links", {"port": 8000, "path": "/"})
        sb.link(8000, "/app?x=1")
        assert api.seen[-1][2] == {"port": 8000, "path": "/app?x=1"}
        api.ingress_domain = False
        with pytest.raises(ember.Conflict) as e:
            sb.link(8000)
        assert e.value.code == "no_ingress_domain"

    async def main() -> None:
        api = FakeApi()
        async with fake_async_client(api) as c:
            sb = ember.AsyncSandbox(ember.SandboxInfo.from_json({**SANDBOX, **HOST_FORM}), c)
            assert await sb.link(3000, "/x") == "http://3000-sb-abc.sandboxes.test/x?ember_link=t1"
            assert api.seen[-1] == ("POST", "/v1/sandboxes/sb-abc/links", {"port": 3000, "path": "/x"})

    asyncio.run(main())


def test_port_forward_endpoints_and_refusals() -> None:
    from ember import _forward

    assert _forward._endpoint("https://api.example.com/ember/") == ("api.example.com", 443, True, "/ember")
    assert _forward._endpoint("http://127.0.0.1:3000") == ("127.0.0.1", 3000, False, "")
    with pytest.raises(ember.EmberError, match="expected http"):
        _forward._endpoint("ftp://x")
    req = _forward._request("http://h:1/p", "ember_k", "sb-x", 5432).decode()
    assert req.startswith("GET /p/v1/sandboxes/sb-x/tunnel/5432 HTTP/1.1\r\n"), req
    assert "Upgrade: ember-tcp\r\n" in req and "Authorization: Bearer ember_k\r\n" in req
    _forward._check_head(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "sb-x", 1)
    head = b'HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n\r\n{"message":"nothing listens"}'
    with pytest.raises(ember.EmberError, match="502 Bad Gateway.*nothing listens"):
        _forward._check_head(head, "sb-x", 1)


def _https_server(tmp_path: Path) -> tuple[str, Path, Any]:
    """An HTTPS server on 127.0.0.1 with a fresh self-signed certificate
    (made by the openssl CLI) answering ``{"status": "ok"}``."""
    import http.server
    import ssl
    import subprocess
    import threading

    cert, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"https://127.0.0.1:{server.server_address[1]}", cert, server


def test_an_https_server_is_verified_against_ember_ca(
    no_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ember._transport import Transport

    url, cert, server = _https_server(tmp_path)
    try:
        untrusting = Transport(_config.resolve(url, "k"), max_retries=0)
        with pytest.raises(ember.EmberError):
            untrusting.request("GET", "/healthz")
        monkeypatch.setenv("EMBER_CA", str(cert))
        trusting = Transport(_config.resolve(url, "k"), max_retries=0)
        assert trusting.request("GET", "/healthz").json() == {"status": "ok"}
        monkeypatch.delenv("EMBER_CA")
        no_env.write_text(f'ca = "{cert}"\n')
        assert _config.resolve(url, "k").ca == str(cert)
        monkeypatch.setenv("EMBER_CA", str(tmp_path / "missing.pem"))
        with pytest.raises(ember.ConfigError, match="missing.pem"):
            _config.resolve(url, "k").ssl_context()
    finally:
        server.shutdown()


def test_settings_never_show_the_key() -> None:
    s = _config.Settings(api_url="http://h:1", api_key="ember_secret")
    assert "ember_secret" not in repr(s)
