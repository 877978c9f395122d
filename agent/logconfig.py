"""Logging configuration, the agent's only global state: structlog to stderr, JSON or console, secrets masked."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

from agent.journald import JournaldRenderer, under_journald
from agent.redact import SecretMasker

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(
    level: str = "info", fmt: str = "auto", masker: SecretMasker | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog once, from the CLI. `fmt`: json, console, journald, or auto (journald under systemd, console
    on a terminal, JSON otherwise)."""
    out = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty()) if use_console else structlog.processors.JSONRenderer()
    )
    if fmt in ("auto", "journald") and _journal_stream(out):
        renderer = JournaldRenderer()  # native fields: journalctl -u emp-agent EMP_SERVICE=comfyui-0
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        masker or SecretMasker(),  # after format_exc_info, so exception text is masked too
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(levelname)s %(name)s: %(message)s")


def _journal_stream(out: TextIO) -> bool:
    try:
        return under_journald(os.environ, out.fileno())
    except (OSError, ValueError):  # a stream without a file descriptor (tests)
        return False
