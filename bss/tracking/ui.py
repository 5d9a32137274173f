"""``mlflow ui`` on a loop's store, opened where the loop's results are (``drivers/ui.py``).

MLflow 3's UI opens on its GenAI home; the loop's iterations are a shared view of its
experiment's runs table (:func:`bss.tracking.ui_url`, the link the loop prints). :func:`start_ui`
starts ``mlflow ui`` on 127.0.0.1 for a local store (a SQLite file), waits until it answers and
returns that link; a tracking server is its own UI, so its link is returned as it is.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bss.errors import BSSError
from bss.tracking import SHARED_VIEW_TAG, health, is_server, normalize_uri, ui_url

HOST = "127.0.0.1"
START_SECONDS = 120.0  # mlflow ui's first start on a new store migrates its database: tens of seconds on 2 cores


def loop_view_key(loop_run_id: str) -> str:
    """The name of a loop's shared view (the experiment tag ``mlflow.sharedViewState.<key>``)."""
    return f"bss-loop-{loop_run_id}"


@dataclass
class Target:
    """Where to look: the store, the experiment and (optionally) the loop whose view to open."""

    uri: str
    experiment: str
    loop_run_id: str | None = None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(wanted: int) -> int:
    """``wanted`` if nothing listens there, else the next free port above it."""
    for port in range(wanted, wanted + 100):
        if port_free(port):
            return port
    raise BSSError(f"no free port in {wanted}-{wanted + 99} on {HOST}; pass --port.")


def _experiment_id(target: Target) -> tuple[str, str | None]:
    """(experiment id, the loop's shared-view key or None): the given loop, else the latest loop
    run of the experiment that has one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(target.uri)
    try:
        exp = client.get_experiment_by_name(target.experiment)
    except Exception as exc:  # noqa: BLE001 - one clear line for any store problem
        raise BSSError(f"cannot read the MLflow store {target.uri}: {str(exc).splitlines()[0][:300]}") from None
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise BSSError(f"the MLflow store {target.uri} has no experiment {target.experiment!r} (it has: {', '.join(names) or 'none'}); pass --experiment.")
    run_id = target.loop_run_id
    if run_id is None:
        loops = client.search_runs([exp.experiment_id], "tags.`bss.kind` = 'loop'", order_by=["attributes.start_time DESC"], max_results=1)
        run_id = loops[0].info.run_id if loops else None
    key = loop_view_key(run_id) if run_id else None
    return exp.experiment_id, key if key and SHARED_VIEW_TAG + key in exp.tags else None


def check_store(uri: str) -> None:
    """A local store must exist already (MLflow would make an empty one); a server must answer."""
    if is_server(uri):
        why = health(uri)
        if why is not None:
            raise BSSError(f"the MLflow tracking server {uri} does not answer (GET {uri.rstrip('/')}/health: {why}); start it, or check the URI.")
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise BSSError(f"no MLflow store at {db}: run the loop first (python drivers/search.py --dataset obstacle), or pass --run-dir / --tracking-uri.")


def start_ui(target: Target, port: int = 5000, log: Path | None = None) -> tuple[str, subprocess.Popen | None]:
    """Start ``mlflow ui`` for ``target`` (none for a tracking server) and wait until it answers;
    (the link to the loop's iterations, or the experiment's runs; the ui process or None)."""
    uri = normalize_uri(target.uri)
    target = Target(uri, target.experiment, target.loop_run_id)
    check_store(uri)
    experiment_id, view = _experiment_id(target)
    if is_server(uri):
        return ui_url(experiment_id, base=uri.rstrip("/"), view=view), None
    port = pick_port(port)
    base = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port)]
    if uri.startswith("sqlite:///"):  # where the loop put its artifacts (bss.tracking.artifact_root_for)
        cmd += ["--default-artifact-root", (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()]
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    deadline = time.monotonic() + START_SECONDS
    while health(base, 2.0) is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = log.read_text()[-1500:] if log and log.is_file() else ""
            raise BSSError(f"mlflow ui on {base} did not start (exit {proc.poll()}){': ' + tail if tail else ''}")
        time.sleep(0.3)
    return ui_url(experiment_id, base=base, view=view), proc
