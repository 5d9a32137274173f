"""One trial's folder, ``<trials>/<key>/``, and the only code that writes its record::

    record.json   state (running | complete | stopped | failed), params, config, best row, run id
    rows.jsonl    one line per evaluation, appended (and fsync'd) *before* it is reported
    promote.pt    the weights of the best evaluation under the promotion rule

The key is ``t<ordinal>-<hash of the resolved config>`` (:func:`trial_key`). States move
``running -> complete | stopped | failed``; the worker writes ``running``, ``complete`` and the
failures it sees, the driver's Tune callback writes ``stopped`` (ASHA, the time budget) and the
failures only it sees (a worker that died). ``running -> lost -> running``: the attempt's worker
or its whole Ray node died and Tune retries the trial (``FailureConfig(max_failures)``); the
lost attempt is appended to ``lost_attempts`` (its node, run id, evaluations, error) and the next
attempt starts afresh, keeping that list.

Ownership: each attempt at a trial stamps its record with an ``attempt`` id and holds the lock on
its key (``<trials>/.<key>.lock``) while it trains. After a SIGKILL of the driver, its Ray worker
can live on for a moment: the resumed search takes the lock before it cleans up (so it waits for
that worker to die), and an attempt whose folder was removed or taken over meanwhile writes
nothing more (:class:`Superseded`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from bss import filelock
from bss.data.io import atomic_write_json, read_json

FINISHED_STATES = ("complete", "stopped", "failed")
LOCK_WAIT = 120.0  # seconds to wait for a previous attempt's worker to die after a kill


class Superseded(RuntimeError):
    """This attempt no longer owns its trial folder (a resumed search took it over): stop quietly."""


def config_hash(config: dict) -> str:
    text = json.dumps({k: v for k, v in config.items() if k != "output_dir"}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def trial_key(ordinal: int, config: dict) -> str:
    return f"t{ordinal:03d}-{config_hash(config)}"


def trial_ordinal(name: str) -> int:
    """The n of a trial name ``trial_<n>`` or a Tune experiment tag ``<n>_lr=...`` (0 if none)."""
    text = str(name)
    text = text.rsplit("_", 1)[-1] if text.startswith("trial_") else text.split("_", 1)[0]
    try:
        return int(text)
    except ValueError:
        return 0


class TrialStore:
    RECORD = "record.json"
    ROWS = "rows.jsonl"
    CHECKPOINT = "promote.pt"

    def __init__(self, trials_dir: str | Path, key: str):
        self.trials_dir, self.key = Path(trials_dir), key
        self.folder = self.trials_dir / key

    @classmethod
    def all(cls, trials_dir: str | Path) -> Iterator["TrialStore"]:
        """Every trial folder under ``trials_dir``, in key order."""
        for folder in sorted(Path(trials_dir).glob("t*-*")):
            if folder.is_dir():
                yield cls(trials_dir, folder.name)

    @property
    def checkpoint(self) -> Path:
        return self.folder / self.CHECKPOINT

    @property
    def lock_path(self) -> Path:
        return self.trials_dir / f".{self.key}.lock"

    def lock(self, timeout: float = LOCK_WAIT):
        """``with store.lock():`` this key's lock for the block (None inside on a timeout: the
        ownership checks still apply then)."""
        return filelock.held(self.lock_path, timeout)

    # ---- reading -------------------------------------------------------------------------
    def record(self) -> dict | None:
        path = self.folder / self.RECORD
        return read_json(path) if path.is_file() else None

    def rows(self) -> list[dict]:
        """The recorded evaluations; a last line cut off by a kill is dropped."""
        path = self.folder / self.ROWS
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else ():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def owned_by(self, attempt: str) -> bool:
        """Whether the folder still belongs to ``attempt`` (not removed nor taken over since)."""
        if not self.folder.is_dir():
            return False
        try:
            record = self.record()
        except Exception:  # noqa: BLE001 - unreadable: not ours
            return False
        return record is not None and record.get("attempt") == attempt

    # ---- the worker's writes ---------------------------------------------------------------
    def start_fresh(self, keep_rows: bool = False) -> None:
        """An empty folder for a new attempt (``keep_rows``: keep the recording it replays)."""
        if self.folder.exists() and not keep_rows:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def claim(self, record: dict) -> None:
        """The attempt's first record: it now owns the folder."""
        atomic_write_json(self.folder / self.RECORD, record)

    def save(self, record: dict) -> None:
        """The attempt's record, unless the folder was taken over (then raise Superseded)."""
        if not self.owned_by(record["attempt"]):
            raise Superseded(f"{self.key}: attempt {record['attempt']} was superseded")
        atomic_write_json(self.folder / self.RECORD, record)

    def append_row(self, row: dict) -> None:
        if not self.folder.is_dir():
            raise Superseded(f"{self.key}: the trial folder was removed")
        with open(self.folder / self.ROWS, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    # ---- the driver's writes ---------------------------------------------------------------
    def mark_stopped(self) -> dict:
        """A trial Tune stopped (ASHA, time budget) while its record said running."""
        record = self.record() or {}
        if record.get("state") == "running":
            record.update(state="stopped", evaluations=len(self.rows()))
            atomic_write_json(self.folder / self.RECORD, record)
        return record

    def mark_failed(self, error: str) -> dict:
        """A trial whose worker failed without recording it (it died): record the error."""
        record = self.record() or {}
        if record and record.get("state") != "failed":
            record.update(state="failed", error=error)
            atomic_write_json(self.folder / self.RECORD, record)
        return record

    def mark_lost(self, error: str) -> dict:
        """The attempt in this folder died with its worker or node (Tune will retry the trial):
        record it in ``lost_attempts``. Called by the driver's callback, and by the retry itself
        when it finds the record still 'running'; only the first call records."""
        record = self.record() or {}
        if record.get("state") == "running":
            lost = {k: record.get(k) for k in ("attempt", "run_id", "node_id", "node_name", "host")}
            lost.update(evaluations=len(self.rows()), error=(error or "")[-500:])
            record.update(state="lost", lost_attempts=list(record.get("lost_attempts") or []) + [lost])
            atomic_write_json(self.folder / self.RECORD, record)
        return record

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def remove_trainer_pick(self) -> None:
        """The trainer's own best.pt (selection by its metric); promote.pt is the trial's."""
        (self.folder / "best.pt").unlink(missing_ok=True)
