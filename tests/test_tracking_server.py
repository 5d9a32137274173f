"""A tracking server that does not answer, or goes away mid-run: real processes, real ports.

* nothing listens on the port: ``train.py`` and ``search.py`` stop within seconds (a health probe
  before any MLflow call), with one ``error:`` line naming the URI, and write nothing;
* a real ``mlflow server`` stopped in the middle of a search: the loop says so within seconds (its
  server watch) and goes on to its end on its own files, as the README's failure policy says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml
from cluster import MlflowServer, free_port, wait_for
from conftest import REPO, make_source_dataset, tiny_config_dict

ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
# one trial that evaluates 4 times: the driver waits at its first evaluation (tests/driver_hook.py)
SPACE = {
    "fixed": {"train_steps": 16, "epochs": 1, "evaluations": 4, "batch_size": 2, "visualization_samples": 0},
    "params": {"learning_rate": {"loguniform": [3.0e-3, 3.0e-2]}},
    "searcher": {"algorithm": "random", "trials": 1},
    "scheduler": {"name": "fifo"},
}


def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there


def _timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120, cwd=REPO)
    return done, time.monotonic() - start


def _assert_refused(done: subprocess.CompletedProcess, seconds: float, uri: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert seconds < 30, f"{seconds:.1f} s"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert uri in lines[0] and "does not answer" in lines[0] and "mlflow server" in lines[0]


def test_train_with_a_tracking_server_that_does_not_answer_stops_at_once(tmp_path):
    root = tmp_path / "datasets"
    make_source_dataset(root)
    subprocess.run(
        [sys.executable, str(REPO / "drivers" / "preprocess.py"), "--dataset", "toy", "--data-root", str(root)], env=ENV, check=True, capture_output=True
    )
    uri = _closed_port_uri()
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test", "enabled": True}  # --tracking-uri replaces the URI
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config_dict(root, tmp_path, tracking=tracking)))
    done, seconds = _timed(
        [
            sys.executable,
            str(REPO / "drivers" / "train.py"),
            "--config",
            str(tmp_path / "config.yaml"),
            "--tracking-uri",
            uri,
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    print(f"train.py on a closed port: exit {done.returncode} after {seconds:.1f} s")
    _assert_refused(done, seconds, uri)
    assert not (tmp_path / "out").exists()


def test_search_with_a_tracking_server_that_does_not_answer_stops_before_anything(tmp_path):
    uri = _closed_port_uri()
    run_dir = tmp_path / "runs" / "obstacle"
    done, seconds = _timed(
        [sys.executable, str(REPO / "drivers" / "search.py"), "--dataset", "obstacle", "--data-root", str(tmp_path / "datasets")]
        + ["--run-dir", str(run_dir), "--tracking-uri", uri]
    )
    print(f"search.py on a closed port: exit {done.returncode} after {seconds:.1f} s")
    _assert_refused(done, seconds, uri)
    # before the data stage (the synthetic default is not even generated), Ray and the run folder
    assert not run_dir.exists() and not (tmp_path / "datasets").exists()


def test_the_loop_goes_on_when_its_tracking_server_goes_away(tmp_path):
    """The server is stopped while the driver waits at the first evaluation of its only trial
    (``tests/driver_hook.py``: an exact point, no race with the trial). The driver says it within
    30 s although it calls nothing meanwhile; released, the loop ends normally on its own files."""
    server = MlflowServer(tmp_path / "mlflow")
    root = tmp_path / "datasets"
    make_source_dataset(root)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config_dict(root, tmp_path)))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    release, log_path, run_dir = tmp_path / "release", tmp_path / "driver.log", tmp_path / "run"
    spec = {"on": "result", "iteration": 0, "ordinal": 1, "kill": "wait", "release": str(release)}
    args = ["--dataset", "toy", "--data-root", str(root), "--config", str(tmp_path / "config.yaml"), "--space", str(tmp_path / "space.yaml")]
    args += ["--iterations", "1", "--trials", "1", "--concurrency", "1", "--promotion", "floor", "--floor", "0", "--seed", "3"]
    args += ["--run-dir", str(run_dir), "--tracking-uri", server.uri]
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "driver_hook.py"), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(ENV, BSS_TEST_KILL=json.dumps(spec)),
        start_new_session=True,
    )
    try:
        wait_for(lambda: "driver_hook: kill wait" in log_path.read_text() or proc.poll() is not None, 300, "the trial's first evaluation", log_path)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        os.killpg(server.proc.pid, signal.SIGKILL)  # gone at once, as a host that is switched off
        server.proc.wait(30)
        gone = time.monotonic()
        wait_for(lambda: "failed (the server stopped answering" in log_path.read_text(), 30, "the driver's warning", log_path)
        print(f"the driver said the server was gone {time.monotonic() - gone:.1f} s after it was killed")
        release.touch()
        proc.wait(300)
    finally:
        release.touch()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        server.stop()
    text = log_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    warnings = [line for line in text.splitlines() if line.startswith("warning: the MLflow store")]
    assert len(warnings) == 1 and server.uri in warnings[0] and "the loop goes on without it" in warnings[0], warnings
    # nothing lost: the loop's decisions, model and report are in its run folder
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["iterations"][0]["done"]
    assert (run_dir / "best.pt").is_file() and (run_dir / "report.md").is_file()
    assert "WARNING mlflow" not in text  # said once, by the loop, not by MLflow's own threads
