"""The log writer's file handling: torn lines after a full disk, the mode of the files it creates."""

from __future__ import annotations

import errno
import stat
from pathlib import Path
from typing import Any

from agent.logwriter import FILE_MODE, RotatingWriter


class FillsUp:
    """A file on a disk that fills: it takes `room` more bytes, then refuses with ENOSPC."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data: memoryview) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = self.real.write(data[: self.room])
        self.room -= taken
        return int(taken)

    def close(self) -> None:
        self.real.close()


def test_a_line_cut_by_a_full_disk_does_not_swallow_the_next_one(tmp_path: Path) -> None:
    """The disk takes half a line and then fails: that line is counted as dropped with the error, and once the
    disk has room again the next line starts on a line of its own instead of finishing the torn one."""
    log = tmp_path / "svc.log"
    writer = RotatingWriter(str(log), 0, 0)
    writer.write(b"first\n", now=0.0)
    handle = writer._handle(0.0)
    writer._file = FillsUp(handle, 4)  # type: ignore[assignment]

    writer.write(b"second line\n", now=1.0)
    writer.write(b"third\n", now=3.0)  # reopened: the disk has room again

    assert b"first\nseco\nthird\n" == log.read_bytes()
    assert (2, 1) == (writer.lines, writer.dropped_lines)
    assert f"{log}: No space left on device" == writer.last_error


def test_files_the_writer_creates_get_the_agents_mode(tmp_path: Path) -> None:
    """After a rotation the new file is created 0640 like the first one, not with the process's default mode."""
    log = tmp_path / "svc.log"
    writer = RotatingWriter(str(log), 10, 1)

    writer.write(b"0123456789\n", now=0.0)
    writer.write(b"again\n", now=0.0)

    assert FILE_MODE == stat.S_IMODE(log.stat().st_mode)
    assert b"0123456789\n" == (tmp_path / "svc.log.1").read_bytes()
    assert b"again\n" == log.read_bytes()
