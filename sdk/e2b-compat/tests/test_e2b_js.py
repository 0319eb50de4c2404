"""E2B's JavaScript SDK (npm ``e2b``, unmodified) against the same live
server: ``node --test js/e2b.test.mjs`` with the three E2B variables set.
``scripts/test-e2b-sdk`` installs the pinned package and names its
directory in ``EMBER_E2B_JS_DIR``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import _missing


def test_the_js_sdk_drives_the_lifecycle() -> None:
    js_dir = os.environ.get("EMBER_E2B_JS_DIR")
    if not js_dir:
        pytest.skip(
            "EMBER_E2B_JS_DIR is not set (scripts/test-e2b-sdk sets it for one run)"
        )
    node = shutil.which("node")
    if node is None:
        _missing("needs Node.js (scripts/setup-host installs it)")
    assert node is not None
    src = Path(__file__).resolve().parents[1] / "js" / "e2b.test.mjs"
    dst = Path(js_dir) / "e2b.test.mjs"
    shutil.copyfile(src, dst)
    r = subprocess.run(
        [node, "--test", "--test-reporter=spec", str(dst)],
        cwd=js_dir,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"node --test failed:\n{r.stdout}\n{r.stderr}"
