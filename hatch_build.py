"""Build hook: compiles the Zig core into the wheel (and into the source tree for editable installs).

It runs `zig build-lib` from the pinned `ziglang` package directly instead of `zig build`: compiling
Zig's own build runner costs about 100 s cold, the library itself a few seconds. The compiler
settings come from zig/native.zon, which build.zig reads too, so both paths build the same library.
`IRM_OPTIMIZE` overrides its optimize mode for one build: `IRM_OPTIMIZE=ReleaseFast pip install .`
makes the unchecked library (the shipped one is ReleaseSafe).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).parent
LIBRARY_IN_PACKAGE = "irmiddleware/_lib/libirm.so"


def native_settings() -> dict[str, str]:
    """The flat `.key = "value"` fields of zig/native.zon."""
    text = (ROOT / "zig" / "native.zon").read_text()
    return dict(re.findall(r'\.(\w+)\s*=\s*"([^"]*)"', text))


OPTIMIZE_MODES = ("Debug", "ReleaseSafe", "ReleaseFast", "ReleaseSmall")


def optimize_mode() -> str:
    """`IRM_OPTIMIZE` if set (e.g. `IRM_OPTIMIZE=ReleaseFast pip install -e .`), else zig/native.zon's."""
    mode = os.environ.get("IRM_OPTIMIZE") or native_settings()["optimize"]
    if mode not in OPTIMIZE_MODES:
        raise RuntimeError(f"IRM_OPTIMIZE={mode!r}: expected one of {', '.join(OPTIMIZE_MODES)}")
    return mode


def zig_target() -> str:
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine.lower(), os.uname().machine)
    if not sys.platform.startswith("linux"):
        raise RuntimeError("irmiddleware's native core supports Linux only (it maps /dev/shm)")
    return f"{machine}-linux"


def build_library(output: Path, optimize: str | None = None) -> None:
    """Compiles libirm into `output` with `optimize` (default: `optimize_mode()`)."""
    settings = native_settings()
    mode = optimize or optimize_mode()
    import ziglang  # noqa: F401  (fails clearly if the build requirement is missing)

    version = subprocess.run(
        [sys.executable, "-m", "ziglang", "version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if version != settings["zig_version"]:
        raise RuntimeError(f"zig/native.zon pins Zig {settings['zig_version']}, the build has {version}")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "ziglang", "build-lib", "-dynamic",
        "-O", mode,
        "-target", zig_target(),
        "-mcpu", settings["cpu"],
        "--name", settings["library_name"],
        f"-femit-bin={output}",
        str(ROOT / settings["root_source_file"]),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)


class NativeBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if version == "editable":
            build_library(ROOT / LIBRARY_IN_PACKAGE)
        else:
            self._workdir = tempfile.TemporaryDirectory()
            built = Path(self._workdir.name) / "libirm.so"
            build_library(built)
            build_data["force_include"][str(built)] = LIBRARY_IN_PACKAGE
        build_data["pure_python"] = False
        platform_tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
        build_data["tag"] = f"py3-none-{platform_tag}"
