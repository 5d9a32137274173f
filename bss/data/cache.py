"""A bounded cache of images and masks decoded and resized once, at training resolution.

Decoding a JPEG/PNG and resizing it costs more than augmenting it, so each (dataset, size) pair is
decoded once into two uint8 ``.npy`` files (``images.npy`` (N, H, W, 3) and ``masks.npy``
(N, H, W)) in a cache folder, and every epoch, every DataLoader worker and every later trial of a
search reads them back with ``pread``: no decoding, and the operating system's page cache (shared
by all processes, never counted in a process's RSS) keeps them in memory when there is room. So a
process's memory does not grow with the dataset; an optional in-memory tier
(``memory_bytes``) keeps the first items in the process as well, bounded in bytes.

The entry's name is a hash of the samples' absolute paths, sizes and modification times and the
training size, so an edited image makes a new entry, and trials with the same data and size
share one. With patches (config key ``patches``) that size is the frame's, never the patch's:
patch training and the evaluation of one dataset at one frame size read one entry. Entries are
written to a temporary folder and renamed into place (never half written); a lock file makes
concurrent trials wait for the one that builds instead of all building. After each build the
cache folder is tidied: entries whose images are gone are deleted, then the least recently used
ones until it holds at most ``disk_bytes``.

Where: ``$BSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/bss/resized``, else ``~/.cache/bss/resized``.
``$BSS_CACHE_MEMORY_MB`` (default 0) and ``$BSS_CACHE_DISK_GB`` (default 20) set the bounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bss.filelock import held

FORMAT_VERSION = 2  # 2: images read as shown (EXIF orientation applied); entries of stored pixels are not reused
_CHUNK = 32  # images decoded in flight while building (bounds the build's memory)


def default_cache_dir() -> Path:
    if os.environ.get("BSS_CACHE_DIR"):
        return Path(os.environ["BSS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bss" / "resized"


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def default_memory_bytes() -> int:
    return int(_env_number("BSS_CACHE_MEMORY_MB", 0) * 2**20)


def default_disk_bytes() -> int:
    return int(_env_number("BSS_CACHE_DISK_GB", 20) * 2**30)


def cache_key(files: Sequence[tuple[Path, Path | None]], height: int, width: int, salt: str = "") -> str:
    """A hash of the (image, mask) files' absolute paths, sizes and mtimes, and the size."""
    digest = hashlib.sha1(f"bss-resized-v{FORMAT_VERSION}|{height}x{width}|{salt}".encode())
    for image, mask in files:
        for path in (image, mask):
            if path is None:
                digest.update(b"|-")
                continue
            st = os.stat(path)
            digest.update(f"|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _write_npy_header(fh, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})


def _entry_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.iterdir() if p.is_file())


def _stale(entry: Path) -> bool:
    """Whether the images an entry was made from are gone (a deleted dataset or temp folder)."""
    try:
        head = json.loads((entry / "meta.json").read_text()).get("files_head") or []
    except (OSError, ValueError):
        return False
    return bool(head) and not any(os.path.exists(path) for path in head)


