"""The log writer: one process draining every instance's pipe, surviving the agent, restarted if it dies."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from agent.host.launcher import ProcessLauncher
from agent.host.logpipes import LOGWRITER_ARGV, LogPipe, LogSpec, LogWriter
from tests.helpers import await_until, wait_until

#: Prints a numbered line every 20 ms; SIGPIPE kills it, so a pipe without a reader shows.
TICKER = Path(__file__).resolve().parent.parent / "programs" / "ticker.py"


def open_message(key: int, log: Path, **extra: object) -> bytes:
    header = {"op": "open", "id": key, "log": str(log), "state": str(LogSpec(log).state_path)}
    return json.dumps({**header, "max_bytes": 1 << 20, "backups": 2, **extra}).encode()


def hand_pipe(control: socket.socket, key: int, log: Path) -> int:
    """Give the writer a new pipe for `log`; returns our write end."""
    read_end, write_end = os.pipe()
    socket.send_fds(control, [open_message(key, log)], [read_end])
    os.close(read_end)
    return write_end


def until_closed(control: socket.socket) -> dict[str, object]:
    """Read the writer's messages (`state` reports) until its `closed` answer, which is returned."""
    control.settimeout(30)
    while (message := json.loads(control.recv(4096)))["op"] != "closed":
        assert "state" == message["op"], message
    return message  # type: ignore[no-any-return]


def dead(pid: int) -> bool:
    """Exited: a zombie, or already reaped (Python 3.11's default child watcher waits in a thread)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def writer_pids() -> set[int]:
    """The log writers running on this machine that this test process started (directly or not)."""
    me = psutil.Process()
    script = LOGWRITER_ARGV[-1]
    found = set()
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        if script in (proc.info["cmdline"] or []) and proc.info["ppid"] == me.pid:
            found.add(proc.pid)
    return found


def test_the_writer_speaks_its_protocol_and_imports_only_what_it_needs(tmp_path: Path) -> None:
    """Started as the agent starts it, the writer takes a pipe over its control socket, timestamps and writes
    its lines, answers `closed` at the pipe's end with the state published, and exits when the agent closes the
    socket. It loads no site packages, argparse, pathlib, typing, socket.py or agent modules."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer = subprocess.Popen(
        [LOGWRITER_ARGV[0], "-X", "importtime", *LOGWRITER_ARGV[1:]], stdin=theirs, stderr=subprocess.PIPE
    )
    theirs.close()
    log = tmp_path / "svc.log"
    write_end = hand_pipe(ours, 7, log)
    os.write(write_end, b"hello\nunterminated")
    os.close(write_end)

    assert {"op": "closed", "id": 7, "lines": 2, "dropped_lines": 0, "last_error": None} == until_closed(ours)
    ours.close()
    _, err = writer.communicate(timeout=30)

    assert 0 == writer.returncode
    imported = {line.split("|")[-1].strip() for line in err.decode().splitlines() if "|" in line}
    assert {"json", "_socket", "select"} <= imported
    assert set() == imported & {"site", "argparse", "pathlib", "typing", "socket", "selectors", "agent"}
    lines = log.read_bytes().splitlines()
    assert [b"hello", b"unterminated"] == [line.split(b"Z ", 1)[1] for line in lines]
    state = json.loads(LogSpec(log).state_path.read_text())
    assert (2, 0, ["hello", "unterminated"]) == (state["lines"], state["dropped_lines"], state["tail"])


def test_the_writer_refuses_a_standard_input_that_is_not_a_socket(tmp_path: Path) -> None:
    """Run by hand with a file or terminal as standard input it says what it needs and exits 2."""
    result = subprocess.run(LOGWRITER_ARGV, input=b"", capture_output=True, timeout=30)

    assert 2 == result.returncode
    assert "standard input must be the agent's control socket" in result.stderr.decode()


