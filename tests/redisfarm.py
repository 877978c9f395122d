"""Redis deployments the registry tests start on loopback: a Sentinel group, a three-node Cluster, a TLS server
with an ACL user. Each owns a temp dir and its processes, and stops them all."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from tests.conftest import redis_server_binary
from tests.helpers import wait_until


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster_bus: bool = False) -> int:
    """A TCP port nobody listens on now (loopback). For a Cluster node, one whose bus port (+10000) is free too,
    which keeps it below the ephemeral range (the kernel's random ports would overflow 65535)."""
    if not cluster_bus:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for _ in range(1000):
        port = random.randrange(20000, 30000)
        if _free(port) and _free(port + 10000):
            return port
    raise AssertionError("no free port pair for a cluster node")


class Farm:
    """Processes started by one test; `stop()` ends every one of them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, port: int, *args: str, config: str | None = None) -> None:
        """A redis-server (or sentinel, with a config file) on `port`, logging into the farm's dir."""
        workdir = self.directory / str(port)
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [redis_server_binary()]
        if config is not None:
            path = workdir / "redis.conf"
            path.write_text(config)
            argv.append(str(path))
        argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "", *args]
        log = (workdir / "log").open("wb")
        self.processes[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)

    def kill(self, port: int) -> None:
        """SIGKILL one server (a crashed master)."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes.clear()


def answers(port: int, **kwargs: Any) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=2, **kwargs).ping())
    except (redis.RedisError, OSError):
        return False


class SentinelGroup(Farm):
    """One master, one replica, three sentinels watching `mymaster` (1 s down-after, quick failover)."""

    name = "mymaster"

    def start(self) -> None:
        self.master, self.replica = free_port(), free_port()
        self.spawn(self.master)
        self.spawn(self.replica, "--replicaof", "127.0.0.1", str(self.master))
        wait_until(lambda: answers(self.master) and answers(self.replica), 20, what="master and replica")
        wait_until(
            lambda: redis.Redis(port=self.replica).info("replication").get("master_link_status") == "up",
            20,
            what="replica in sync",
        )
        self.sentinels = [free_port() for _ in range(3)]
        for port in self.sentinels:
            config = (
                f"sentinel monitor {self.name} 127.0.0.1 {self.master} 2\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 5000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            self.spawn(port, "--sentinel", config=config)
        wait_until(lambda: all(answers(p) for p in self.sentinels), 20, what="sentinels")
        wait_until(self._sentinels_know_each_other, 30, what="sentinels to discover each other")

    def _sentinels_know_each_other(self) -> bool:
        # Sentinel commands through execute_command here and in master_port: redis-py 6.4's sync helpers pass
        # options their own reply parsers do not take (the agent's asyncio Sentinel does not use them).
        try:
            return all(
                int(
                    redis.Redis(port=p, decode_responses=True).execute_command("SENTINEL MASTER", self.name)[
                        "num-other-sentinels"
                    ]
                )
                >= 2
                for p in self.sentinels
            )
        except (redis.RedisError, OSError, KeyError):
            return False

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.name}"

    def master_port(self) -> int:
        """The port Sentinel says is master now."""
        client = redis.Redis(port=self.sentinels[0], decode_responses=True)
        return int(client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.name)[1])


class Cluster(Farm):
    """Three masters, no replicas, slots spread by redis-cli --cluster create."""

    def start(self) -> None:
        self.ports = [free_port(cluster_bus=True) for _ in range(3)]
        for port in self.ports:
            self.spawn(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--appendonly", "no")
        wait_until(lambda: all(answers(p) for p in self.ports), 20, what="cluster nodes")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(self._ok, 30, what="cluster_state:ok on every node")

    def _ok(self) -> bool:
        try:
            return all(
                redis.Redis(port=p, decode_responses=True).cluster("info").get("cluster_state") == "ok"
                for p in self.ports
            )
        except (redis.RedisError, OSError):
            return False

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]},127.0.0.1:{self.ports[1]}"


class TlsServer(Farm):
    """TLS only, with a certificate from a private CA, and an ACL user limited to the emp: prefix."""

    user, password = "agent", "agent-secret-pw"

    def start(self) -> None:
        import trustme

        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert_file, key_file = self.directory / "server.pem", self.directory / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        self.port = free_port()
        acl = f"user {self.user} on >{self.password} ~emp:* &emp:* &machine:status:* +@all -@admin\n"
        acl += "user default on nopass ~* &* +@all\n"
        acl_file = self.directory / "users.acl"
        acl_file.write_text(acl)
        self.spawn(
            0,
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(cert_file),
            "--tls-key-file",
            str(key_file),
            "--tls-ca-cert-file",
            str(self.ca_file),
            "--tls-auth-clients",
            "no",
            "--aclfile",
            str(acl_file),
        )
        deadline = time.monotonic() + 20
        while not self.admin_ping():
            if time.monotonic() > deadline:
                raise AssertionError("TLS redis-server did not answer")
            time.sleep(0.1)

    def admin(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, ssl=True, ssl_ca_certs=str(self.ca_file), decode_responses=True, socket_timeout=5
        )

    def admin_ping(self) -> bool:
        try:
            return bool(self.admin().ping())
        except (redis.RedisError, OSError):
            return False

    @property
    def url(self) -> str:
        return f"rediss://{self.user}:{self.password}@127.0.0.1:{self.port}/0"
