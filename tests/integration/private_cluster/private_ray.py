"""A Ray cluster of the test's own, isolated from every other Ray on this machine.

The session fixture (conftest.py) runs a ray.cluster_utils.Cluster inside the pytest process,
and other people may run Ray clusters on this machine too. Tests that need a cluster started
differently (the fake_multinode autoscaler, a fast metrics export interval) start one here:
`ray start --head --block` in its own process group, with its own temp dir, its own free
ports and its own auth token, and talk to it only from subprocesses. Stopping it signals that
process group and then any process whose command line names this cluster's temp dir or GCS
port (fake nodes the autoscaler started), never a global `ray stop`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.support import free_port as _free_port
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[3]
LOCAL_CONFIG = REPO / "cluster.local.yaml"


def free_port() -> int:
    """A port free on every interface (Ray's processes listen on the node's address)."""
    return _free_port("")


def node_ip() -> str:
    """The address Ray picks for nodes on this machine (fake nodes connect to the GCS there)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


class PrivateRay:
    """`ray start --head` of the test's own. `autoscaling` is a cluster-launcher config (dict)
    for the fake_multinode provider, or None for a plain single-node head."""

    def __init__(self, num_cpus: int = 2, labels: dict[str, str] | None = None,
                 autoscaling: dict | None = None, system_config: dict | None = None) -> None:
        # Short: Ray's unix socket paths live under it and must stay below 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.port = free_port()
        self.ip = node_ip()
        self.address = f"{self.ip}:{self.port}"
        self.token = secrets.token_hex(16)
        # Canary cloud credentials in every process's environment: no log may ever show them.
        self.canaries = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
                         "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
        self.num_cpus = num_cpus
        self.labels = labels or {}
        self.autoscaling = autoscaling
        self.system_config = system_config or {}
        self.log_path = self.temp_dir / "ray-start.log"
        self.proc: subprocess.Popen | None = None
        self.initial_nodes: set[str] = set()  # alive once started (start_local_cluster)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver subprocess of this cluster: its address and token (and the
        canary credentials)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   PYTHONPATH=str(REPO), **self.canaries, **extra)
        return env

    def start(self, timeout_s: float = 120.0) -> "PrivateRay":
        cmd = ["ray", "start", "--head", "--block", f"--port={self.port}",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
               f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}",
               "--object-store-memory=300000000", "--disable-usage-stats"]
        if self.labels:
            cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in self.labels.items()))
        if self.system_config:
            cmd.append("--system-config=" + json.dumps(self.system_config, separators=(",", ":")))
        env = self.env()
        env.pop("RAY_ADDRESS")
        if self.autoscaling is not None:
            config = dict(self.autoscaling)
            # Fake nodes dial the GCS at this address (default: <ip>:6379, someone else's).
            config["provider"] = {**config["provider"], "gcs_address": self.address}
            path = self.temp_dir / "autoscaling.yaml"
            path.write_text(yaml.safe_dump(config))
            cmd.append(f"--autoscaling-config={path}")
            # The provider refuses to run without it; 1 s: react to demand within seconds.
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_until_up(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text()[-3000:])
            if "Ray runtime started" in self.log_path.read_text():
                return
            time.sleep(0.5)
        raise TimeoutError(f"ray start did not come up in {timeout_s}s:\n"
                           + self.log_path.read_text()[-3000:])

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> set[str]:
        """Until `count` nodes are alive: the autoscaler launches min_workers nodes only after
        the head is up, and on a cold machine that takes a while. Returns their node ids."""
        out = self.run_python(f"""
import json, ray
from orchestrator.polling import wait_for
ray.init()
alive = wait_for("{count} nodes alive", lambda: (lambda ids: ids if len(ids) >= {count}
                 else None)([n["NodeID"] for n in ray.nodes() if n["Alive"]]),
                 timeout_s={timeout_s})
print("NODES", json.dumps(alive))
""", timeout_s=timeout_s + 60)
        return set(_printed_nodes(out))

    def stop_nodes_added_since(self, kept: set[str], timeout_s: float = 60.0) -> list[str]:
        """Stop every node of this cluster not in `kept` (the ones the autoscaler added for a
        test) and wait until their raylets have exited; returns their ids. Left alone they
        would idle for cluster.local.yaml's idle_timeout_minutes (2), each a raylet, its
        agents and our node agent beside the next test. SIGTERM makes a raylet leave the
        cluster cleanly (Ray lists it dead), taking its workers and agents with it; the
        autoscaler then loses contact with it and drops it. Here, not in a driver: a driver's
        start costs seconds, and the fake provider runs every raylet on this machine."""
        added = {node: pid for node, pid in self._raylets().items() if node not in kept}
        for pid in added.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_for(f"the raylets of nodes {sorted(added)} to exit",
                 lambda: not any(_running(pid) for pid in added.values()), timeout_s)
        return sorted(added)

    def _raylets(self) -> dict[str, int]:
        """node id -> pid of this cluster's raylets (each names both on its command line)."""
        raylets = {}
        for pid in _pids_mentioning((f"--temp_dir={self.temp_dir}",)):
            node = re.search(r"/raylet --.* --node_id=(\w+)", _cmdline(pid))
            if node:
                raylets[node.group(1)] = pid
        return raylets

    @property
    def session_dir(self) -> Path:
        return (self.temp_dir / "session_latest").resolve()

    def run_python(self, code: str, timeout_s: float = 300.0, **env: str) -> str:
        """Run `code` in a fresh Python connected to nothing yet (RAY_ADDRESS points here);
        returns its stdout, raises with its output on failure."""
        result = subprocess.run([sys.executable, "-c", code], env=self.env(**env), cwd=REPO,
                                capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise AssertionError(f"driver failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
        return result.stdout

    def stop(self) -> None:
        """Stop this cluster, and only it."""
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM lets raylets and the GCS exit cleanly; `ray start --block` itself can
            # outlive it for long, and nothing of this cluster is worth waiting for.
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Fake nodes started by the autoscaler (and anything that escaped the group): every
        # process of this cluster names its temp dir or its GCS address on its command line.
        for pid in _pids_mentioning((str(self.temp_dir), self.address)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _printed_nodes(out: str) -> list[str]:
    # A tagged line, not the last one: Ray may write a line of its own to stdout after ours.
    return next(json.loads(line.removeprefix("NODES ")) for line in reversed(out.splitlines())
                if line.startswith("NODES "))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="ignore")
    except OSError:  # exited meanwhile, or not ours to read
        return ""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited raylet stays one until the autoscaler reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids_mentioning(needles: tuple[str, ...]) -> list[int]:
    # Not followed by a digit: "ip:4123" must not match another cluster's "ip:41234".
    pattern = re.compile("|".join(re.escape(n) + r"(?!\d)" for n in needles))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if pattern.search(_cmdline(int(entry.name))):
            pids.append(int(entry.name))
    return pids


def start_local_cluster() -> PrivateRay:
    """A cluster.local.yaml cluster: one CPU worker from the start (so node agents have a peer
    to measure bandwidth to), and a metrics export interval of 1 s instead of Ray's 10 s so
    metrics arrive within seconds."""
    cluster = PrivateRay(num_cpus=2, labels={"orchestrator.io/node-type": "head"},
                         autoscaling=local_config(cpu_worker={"min_workers": 1}),
                         system_config={"metrics_report_interval_ms": 1000}).start()
    try:
        # The head and the min_workers CPU worker: what each test module may count on.
        cluster.initial_nodes = cluster.wait_for_nodes(2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def local_config(**node_type_overrides: dict) -> dict:
    """cluster.local.yaml, with per-node-type overrides (e.g. min_workers) for a test."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    for name, override in node_type_overrides.items():
        config["available_node_types"][name].update(override)
    return config
