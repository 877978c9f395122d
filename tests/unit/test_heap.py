"""The agent's heap: memory freed during start-up goes back to the kernel."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_memory_freed_after_start_up_is_returned_to_the_kernel() -> None:
    """After 64 MiB of medium-sized objects are allocated and dropped (as start-up's temporaries are), the
    release hands the free heap back: the resident set shrinks by most of it, and the call says by how much."""
    code = (
        "from agent.host.heap import release_free_memory, resident_bytes\n"
        "junk = [bytes(1000 + i % 7) for i in range(64 * 1024)]\n"
        "grown = resident_bytes()\n"
        "del junk\n"
        "released = release_free_memory()\n"
        "print(grown - resident_bytes(), released)\n"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)

    shrank, released = map(int, out.stdout.split())
    assert released >= 32 * 1024 * 1024
    assert abs(shrank - released) <= 4 * 1024 * 1024
