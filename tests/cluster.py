"""Real multi-node Ray clusters and a real ``mlflow server`` on this machine, for the cluster tests.

:class:`RayNodes` starts a head and worker nodes with ``ray start --block``, each node in its own
process group and temp dir, all with one token in a temp file (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``: Ray's supported token setup; nothing is read from or written to
``~/.ray``). A node is killed by SIGKILL to its process group (its raylet and its workers), as a
machine that is switched off. :class:`MlflowServer` is ``mlflow server`` with a SQLite backend
and ``--artifacts-destination`` (artifacts go through the server). Both stop everything they
started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether ``url`` answers an HTTP GET with a success status."""
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return 200 <= reply.status < 300
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{tail}")


class RayNodes:
    """A Ray cluster of real nodes (separate raylets) on this machine."""

    def __init__(self, token: bool | Path = True):
        """``token``: True: a new token file; a path: that token file (a process that joined one
        cluster keeps its token: Ray caches it, so one driver process joining several clusters in
        turn needs them to share one token); False: ``RAY_AUTH_MODE=disabled``."""
        # short: Ray's Unix sockets live under the temp dir (107-character limit)
        self.root = Path(tempfile.mkdtemp(prefix="bss-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        if token:
            path = Path(token) if not isinstance(token, bool) else self.root / "token"
            if not path.is_file():
                path.write_text(secrets.token_hex(32))
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
        else:
            self.env.update(RAY_AUTH_MODE="disabled")
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.nodes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        cmd = [str(BIN / "ray"), "start", "--block", "--node-name", name, "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args]
        with open(log, "w") as handle:
            self.nodes[name] = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        wait_for(lambda: "Ray runtime started" in log.read_text() or self.nodes[name].poll() is not None, 90, f"ray node {name}", log)
        if self.nodes[name].poll() is not None:
            raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")

    def head(self, cpus: int = 0, gpus: int = 0) -> "RayNodes":
        """The head: GCS, and ``cpus`` CPUs for work (0: no trial ever runs beside the driver)."""
        self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.port),
                "--num-cpus",
                str(cpus),
                "--num-gpus",
                str(gpus),
                "--temp-dir",
                str(self.root / "head"),
                "--include-dashboard",
                "false",
            ],
        )
        return self

    def worker(self, name: str, cpus: int = 1, gpus: int = 0) -> None:
        self._start(name, ["--address", self.address, "--num-cpus", str(cpus), "--num-gpus", str(gpus), "--temp-dir", str(self.root / name)])

    def kill(self, name: str) -> None:
        """SIGKILL the node's whole process group: its raylet and every worker on it."""
        proc = self.nodes.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def shutdown(self) -> None:
        for name in list(self.nodes)[::-1]:  # workers first, the head last
            self.kill(name)
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1: SQLite backend, artifacts proxied to a folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{self.folder / 'server.db'}"
        self.artifacts = self.folder / "artifacts"
        self.log = self.folder / "server.log"
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            self.backend,
            "--artifacts-destination",
            str(self.artifacts),
            "--workers",
            "1",
        ]
        with open(self.log, "w") as handle:
            self.proc = subprocess.Popen(
                cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
            )
        wait_for(self._healthy, 90, "mlflow server", self.log)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
        return answers(f"{self.uri}/health")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
