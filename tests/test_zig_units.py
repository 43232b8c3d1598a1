"""The native core's own Zig unit tests (zig/*.zig `test` blocks) run as part of every test run,
with safety checks on, through the same pinned compiler the build uses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hatch_build import native_settings

pytestmark = pytest.mark.slow  # compiles the Zig unit tests

ROOT = Path(__file__).resolve().parent.parent


def test_zig_unit_tests_pass() -> None:
    pinned = native_settings()
    version = subprocess.run(
        [sys.executable, "-m", "ziglang", "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert version == pinned["zig_version"]
    result = subprocess.run(
        [sys.executable, "-m", "ziglang", "test", "-O", "Debug", str(ROOT / pinned["root_source_file"])],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"All \d+ tests passed", output), output[-2000:]
