"""A Ray cluster of N nodes on this machine, for tests and benchmarks: `ray start --head` plus
`ray start --address` per extra node, each with its own ports and CPUs, in a temp dir of its own,
with a small object store. Stopped by killing only the processes started in that temp dir (never
`ray stop`, which would stop every Ray cluster of this user on the machine).

    with LocalRayCluster(nodes=2, cpus=1) as cluster:
        ... quantize release RECIPE --executor ray --address cluster.address
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECT_STORE_BYTES = 100 * 1024 * 1024
PORTS_PER_NODE = 10


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def free_port_range(width: int = 40) -> int:
    """The first of `width` consecutive free ports (workers' ports)."""
    for start in range(21000, 60000, width):
        try:
            held = []
            for port in range(start, start + width):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                held.append(s)
            for s in held:
                s.close()
            return start
        except OSError:
            for s in held:
                s.close()
    raise RuntimeError("no free port range")


class LocalRayCluster:
    def __init__(self, nodes: int = 2, cpus: int = 1, env: dict[str, str] | None = None):
        self.nodes, self.cpus = nodes, cpus
        self.env = {**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="qray-", dir="/tmp"))  # short: Ray's socket paths
        self.address: str | None = None
        self.ray = str(Path(sys.executable).with_name("ray"))

    def _start(self, head: bool) -> None:
        ports = free_ports(8)
        workers = free_port_range()
        command = [self.ray, "start", "--num-cpus", str(self.cpus), "--num-gpus", "0",
                   "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
                   "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                   "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
                   "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
                   "--min-worker-port", str(workers), "--max-worker-port", str(workers + 39)]
        if head:
            command += ["--head", "--port", str(ports[6]), "--dashboard-port", str(ports[7]),
                        "--include-dashboard", "false", "--temp-dir", str(self.temp_dir),
                        "--node-ip-address", "127.0.0.1"]
            self.address = f"127.0.0.1:{ports[6]}"
        else:
            command += ["--address", self.address, "--node-ip-address", "127.0.0.1"]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"ray start failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def __enter__(self) -> "LocalRayCluster":
        try:
            self._start(head=True)
            for _ in range(self.nodes - 1):
                self._start(head=False)
            self.wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_nodes(self, timeout: float = 120) -> None:
        code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env, capture_output=True,
                                 text=True, timeout=120).stdout.strip()
            if out.isdigit() and int(out) >= self.nodes:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {self.nodes} live nodes")

    def processes(self) -> list[int]:
        """Pids of this cluster's processes: those whose command line names its temp dir or address."""
        import psutil

        marks = [str(self.temp_dir)] + ([self.address] if self.address else [])
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if any(mark in cmdline for mark in marks) and process.pid != os.getpid():
                found.append(process.pid)
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline and self.processes():
                time.sleep(0.3)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()
