"""The `irmiddleware` command itself: every subcommand is listed, `--version` names the package's
version, an unknown command is refused with the list, and `serve --help` names every strategy."""

from __future__ import annotations

import contextlib
import io

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
