"""The manual page: generated from the parser, so every command and option is in it, and groff reads it clean."""

from __future__ import annotations

import shutil
import subprocess
from datetime import date

import pytest

from agent.cli import _parser
from agent.manpage import render_manpage


def test_every_command_and_option_is_documented() -> None:
    """Each subcommand is a subsection and each of its options appears, with the exit codes and files."""
    page = render_manpage(_parser(), date(2026, 12, 3))
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")

    for name, parser in sub.choices.items():  # type: ignore[attr-defined]
        assert f".SS {name.replace('-', chr(92) + '-')}\n" in page
        for action in parser._actions:
            if "-h" in action.option_strings:
                continue  # --help is implied
            for flag in action.option_strings:
                assert flag.replace("-", "\\-") in page
    assert '.TH EMP\\-AGENT 1 "2026-12-03"' in page
    assert "/etc/emp\\-agent/env" in page
    assert ".SH EXIT STATUS" in page


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_renders_it_without_warnings() -> None:
    """`groff -man -ww` reports no warning (man(1) would show the same page)."""
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z"], input=render_manpage(_parser()), capture_output=True, text=True
    )

    assert (0, "") == (result.returncode, result.stderr)
