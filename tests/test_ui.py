"""``drivers/ui.py``: what it refuses, in one line each (its happy path, in a real browser, is
``tests/test_search_ray.py::test_the_quick_start_ui_command_opens_the_loops_iterations``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cluster import free_port
from conftest import REPO

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _ui(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "drivers" / "ui.py"), *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), "no MLflow store at"),  # the default store, sqlite:///mlflow.db here, does not exist
        (("--run-dir", "runs/none"), "no loop here"),
        (("--tracking-uri", "closed"), "does not answer"),
    ],
)
def test_ui_refuses_in_one_line_and_makes_nothing(tmp_path, args, expected):
    args = tuple(f"http://127.0.0.1:{free_port()}" if a == "closed" else a for a in args)
    done = _ui(tmp_path, *args)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
    assert expected in done.stderr
    assert list(tmp_path.iterdir()) == []  # no empty mlflow.db, no run folder
