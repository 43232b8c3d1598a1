"""The built library is what the packaging promises: compiled for a baseline CPU (no AVX/BMI
instructions that would crash an older x86-64), free of libc (no NEEDED entries), exporting only
`irm_` symbols; and the Zig version is pinned in one place that pyproject.toml agrees with."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from hatch_build import native_settings
from irmiddleware import _native

pytestmark = pytest.mark.slow  # inspects the built library with binutils

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = _native._library_path()


def tool_output(*command: str) -> str:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed (binutils)")
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


def test_no_instructions_beyond_the_baseline_cpu() -> None:
    disassembly = tool_output("objdump", "-d", "--no-show-raw-insn", str(LIBRARY))
    beyond_baseline = re.findall(r"\b(v\w+\s+%[xyz]mm|popcnt|lzcnt|tzcnt|andn|shlx|shrx|sarx)\b", disassembly)
    assert beyond_baseline == []
    # One exception, guarded at run time: owned handles of shared tables (zig/owners.zig) need the
    # 16-byte compare-and-swap, which attaching as an owner checks with cpuid first (a CPU without
    # it gets a clean refusal, and nothing else uses the instruction).
    assert len(re.findall(r"\bcmpxchg16b\b", disassembly)) <= 2
    assert re.search(r"\bcpuid\b", disassembly)


def test_library_needs_no_other_library_and_exports_only_irm_symbols() -> None:
    dynamic = tool_output("readelf", "-d", str(LIBRARY))
    assert "NEEDED" not in dynamic
    symbols = tool_output("readelf", "--dyn-syms", "-W", str(LIBRARY))
    exported = re.findall(r"\sFUNC\s+GLOBAL\s+DEFAULT\s+\d+\s+(\S+)", symbols)
    assert exported, symbols
    assert all(name.startswith("irm_") for name in exported), exported
    declared = set(_native._SIGNATURES)
    assert declared == set(exported)  # the binding declares every export, and nothing else


def test_zig_version_is_pinned_once_and_pyproject_agrees() -> None:
    pinned = native_settings()["zig_version"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = project["build-system"]["requires"] + project["project"]["optional-dependencies"]["test"]
    zig_pins = {r for r in requirements if r.startswith("ziglang")}
    assert zig_pins == {f"ziglang=={pinned}"}
    assert "native.zon" in (ROOT / "build.zig").read_text()
