"""A real ``ember server`` for the SDK's tests: its embedded host agent boots
real microVMs from the shared guest image, in directories, a network prefix
and an address pool of its own, so it runs beside other Ember servers and
tests. The admin key it writes on its first start (to the file it names) is read.

Stopping destroys the sandboxes it still has, stops it, and removes whatever
of its pool is left (VMM processes, namespaces, links, nftables table, RAM
files, directories), so a failed run leaves nothing behind.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import string
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def find_binary() -> Path | None:
    env = os.environ.get("EMBER_BIN")
    candidates = [Path(env)] if env else []
    candidates += [repo_root() / "target" / "debug" / "ember", repo_root() / "target" / "release" / "ember"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def _backend_args() -> list[str]:
    """QEMU, or Firecracker with a real Linux guest under ``scripts/test-kvm``."""
    backend = os.environ.get("EMBER_TEST_BACKEND", "qemu")
    if backend == "qemu":
        return ["--backend", "qemu"]
    if backend != "firecracker":
        raise RuntimeError(f'EMBER_TEST_BACKEND={backend!r}: expected "qemu" or "firecracker"')
    args = ["--backend", "firecracker", "--firecracker-bin", os.environ["EMBER_FIRECRACKER_BIN"]]
    if os.environ.get("EMBER_JAILER_BIN"):
        args += ["--jailer-bin", os.environ["EMBER_JAILER_BIN"]]
    return args


def find_image_dir() -> Path | None:
    """The current built guest image (what ``ember image build`` made)."""
    env = os.environ.get("EMBER_IMAGE_DIR")
    if env:
        return Path(env)
    data = Path(os.environ.get("EMBER_DATA_DIR") or "/var/lib/ember")
    current = data / "images" / "current"
    if not current.exists():
        return None
    d = current.resolve()
    if all((d / f).is_file() for f in ("manifest.json", "vmlinux", "initrd", "rootfs.ext4")):
        return d
    return None


class EmberServer:
    def __init__(self, binary: Path, image_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.image_dir = image_dir
        self.extra_args = extra_args
        rng = random.SystemRandom()
        self.prefix = "p" + "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
        self.pool = f"10.{rng.randrange(100, 250)}.{rng.randrange(0, 256)}.0/24"
        self.dir = Path(tempfile.mkdtemp(prefix="ember-pysdk-"))
        self.memory_dir = Path(f"/dev/shm/{self.prefix}")
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin_key = ""

    def start(self, timeout: float = 180.0) -> None:
        cmd = [
            str(self.binary), "server",
            "--listen", "127.0.0.1:0",
            *_backend_args(),
            "--data-dir", str(self.dir / "data"),
            "--run-dir", str(self.dir / "run"),
            "--memory-dir", str(self.memory_dir),
            "--image-dir", str(self.image_dir),
            "--net-prefix", self.prefix,
            "--net-pool", self.pool,
            *self.extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
        env["EMBER_LOG"] = "info"
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            with self.log_path.open("w") as log:
                for raw in self.proc.stderr:
                    line = raw.decode("utf-8", "replace")
                    log.write(line)
                    log.flush()
                    lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self.url:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"ember server did not start; log:\n{self.logs()}") from None
            s = line.strip()
            if s.startswith("EMBER_ADMIN_KEY_FILE="):
                with open(s.split("=", 1)[1]) as f:
                    self.admin_key = f.read().strip()
            if line.startswith("ember server: listening on "):
                self.url = line.split("listening on ", 1)[1].strip()
        if not self.admin_key:
            self.stop()
            raise RuntimeError("ember server named no admin key file on its first start")

    def logs(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.url:
            self._destroy_sandboxes()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reclaim()

    def _destroy_sandboxes(self) -> None:
        headers = {"authorization": f"Bearer {self.admin_key}"}
        try:
            with httpx.Client(base_url=self.url, headers=headers, timeout=120) as c:
                live = "creating,running,pausing,paused,resuming,snapshotting,failed"
                for sb in c.get("/v1/sandboxes", params={"state": live, "limit": 1000}).json()["sandboxes"]:
                    c.delete(f"/v1/sandboxes/{sb['id']}")
        except (httpx.HTTPError, KeyError, ValueError):
            pass  # _reclaim removes what is left by force

    def _reclaim(self) -> None:
        needle = str(self.dir).encode()
        me = os.getpid()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == me:
                continue
            try:
                cmdline = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                try:
                    os.kill(int(p.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        netns = Path("/run/netns")
        if netns.is_dir():
            for ns in netns.iterdir():
                if ns.name.startswith(f"{self.prefix}-"):
                    subprocess.run(["ip", "netns", "del", ns.name], stderr=subprocess.DEVNULL, check=False)
        for link in Path("/sys/class/net").iterdir():
            if link.name.startswith(f"{self.prefix}h"):
                subprocess.run(["ip", "link", "del", link.name], stderr=subprocess.DEVNULL, check=False)
        subprocess.run(
            ["nft", "delete", "table", "ip", self.prefix],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        shutil.rmtree(self.memory_dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this server's pool exists now (namespaces, VMM processes)."""
        out = []
        netns = Path("/run/netns")
        if netns.is_dir():
            out += [ns.name for ns in netns.iterdir() if ns.name.startswith(f"{self.prefix}-")]
        needle = str(self.dir / "run").encode()
        server = self.proc.pid if self.proc is not None else -1
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != server:
                try:
                    if needle in (p / "cmdline").read_bytes():
                        out.append(f"pid {p.name}")
                except OSError:
                    pass
        return out
