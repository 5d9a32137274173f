"""Several processes on one new MLflow SQLite store: all of them set it up (real processes)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_processes_starting_together_on_a_new_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from bss import tracking; print(tracking.setup({uri!r}, 'bss-search'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in results]
    ids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(ids) == 1  # one experiment, seen by all
