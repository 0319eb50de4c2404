"""The synchronous SDK against a live ``ember server`` booting real microVMs."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
from conftest import Live

import ember
from ember import Sandbox, SandboxState, Template


def test_sandbox_lifecycle(api: Live) -> None:
    tag = uuid.uuid4().hex[:8]
    sb = Sandbox.create(timeout=600, metadata={"suite": "sync", "tag": tag}, env={"GREETING": "hello"})
    try:
        assert sb.id.startswith("sb-")
        assert sb.info.state is SandboxState.RUNNING
        assert sb.info.metadata == {"suite": "sync", "tag": tag}
        assert sb.info.access_token and sb.info.access_token.startswith("embersb_")

        # Commands: a string goes through the shell, a list is the argv.
        seen_out: list[str] = []
        seen_err: list[str] = []
        r = sb.commands.run(
            "echo out $GREETING; echo err >&2; exit 7",
            on_stdout=seen_out.append,
            on_stderr=seen_err.append,
        )
        assert (r.stdout, r.stderr, r.exit_code, r.ok) == ("out hello\n", "err\n", 7, False)
        assert "".join(seen_out) == "out hello\n" and "".join(seen_err) == "err\n"
        r = sb.commands.run(
            ["python3", "-c", "import os; print(os.getcwd(), os.environ['X'])"], cwd="/tmp", env={"X": "1"}
        )
        assert (r.stdout, r.exit_code) == ("/tmp 1\n", 0)
        r = sb.commands.run("kill -9 $$")
        assert (r.exit_code, r.signal) == (None, 9)
        with pytest.raises(ember.TimeoutError) as e:
            sb.commands.run("echo before; sleep 30", timeout=1)
        assert e.value.result.stdout == "before\n" and e.value.result.timed_out
        with pytest.raises(ember.NotFound):
            sb.commands.run(["/no/such/program"])

        # Background with stdin.
        h = sb.commands.run("cat; echo done", background=True, stdin=True)
        assert isinstance(h, ember.CommandHandle) and h.pid > 0
        h.send_stdin("line one\n")
        h.send_stdin(b"line two\n")
        h.close_stdin()
        r = h.wait()
        assert (r.stdout, r.exit_code) == ("line one\nline two\ndone\n", 0)
        procs = {p.pid: p for p in sb.commands.list()}
        assert procs[h.pid].background and not procs[h.pid].running and procs[h.pid].exit_code == 0
        h = sb.commands.run(["sleep", "300"], background=True)
        h.kill()
        assert h.wait().signal == 9

        # Metrics: from the sandbox's cgroup and host link, at least one sample.
        samples = sb.get_metrics()
        assert samples, "a running sandbox has at least one sample"
        last = samples[-1]
        assert isinstance(last, ember.MetricSample)
        assert last.memory_bytes > 0 and last.memory_limit_bytes >= 512 << 20, last
        assert last.pids > 0 and last.disk_bytes > 0 and last.cpu_seconds > 0, last

        # Files.
        blob = bytes(range(256)) * 1000
        info = sb.files.write("/root/blob.bin", blob, mode=0o600)
        assert (info.size, info.mode, info.type) == (len(blob), 0o600, ember.FileType.FILE)
        assert sb.files.read("/root/blob.bin") == blob
        assert b"".join(sb.files.iter_bytes("/root/blob.bin")) == blob
        sb.files.write("/root/hello.txt", "héllo\n")
        assert sb.files.read_text("/root/hello.txt") == "héllo\n"
        sb.files.make_dir("/root/d/e")
        names = {f.name: f for f in sb.files.list("/root")}
        assert {"blob.bin", "hello.txt", "d"} <= set(names) and names["d"].is_dir
        assert sb.files.exists("/root/hello.txt")
        sb.files.remove("/root/hello.txt")
        assert not sb.files.exists("/root/hello.txt")
        with pytest.raises(ember.NotFound):
            sb.files.read("/root/hello.txt")
        with pytest.raises(ember.InvalidRequest):
            sb.files.read("relative/path")
        sb.files.remove("/root/d", recursive=True)

        # Listing, filtered by metadata.
        found = Sandbox.list(metadata={"tag": tag})
        assert [s.id for s in found] == [sb.id]
        assert Sandbox.list(metadata={"tag": "no-such-tag"}) == []

        # Pause: nothing runs; resume (class form): the files are back.
        assert sb.pause().state is SandboxState.PAUSED
        with pytest.raises(ember.Conflict):
            sb.commands.run("true")
        with pytest.raises(ember.Conflict):
            sb.pause()
        resumed = Sandbox.resume(sb.id, timeout=900)
        try:
            assert resumed.id == sb.id and resumed.info.state is SandboxState.RUNNING
            assert resumed.info.timeout == 900
            assert resumed.files.read("/root/blob.bin") == blob
            assert resumed.commands.run("echo $GREETING").stdout == "hello\n"
        finally:
            resumed.close()
        # …and the instance form.
        sb.pause()
        assert sb.resume() is sb and sb.info.state is SandboxState.RUNNING
        assert sb.set_timeout(1200).timeout == 1200

        assert sb.kill() is True
        assert sb.refresh().state is SandboxState.DESTROYED
        assert sb.kill() is False, "killing twice is not an error"
    finally:
        sb.kill()
        sb.close()


def create_from(template: str) -> Sandbox:
    """Create from a template made moments ago. The control plane learns that
    the host holds the new build at its next poll of the host and answers
    no_capacity until then (reported to the control plane's owner), so that
    one answer is retried here for a few seconds."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return Sandbox.create(template=template, timeout=300)
        except ember.CapacityError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_snapshots_and_templates(api: Live) -> None:
    name = f"py-{uuid.uuid4().hex[:8]}"
    with Sandbox.create(timeout=300) as sb:
        sb.files.write("/root/state", "frozen\n")
        snap = sb.snapshot(name)
        assert (snap.name, snap.source_sandbox_id) == (name, sb.id)
        assert sb.refresh().state is SandboxState.RUNNING, "the source keeps running"
        with pytest.raises(ember.Conflict):
            sb.snapshot(name)
        with ember.Client() as c:
            assert name in [s.name for s in c.list_snapshots()]
            assert c.get_snapshot(name).build_id == snap.build_id
            with create_from(name) as child:
                assert child.info.template == name
                assert child.files.read_text("/root/state") == "frozen\n"
            deleted = c.delete_snapshot(name)
            assert deleted.name == name
            with pytest.raises(ember.NotFound):
                c.get_snapshot(name)
    with pytest.raises(ember.NotFound):
        Sandbox.create(template=name)


def _wheel(path: Path) -> None:
    """A pure-Python wheel of ``hello_ember``: an HTTP server on port 8000."""
    import base64
    import hashlib
    import zipfile

    files = {
        "hello_ember/__init__.py": "GREETING = 'installed by pip from the context'\n",
        "hello_ember/__main__.py": (
            "import http.server\n"
            "from hello_ember import GREETING\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(GREETING.encode())\n"
            "http.server.HTTPServer(('0.0.0.0', 8000), H).serve_forever()\n"
        ),
        "hello_ember-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-ember\nVersion: 1.0\n",
        "hello_ember-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(text.encode())}")
        record.append("hello_ember-1.0.dist-info/RECORD,,")
        z.writestr("hello_ember-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def test_template_build_pip_installs_from_the_context_and_serves_at_once(api: Live, tmp_path: Path) -> None:
    import shutil

    import pip

    name = f"py-build-{uuid.uuid4().hex[:8]}"
    # The guest image has Python but no pip, and this machine no internet:
    # pip itself and the wheel travel in the build context.
    shutil.copytree(
        Path(pip.__file__).parent, tmp_path / "pip" / "pip", ignore=shutil.ignore_patterns("__pycache__")
    )
    _wheel(tmp_path / "hello_ember-1.0-py3-none-any.whl")
    (tmp_path / "Dockerfile").write_text(
        "FROM base\n"
        "COPY pip/ /opt/pip/\n"
        "COPY *.whl /tmp/wheels/\n"
        "ENV PYTHONPATH=/opt/pip\n"
        # Debian marks its Python externally managed; images built on it say so.
        "RUN python3 -m pip install --no-index --no-cache-dir --break-system-packages"
        " /tmp/wheels/hello_ember-1.0-py3-none-any.whl\n"
        'CMD ["python3", "-m", "hello_ember"]\n'
    )
    seen: list[str] = []
    build = Template.build(name, dockerfile=str(tmp_path / "Dockerfile"), ready_port=8000, on_log=seen.append)
    assert build.status == "ready"
    assert "Successfully installed hello-ember-1.0" in build.log
    assert "".join(seen) == build.log
    try:
        with create_from(name) as child:
            # The first request, no retry: the server was frozen serving.
            url = "http://127.0.0.1:8000/"
            fetch = f"import urllib.request as u; print(u.urlopen('{url}').read().decode(), end='')"
            r = child.commands.run(f'python3 -c "{fetch}"')
            assert r.stdout == "installed by pip from the context"
        with pytest.raises(ember.BuildFailed) as failed:
            Template.build(f"{name}-bad", dockerfile="FROM base\nRUN echo nope && exit 7\n")
        assert "exited with code 7" in str(failed.value)
        assert "nope" in (failed.value.build.error or "")
        with pytest.raises(ember.InvalidRequest, match="line 2"):
            Template.build(f"{name}-x", dockerfile="FROM base\nVOLUME /data\n")
    finally:
        with ember.Client() as c:
            c.delete_snapshot(name)


def test_context_manager_kills_on_exit_and_on_error(api: Live) -> None:
    with Sandbox.create(timeout=300) as sb:
        assert sb.commands.run("true").ok
    with ember.Client() as c:
        assert c.get_sandbox(sb.id).state is SandboxState.DESTROYED
        with pytest.raises(RuntimeError, match="boom"):
            with Sandbox.create(timeout=300, client=c) as sb2:
                raise RuntimeError("boom")
        assert c.get_sandbox(sb2.id).state is SandboxState.DESTROYED
    if api.server is not None:
        assert api.server.leftovers() == [], "destroyed sandboxes leave no VMM or namespace"


def test_errors_map_to_exceptions(api: Live) -> None:
    with pytest.raises(ember.NotFound):
        Sandbox.connect("sb-00000000000000000000")
    with pytest.raises(ember.AuthError):
        Sandbox.list(api_key="ember_wrong_key")
    with pytest.raises(ember.InvalidRequest) as e:
        Sandbox.create(timeout=0)
    assert e.value.field == "timeout_s"
    with pytest.raises(ember.CapacityError):
        Sandbox.create(vcpus=64)  # more than this host hands out
    with pytest.raises(ember.NotFound):
        Sandbox.create(template="no-such-template")
    with pytest.raises(ember.ConnectError):
        Sandbox.list(api_url="http://127.0.0.1:9")


def test_rename_terminal_resize_and_network_rules(api: Live) -> None:
    with Sandbox.create(timeout=300) as sb:
        sb.files.write("/root/a.txt", b"moved")
        sb.files.write("/root/b.txt", b"in the way")
        with pytest.raises(ember.Conflict):
            sb.files.rename("/root/a.txt", "/root/b.txt")
        info = sb.files.rename("/root/a.txt", "/root/b.txt", overwrite=True)
        assert info.path == "/root/b.txt"
        assert sb.files.read("/root/b.txt") == b"moved"
        assert not sb.files.exists("/root/a.txt")

        h = sb.commands.run("read line; stty size", background=True, pty=(24, 80), stdin=True)
        sb.commands.resize(h.pid, rows=33, cols=101)
        h.send_stdin("go\n")
        assert "33 101" in h.wait().stdout

        info = sb.set_network(allow_out=["198.51.100.7"], deny_out=["203.0.113.0/24"])
        assert (info.allow_out, info.deny_out) == (["198.51.100.7"], ["203.0.113.0/24"])
        got = sb.client.get_sandbox(sb.id)
        assert (got.allow_out, got.deny_out) == (["198.51.100.7"], ["203.0.113.0/24"])
        with pytest.raises(ember.InvalidRequest):
            sb.set_network(allow_out=["not-a-cidr"])


def test_a_directory_watch_reports_changes(api: Live) -> None:
    with Sandbox.create(timeout=300) as sb:
        sb.files.make_dir("/root/w")
        with sb.files.watch("/root/w", recursive=True) as w:
            sb.commands.run("mkdir /root/w/sub && echo x > /root/w/sub/f && rm /root/w/sub/f")
            seen: list[tuple[str, str]] = []
            for ev in w:
                seen.append((ev.type, ev.name))
                if ev.type == "remove":
                    break
        assert seen[0] == ("create", "sub"), seen
        assert ("create", "sub/f") in seen and seen[-1] == ("remove", "sub/f"), seen
        with pytest.raises(ember.Conflict):
            sb.files.watch("/etc/hostname")


def test_plain_creates_fork_the_warm_base_and_cold_ones_boot(api: Live) -> None:
    def phases(sb: Sandbox) -> list[str]:
        assert sb.info.last_operation is not None
        assert sb.info.last_operation.operation == "create"
        assert sb.info.last_operation.total_ms > 0
        return [name for name, _ in sb.info.last_operation.phases]

    # The first plain create of a shape may make the host's warm base; the
    # next one forks from it.
    first = Sandbox.create(timeout=120, memory_mib=384)
    try:
        plain = Sandbox.create(timeout=120, memory_mib=384)
        cold = Sandbox.create(timeout=120, memory_mib=384, cold=True)
        try:
            assert "host.vmm.load_state" in phases(plain), phases(plain)
            assert "host.vmm.load_state" not in phases(cold), phases(cold)
            assert "host.guest.ready" in phases(cold)
            assert plain.commands.run("true").ok and cold.commands.run("true").ok
        finally:
            plain.kill()
            cold.kill()
    finally:
        first.kill()


def test_ports_through_the_ingress_proxy(api: Live) -> None:
    import httpx

    with Sandbox.create(timeout=600) as sb:
        sb.files.write("/tmp/www/index.txt", "hello through ember\n")
        sb.commands.run("python3 -m http.server 8000 --directory /tmp/www", background=True)
        url = sb.url(8000)
        assert url.endswith(f"/v1/sandboxes/{sb.id}/ports/8000/"), url
        assert not sb.info.public and sb.traffic_token.startswith("embertraffic_")
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(f"{url}index.txt", headers={"x-ember-traffic-token": sb.traffic_token})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 502, r.text  # not listening yet
            time.sleep(0.2)
        assert (r.status_code, r.text) == (200, "hello through ember\n")
        # Private: refused without the token; public: served to anyone.
        assert httpx.get(f"{url}index.txt").status_code == 401
        info = sb.set_ingress(public=True)
        assert info.public and not info.auto_resume
        assert httpx.get(f"{url}index.txt").text == "hello through ember\n"
        # Any TCP protocol through a local listener: raw HTTP/1.0 here.
        with sb.port_forward(8000) as fwd:
            assert repr(fwd).endswith(f"-> {sb.id}:8000)")
            with socket.create_connection(("127.0.0.1", fwd.local_port), timeout=30) as c:
                c.sendall(b"GET /index.txt HTTP/1.0\r\n\r\n")
                got = b"".join(iter(lambda: c.recv(65536), b""))
            assert got.startswith(b"HTTP/1.0 200"), got
            assert got.endswith(b"\r\n\r\nhello through ember\n"), got
            # Nothing listens on 8002: the local connection is closed at once.
            with sb.port_forward(8002) as closed:
                with socket.create_connection(("127.0.0.1", closed.local_port), timeout=30) as c:
                    assert c.recv(1) == b""
        with pytest.raises(OSError):  # closed: no longer listening
            socket.create_connection(("127.0.0.1", fwd.local_port), timeout=5)
