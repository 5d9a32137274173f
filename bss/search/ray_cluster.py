"""Ray, for the whole project: starting or joining a cluster, and planning trial resources.

The only module that calls ``ray.init``. A local Ray is started with only the CPUs (and GPUs)
this process may use; ``--address`` joins a running cluster, whose workers get the project's
import path and quiet environment through the runtime environment.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bss.environment import quiet
from bss.errors import BSSError

ROOT = Path(__file__).resolve().parents[2]


def quiet_environment() -> None:
    quiet(
        extra={
            "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard files per trial
            "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl-C raises KeyboardInterrupt: the loop saves its state and exits
            "RAY_AIR_NEW_OUTPUT": "0",
            "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
        }
    )


def local_resources() -> tuple[int, int]:
    """(CPUs this process may use, CUDA GPUs visible)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    import torch

    return cpus, torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_ray(address: str | None = None, cpus: int | None = None, gpus: int | None = None) -> tuple[int, int, bool]:
    """Join ``address`` or start a local Ray; reuse one already running in this process.

    Joining a cluster with token authentication (``RAY_AUTH_MODE=token`` on its nodes) needs the
    same token here (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``): Ray
    reads ``~/.ray/auth_token`` by itself only for ``address="auto"``. A refused token is one
    :class:`BSSError` line saying so.

    Returns (cluster CPUs, cluster GPUs, whether this call started Ray).
    """
    if address:  # a refused token is retried once a second this many times (Ray's default: 20)
        os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", "5")
    import ray

    quiet_environment()
    started = False
    if not ray.is_initialized():
        if address:
            probe_address(address)
        path = os.environ.get("PYTHONPATH", "")
        if str(ROOT) not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
        env = {
            k: os.environ[k]
            for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE")
            if k in os.environ
        }
        try:
            if address:
                ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, logging_level="ERROR")
            else:
                ray.init(
                    address="local",
                    num_cpus=cpus,
                    num_gpus=gpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="ERROR",
                    object_store_memory=256 * 1024**2,
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if address and _auth_failure(exc):
                raise BSSError(auth_message(address)) from None
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise BSSError(f"cannot start or join {where}: {exc}") from None
        started = True
        if address:
            HeadWatch.start(ray.get_runtime_context().gcs_address)
    res = ray.cluster_resources()
    return int(res.get("CPU", 0)), int(res.get("GPU", 0)), started


class HeadWatch:
    """Watches the head (GCS) of a cluster the driver joined, and stops the driver cleanly when it is gone.

    Without it, a driver whose head died hangs in a Ray call to the GCS (Tune's resource update
    blocks in C++, deaf to signals) until Ray's core worker ends the process 60 s later with a C++
    log line (``gcs_rpc_server_reconnect_timeout_s``). This thread notices first: after ``grace``
    seconds without a TCP connection to the GCS port it runs the ``on_lost`` hooks (the loop ends
    its MLflow runs), prints one ``error:`` line and ends the process with exit code 2. The loop's
    state holds every completed stage: ``--resume`` against a restarted cluster continues.
    """

    current: "HeadWatch | None" = None

    def __init__(self, gcs_address: str, grace: float = 8.0, period: float = 1.0):
        host, _, port = gcs_address.rpartition(":")
        self.address, self.host, self.port, self.grace, self.period = gcs_address, host.strip("[]"), int(port), grace, period
        self.hooks: list = []
        self.stopped = threading.Event()

    @classmethod
    def start(cls, gcs_address: str) -> "HeadWatch":
        cls.stop()
        cls.current = watch = cls(gcs_address)
        threading.Thread(target=watch.run, name="bss-head-watch", daemon=True).start()
        return watch

    @classmethod
    def stop(cls) -> None:
        if cls.current is not None:
            cls.current.stopped.set()
        cls.current = None

    @classmethod
    def on_lost(cls, hook) -> None:
        """Call ``hook(message)`` before the driver ends because the cluster is lost."""
        if cls.current is not None:
            cls.current.hooks.append(hook)

    def reachable(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2.0):
                return True
        except OSError:
            return False

    def run(self) -> None:
        down_since = None
        while not self.stopped.wait(self.period):
            if self.reachable():
                down_since = None
                continue
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= self.grace and not self.stopped.is_set():
                self.end()

    def end(self) -> None:
        message = f"lost the Ray cluster: its head (GCS at {self.address}) has not answered for {self.grace:.0f} s"
        for hook in self.hooks:
            try:
                hook(message)
            except Exception:  # noqa: BLE001 - the process ends anyway
                pass
        sys.stdout.flush()
        print(
            f"error: {message}. The completed stages are saved in the run folder; start the cluster again and rerun the same command with --resume.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)


def probe_address(address: str, timeout: float = 5.0) -> None:
    """An explicit ``host:port`` where nothing accepts a TCP connection within ``timeout`` seconds
    is one :class:`BSSError` line, within seconds (``ray.init`` itself would retry for minutes);
    ``auto``, ``local`` and ``ray://`` addresses are left to Ray."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BSSError(f"--address {address}: expected HOST:PORT of a Ray cluster's head (e.g. 10.0.0.5:6379), or auto.")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower() if not isinstance(exc, TimeoutError) else f"no answer within {timeout:g} s"
    raise BSSError(f"no Ray cluster answers at {address} ({reason}): start its head there (ray start --head --port {port}), or check --address.")


def stop_ray() -> None:
    """``ray.shutdown()`` after a loop, and no more watching the head."""
    import ray

    HeadWatch.stop()
    ray.shutdown()


def _auth_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is Ray refusing this process's auth token."""
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def auth_message(address: str) -> str:
    """The one line a user gets when the cluster at ``address`` refuses this driver's token."""
    if (os.environ.get("RAY_AUTH_MODE") or "").lower() != "token":
        here = f"RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE') or 'unset'} here, so the driver sends none"
    else:
        here = "the driver sent the token from " + (
            "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
        )
    return (
        f"the Ray cluster at {address} refused this driver's auth token (InvalidAuthToken: {here}). "
        "Give the driver and every `ray start` of the cluster the same token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the head's token file> "
        "(or RAY_AUTH_TOKEN), or start the whole cluster with RAY_AUTH_MODE=disabled; see README, Running on a cluster."
    )


@dataclass
class Resources:
    cpus_per_trial: float
    gpus_per_trial: float
    concurrency: int

    def describe(self) -> str:
        gpu = f", {self.gpus_per_trial:g} GPU" if self.gpus_per_trial else ""
        return f"{self.concurrency} trial(s) at a time, each {self.cpus_per_trial:g} CPU{gpu}"


def node_resources() -> list[tuple[float, float]]:
    """(CPUs, GPUs) of every alive node of the Ray cluster this process is connected to."""
    import ray

    return [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in ray.nodes() if n.get("Alive")]


def plan_resources(
    total_cpus: int,
    total_gpus: int,
    trials: int,
    concurrency: int | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    nodes: list[tuple[float, float]] | None = None,
) -> Resources:
    """Resources per trial and concurrency; every flag left out is filled in.

    * GPUs: 2 trials share each GPU (``gpus_per_trial`` = GPUs / concurrency), CPUs split evenly.
    * CPUs only: 1 CPU per trial up to 8 cores (2 above), as many trials as fit.
    * ``nodes`` ((CPUs, GPUs) per node, :func:`node_resources`): a trial runs on one node, so on a
      cluster the plan is fitted node by node (:func:`fit_nodes`).
    """
    if total_cpus < 1:
        raise BSSError("the Ray cluster reports no CPU.")
    for name, value in (("--cpus-per-trial", cpus_per_trial), ("--gpus-per-trial", gpus_per_trial)):
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise BSSError(f"{name} must be 0 or more, got {value}.")
    cpus_given, given = cpus_per_trial is not None, concurrency
    if cpus_per_trial is not None and cpus_per_trial <= 0:
        raise BSSError(f"--cpus-per-trial must be positive, got {cpus_per_trial}.")
    if concurrency is not None and concurrency < 1:
        raise BSSError(f"--concurrency must be at least 1, got {concurrency}.")
    if gpus_per_trial and gpus_per_trial > total_gpus:
        raise BSSError(f"--gpus-per-trial {gpus_per_trial:g} but the cluster has {total_gpus} GPU(s).")
    if gpus_per_trial and gpus_per_trial > 1 and not float(gpus_per_trial).is_integer():
        raise BSSError(f"--gpus-per-trial {gpus_per_trial:g}: above 1 it must be a whole number (Ray cannot split several GPUs fractionally).")
    if gpus_per_trial is None:
        if total_gpus:
            concurrency = concurrency or max(1, min(trials, 2 * total_gpus))
            share = total_gpus / concurrency
            gpus_per_trial = float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100
        else:
            gpus_per_trial = 0.0
    if gpus_per_trial and concurrency is None:
        concurrency = max(1, min(trials, int(total_gpus / gpus_per_trial + 1e-9)))
    if cpus_per_trial is None:
        if gpus_per_trial:
            cpus_per_trial = float(max(1, min(8, total_cpus // max(1, concurrency))))
        else:
            cpus_per_trial = 1.0 if total_cpus <= 8 else 2.0
    if cpus_per_trial > total_cpus:
        raise BSSError(f"--cpus-per-trial {cpus_per_trial:g} but the cluster has {total_cpus} CPU(s).")
    if concurrency is None:
        concurrency = max(1, min(trials, int(total_cpus // cpus_per_trial)))
    plan = Resources(float(cpus_per_trial), float(gpus_per_trial), int(concurrency))
    return fit_nodes(plan, nodes, trials, given, fixed_cpus=cpus_given) if nodes and len(nodes) > 1 else plan


def fit_nodes(plan: Resources, nodes: list[tuple[float, float]], trials: int, concurrency: int | None, fixed_cpus: bool) -> Resources:
    """The plan on real nodes: with GPUs, each GPU node's CPUs are split among the trials its GPUs
    hold (the smallest share decides, unless ``--cpus-per-trial`` was given), and the concurrency
    (unless given) is what fits node by node: sum of min(CPUs / c, GPUs / g). A trial that fits on
    no node is an error (Ray would wait for it forever)."""
    cpus, gpus = plan.cpus_per_trial, plan.gpus_per_trial
    if gpus and not fixed_cpus:
        shares = [c // max(1, int(g / gpus + 1e-9)) for c, g in nodes if g >= gpus - 1e-9 and c >= 1]
        cpus = float(max(1, min(8, min(shares)))) if shares else cpus

    def fits(c: float, g: float) -> int:
        by_gpu = int(g / gpus + 1e-9) if gpus else trials
        return min(int(c / cpus + 1e-9), by_gpu)

    slots = sum(fits(c, g) for c, g in nodes)
    if slots < 1:
        shown = ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in nodes)
        raise BSSError(f"a trial of {cpus:g} CPU and {gpus:g} GPU fits on no node of the cluster ({shown}); lower --cpus-per-trial or --gpus-per-trial.")
    return Resources(float(cpus), float(gpus), int(concurrency or max(1, min(trials, slots))))
