"""The `irmiddleware` command itself: every subcommand is listed, `--version` names the package's
version, an unknown command is refused with the list, `serve --help` names every strategy, and help
piped to a reader that leaves early (`| head -1`) ends quietly."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

import irmiddleware
from irmiddleware import STRATEGIES
from irmiddleware._cli import COMMANDS, main


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's --help
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_version_and_usage() -> None:
    assert run("--version") == (0, f"irmiddleware {irmiddleware.__version__}\n", "")
    code, out, _err = run("--help")
    assert code == 0 and all(f"  {name} " in out for name in COMMANDS)
    assert run()[0] == 2


def test_an_unknown_command_lists_the_known_ones() -> None:
    code, _out, err = run("fly")
    assert code == 2 and "unknown command 'fly'" in err and "emulate" in err


@pytest.mark.parametrize("command", ["serve", "emulate"])
def test_subcommand_help_is_complete(command: str) -> None:
    code, out, _err = run(command, "--help")
    assert code == 0
    if command == "serve":
        flat = " ".join(out.split())
        assert all(name in flat for name in STRATEGIES), flat
    else:
        assert all(kind in out for kind in ("vllm", "triton", "tgi"))


@pytest.mark.slow  # starts the command as a process
@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_to_a_reader_that_left_ends_quietly(argv: list[str]) -> None:
    command = [sys.executable, "-m", "irmiddleware", *argv]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()  # the reader leaves before a line is written, as `head` does after one
    _out, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (0, b"")
