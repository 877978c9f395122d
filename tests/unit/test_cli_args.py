"""Command-line arguments are checked by the parser: a bad value is a usage error (exit 2), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "argv",
    [
        ["drain", "--timeout", "-1000"],
        ["drain", "--timeout", "nan"],
        ["drain", "--timeout", "inf"],
        ["status", "--watch", "--interval", "inf"],
        ["logs", "web-0", "-n", "-5"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(argv: list[str]) -> None:
    """Each gets argparse's one-line message and exit 2 before any socket is touched."""
    result = subprocess.run([sys.executable, "-m", "agent", *argv], capture_output=True, text=True, cwd=REPO)

    assert 2 == result.returncode
    assert "Traceback" not in result.stderr
    assert "error: argument" in result.stderr


def test_a_log_name_with_a_path_is_refused() -> None:
    """`logs ../x` never reads files outside the log directory."""
    result = subprocess.run(
        [sys.executable, "-m", "agent", "logs", "../outside"], capture_output=True, text=True, cwd=REPO
    )

    assert (2, "../outside: ERROR (not an instance name)\n") == (result.returncode, result.stderr)


def test_a_closed_pipe_ends_the_output_quietly(tmp_path: Path) -> None:
    """`emp-agent logs web-0 -n 200000 | head -1`: the first line, and no BrokenPipeError traceback."""
    (tmp_path / "web-0.log").write_text("".join(f"line {n}\n" for n in range(200_000)))
    env = {"PATH": os.environ["PATH"], "EMP_AGENT_LOG_DIR": str(tmp_path), "EMP_AGENT_RUNTIME_DIR": str(tmp_path)}

    result = subprocess.run(
        f"{sys.executable} -m agent logs web-0 -n 200000 | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )

    assert ("line 0\n", "") == (result.stdout, result.stderr)
