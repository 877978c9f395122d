"""The emp-agent(1) manual page in roff, generated from the argument parser so it never falls behind the CLI."""

from __future__ import annotations

import argparse
from datetime import date

from agent import __version__

FILES = [
    ("/etc/emp-agent/agent.toml", "settings (docs/settings.md); EMP_AGENT_* variables win over it"),
    ("/etc/emp-agent/env", "secrets for the unit (EnvironmentFile=), mode 0600; read by commands with --env-file"),
    ("/etc/emp-agent/profiles/", "host profiles (docs/profiles.md)"),
    ("/var/lib/emp-agent/", "state: machine id, bootstrap journal, process ledger, models, embedded registry"),
    ("/run/emp-agent/agent.sock", "the control socket (mode 0660, group emp-agent)"),
    ("/var/log/emp-agent/", "one output log per service instance and preparation step"),
]
EXIT_STATUS = [
    ("0", "success (status: the machine is ready)"),
    ("1", "failure (status: the machine failed)"),
    ("2", "usage or configuration error: one line per problem, naming the file or variable and the field"),
    ("3", "the agent is not running"),
    ("4", "partial (status: not ready yet, or degraded; control: some instances failed)"),
]


def _text(value: str) -> str:
    """Plain text made safe for roff: backslashes, hyphens, and a leading dot or quote."""
    out = value.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + out if out.startswith((".", "'")) else out


def _synopsis(action: argparse.Action) -> str:
    flags = ", ".join(f"\\fB{_text(flag)}\\fR" for flag in action.option_strings)
    if action.nargs == 0:
        return flags
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    shown = " ".join(metavar) if isinstance(metavar, tuple) else metavar
    return f"{flags} \\fI{_text(str(shown))}\\fR" if flags else f"\\fI{_text(str(shown))}\\fR"


def render_manpage(parser: argparse.ArgumentParser, today: date | None = None) -> str:
    """The whole page: NAME, SYNOPSIS, DESCRIPTION, one subsection per command with its options, FILES, EXIT
    STATUS, SEE ALSO."""
    day = (today or date.today()).isoformat()
    lines = [
        f'.TH EMP\\-AGENT 1 "{day}" "emp-agent {__version__}" "User Commands"',
        ".SH NAME",
        "emp\\-agent \\- host agent for GPU fleets: bootstrap the host, supervise its services, register in Redis",
        ".SH SYNOPSIS",
        ".B emp\\-agent",
        ".I COMMAND",
        "[\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _text(parser.description or ""),
        ".SH COMMANDS",
    ]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in subparsers._choices_actions}
    for name, sub in subparsers.choices.items():
        lines += [".SS " + _text(name), _text(helps.get(name, ""))]
        if sub.description:
            lines += [".PP", _text(sub.description)]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            lines += [".TP", _synopsis(action), _text(action.help or "")]
            if action.choices and not isinstance(action.choices, dict):
                lines.append("One of: " + ", ".join(_text(str(c)) for c in action.choices) + ".")
    lines.append(".SH FILES")
    for path, meaning in FILES:
        lines += [".TP", f"\\fI{_text(path)}\\fR", _text(meaning)]
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", _text(meaning)]
    lines += [
        ".SH ENVIRONMENT",
        "Every setting is also an \\fBEMP_AGENT_\\fR\\fINAME\\fR variable (docs/settings.md); an unknown one is an",
        "error. \\fBCUDA_VISIBLE_DEVICES\\fR limits the GPUs the agent uses.",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1); docs/operations.md (the runbook), docs/deploy.md,",
        "docs/registry.md and docs/capabilities.md in the emp\\-agent sources.",
    ]
    return "\n".join(lines) + "\n"
