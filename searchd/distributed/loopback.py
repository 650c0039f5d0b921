"""A Ray cluster of several nodes on this machine, on 127.0.0.1 (a development tool): try
`ray job submit` and `--resume` before renting a cloud, and the cluster of
tests/test_cluster_loopback.py and benchmarks/cluster_scaling.py.

    python -m searchd.distributed.loopback --nodes 2 --cpus-per-node 1     # Ctrl-C stops it

prints the environment a client needs (address, token) and waits.

Each node is a ``ray start --block`` process of ours, with token authentication on, its own
token file, ports below Ray's worker port range (10002-19999) found free, and a marker in its
environment that every process it starts inherits (GCS, raylet, dashboard, workers, job
supervisors and drivers). Shutting down ends the node processes and then every process that
carries the marker, and nothing else: ``ray stop`` would end every Ray process on the machine,
other people's included.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MARKER_ENV = "SEARCHD_LOOPBACK_CLUSTER"
# Ports are drawn from here: below Ray's default worker ports (10002-19999), which a --port
# or --dashboard-port must not overlap, and away from well-known services.
PORT_RANGE = (6300, 9999)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port(taken: Iterable[int] = ()) -> int:
    """A TCP port in ``PORT_RANGE`` that nothing listens on now (on any address) and that is
    not in ``taken``. Random, so that concurrent clusters rarely pick the same one."""
    taken = set(taken)
    lo, hi = PORT_RANGE
    for _ in range(500):
        port = random.randint(lo, hi)
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``MARKER_ENV=marker`` (read from /proc)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if needle in env:
            out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class LoopbackCluster:
    """``nodes`` Ray nodes on 127.0.0.1, each a ``ray start --block`` subprocess of ours.

    Args:
        nodes: nodes to start (the first is the head).
        cpus_per_node: logical CPUs each node advertises.
        gpus_per_node: logical GPUs each node advertises (0 by default). Ray schedules by the
            counts it is told, so a pool sized from GPUs (``num_gpus_per_worker``) takes the
            same path as on a GPU cluster; with ``model.device=cpu`` its actors compute on
            the CPU.
        object_store_mb: object store of each node.
        base_dir: where the session files, token and logs go (default: a new /tmp folder,
            short, because Ray's socket paths must stay under 108 characters).
        startup_timeout_s: how long to wait for the head, and for each node to join.

    Use as a context manager; ``env`` is the environment of a client (``ray job ...``).
    """

    def __init__(
        self,
        nodes: int = 2,
        cpus_per_node: int = 1,
        *,
        gpus_per_node: int = 0,
        object_store_mb: int = 256,
        base_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 180.0,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes = {nodes}; at least the head is needed")
        self.n_nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.object_store_mb = object_store_mb
        self.startup_timeout_s = startup_timeout_s
        self.marker = uuid.uuid4().hex
        self._own_dir = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.token_path = self.base / "auth_token"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lost: list[subprocess.Popen[bytes]] = []  # nodes lost on purpose (lose_node)
        self._started = 0  # nodes started so far: node i's address is node_ip(i)
        self.leftover_commands: list[str] = []
        self._ports: list[int] = []
        self.gcs_port = 0
        self.dashboard_port = 0

    # Environment -------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment of the nodes and of a client: token auth on, this cluster's token,
        the marker, and no RAY_ADDRESS of the caller's."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            MARKER_ENV: self.marker,
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        return env

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip(0)}:{self.gcs_port}"

    # Start -------------------------------------------------------------------------------
    def __enter__(self) -> LoopbackCluster:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _port(self) -> int:
        port = free_port(self._ports)
        self._ports.append(port)
        return port

    def _ray_start(self, args: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 (kept open by the child)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
            f"--num-cpus={self.cpus_per_node}", f"--num-gpus={self.gpus_per_node}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            # Workers take OS-assigned ports: two raylets on one machine never share a range.
            "--min-worker-port=0", "--max-worker-port=0",
            f"--dashboard-agent-listen-port={self._port()}",
            # A temp dir per node, as on separate machines: a node's runtime-env agent deletes
            # the job packages it no longer uses, which would pull a shared one from under the
            # other nodes' workers.
            "--temp-dir", str(self.base / f"ray{self._started}"),
            "--disable-usage-stats",
            *args,
        ]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self._procs.append(proc)
        self._started += 1
        return proc

    def start(self) -> LoopbackCluster:
        """Start the head, then the other nodes; return when all of them are alive."""
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.gcs_port, self.dashboard_port = self._port(), self._port()
        # Ray replaces 127.0.0.1 and localhost (as a node address or in --address) by the
        # machine's outward address, so each node takes its own other address of the
        # loopback range, 127.0.0.2, 127.0.0.3, ...: all traffic stays on lo, and the nodes
        # differ by address too.
        self._ray_start([
            "--head", f"--node-ip-address={self.node_ip(0)}", f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self._port()}",
        ], "head")
        self._wait(lambda: len(self.nodes()) == 1, "the head")
        for _ in range(1, self.n_nodes):
            self.add_node()
        return self

    @staticmethod
    def node_ip(i: int) -> str:
        """The loopback address of node ``i`` (0: the head)."""
        return f"127.0.0.{2 + i}"

    def add_node(self) -> str:
        """Start one more node (on an address no node had before) and wait until the
        cluster counts it alive; returns its address."""
        n, alive = self._started, len(self._procs)
        self._ray_start([f"--address={self.gcs_address}", f"--node-ip-address={self.node_ip(n)}"],
                        f"node{n}")
        self._wait(lambda: len(self.nodes()) == alive + 1, f"node {n} to join")
        return self.node_ip(n)

    def raylet_pid(self, address: str) -> int | None:
        """The pid of the raylet of the node at ``address`` (a child of its ``ray start``)."""
        for proc in self._procs:
            for pid in marked_pids(self.marker):
                cmd = _cmdline(pid)
                if "/raylet/raylet " in cmd and f"--node_ip_address={address} " in cmd + " " \
                        and _parent(pid) == proc.pid:
                    return pid
        return None

    def lose_node(self, address: str, timeout_s: float = 120.0) -> int:
        """Lose the (non-head) node at ``address`` as a machine that fails does: SIGKILL its
        raylet (its workers end with it, its ``ray start --block`` exits), then wait until
        the cluster counts it dead. Returns the raylet's pid."""
        if address == self.node_ip(0):
            raise ValueError("lose_node: not the head (the cluster ends with it)")
        pid = self.raylet_pid(address)
        if pid is None:
            raise RuntimeError(f"no raylet of this cluster at {address}")
        owner = next(p for p in self._procs if p.pid == _parent(pid))
        os.kill(pid, signal.SIGKILL)
        self._procs.remove(owner)
        self._lost.append(owner)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(n.get("node_ip") != address for n in self.nodes()):
                return pid
            time.sleep(0.5)
        raise TimeoutError(f"the cluster still counts the node at {address} alive after "
                           f"{timeout_s} s")

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a ray start process exited ({p.returncode}) while "
                                       f"waiting for {what}; logs in {self.base}")
            try:
                if ready():
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {self.startup_timeout_s} s waiting for {what}; "
                           f"logs in {self.base}")

    # Dashboard HTTP API (token in the Authorization header) ----------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.dashboard_url + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token_path.read_text().strip())
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def _get(self, path: str) -> Any:
        try:
            return self._request("GET", path, timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes as the state API lists them (node_id, node_ip, is_head_node, ...)."""
        got = self._get("/api/v0/nodes?limit=100&detail=true")
        if not isinstance(got, dict):
            return []
        rows = got.get("data", {}).get("result", {}).get("result", [])
        return [n for n in rows if n.get("state") == "ALIVE"]

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's record (status, message, start/end times, driver node)."""
        return self._request("GET", f"/api/jobs/{job_id}")

    def job_logs(self, job_id: str) -> str:
        got = self._request("GET", f"/api/jobs/{job_id}/logs")
        return got.get("logs", "") if isinstance(got, dict) else str(got)

    def wait_job(self, job_id: str, timeout_s: float) -> str:
        """Wait for a terminal status (SUCCEEDED, FAILED, STOPPED) and return it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.job(job_id)["status"]
            if status in TERMINAL:
                return status
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s} s:\n"
                           + self.job_logs(job_id)[-4000:])

    # Ray's CLI, as a user runs it ----------------------------------------------------------
    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``ray <args>`` with this cluster's client environment."""
        return subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", *args], env=self.env,
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def submit(
        self, entrypoint: Sequence[str], *, working_dir: str | os.PathLike[str],
        env_vars: dict[str, str] | None = None, submission_id: str | None = None,
    ) -> str:
        """``ray job submit --no-wait --working-dir ... -- <entrypoint>``; returns the job id.

        The entrypoint's words are passed as they are: Ray's CLI shell-quotes them
        (``shlex.join``) for the shell that runs the job on the head node.
        """
        job_id = submission_id or f"loopback-{uuid.uuid4().hex[:10]}"
        runtime_env = {"env_vars": dict(env_vars or {})}
        done = self.ray_cli(
            "job", "submit", "--address", self.dashboard_url, "--submission-id", job_id,
            "--no-wait", "--working-dir", str(working_dir),
            "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray job submit failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return job_id

    def stop_job(self, job_id: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``ray job stop`` (which waits until the job has stopped)."""
        return self.ray_cli("job", "stop", "--address", self.dashboard_url, job_id,
                            timeout=timeout)

    # Stop ----------------------------------------------------------------------------------
    def shutdown(self, grace_s: float = 20.0) -> list[int]:
        """End this cluster's processes only; returns the marked pids that had to be killed.

        The nodes first (SIGTERM: ``ray start --block`` then stops what it started), then
        any process still carrying the marker (workers and job drivers outlive a raylet for a
        moment) with SIGTERM and, after ``grace_s``, SIGKILL.
        """
        for proc in [*self._lost, *reversed(self._procs)]:  # the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        leftover = marked_pids(self.marker)
        self.leftover_commands = [_cmdline(pid) for pid in leftover]
        if leftover:
            _signal_all(leftover, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while marked_pids(self.marker) and time.monotonic() < deadline:
                time.sleep(0.2)
            _signal_all(marked_pids(self.marker), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while marked_pids(self.marker) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._procs.clear()
        self._lost.clear()
        if self._own_dir:
            shutil.rmtree(self.base, ignore_errors=True)
        return leftover


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=1)
    args = p.parse_args(argv)
    with LoopbackCluster(args.nodes, args.cpus_per_node) as c:
        print(f"{len(c.nodes())} nodes up. In another shell:\n"
              f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={c.token_path}\n"
              f"  ray job submit --address {c.dashboard_url} --working-dir . -- "
              "python -m searchd.search --config configs/quickstart.yaml\n"
              "Ctrl-C stops the cluster.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
