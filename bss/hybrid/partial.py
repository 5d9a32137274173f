"""The work-in-progress folder of one ``H<n>``: refined images kept across a kill, so a rerun resumes.

``.<NAME>_H<n>.partial/`` beside the target holds, per refined box-only image, its mask
(``masks/<stem>.png``), its soft label (``soft/<stem>.png``, with a ``soft`` rule) and its manifest
row with its label-quality counts (``rows/<stem>.json``). Each file is written to a temporary name
and renamed (``os.replace``); the row is written last, so an image counts as done exactly when its
row exists (a kill between the mask and the row redoes that one image). Whoever refines (the driver,
or Ray workers on other nodes: the folder must be on storage every node mounts) writes here; the
driver assembles ``H<n>`` from it at the end and then removes it.

``key.json`` records what the masks depend on: the checkpoint's sha256, the rule, the input size,
TTA, the device type and torch's thread count (:func:`refinement_key`). A rerun with another key
**starts over**: the folder's images cannot belong to this ``H<n>``, so they are deleted (the
result says how many) rather than mixed in. One writer at a time: the driver holds ``.lock`` (a
second run on the same ``H<n>`` is refused with one line).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from bss import filelock
from bss.data.io import atomic_path, atomic_write_json, check_folder_path
from bss.errors import BSSError

KEY = "key.json"
LOCK = ".lock"


def partial_path(target: Path) -> Path:
    """Where the work in progress of ``target`` (``<root>/<NAME>_H<n>``) is kept."""
    return Path(target).parent / f".{Path(target).name}.partial"


def refinement_key(checkpoint_sha256: str, rule: dict, input_size, tta: bool, device: str, threads: int) -> dict:
    """What a refined mask depends on besides its image and box (``device``: ``cpu`` or ``cuda``)."""
    return {
        "checkpoint_sha256": checkpoint_sha256,
        "rule": rule,
        "input_size": [int(v) for v in input_size],
        "tta": bool(tta),
        "device": device,
        "torch_threads": int(threads),
    }


def _write_bytes(path: Path, data: bytes) -> None:
    """``path`` replaced in one rename (no fsync: a killed process loses nothing the kernel holds)."""
    with atomic_path(path, fsync=False) as tmp:
        tmp.write_bytes(data)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")  # the bytes write_mask / Image.save(<name>.png) write
    return buffer.getvalue()


class PartialFolder:
    """One ``H<n>``'s work in progress. The driver :meth:`open`\\ s it (lock, key); workers
    :meth:`attach` to write images into it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = None
        self.discarded = 0  # images of another key deleted by open()

    @classmethod
    def open(cls, target: Path, key: dict) -> "PartialFolder":
        """Lock the folder of ``target`` (made if missing) for this process; images made with
        another key are deleted."""
        folder = cls(partial_path(target))
        check_folder_path(folder.path)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.lock = filelock.acquire(folder.path / LOCK, timeout=0)
        if folder.lock is None:
            raise BSSError(f"{folder.path} is locked: another make_hybrid is refining {Path(target).name} now; wait for it, or choose another --number.")
        stored = None
        if (folder.path / KEY).is_file():
            try:
                stored = json.loads((folder.path / KEY).read_text())
            except ValueError:
                stored = None  # a key cut short cannot have images of its own: start over
        if stored != key:
            folder.discarded = len(folder.done())
            for sub in ("masks", "soft", "rows"):
                shutil.rmtree(folder.path / sub, ignore_errors=True)
            atomic_write_json(folder.path / KEY, key)
        for sub in ("masks", "soft", "rows"):
            (folder.path / sub).mkdir(exist_ok=True)
        return folder

    @classmethod
    def attach(cls, path: str | Path) -> "PartialFolder":
        """A writer's view of a folder the driver opened (e.g. on a Ray worker node)."""
        folder = cls(Path(path))
        if not (folder.path / KEY).is_file():
            raise BSSError(
                f"{folder.path / KEY} not found on this node: the refinement's work folder must be on storage every node mounts (as the data root and checkpoint are)."
            )
        return folder

    def done(self) -> set[str]:
        """Stems whose mask and row are complete."""
        rows = self.path / "rows"
        return {p.stem for p in rows.glob("*.json")} if rows.is_dir() else set()

    def write(self, stem: str, mask: np.ndarray, soft: np.ndarray | None, row: dict) -> None:
        """One refined image: mask, soft label, then its row (which marks it done)."""
        _write_bytes(self.path / "masks" / f"{stem}.png", _png((np.asarray(mask) > 0).astype(np.uint8) * 255))
        if soft is not None:
            _write_bytes(self.path / "soft" / f"{stem}.png", _png(np.clip(soft * 255.0 + 0.5, 0, 255).astype(np.uint8)))
        _write_bytes(self.path / "rows" / f"{stem}.json", json.dumps(row).encode())

    def row(self, stem: str) -> dict:
        path = self.path / "rows" / f"{stem}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BSSError(f"{path}: unreadable ({exc}); delete {self.path} and rerun make_hybrid.") from None

    def mask(self, stem: str) -> Path:
        return self.path / "masks" / f"{stem}.png"

    def soft(self, stem: str) -> Path:
        return self.path / "soft" / f"{stem}.png"

    def remove(self) -> None:
        """After ``H<n>`` is in place: the folder is deleted and the lock released."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None
