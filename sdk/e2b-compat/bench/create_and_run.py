"""Latency of `Sandbox.create` + `commands.run("echo hi")` through E2B's
SDK against Ember's own SDK, on one live `ember server`, interleaved so
both see the same machine; prints medians and the ratio.

    sudo scripts/bench-e2b-sdk          # N=5 rounds; EMBER_BENCH_ROUNDS to change
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "tests"))
from _server import EmberServer, find_binary, find_image_dir


def main() -> None:
    binary, image = find_binary(), find_image_dir()
    if os.geteuid() != 0 or binary is None or image is None:
        sys.exit("bench: needs root, the ember binary and a built guest image")
    import e2b
    import ember

    rounds = int(os.environ.get("EMBER_BENCH_ROUNDS", "5"))
    server = EmberServer(binary, image)
    server.start()
    try:
        r = httpx.post(
            f"{server.url}/v1/keys",
            headers={"authorization": f"Bearer {server.admin_key}"},
            json={"name": "bench", "e2b": True},
        )
        r.raise_for_status()
        key = r.json()["key"]
        os.environ.update(
            {
                "E2B_API_URL": server.url,
                "E2B_SANDBOX_URL": server.url,
                "E2B_API_KEY": key,
            }
        )

        def via_e2b() -> float:
            t = time.perf_counter()
            s = e2b.Sandbox.create()
            assert s.commands.run("echo hi").stdout == "hi\n"
            took = time.perf_counter() - t
            s.kill()
            return took

        def via_ember() -> float:
            t = time.perf_counter()
            s = ember.Sandbox.create(api_url=server.url, api_key=key)
            assert s.commands.run("echo hi").stdout == "hi\n"
            took = time.perf_counter() - t
            s.kill()
            return took

        via_e2b(), via_ember()  # warm both paths (image cache, connections)
        e2b_t, ember_t = [], []
        for _ in range(rounds):
            e2b_t.append(via_e2b())
            ember_t.append(via_ember())
        a, b = statistics.median(ember_t), statistics.median(e2b_t)
        from importlib.metadata import version

        print(f"create + run('echo hi'), median of {rounds} (e2b {version('e2b')})")
        print(f"  Ember's SDK     {a * 1000:8.0f} ms   1.000")
        print(f"  E2B's SDK       {b * 1000:8.0f} ms   {b / a:.3f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
