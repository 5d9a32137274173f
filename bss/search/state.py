"""The loop's resume file: ``<run-dir>/state.json``, small, JSON, always written atomically.

Its content is the typed :class:`~bss.search.record.LoopRecord` (settings, and per iteration the
record of every completed stage). A stage is written only after its outputs are on disk, with a
temporary file, ``fsync`` and ``os.replace``: a kill at any moment leaves either the old or the
new file, never half of one. :class:`RunLock` keeps a second driver out of a run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from bss.data.io import atomic_write_json, read_json
from bss.errors import BSSError
from bss.search.record import LoopRecord, load_record

FILE = "state.json"


class RunLock:
    """An exclusive lock on a run folder, held while a driver works in it (``flock`` on
    ``.<run-dir>.lock`` beside it, so a refused start leaves no run folder). The kernel releases
    it when the process ends, however it ends, so a lock left by a killed driver never blocks."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self.handle = None

    def acquire(self) -> "RunLock":
        import time

        from bss import filelock
        from bss.data.io import check_folder_path

        check_folder_path(self.run_dir, "--run-dir")
        handle = filelock.acquire(self.path, timeout=0)
        if handle is None:
            holder = self.path.read_text().strip() if self.path.is_file() else ""
            raise BSSError(
                f"{self.run_dir} is in use by a running loop ({holder or 'another process'}); wait for it to finish, or use another --run-dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None


class LoopState:
    """The resume state of one loop: its :class:`LoopRecord` and where it lives; ``save()``
    after every completed stage."""

    def __init__(self, path: Path, record: LoopRecord):
        self.path = Path(path)
        self.record = record

    @classmethod
    def new(cls, run_dir: str | Path, settings: dict) -> "LoopState":
        return cls(Path(run_dir) / FILE, LoopRecord(settings=settings))

    @classmethod
    def load(cls, run_dir: str | Path) -> "LoopState | None":
        path = Path(run_dir) / FILE
        if not path.is_file():
            return None
        return cls(path, load_record(read_json(path), str(path)))

    def save(self) -> None:
        atomic_write_json(self.path, self.record.to_json())

    @property
    def settings(self) -> dict:
        return self.record.settings
