"""The `emp-agent` command line; the only place that chooses exit codes.

Exit codes: 0 ok, 1 failed, 2 usage or configuration error, 3 agent not running, 4 partial (`status`: the
agent answers but the machine is not ready: bootstrapping, degraded or stopping).
Heavy modules (pydantic, redis, pynvml, the HTTP stack) are imported only by the commands that need them, so
`emp-agent status` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent import __version__
from agent.errors import AgentError, AgentNotRunning, ConfigError

TYPE_CHECKING = False  # typing costs `emp-agent status` 5 ms of imports; mypy reads this name as usual

if TYPE_CHECKING:
    from agent.profile import Profile
    from agent.redact import SecretMasker
    from agent.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_PARTIAL = 0, 1, 2, 3, 4
#: A stop waits for the whole tree to go; stop timeouts of GPU services run to minutes.
CONTROL_TIMEOUT_S = 900.0


def _seconds(highest: float, lowest: float = 0.0) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds in [lowest, highest]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not lowest <= value <= highest:  # also false for nan
            raise argparse.ArgumentTypeError(f"must be seconds between {lowest:g} and {highest:g}")
        return value

    return parse


def _count(text: str) -> int:
    """An argparse type: a whole number, zero or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, help="agent TOML file (default: $EMP_AGENT_CONFIG or /etc/emp-agent/agent.toml)"
    )
    common.add_argument(
        "--env-file",
        type=Path,
        help="read KEY=value lines first, as the unit's EnvironmentFile= does (e.g. /etc/emp-agent/env)",
    )
    parser = argparse.ArgumentParser(
        prog="emp-agent",
        description="Host agent for GPU fleets: bootstrap the host, supervise its services, register in Redis.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage or configuration error, 3 agent not running, "
        "4 partial (status: the machine is not ready yet, or degraded).",
    )
    parser.add_argument("--version", action="version", version=f"emp-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    profile_opt = argparse.ArgumentParser(add_help=False)
    profile_opt.add_argument("--profile", help="profile name or path (overrides EMP_AGENT_PROFILE)")
    sub.add_parser("run", parents=[common, profile_opt], help="bootstrap this host and supervise it until SIGTERM")
    socket_opt = argparse.ArgumentParser(add_help=False)
    socket_opt.add_argument("--socket", type=Path, help="control socket (default: <runtime_dir>/agent.sock)")
    status = sub.add_parser("status", parents=[common, socket_opt], help="show the running agent's state")
    status.add_argument("--json", action="store_true", help="print the status document as JSON")
    status.add_argument("--watch", action="store_true", help="redraw until interrupted (in place on a terminal)")
    status.add_argument("--interval", type=_seconds(3600, 0.1), default=2.0, help="seconds between redraws (default 2)")
    for verb, text in (("start", "start"), ("stop", "stop (whole process tree)"), ("restart", "stop, then start")):
        control = sub.add_parser(verb, parents=[common, socket_opt], help=f"{text} instances of the running agent")
        control.add_argument(
            "names", nargs="+", metavar="NAME", help="an instance, a service (all its instances) or 'all'"
        )
    reopen = sub.add_parser(
        "reopen-logs",
        parents=[common, socket_opt],
        help="make log writers reopen their files (after an external logrotate)",
    )
    reopen.add_argument("names", nargs="*", default=["all"], metavar="NAME", help="default: all")
    signal_cmd = sub.add_parser("signal", parents=[common, socket_opt], help="send a signal to an instance's group")
    signal_cmd.add_argument("names", nargs=1, metavar="NAME")
    signal_cmd.add_argument("signal", help="e.g. HUP, USR1, SIGTERM")
    drain = sub.add_parser(
        "drain",
        parents=[common, socket_opt],
        help="take this machine out of rotation: phase draining, grace, deregister, stop services",
    )
    drain.add_argument(
        "--timeout", type=_seconds(86400), default=0.0, help="grace for in-flight work, in seconds (default 0)"
    )
    logs = sub.add_parser("logs", parents=[common, socket_opt], help="print (and follow) an instance's output log")
    logs.add_argument("names", nargs=1, metavar="NAME", help="an instance, or a service with one instance")
    logs.add_argument("-n", "--lines", type=_count, default=20, help="last lines to print first (default 20)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output, across rotations")
    sub.add_parser("check", parents=[common, profile_opt], help="validate settings and profile; start nothing")
    sub.add_parser(
        "pull",
        parents=[common, profile_opt],
        help="download and verify the profile's models, then exit (image bakes; safe beside a running agent)",
    )
    bootstrap = sub.add_parser(
        "bootstrap",
        parents=[common, profile_opt],
        help="run the first bootstrap stages alone, for image bakes (no registration, no services)",
        description="Runs detect, pull_models and prepare up to --until, then exits: what a golden image bakes "
        "in. Nothing is registered, no service is left running, no machine id is kept. Refuses to run beside an "
        "agent using the same state dir.",
    )
    bootstrap.add_argument("--until", required=True, choices=["detect", "pull_models", "prepare"])
    detect = sub.add_parser("detect", parents=[common], help="print the host's fingerprint: host facts and GPUs")
    detect.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    detect.add_argument("--profile", help="apply this profile's [gpu] select (overrides EMP_AGENT_PROFILE)")
    fleet = sub.add_parser(
        "fleet",
        parents=[common],
        help="list the machines in Redis (live, suspect, dead) and which can take a job",
        description="Reads the registry named by EMP_AGENT_REDIS_URL (or this host's embedded one). With a "
        "requirement, lists the machines that meet it; exit 1 when none does.",
    )
    fleet.add_argument(
        "--service", help="a job-facing capability name that must be ready (a profile's `capabilities`, e.g. comfyui)"
    )
    fleet.add_argument("--min-gpu-memory-mib", type=_count, default=0, help="an offered GPU slot with this much")
    fleet.add_argument("--model", action="append", default=[], help="a model (name or sha256) that must be present")
    fleet.add_argument("--json", action="store_true", help="print JSON instead of the table")
    sub.add_parser("version", help="print the agent version")
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="bash: `emp-agent completion bash > /etc/bash_completion.d/emp-agent`; "
        'zsh: `emp-agent completion zsh > "${fpath[1]}/_emp-agent"`',
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    sub.add_parser(
        "manpage",
        help="print the emp-agent(1) manual page (roff)",
        description="`emp-agent manpage > /usr/local/share/man/man1/emp-agent.1` (install.sh does this).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"emp-agent {__version__}")
            return EXIT_OK
        if args.command == "completion":
            from agent.completion import completion_script

            print(completion_script(_parser(), args.shell))
            return EXIT_OK
        if args.command == "manpage":
            from agent.manpage import render_manpage

            sys.stdout.write(render_manpage(_parser()))
            return EXIT_OK
        if args.command == "status":
            return _status(args)
        if args.command in ("start", "stop", "restart", "signal", "reopen-logs"):
            return _control(args)
        if args.command == "drain":
            return _drain(args)
        if args.command == "logs":
            return _logs(args)
        if args.command == "check":
            return _check(args)
        if args.command == "detect":
            return _detect(args)
        if args.command == "pull":
            return _pull(args)
        if args.command == "fleet":
            return _fleet(args)
        if args.command == "bootstrap":
            return _bootstrap(args)
        return _run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            _error(str(problem))
        return EXIT_USAGE
    except AgentNotRunning as exc:
        _error(str(exc))
        return EXIT_NOT_RUNNING
    except AgentError as exc:
        _error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `emp-agent status | head`: the reader is gone, nothing to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # writing our own output failed (disk full)
            print(f"error: cannot write the output: {exc.strerror}", file=sys.stderr)
            return EXIT_FAILED
        raise


def _error(text: str) -> None:
    """`error: …` on stderr; under systemd prefixed `<3>`, so journald files it at priority err (-p warning)."""
    import os

    from agent.journald import under_journald

    prefix = "<3>" if under_journald(os.environ, sys.stderr.fileno()) else ""
    print(f"{prefix}error: {text}", file=sys.stderr)


def _socket(args: argparse.Namespace) -> Path:
    """The control socket: --socket, else found like the settings would find it (without importing them)."""
    from agent.api.client import locate_socket

    path: Path = args.socket or locate_socket(config_path=str(args.config) if args.config else None)
    return path


def _status(args: argparse.Namespace) -> int:
    from agent.api.client import request_json
    from agent.statusview import render_status

    socket_path = _socket(args)
    if args.watch:
        return _watch(socket_path, args.json, max(0.1, args.interval))
    _, status = request_json(socket_path, "GET", "/status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status, colour=sys.stdout.isatty()))
    return {"ready": EXIT_OK, "failed": EXIT_FAILED}.get(status.get("phase"), EXIT_PARTIAL)


def _watch(socket_path: Path, as_json: bool, interval: float) -> int:
    """Redraw every `interval` seconds: in place on a terminal, one frame after another when piped. An agent
    that goes away is reported and waited for; Ctrl-C ends it with exit 0."""
    import time

    from agent.api.client import request_json
    from agent.statusview import render_status

    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                _, status = request_json(socket_path, "GET", "/status")
                frame = json.dumps(status) if as_json else render_status(status, colour=tty)
            except AgentError as exc:  # gone, hung or refused: say so and keep watching
                frame = f"error: {exc}"
            if tty:
                frame = "\033[H\033[2J" + frame  # home and clear: the table is redrawn in place
            print(frame + ("" if tty or as_json else "\n"), flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _control(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from agent.api.client import request_json

    socket_path = _socket(args)
    done = {
        "start": "started",
        "stop": "stopped",
        "restart": "restarted",
        "signal": "signalled",
        "reopen-logs": "log reopened",
    }[args.command]
    ok = failed = 0
    for name in args.names:
        path = f"/services/{quote(name, safe='')}/{args.command}"
        if args.command == "signal":
            path += f"?signal={quote(args.signal)}"
        code, body = request_json(socket_path, "POST", path, timeout=CONTROL_TIMEOUT_S)
        if code == 400:
            print(f"{name}: ERROR ({body.get('error')})")
            failed += 1
            continue
        for result in body["results"]:
            print(f"{result['name']}: {done}" if result["ok"] else f"{result['name']}: ERROR ({result['error']})")
            ok, failed = (ok + 1, failed) if result["ok"] else (ok, failed + 1)
    if failed == 0:
        return EXIT_OK
    return EXIT_FAILED if ok == 0 else EXIT_PARTIAL


def _drain(args: argparse.Namespace) -> int:
    from agent.api.client import request_json

    socket_path = _socket(args)
    code, body = request_json(
        socket_path, "POST", f"/drain?timeout={args.timeout}", timeout=args.timeout + CONTROL_TIMEOUT_S
    )
    if code != 200:
        print(f"error: {body.get('error')}", file=sys.stderr)
        return EXIT_USAGE if code == 400 else EXIT_FAILED
    registry = "deregistered" if body["deregistered"] else "not registered"
    print(f"drained: {len(body['stopped'])} instance(s) stopped, {registry}; phase {body['phase']}")
    return EXIT_OK


def _logs(args: argparse.Namespace) -> int:
    """Ask the running agent where the instance's log is; without an agent, look in the configured log_dir."""
    from agent.api.client import request_json
    from agent.logtail import follow, last_lines, write_out

    name = args.names[0]
    if "/" in name or name.startswith(".") or not name:
        print(f"{name}: ERROR (not an instance name)", file=sys.stderr)
        return EXIT_USAGE
    socket_path = _socket(args)
    try:
        _, status = request_json(socket_path, "GET", "/status")
    except AgentNotRunning:
        settings, _ = _load(args, need_profile=False)
        path = settings.log_dir / f"{name}.log"
    else:
        services = status.get("services", [])
        found = [s for s in services if s["name"] == name] or [s for s in services if s["service"] == name]
        if not found:
            print(f"{name}: ERROR (no such service)", file=sys.stderr)
            return EXIT_FAILED
        if len(found) > 1:
            names = ", ".join(s["name"] for s in found)
            print(f"{name}: ERROR ({len(found)} instances: {names}; name one)", file=sys.stderr)
            return EXIT_USAGE
        path = Path(found[0]["log"]["path"])
    if not path.exists() and not args.follow:
        print(f"{name}: ERROR (no log at {path})", file=sys.stderr)
        return EXIT_FAILED
    if path.exists():
        for line in last_lines(path, args.lines):
            write_out(line)
    if args.follow:
        for chunk in follow(path):
            write_out(chunk)
    return EXIT_OK


def _load(args: argparse.Namespace, need_profile: bool) -> tuple[Settings, Profile | None]:
    from agent.errors import Problem
    from agent.profile import load_profile
    from agent.settings import load_settings

    problems: list[Problem] = []
    settings = None
    if getattr(args, "env_file", None) is not None:
        import os

        from agent.settings import read_env_file

        os.environ.update(read_env_file(args.env_file))  # raises ConfigError naming the file and line
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    ref = getattr(args, "profile", None) or (settings.profile if settings else None)
    profile = None
    if ref is None and need_profile and settings is not None:
        problems.append(Problem("settings", "EMP_AGENT_PROFILE", "no profile given (set it or pass --profile)"))
    elif ref is not None:
        from agent.settings import Settings

        profiles_dir = settings.profiles_dir if settings else Settings.model_fields["profiles_dir"].default
        try:
            profile = load_profile(ref, profiles_dir)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings, profile


def _check(args: argparse.Namespace) -> int:
    import os

    settings, profile = _load(args, need_profile=False)
    settings.http_token()  # raises ConfigError naming the file when the token is unusable
    if profile is None:
        print("ok: settings valid (no profile given)")
        return EXIT_OK
    for name, model in profile.models.items():
        if model.auth_env and not os.environ.get(model.auth_env):
            print(f"warning: models.{name}.auth_env: {model.auth_env} is not set in this environment", file=sys.stderr)
    print(
        f"ok: settings valid; profile {profile.name} ({profile.source}): {len(profile.services)} service(s), "
        f"{len(profile.models)} model(s), {len(profile.prepare)} prepare step(s)"
    )
    return EXIT_OK


def _detect(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from agent.host.facts import read_host_facts
    from agent.host.gpu import GpuState, visible
    from agent.host.nvml import NvmlProbe
    from agent.statusview import render_fingerprint

    settings, profile = _load(args, need_profile=False)
    report = asyncio.run(NvmlProbe(settings.gpu_probe_timeout_s).probe())
    report = visible(report, os.environ.get("CUDA_VISIBLE_DEVICES"), profile.gpu.select if profile else None)
    data = {"host": read_host_facts(settings.model_root).to_dict(), "gpus": report.to_dict()}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(render_fingerprint(data, colour=sys.stdout.isatty()))
    return EXIT_FAILED if report.state in (GpuState.ERROR, GpuState.TIMEOUT) else EXIT_OK


def _bootstrap(args: argparse.Namespace) -> int:
    from agent.bootstrap.bake import run_bake
    from agent.logconfig import configure_logging

    settings, profile = _load(args, need_profile=True)
    assert profile is not None  # _load raised otherwise
    configure_logging(settings.log_level, settings.log_format.value, _masker(settings, profile))
    records = run_bake(settings, profile, args.until)
    for record in records:
        text = record.error if record.error else record.detail or ""
        print(f"{record.name:<12} {record.state.value:<8} {text}")
    return EXIT_OK if all(r.state.value == "done" for r in records) else EXIT_FAILED


def _fleet(args: argparse.Namespace) -> int:
    import asyncio

    from agent.registry.fleet import Requirement, read_fleet
    from agent.statusview import render_fleet

    settings, _ = _load(args, need_profile=False)
    from agent.registry.embedded import url_of

    url = settings.redis_url.get_secret_value() if settings.redis_url else url_of(settings.registry_socket)
    shown = settings.redis_url_redacted or f"{url} (this host's embedded registry)"
    print(f"registry: {shown}", file=sys.stderr)
    need = Requirement(args.service, args.min_gpu_memory_mib, tuple(args.model))
    machines = asyncio.run(read_fleet(url, settings.redis_tls, need))
    asked = bool(args.service or args.min_gpu_memory_mib or args.model)
    listed = [m for m in machines if m.unmet is None] if asked else machines
    if args.json:
        print(json.dumps([m.to_dict() for m in listed], indent=2))
    else:
        sys.stdout.write(render_fleet([m.to_dict() for m in listed], colour=sys.stdout.isatty()))
        if asked and not listed and machines:
            reasons = sorted({m.unmet for m in machines if m.unmet})
            print(f"none of {len(machines)} machine(s) fits: {'; '.join(reasons)[:500]}", file=sys.stderr)
    return EXIT_FAILED if asked and not listed else EXIT_OK


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from agent.daemon import Agent
    from agent.host.launcher import watch_children_by_pidfd
    from agent.logconfig import configure_logging

    settings, profile = _load(args, need_profile=True)
    assert profile is not None  # _load raised otherwise
    configure_logging(settings.log_level, settings.log_format.value, _masker(settings, profile))
    watch_children_by_pidfd()
    return asyncio.run(Agent(settings, profile).run())


def _masker(settings: Settings, profile: Profile) -> SecretMasker:
    """A log processor that knows every secret value this agent may hold: the Redis password, the tokens of the
    model sources, and the variables services inherit."""
    import os

    from agent.profile import token_env_names
    from agent.redact import SecretMasker, url_secrets

    masker = SecretMasker()
    token = settings.http_token()
    if token:
        masker.add(token)
    if settings.redis_url is not None:
        for secret in url_secrets(settings.redis_url.get_secret_value()):
            masker.add(secret)
    names = {n for service in profile.services.values() for n in service.inherit_env}
    names |= token_env_names(profile.models)
    for name in names:
        if os.environ.get(name):
            masker.add(os.environ[name])
    return masker


def _pull(args: argparse.Namespace) -> int:
    import os
    import threading

    from agent.logconfig import configure_logging
    from agent.pull.progress import bar
    from agent.pull.puller import open_puller

    settings, profile = _load(args, need_profile=True)
    assert profile is not None  # _load raised otherwise
    drawing = sys.stderr.isatty()
    # With the bar on the terminal, only warnings and errors are logged there (progress lines would tear it).
    level = "warning" if drawing and settings.log_level in ("debug", "info") else settings.log_level
    configure_logging(level, settings.log_format.value, _masker(settings, profile))
    puller, transport = open_puller(settings, os.environ)
    finished = threading.Event()
    drawer = None
    if drawing:

        def draw() -> None:
            while not finished.wait(0.5):
                if puller.progress.planned_yet:
                    print("\r\033[K" + bar(puller.progress.snapshot()), end="", file=sys.stderr, flush=True)

        drawer = threading.Thread(target=draw, daemon=True)
        drawer.start()
    try:
        statuses = puller.pull(profile.models)
    except KeyboardInterrupt:
        puller.cancel()
        raise
    finally:
        finished.set()
        if drawer is not None:
            drawer.join()
            print(file=sys.stderr)
        transport.close()
    failed = 0
    for status in statuses.values():
        if status.state == "failed":
            failed += 1
            print(f"{status.name}: ERROR ({status.error})")
        else:
            print(f"{status.name}: {status.state} {status.dest}")
    return EXIT_FAILED if failed else EXIT_OK
