"""Fixtures: one live ``ember server`` (with a real VM host) for the session.

Tests that need it skip with a reason when it cannot run here (not root, no
``ember`` binary, no built guest image) — or fail, when
``EMBER_TEST_REQUIRE=all`` says everything must run (CI). To test against a
server you started yourself, set ``EMBER_TEST_API_URL`` and
``EMBER_TEST_API_KEY`` (an admin key).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _server import EmberServer, find_binary, find_image_dir


@dataclass(frozen=True)
class Live:
    url: str
    key: str
    server: EmberServer | None


def _missing(reason: str) -> None:
    if os.environ.get("EMBER_TEST_REQUIRE") == "all":
        pytest.fail(f"precondition missing but EMBER_TEST_REQUIRE=all: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def live() -> Iterator[Live]:
    url, key = os.environ.get("EMBER_TEST_API_URL"), os.environ.get("EMBER_TEST_API_KEY")
    if url and key:
        yield Live(url, key, None)
        return
    if os.geteuid() != 0:
        _missing("needs root: the server's host agent creates network namespaces")
    binary = find_binary()
    if binary is None:
        _missing("needs the ember binary (cargo build -p ember-cli, or set EMBER_BIN)")
    image = find_image_dir()
    if image is None:
        _missing("needs a built guest image (run `ember image build`)")
    assert binary is not None and image is not None
    server = EmberServer(binary, image)
    server.start()
    try:
        yield Live(server.url, server.admin_key, server)
    finally:
        server.stop()


@pytest.fixture
def api(live: Live, monkeypatch: pytest.MonkeyPatch) -> Live:
    """The live server, also set as EMBER_API_URL / EMBER_API_KEY, so the
    SDK's defaults find it; no config file is read."""
    monkeypatch.setenv("EMBER_API_URL", live.url)
    monkeypatch.setenv("EMBER_API_KEY", live.key)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent/ember-sdk-tests")
    return live
