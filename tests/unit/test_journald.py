"""journald: log events arrive as native journal fields on a datagram socket we bind, secrets masked first."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import structlog

from agent.journald import JournaldRenderer, encode, under_journald
from agent.redact import SecretMasker


def parse(datagram: bytes) -> dict[str, str]:
    """The journal's native protocol, read back."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, tail = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = tail
        else:
            size = struct.unpack("<Q", tail[:8])[0]
            fields[line.decode()] = tail[8 : 8 + size].decode()
            rest = tail[8 + size + 1 :]
    return fields


@pytest.fixture
def journal(tmp_path: Path):  # type: ignore[no-untyped-def]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.sock"))
    sock.settimeout(5)
    yield sock, str(tmp_path / "journal.sock")
    sock.close()


def test_events_become_fields_operators_filter_on(journal) -> None:  # type: ignore[no-untyped-def]
    """An instance's state change arrives with SYSLOG_IDENTIFIER, PRIORITY, EMP_SERVICE and EMP_MACHINE_ID, and
    the message keeps its details; nothing is printed."""
    sock, address = journal
    renderer = JournaldRenderer(address)
    event = {
        "event": "service state",
        "level": "warning",
        "instance": "comfyui-0",
        "machine_id": "m1",
        "new": "BACKOFF",
    }

    with pytest.raises(structlog.DropEvent):
        renderer(None, "warning", event)
    fields = parse(sock.recv(65536))

    assert {
        "SYSLOG_IDENTIFIER": "emp-agent",
        "PRIORITY": "4",
        "EMP_SERVICE": "comfyui-0",
        "EMP_MACHINE_ID": "m1",
        "EMP_NEW": "BACKOFF",
    }.items() <= fields.items()
    assert fields["MESSAGE"].startswith("service state instance=comfyui-0")


def test_multiline_values_use_the_binary_form(journal) -> None:  # type: ignore[no-untyped-def]
    """A traceback (several lines) is sent length-prefixed and read back whole."""
    sock, address = journal
    with pytest.raises(structlog.DropEvent):
        JournaldRenderer(address)(
            None, "error", {"event": "boom", "level": "error", "stage": "prepare", "exception": "a\nb"}
        )

    fields = parse(sock.recv(65536))

    assert ("prepare", "a\nb", "3") == (fields["EMP_STAGE"], fields["EMP_EXCEPTION"], fields["PRIORITY"])


def test_secrets_are_masked_before_they_reach_the_journal(journal) -> None:  # type: ignore[no-untyped-def]
    """The masker runs before the journal renderer: a Redis password never reaches journald."""
    sock, address = journal
    masker = SecretMasker()
    masker.add("hunter2hunter2")
    event = masker(None, "info", {"event": "connecting", "level": "info", "url": "redis://:hunter2hunter2@db"})

    with pytest.raises(structlog.DropEvent):
        JournaldRenderer(address)(None, "info", event)

    assert b"hunter2" not in sock.recv(65536)


def test_without_a_journal_the_event_falls_back_to_json(tmp_path: Path) -> None:
    """A journal socket that is gone: the line is rendered as JSON for stderr instead of being lost."""
    rendered = JournaldRenderer(str(tmp_path / "missing.sock"))(None, "info", {"event": "hello", "level": "info"})

    assert '"event": "hello"' in rendered


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    """JOURNAL_STREAM names the stream systemd connected; another file is not the journal."""
    handle = (tmp_path / "stream").open("w")
    stat = os.fstat(handle.fileno())

    assert under_journald({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, handle.fileno())
    assert not under_journald({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"}, handle.fileno())
    assert not under_journald({}, handle.fileno())
    assert encode({"A": "1"}) == b"A=1\n"
    handle.close()