def test_the_writer_outlives_the_agent_until_the_last_pipe_ends(tmp_path: Path) -> None:
    """With the agent gone (its end of the control socket closed) the writer keeps draining the pipes it holds,
    as it does for services an agent restarted under systemd adopts, and exits once the last one ends."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer = subprocess.Popen(LOGWRITER_ARGV, stdin=theirs)
    theirs.close()
    first, second = hand_pipe(ours, 1, tmp_path / "a.log"), hand_pipe(ours, 2, tmp_path / "b.log")
    os.write(first, b"before\n")
    wait_until(lambda: (tmp_path / "a.log").exists() and b"before" in (tmp_path / "a.log").read_bytes())
    ours.close()  # the agent dies

    os.write(first, b"after\n")
    os.close(first)
    os.write(second, b"still here\n")
    assert None is writer.poll()  # b.log's pipe is still open
    os.close(second)

    assert 0 == writer.wait(30)
    assert [b"before", b"after"] == [line.split(b"Z ", 1)[1] for line in (tmp_path / "a.log").read_bytes().splitlines()]
    assert (tmp_path / "b.log").read_bytes().endswith(b"Z still here\n")


def test_one_writer_serves_every_instance_and_exits_after_the_last(tmp_path: Path) -> None:
    """Three instances' pipes go to one writer process, each line to its own file; once every pipe is closed the
    writer has exited, and the next pipe starts a new one."""

    async def scenario() -> tuple[set[int], set[int], list[bytes], int | None]:
        launcher = ProcessLauncher()
        others = writer_pids()  # a writer another test left draining
        pipes: list[LogPipe] = []
        children = []
        for name in ("a", "b", "c"):
            pipe = await launcher.open_log(LogSpec(tmp_path / f"{name}.log"))
            pipes.append(pipe)
            children.append(await launcher.spawn([sys.executable, "-c", f"print('{name}')"], {}, None, pipe))
        during = writer_pids() - others
        for child in children:
            await child.wait()
        for pipe in pipes:
            await pipe.close()
        after = writer_pids() - others
        contents = [(tmp_path / f"{name}.log").read_bytes() for name in ("a", "b", "c")]
        again = await launcher.open_log(LogSpec(tmp_path / "d.log"))
        new_pid = launcher.log_writer.pid
        await again.close()
        return during, after, contents, new_pid

    during, after, contents, new_pid = asyncio.run(scenario())

    assert 1 == len(during)
    assert set() == after
    assert [b"a", b"b", b"c"] == [content.split(b"Z ", 1)[1].strip() for content in contents]
    assert new_pid is not None
    assert new_pid not in during


def test_a_killed_writer_is_restarted_and_the_service_never_sees_a_broken_pipe(tmp_path: Path) -> None:
    """SIGKILL of the writer while a service prints: the service lives on (the agent's read end keeps the pipe
    from breaking), a new writer takes the pipe over, the lines the service wrote meanwhile reach the file, and
    the published counters carry on from the old writer's. At most the few lines the old writer had read but not
    written when it was killed are missing; none is repeated."""
    log_path = tmp_path / "ticker.log"
    numbers = lambda: [  # noqa: E731
        int(line.rsplit(b" ", 1)[1]) for line in log_path.read_bytes().splitlines() if b" tick " in line
    ]

    async def scenario() -> tuple[list[int], int, bool, int, int]:
        launcher = ProcessLauncher()
        pipe = await launcher.open_log(LogSpec(log_path))
        child = await launcher.spawn([sys.executable, str(TICKER)], {}, None, pipe)
        await await_until(lambda: len(numbers()) >= 20, what="20 ticks logged")
        state_path = LogSpec(log_path).state_path
        await await_until(lambda: state_path.exists(), what="the state published")
        old = launcher.log_writer.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await await_until(lambda: launcher.log_writer.pid not in (None, old), 30, what="a new writer")
        seen = len(numbers())
        await await_until(lambda: len(numbers()) >= seen + 50, 30, what="50 more ticks")
        alive = child.group_alive()
        child.signal_group(signal.SIGTERM)
        code = await child.wait()
        await pipe.close()
        return numbers(), code, alive, json.loads(state_path.read_text())["lines"], seen

    ticks, code, alive, published, seen = asyncio.run(scenario())

    assert alive
    assert -signal.SIGTERM == code  # not SIGPIPE
    assert ticks == sorted(set(ticks))
    assert ticks[-1] + 1 - len(ticks) <= 3
    assert published > len(ticks) - seen  # more than the new writer wrote: it started from the old one's count


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def test_a_restarted_writer_gets_every_pipe_even_more_than_its_socket_holds_at_once(tmp_path: Path) -> None:
    """400 open pipes with long paths (more headers than the control socket's buffer holds): after a SIGKILL of
    the writer the new one is handed every pipe, waiting for room as it reads, and each pipe's next line still
    reaches its file."""
    raise_fd_limit(4096)
    logs = [tmp_path / f"{'x' * 200}-{n:03d}.log" for n in range(400)]

    async def scenario() -> list[bytes]:
        writer = LogWriter()
        pipes = [await writer.open(LogSpec(path)) for path in logs]
        old = writer.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await await_until(lambda: writer.pid not in (None, old), 30, what="a new writer")
        for pipe in pipes:
            os.write(pipe.write_fd, b"after the restart\n")
        for pipe in pipes:
            await pipe.close()
        return [path.read_bytes() for path in logs]

    contents = asyncio.run(scenario())

    assert [] == [path.name[-7:] for path, content in zip(logs, contents, strict=True) if b"after" not in content]


def test_a_pipe_opened_just_after_the_writer_died_goes_to_a_new_one(tmp_path: Path) -> None:
    """The writer is dead but its watcher has not run yet: a start opening its log gets a new writer instead of
    failing (a failed start would count towards the crash-loop limit)."""

    async def scenario() -> tuple[int | None, int | None, bytes]:
        writer = LogWriter()
        first = await writer.open(LogSpec(tmp_path / "a.log"))
        old = writer.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: dead(old), what="the writer dead")  # without yielding to the loop
        second = await writer.open(LogSpec(tmp_path / "b.log"))
        os.write(second.write_fd, b"second\n")
        new = writer.pid
        await second.close()
        await first.close()
        return old, new, (tmp_path / "b.log").read_bytes()

    old, new, content = asyncio.run(scenario())

    assert new not in (None, old)
    assert content.endswith(b"Z second\n")


def test_status_reports_dropped_lines_when_not_even_the_state_file_can_be_written(tmp_path: Path) -> None:
    """Every log write fails and so does the state file next to the log (here: a directory in the way of its
    temporary file, as on a full or read-only disk): the counts still reach the agent over the control socket,
    live and after the pipe is closed."""
    log = tmp_path / "svc.log"
    log.symlink_to("/dev/full")
    spec = LogSpec(log)
    (tmp_path / f".{spec.state_path.name}.tmp").mkdir()

    async def scenario() -> tuple[dict[str, object] | None, dict[str, object] | None]:
        writer = LogWriter()
        pipe = await writer.open(spec)
        for n in range(100):
            os.write(pipe.write_fd, b"line %d\n" % n)
        live = await await_until(lambda: (c := pipe.counts) and c["dropped_lines"] == 100 and c, what="live counts")
        await pipe.close()
        return live, pipe.counts

    live, final = asyncio.run(scenario())

    assert live is not None
    assert final is not None
    assert (100, f"{log}: No space left on device") == (live["dropped_lines"], live["last_error"])
    assert 100 == final["dropped_lines"]
    assert not spec.state_path.exists()


def test_messages_the_agent_never_sends_do_not_stop_the_writer(tmp_path: Path) -> None:
    """A header with wrong types, a regular file instead of a pipe, garbage and an unknown op are ignored (their
    descriptors closed); the pipe that follows is written as usual, and its tail keeps at most 2 KiB of a line."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer = subprocess.Popen(LOGWRITER_ARGV, stdin=theirs)
    theirs.close()
    read_end, write_end = os.pipe()
    socket.send_fds(ours, [open_message(1, tmp_path / "x.log", max_bytes="big")], [read_end])
    with (tmp_path / "file").open("wb") as regular:
        socket.send_fds(ours, [open_message(2, tmp_path / "y.log")], [regular.fileno()])
    ours.send(b"\xff not json")
    ours.send(b'{"op": "explode", "id": 3}')
    log = tmp_path / "z.log"
    good = hand_pipe(ours, 4, log)
    os.write(good, b"a" * 10_000 + b"\nok\n")
    os.close(good)

    assert 4 == until_closed(ours)["id"]
    ours.close()
    assert 0 == writer.wait(30)
    os.close(read_end)
    os.close(write_end)
    assert log.read_bytes().endswith(b"Z ok\n")
    assert not (tmp_path / "x.log").exists()
    assert not (tmp_path / "y.log").exists()
    assert [2048, 2] == [len(line) for line in json.loads(LogSpec(log).state_path.read_text())["tail"]]