def prune(root: Path, budget: int, keep: Path | None = None) -> None:
    """Delete entries whose source images are gone, then the least recently used ones until
    ``root`` holds at most ``budget`` bytes."""
    entries = []
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.is_dir() and (entry / "meta.json").is_file():
            if entry != keep and _stale(entry):
                shutil.rmtree(entry, ignore_errors=True)
                continue
            with contextlib.suppress(OSError):
                entries.append(((entry / "meta.json").stat().st_mtime, _entry_bytes(entry), entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries):
        if total <= budget:
            break
        if keep is not None and entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size


class ResizedCache:
    """uint8 images (H, W, 3) and masks (H, W) of ``n`` samples at one size, read by index.

    ``decode(i)`` returns sample ``i`` already resized; it is called once per sample when the
    entry is built. Reads are thread- and fork-safe (``pread`` needs no file position); a
    pickled cache (spawned DataLoader workers) reopens its files in the new process.
    """

    def __init__(self, entry: Path, n: int, height: int, width: int, memory_bytes: int = 0):
        self.entry, self.n, self.height, self.width = Path(entry), n, height, width
        self.image_bytes, self.mask_bytes = height * width * 3, height * width
        self._image_offset = self._data_offset(self.entry / "images.npy")
        self._mask_offset = self._data_offset(self.entry / "masks.npy")
        self._fds: tuple[int, int] | None = None
        self._pid = -1
        self.memory_bytes = max(0, int(memory_bytes))
        self._memory: list[tuple[np.ndarray, np.ndarray]] = []
        in_memory = min(n, self.memory_bytes // (self.image_bytes + self.mask_bytes))
        for i in range(in_memory):
            self._memory.append(self._read(i))

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def open_or_build(
        cls,
        files: Sequence[tuple[Path, Path | None]],
        height: int,
        width: int,
        decode: Callable[[int], tuple[np.ndarray, np.ndarray]],
        root: str | Path | None = None,
        memory_bytes: int | None = None,
        disk_bytes: int | None = None,
        salt: str = "",
        threads: int | None = None,
    ) -> "ResizedCache":
        root = Path(root) if root is not None else default_cache_dir()
        memory_bytes = default_memory_bytes() if memory_bytes is None else memory_bytes
        disk_bytes = default_disk_bytes() if disk_bytes is None else disk_bytes
        root.mkdir(parents=True, exist_ok=True)
        entry = root / f"{height}x{width}-{cache_key(files, height, width, salt)}"
        n = len(files)
        if not cls._complete(entry, n, height, width):
            with held(root / f"{entry.name}.lock"):
                if not cls._complete(entry, n, height, width):  # nobody built it while we waited
                    cls._build(entry, files, height, width, decode, threads)
                    prune(root, disk_bytes, keep=entry)
        with contextlib.suppress(OSError):
            os.utime(entry / "meta.json")  # least recently used goes first when pruning
        return cls(entry, n, height, width, memory_bytes)

    @staticmethod
    def _complete(entry: Path, n: int, height: int, width: int) -> bool:
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return meta.get("format_version") == FORMAT_VERSION and meta.get("n") == n and meta.get("size") == [height, width]

    @staticmethod
    def _build(entry: Path, files, height: int, width: int, decode, threads: int | None) -> None:
        tmp = entry.with_name(f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        n = len(files)
        started = time.perf_counter()
        try:
            threads = threads or min(4, os.cpu_count() or 1)
            with open(tmp / "images.npy", "wb") as fi, open(tmp / "masks.npy", "wb") as fm, ThreadPoolExecutor(threads) as pool:
                _write_npy_header(fi, (n, height, width, 3))
                _write_npy_header(fm, (n, height, width))
                for start in range(0, n, _CHUNK):  # decode (PIL and cv2 release the GIL) in parallel, write in order
                    for rgb, mask in pool.map(decode, range(start, min(n, start + _CHUNK))):
                        if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8 or mask.shape != (height, width) or mask.dtype != np.uint8:
                            raise ValueError(
                                f"decode returned {rgb.shape} {rgb.dtype} / {mask.shape} {mask.dtype}, expected ({height}, {width}, 3) / ({height}, {width}) uint8"
                            )
                        fi.write(np.ascontiguousarray(rgb).data)
                        fm.write(np.ascontiguousarray(mask).data)
            meta = {
                "format_version": FORMAT_VERSION,
                "n": n,
                "size": [height, width],
                "files_head": [os.path.abspath(a) for a, _ in files[:3]],
                "build_seconds": round(time.perf_counter() - started, 3),
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            if entry.exists():  # a stale or foreign entry (another format): replace it
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ---- reading ----------------------------------------------------------------------------
    @staticmethod
    def _data_offset(path: Path) -> int:
        with open(path, "rb") as fh:
            np.lib.format.read_magic(fh)
            np.lib.format.read_array_header_1_0(fh)
            return fh.tell()

    def _open(self) -> tuple[int, int]:
        if self._fds is None or self._pid != os.getpid():
            self._fds = (os.open(self.entry / "images.npy", os.O_RDONLY), os.open(self.entry / "masks.npy", os.O_RDONLY))
            self._pid = os.getpid()
        return self._fds

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        fi, fm = self._open()
        rgb = np.empty((self.height, self.width, 3), np.uint8)
        mask = np.empty((self.height, self.width), np.uint8)
        for fd, out, offset in ((fi, rgb, self._image_offset + index * self.image_bytes), (fm, mask, self._mask_offset + index * self.mask_bytes)):
            view = memoryview(out).cast("B")
            got = os.preadv(fd, [view], offset) if hasattr(os, "preadv") else _pread_into(fd, view, offset)
            if got != len(view):
                raise OSError(f"{self.entry}: cache file is truncated (item {index}); delete the folder to rebuild it.")
        return rgb, mask

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """A private, writable copy of sample ``index``: (uint8 (H, W, 3), uint8 (H, W))."""
        if not 0 <= index < self.n:
            raise IndexError(index)
        if index < len(self._memory):
            rgb, mask = self._memory[index]
            return rgb.copy(), mask.copy()
        return self._read(index)

    @property
    def resident_bytes(self) -> int:
        """Bytes this process holds in its in-memory tier (never more than ``memory_bytes``)."""
        return sum(a.nbytes + b.nbytes for a, b in self._memory)

    def close(self) -> None:
        if self._fds is not None and self._pid == os.getpid():
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = None, -1
        return state

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:  # pragma: no cover - platforms without preadv
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


class MemoryCache:
    """The fallback where no cache folder is writable: up to ``memory_bytes`` of samples kept in
    memory (first come), the rest decoded on every read. Warns once that it is slower."""

    def __init__(self, n: int, decode: Callable[[int], tuple[np.ndarray, np.ndarray]], memory_bytes: int):
        self.n, self.decode, self.memory_bytes = n, decode, max(0, int(memory_bytes))
        self._items: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._held = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._items:
            rgb, mask = self._items[index]
            return rgb.copy(), mask.copy()
        rgb, mask = self.decode(index)
        if self._held + rgb.nbytes + mask.nbytes <= self.memory_bytes:
            self._items[index] = (rgb, mask)
            self._held += rgb.nbytes + mask.nbytes
            return rgb.copy(), mask.copy()
        return rgb, mask

    @property
    def resident_bytes(self) -> int:
        return self._held


def warn_no_disk_cache(root: Path, exc: Exception) -> None:
    warnings.warn(
        f"image cache folder {root} is not usable ({exc}); caching in memory only (set BSS_CACHE_DIR to a writable folder).", RuntimeWarning, stacklevel=3
    )
