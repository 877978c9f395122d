"""Side-by-side benchmark of one large model file pulled from nginx on loopback: `curl -o`, `aria2c -x8` and
`emp-agent pull` (sha256 verified, fsynced, published through the cache), in one run, interleaved per round.

Two servers from one nginx: unlimited, and `limit_rate 50m` per connection (a shaped CDN). Prints a Markdown
table (median MB/s of the rounds, ratio to each peer) and writes JSON.

    bash bench/setup.sh --pull                 # nginx-light and aria2 from Debian's archive (needs root)
    .venv/bin/python bench/pull.py --size-mib 2048 --rounds 3 --out bench/results-pull.json

Every download is checked against the source's sha256 after it is timed (outside the timing for the peers,
inside it for emp-agent, which verifies as part of the pull). 1 MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AGENT = REPO / ".venv" / "bin" / "emp-agent"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_source(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 64 << 20))
            handle.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def start_nginx(work: Path, www: Path, fast: int, shaped: int, rate: str) -> subprocess.Popen[bytes]:
    conf = work / "nginx.conf"
    temp = " ".join(f"{kind}_temp_path {work}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(
        textwrap.dedent(f"""\
        worker_processes 2;
        daemon off;
        pid {work}/nginx.pid;
        error_log {work}/error.log;
        events {{ worker_connections 1024; }}
        http {{
          access_log off; sendfile on; tcp_nopush on; {temp}
          server {{ listen 127.0.0.1:{fast}; root {www}; }}
          server {{ listen 127.0.0.1:{shaped}; root {www}; limit_rate {rate}; }}
        }}
        """)
    )
    proc = subprocess.Popen(["nginx", "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")])
    deadline = time.monotonic() + 10
    for port in (fast, shaped):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise
                time.sleep(0.05)
    return proc


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_curl(url: str, out: Path, digest: str, size: int) -> float:
    seconds = timed(["curl", "-sS", "-f", "-o", str(out), url])
    assert sha256_of(out) == digest, "curl produced a wrong file"
    return seconds


def run_aria2(url: str, out: Path, digest: str, size: int) -> float:
    seconds = timed(
        ["aria2c", "-q", "-x8", "-s8", "-k1M", "--allow-overwrite=true", "-d", str(out.parent), "-o", out.name, url]
    )
    assert sha256_of(out) == digest, "aria2c produced a wrong file"
    return seconds


def run_agent(url: str, out: Path, digest: str, size: int) -> float:
    profile = out.parent / "bench.toml"
    profile.write_text(
        f'[models.big]\nurl = "{url}"\ndest = "checkpoints/big.bin"\nsha256 = "{digest}"\nsize = {size}\n'
    )
    env = {
        "PATH": os.environ["PATH"],
        "EMP_AGENT_MODEL_ROOT": str(out.parent / "models"),
        "EMP_AGENT_STATE_DIR": str(out.parent / "state"),
        "EMP_AGENT_LOG_LEVEL": "warning",
        "EMP_AGENT_PULL_DISK_MARGIN_MIB": "0",
    }
    seconds = timed([str(AGENT), "pull", "--profile", str(profile)], env)
    placed = out.parent / "models" / "checkpoints" / "big.bin"
    assert sha256_of(placed) == digest, "emp-agent placed a wrong file"
    return seconds


TOOLS = {"curl -o": run_curl, "aria2c -x8": run_aria2, "emp-agent pull": run_agent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", default="50m", help="nginx limit_rate per connection for the shaped server")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    for tool in ("nginx", "curl", "aria2c"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run `bash bench/setup.sh --pull` first")
    work = Path(tempfile.mkdtemp(prefix="emp-pull-bench-", dir=args.dir or "/var/tmp"))
    size = args.size_mib * 1024 * 1024
    work.chmod(0o755)  # nginx workers run as nobody
    www = work / "www"
    www.mkdir()
    digest = make_source(www / "big.bin", size)
    (www / "big.bin").chmod(0o644)
    fast, shaped = free_port(), free_port()
    nginx = start_nginx(work, www, fast, shaped, args.rate)
    scenarios = {
        "unlimited": f"http://127.0.0.1:{fast}/big.bin",
        f"{args.rate}/connection": f"http://127.0.0.1:{shaped}/big.bin",
    }
    tools_for = {"unlimited": list(TOOLS), f"{args.rate}/connection": ["aria2c -x8", "emp-agent pull"]}
    results: dict[str, dict[str, list[float]]] = {s: {t: [] for t in tools_for[s]} for s in scenarios}
    try:
        for round_no in range(args.rounds):
            for scenario, url in scenarios.items():
                order = (
                    tools_for[scenario][round_no % len(tools_for[scenario]) :]
                    + tools_for[scenario][: round_no % len(tools_for[scenario])]
                )
                for tool in order:
                    target = work / "out"
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir()
                    subprocess.run(["sync"], check=True)
                    seconds = TOOLS[tool](url, target / "big.bin", digest, size)
                    mbps = size / seconds / 1e6
                    results[scenario][tool].append(round(mbps, 1))
                    print(f"round {round_no + 1} {scenario:16} {tool:15} {seconds:7.2f} s {mbps:7.0f} MB/s", flush=True)
                    shutil.rmtree(target, ignore_errors=True)
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {"size_bytes": size, "rounds": args.rounds, "loadavg": os.getloadavg(), "results": results}
    print(f"\n| scenario | tool | median MB/s | runs | ratio emp-agent / tool |\n|---|---|---|---|---|")
    for scenario, per_tool in results.items():
        ours = statistics.median(per_tool["emp-agent pull"])
        for tool, runs in per_tool.items():
            median = statistics.median(runs)
            ratio = "—" if tool == "emp-agent pull" else f"{ours / median:.2f}"
            print(f"| {scenario} | {tool} | {median:.0f} | {', '.join(f'{r:.0f}' for r in runs)} | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
