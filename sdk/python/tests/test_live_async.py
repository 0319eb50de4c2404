"""The asyncio SDK against a live ``ember server`` booting real microVMs:
the same lifecycle as the sync tests, plus commands running concurrently."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import Live

import ember
from ember import AsyncSandbox, SandboxState


async def lifecycle() -> None:
    tag = uuid.uuid4().hex[:8]
    sb = await AsyncSandbox.create(
        timeout=600, metadata={"suite": "async", "tag": tag}, env={"GREETING": "hi"}
    )
    try:
        assert sb.info.state is SandboxState.RUNNING
        chunks: list[str] = []

        async def collect(text: str) -> None:  # coroutine callbacks are awaited
            chunks.append(text)

        r = await sb.commands.run("echo $GREETING; exit 4", on_stdout=collect)
        assert (r.stdout, r.exit_code) == ("hi\n", 4)
        assert "".join(chunks) == "hi\n"

        # Two commands at once on one connection pool.
        a, b = await asyncio.gather(
            sb.commands.run("sleep 1; echo a"),
            sb.commands.run(["sh", "-c", "sleep 1; echo b >&2"]),
        )
        assert (a.stdout, b.stderr) == ("a\n", "b\n")

        with pytest.raises(ember.TimeoutError):
            await sb.commands.run("sleep 30", timeout=1)

        h = await sb.commands.run("read x; echo got $x", background=True, stdin=True)
        await h.send_stdin("it\n")
        assert (await h.wait()).stdout == "got it\n"

        await sb.files.write("/root/a.txt", b"async bytes")
        assert await sb.files.read("/root/a.txt") == b"async bytes"
        assert "a.txt" in [f.name for f in await sb.files.list("/root")]
        assert b"".join([c async for c in sb.files.iter_bytes("/root/a.txt")]) == b"async bytes"
        await sb.files.remove("/root/a.txt")
        assert not await sb.files.exists("/root/a.txt")

        # A port inside the sandbox, forwarded to a local listener.
        await sb.files.write("/tmp/www/f.txt", b"forwarded\n")
        await sb.commands.run("python3 -m http.server 8001 --directory /tmp/www", background=True)
        async with await sb.port_forward(8001) as fwd:
            assert fwd.local_port > 0
            body = b""
            for _ in range(100):  # until the server listens
                reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local_port)
                writer.write(b"GET /f.txt HTTP/1.0\r\n\r\n")
                await writer.drain()
                body = await reader.read()
                writer.close()
                if body:
                    break
                await asyncio.sleep(0.2)
            assert body.startswith(b"HTTP/1.0 200"), body
            assert body.endswith(b"\r\n\r\nforwarded\n"), body

        found = await AsyncSandbox.list(metadata={"tag": tag})
        assert [s.id for s in found] == [sb.id]

        assert (await sb.pause()).state is SandboxState.PAUSED
        with pytest.raises(ember.Conflict):
            await sb.commands.run("true")
        again = await AsyncSandbox.resume(sb.id)
        try:
            assert again.info.state is SandboxState.RUNNING
            assert (await again.commands.run("echo $GREETING")).stdout == "hi\n"
        finally:
            await again.close()
        await sb.pause()
        assert await sb.resume() is sb

        name = f"pya-{tag}"
        snap = await sb.snapshot(name)
        assert snap.source_sandbox_id == sb.id
        async with ember.AsyncClient() as c:
            assert (await c.get_snapshot(name)).name == name
            assert (await c.delete_snapshot(name)).name == name

        assert await sb.kill() is True
        assert (await sb.refresh()).state is SandboxState.DESTROYED
        assert await sb.kill() is False
    finally:
        await sb.kill()
        await sb.close()


def test_async_lifecycle(api: Live) -> None:
    asyncio.run(lifecycle())


async def context_manager(live: Live) -> None:
    async with await AsyncSandbox.create(timeout=300) as sb:
        assert (await sb.commands.run("true")).ok
    async with ember.AsyncClient() as c:
        assert (await c.get_sandbox(sb.id)).state is SandboxState.DESTROYED
        with pytest.raises(ValueError):
            async with await AsyncSandbox.create(timeout=300, client=c) as sb2:
                raise ValueError("boom")
        assert (await c.get_sandbox(sb2.id)).state is SandboxState.DESTROYED
        if live.server is not None:
            assert live.server.leftovers() == [], "destroyed sandboxes leave no VMM or namespace"
        with pytest.raises(ember.NotFound):
            await c.connect("sb-00000000000000000000")
        with pytest.raises(ember.InvalidRequest):
            await c.create_sandbox(timeout=0)
    with pytest.raises(ember.AuthError):
        await AsyncSandbox.list(api_key="ember_wrong_key")


def test_async_context_manager_and_errors(api: Live) -> None:
    asyncio.run(context_manager(api))
