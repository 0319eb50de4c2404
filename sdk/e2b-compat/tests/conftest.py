"""One live ``ember server`` (real VM host) for the session, driven by the
unmodified ``e2b`` SDK from PyPI through the three variables a user sets:
``E2B_API_URL``, ``E2B_SANDBOX_URL`` and ``E2B_API_KEY`` (an E2B-shaped key
minted by the server). The server harness is the Ember SDK's own
(``sdk/python/tests/_server.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "tests"))
from _server import EmberServer, find_binary, find_image_dir

INGRESS_DOMAIN = "e2b.test"


def _missing(reason: str) -> None:
    if os.environ.get("EMBER_TEST_REQUIRE") == "all":
        pytest.fail(f"precondition missing but EMBER_TEST_REQUIRE=all: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def server() -> Iterator[EmberServer]:
    if os.geteuid() != 0:
        _missing("needs root: the server's host agent creates network namespaces")
    binary, image = find_binary(), find_image_dir()
    if binary is None:
        _missing("needs the ember binary (cargo build -p ember-cli, or set EMBER_BIN)")
    if image is None:
        _missing("needs a built guest image (run `ember image build`)")
    assert binary is not None and image is not None
    # Ports are served at {port}-{id}.e2b.test (what `get_host` returns);
    # the tests send that host name to the server's address.
    s = EmberServer(binary, image, extra_args=("--ingress-domain", f"http://{INGRESS_DOMAIN}"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def e2b_key(server: EmberServer) -> str:
    r = httpx.post(
        f"{server.url}/v1/keys",
        headers={"authorization": f"Bearer {server.admin_key}"},
        json={"name": "e2b-sdk", "e2b": True},
    )
    r.raise_for_status()
    key: str = r.json()["key"]
    assert key.startswith("e2b_") and len(key) == 44, key
    return key


@pytest.fixture(scope="session", autouse=True)
def e2b_env(server: EmberServer, e2b_key: str) -> Iterator[None]:
    """The three variables, for the whole session (module fixtures too)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("E2B_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(
        {
            "E2B_API_URL": server.url,
            "E2B_SANDBOX_URL": server.url,
            "E2B_API_KEY": e2b_key,
        }
    )
    yield
    for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        os.environ.pop(k, None)
    os.environ.update(saved)
