"""Registry scale benchmark: how many machine heartbeats one redis-server sustains, emp-agent's one-call function
heartbeat side by side with the plain-SET and plain-HSET heartbeats other systems use, in the same run.

redis-benchmark (C, the server's own load generator) drives every scenario, so the client is never the limit:
N machines are registered first (real records of an 8x H100 host, ~6 KB each), then each scenario sends
`--requests` heartbeats for random machines from `--clients` connections, one command per round trip.

    .venv/bin/python bench/registry.py --machines 10000 100000 --requests 200000 --out bench/results-registry.json

Per scenario: heartbeats/s, p50/p99 latency (ms), redis-server CPU seconds per 10 000 heartbeats, and the
machines' memory. Everything runs on loopback against a server this script starts and stops.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from agent.capabilities import caps_hash, dynamic_record, static_record  # noqa: E402
from agent.host.facts import read_host_facts  # noqa: E402
from agent.host.nvml import read_gpus  # noqa: E402
from agent.registry import keys  # noqa: E402
from agent.registry.client import LIBRARY, STREAM_MAXLEN, STREAM_TTL_MS  # noqa: E402
from agent.testing import FakeNvml  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def record_fields(machine_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """The full record at registration and the small fields of one beat, as the agent writes them."""
    report = read_gpus(FakeNvml.from_file(REPO / "tests" / "fixtures" / "nvml" / "h100x8.json"))
    host = read_host_facts(Path("/"))
    slots = [
        {
            "name": f"comfyui-{g.index}",
            "service": "comfyui",
            "capabilities": ["comfyui"],
            "port": 8188 + g.index,
            "gpu": {"index": g.index, "uuid": g.uuid},
            "per_gpu": True,
        }
        for g in report.gpus
    ]
    caps = static_record(agent_version="0.1.0", profile="comfyui", host=host, gpus=report, slots=slots, models=[])
    small = {
        "phase": "ready",
        "reasons": "[]",
        "dynamic": json.dumps(dynamic_record((200000, 3000000), report), sort_keys=True),
        "services_ready": '["comfyui"]',
        "interval_ms": "10000",
    }
    full = {
        "machine_id": machine_id,
        "capabilities": json.dumps(caps, sort_keys=True),
        "caps_hash": caps_hash(caps),
        **small,
    }
    return full, small


def populate(client: redis.Redis, machines: int) -> None:
    """Register every machine through the library (epoch 1 each), in pipelined batches."""
    full, _small = record_fields("m")
    batch = 500
    for start in range(0, machines, batch):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(start + batch, machines)):
            mid = f"m{n:012d}"
            fields = json.dumps({**full, "machine_id": mid})
            pipe.fcall(
                "emp_v1_register",
                3,
                keys.machine_key(mid),
                keys.epoch_key(mid),
                keys.events_key(mid),
                fields,
                30000,
                STREAM_MAXLEN,
                STREAM_TTL_MS,
            )
            pipe.fcall("emp_v1_index", 1, keys.FLEET_INDEX, mid, "seen")
        pipe.execute()


def bench(port: int, command: list[str], requests: int, clients: int, keyspace: int) -> dict[str, float]:
    """redis-benchmark on one command with __rand_int__ machine ids; its CSV summary."""
    argv = [
        "redis-benchmark",
        "-p",
        str(port),
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-r",
        str(keyspace),
        "--csv",
        *command,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout
    # the test-name column echoes the command (with its JSON) unescaped: read the seven numbers at the line's end
    numbers = [float(n) for n in re.findall(r'"([0-9.]+)"', out.strip().splitlines()[-1])[-7:]]
    rps, _avg, _min, p50, _p95, p99, _max = numbers
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99}


def cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def scenarios(small: dict[str, str]) -> dict[str, list[str]]:
    """The heartbeats compared. __rand_int__ is replaced by redis-benchmark with a random 12-digit machine number."""
    machine = "emp:machine:{m__rand_int__}"
    return {
        "emp-agent FCALL heartbeat (fenced, TIME, TTL)": [
            "FCALL",
            "emp_v1_heartbeat",
            "2",
            machine,
            machine + ":events",
            "1",
            json.dumps(small),
            "30000",
            str(STREAM_MAXLEN),
        ],
        "emp-agent FCALL fleet index": ["FCALL", "emp_v1_index", "1", keys.FLEET_INDEX, "m__rand_int__", "seen"],
        "plain SET key EX 30 (Sidekiq/Celery-like liveness key)": ["SET", "hb:m__rand_int__", "1", "EX", "30"],
        "plain HSET of the same fields (no TTL, no fence)": [
            "HSET",
            machine,
            *[part for name, value in small.items() for part in (name, value)],
        ],
    }


def run(machines: int, requests: int, clients: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="emp-bench-") as tmp:
        port = free_port()
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            client.function_load(LIBRARY, replace=True)
            started = time.monotonic()
            populate(client, machines)
            populated_s = time.monotonic() - started
            memory = int(client.info("memory")["used_memory"])
            _full, small = record_fields("m")
            results: dict[str, Any] = {
                "machines": machines,
                "populate_s": round(populated_s, 1),
                "used_memory_mb": round(memory / 1e6, 1),
                "scenarios": {},
            }
            for name, command in scenarios(small).items():
                before = cpu_seconds(client)
                summary = bench(port, command, requests, clients, machines)
                spent = cpu_seconds(client) - before
                summary["redis_cpu_s_per_10k"] = round(spent / requests * 10000, 3)
                results["scenarios"][name] = summary
                print(
                    f"{machines:>7} {name:<58} {summary['rps']:>9.0f}/s  p50 {summary['p50_ms']:.3f} ms  "
                    f"p99 {summary['p99_ms']:.3f} ms  cpu {summary['redis_cpu_s_per_10k']:.3f} s/10k",
                    flush=True,
                )
            return results
        finally:
            server.terminate()
            server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--requests", type=int, default=200000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if shutil.which("redis-benchmark") is None:
        print("redis-benchmark is needed (apt-get install redis-tools)", file=sys.stderr)
        return 2
    results = {
        "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "requests": args.requests,
        "clients": args.clients,
        "runs": [run(m, args.requests, args.clients) for m in args.machines],
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
