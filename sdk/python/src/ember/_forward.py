"""Port forwarding: a local TCP listener whose connections are tunnelled to
a port inside a sandbox, as ``ember sandbox port-forward`` does.

Each accepted connection opens ``GET /v1/sandboxes/{id}/tunnel/{port}`` on
the server with ``Connection: Upgrade`` and ``Upgrade: ember-tcp``; after the
server's ``101`` the socket carries the TCP stream both ways, so any protocol
works (PostgreSQL, Redis, SSH, HTTP). The sync form runs a thread per
direction; the asyncio form runs tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from urllib.parse import urlsplit

from . import errors
from ._config import resolve

UPGRADE = "ember-tcp"
#: The server's answer head may not be longer than this.
MAX_HEAD = 16 * 1024
CHUNK = 64 * 1024


def _endpoint(api_url: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, path prefix) of the API's base URL."""
    u = urlsplit(api_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise errors.EmberError(f"api_url {api_url!r}: expected http(s)://HOST[:PORT]")
    tls = u.scheme == "https"
    return u.hostname, u.port or (443 if tls else 80), tls, u.path.rstrip("/")


def _request(api_url: str, api_key: str, sandbox_id: str, port: int) -> bytes:
    host, p, _, prefix = _endpoint(api_url)
    return (
        f"GET {prefix}/v1/sandboxes/{sandbox_id}/tunnel/{port} HTTP/1.1\r\n"
        f"Host: {host}:{p}\r\n"
        f"Authorization: Bearer {api_key}\r\n"
        f"Connection: Upgrade\r\nUpgrade: {UPGRADE}\r\n\r\n"
    ).encode()


def _check_head(head: bytes, sandbox_id: str, port: int) -> None:
    """Raise unless the server switched protocols; the error carries its
    message (e.g. "nothing listens on port 5432 in sandbox ...")."""
    status_line, _, rest = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) >= 2 and parts[1] == b"101":
        return
    body = rest.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
    raise errors.EmberError(
        f"tunnel to port {port} of sandbox {sandbox_id} refused: "
        f"{status_line.decode(errors='replace')} {body}".strip()
    )


def _tls(api_url: str, api_key: str) -> ssl.SSLContext:
    """The TLS context of the API's connections (trusting ``EMBER_CA``)."""
    return resolve(api_url, api_key).ssl_context()


def open_tunnel(api_url: str, api_key: str, sandbox_id: str, port: int, timeout: float) -> socket.socket:
    """A socket connected to ``port`` inside the sandbox (blocking)."""
    host, p, tls, _ = _endpoint(api_url)
    sock = socket.create_connection((host, p), timeout=timeout)
    try:
        if tls:
            sock = _tls(api_url, api_key).wrap_socket(sock, server_hostname=host)
        sock.sendall(_request(api_url, api_key, sandbox_id, port))
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data or len(head) > MAX_HEAD:
                break
            head += data
        head, sep, extra = head.partition(b"\r\n\r\n")
        if not sep:
            raise errors.EmberError(f"tunnel to port {port} of sandbox {sandbox_id}: no answer")
        if not head.startswith(b"HTTP/1.1 101"):
            # The error's body (or its start) came with the head.
            _check_head(head + b"\r\n\r\n" + extra, sandbox_id, port)
        if extra:
            raise errors.EmberError("the server sent bytes before the tunnel opened")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except OSError:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


class PortForward:
    """A local listener forwarding to a port inside a sandbox; see
    :meth:`ember.Sandbox.port_forward`. Close it (or use ``with``) to stop
    listening; connections already open run until either side closes."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        sandbox_id: str,
        remote_port: int,
        local_port: int = 0,
        host: str = "127.0.0.1",
        timeout: float = 30.0,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.remote_port = remote_port
        self._args = (api_url, api_key, sandbox_id, remote_port, timeout)
        self._listener = socket.create_server((host, local_port))
        self.host, self.local_port = self._listener.getsockname()[:2]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="ember-port-forward", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port`` of the local listener."""
        return f"{self.host}:{self.local_port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = open_tunnel(*self._args)
        except (OSError, errors.EmberError):
            client.close()
            return
        t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        t.start()
        _pump(client, upstream)
        t.join()
        client.close()
        upstream.close()

    def close(self) -> None:
        """Stop accepting connections."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> PortForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PortForward({self.address} -> {self.sandbox_id}:{self.remote_port})"


async def open_tunnel_async(
    api_url: str, api_key: str, sandbox_id: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams connected to ``port`` inside the sandbox."""
    host, p, tls, _ = _endpoint(api_url)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, p, ssl=_tls(api_url, api_key) if tls else None), timeout
    )
    try:
        writer.write(_request(api_url, api_key, sandbox_id, port))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            body = b""
            with contextlib.suppress(TimeoutError, OSError):
                body = await asyncio.wait_for(reader.read(MAX_HEAD), 1.0)
            _check_head(head + body, sandbox_id, port)
        return reader, writer
    except BaseException:
        writer.close()
        raise


async def _apump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


class AsyncPortForward:
    """The asyncio form of :class:`PortForward`; see
    :meth:`ember.aio.AsyncSandbox.port_forward`."""

    def __init__(
        self,
        server: asyncio.Server,
        sandbox_id: str,
        remote_port: int,
    ) -> None:
        self._server = server
        self.sandbox_id = sandbox_id
        self.remote_port = remote_port
        self.host, self.local_port = server.sockets[0].getsockname()[:2]

    @classmethod
    async def start(
        cls,
        api_url: str,
        api_key: str,
        sandbox_id: str,
        remote_port: int,
        local_port: int = 0,
        host: str = "127.0.0.1",
        timeout: float = 30.0,
    ) -> AsyncPortForward:
        async def serve(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await open_tunnel_async(api_url, api_key, sandbox_id, remote_port, timeout)
            except (OSError, errors.EmberError, TimeoutError):
                cw.close()
                return
            try:
                await asyncio.gather(_apump(cr, uw), _apump(ur, cw))
            finally:
                cw.close()
                uw.close()

        server = await asyncio.start_server(serve, host, local_port)
        return cls(server, sandbox_id, remote_port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.local_port}"

    async def close(self) -> None:
        """Stop accepting connections."""
        self._server.close()
        # Since Python 3.12 this also waits for open connections: not ours to end.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def __aenter__(self) -> AsyncPortForward:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncPortForward({self.address} -> {self.sandbox_id}:{self.remote_port})"
