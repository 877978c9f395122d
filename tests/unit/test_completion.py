"""Shell completion generated from the parser, exercised in a real bash."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def complete(words: list[str]) -> list[str]:
    """What bash offers for `words` (the last one being completed), with the generated script sourced."""
    script = subprocess.run(
        [sys.executable, "-m", "agent", "completion", "bash"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        f'{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _emp_agent; printf "%s\\n" "${{COMPREPLY[@]}}"'
    )
    result = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}
    )
    return sorted(result.stdout.split())


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_commands_options_and_targets() -> None:
    """Commands by prefix, a command's own options, and `all` as a target when no agent answers."""
    assert ["start", "status", "stop"] == complete(["emp-agent", "st"])
    assert ["--follow", "--lines"] == [o for o in complete(["emp-agent", "logs", "--"]) if o in ("--follow", "--lines")]
    assert "--watch" in complete(["emp-agent", "status", "--"])
    assert ["all"] == complete(["emp-agent", "restart", "a"])
    assert ["-f", "-n"] == [o for o in complete(["emp-agent", "logs", "-"]) if o in ("-f", "-n")]
    assert ["USR1", "USR2"] == complete(["emp-agent", "signal", "web-0", "US"])
    assert ["bash"] == complete(["emp-agent", "completion", "b"])


def test_zsh_script_names_every_command() -> None:
    """The zsh script is generated from the same parser: every command is offered."""
    script = subprocess.run(
        [sys.executable, "-m", "agent", "completion", "zsh"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout

    assert script.startswith("#compdef emp-agent")
    for command in ("run", "status", "logs", "pull", "check", "detect", "completion"):
        assert f"      {command}) opts=(" in script
