"""Reading images and masks safely, and writing folders atomically.

Every reader raises :class:`~bss.errors.DatasetError` naming the file instead of returning
garbage (OpenCV returns ``None`` for a corrupt file and silently half-decodes a truncated JPEG,
so decoding goes through Pillow, which refuses truncated files).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bss.errors import BSSError, DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3); grey images are repeated over three channels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated image ({exc}). Replace or remove the file.") from None
    return rgb


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: corrupt image ({exc}). Replace or remove the file.") from None
    return height, width


def read_mask(path: str | Path) -> np.ndarray:
    """A binary uint8 mask (H, W) of 0/1 from a png of 0/255 or 0/1 (any value > 0 is foreground)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated mask ({exc}). Replace or remove the file.") from None
    return (arr > 0).astype(np.uint8)


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Save a 0/1 (or boolean) mask as a 0/255 png."""
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(path)


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success rename it to ``target``; on error delete it.

    ``target`` must not exist unless ``overwrite`` is set, so nothing is replaced by surprise.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise BSSError(f"{target} already exists; pass --overwrite to replace it, or choose another name.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk) where the filesystem allows, else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
