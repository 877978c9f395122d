"""Process trees as the launcher sees them when it samples usage: the instance's own tree, not all of /proc."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from agent.host.launcher import ProcessLauncher, descendants
from agent.host.logpipes import LogSpec
from tests.helpers import await_until

#: A parent that starts a child in its own group and a grandchild in a new session, then waits; a thread of the
#: parent starts one more (the kernel lists a child under the thread that forked it).
FAMILY = """
import subprocess, sys, threading, time
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
child = subprocess.Popen(sleep, process_group=0)
escaped = subprocess.Popen(sleep, start_new_session=True)
from_thread = []
thread = threading.Thread(target=lambda: from_thread.append(subprocess.Popen(sleep)))
thread.start(); thread.join()
open(sys.argv[1], "w").write(f"{child.pid} {escaped.pid} {from_thread[0].pid}")
time.sleep(300)
"""


def test_sampling_sees_the_whole_tree_that_a_full_walk_sees(tmp_path: Path) -> None:
    """The sampled tree holds the main process, a child in another process group, a grandchild in another
    session and a child forked by another thread; its usage matches the full /proc walk's."""
    pids_file = tmp_path / "pids"

    async def scenario() -> tuple[set[int], set[int] | None, set[int], int, int]:
        launcher = ProcessLauncher()
        log = await launcher.open_log(LogSpec(tmp_path / "family.log"))
        child = await launcher.spawn([sys.executable, "-c", FAMILY, str(pids_file)], dict(os.environ), None, log)
        try:
            await await_until(lambda: pids_file.exists() and pids_file.read_text(), what="the family started")
            others = {int(pid) for pid in pids_file.read_text().split()}
            tree = descendants(child.pid)
            walked = {proc.pid for proc in child.members()}  # type: ignore[attr-defined]
            rss_sampled, _ = child.usage(sampling=True)
            rss_walked, _ = child.usage()
            return others | {child.pid}, tree, walked, rss_sampled, rss_walked
        finally:
            child.kill_tree()
            await child.wait()
            await log.close()

    family, tree, walked, rss_sampled, rss_walked = asyncio.run(scenario())

    assert family == tree
    assert family == walked
    assert abs(rss_sampled - rss_walked) < 0.2 * rss_walked  # the same processes, read a moment apart


def test_a_kernel_without_children_lists_is_reported_and_a_gone_root_is_empty(tmp_path: Path) -> None:
    """A /proc whose threads have no `children` file gives None (the caller walks /proc instead); a root that
    is gone gives an empty tree."""
    fake = tmp_path / "proc"
    (fake / "42" / "task" / "42").mkdir(parents=True)

    assert descendants(42, str(fake)) is None
    assert set() == descendants(43, str(fake))
