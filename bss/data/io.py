"""Reading images and masks safely, and writing files and folders atomically.

Every reader raises :class:`~bss.errors.DatasetError` naming the file instead of returning
garbage (OpenCV returns ``None`` for a corrupt file and silently half-decodes a truncated JPEG,
so decoding goes through Pillow, which refuses truncated files).

Every image is read as it is shown: an EXIF Orientation tag (a phone or camera photo stored
sideways) is applied, as browsers, VIA and ``cv2.imread`` apply it, so polygons drawn in VIA on
the turned picture land on the right pixels; :func:`image_size` gives the turned size too.
An image of more than :func:`max_image_pixels` pixels (``$BSS_MAX_IMAGE_PIXELS``, by default
Pillow's own refusal threshold of 178,956,970) is refused by name instead of Pillow's anonymous
``DecompressionBombError``; below it Pillow's anonymous warning is not printed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bss.errors import BSSError, DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # Pillow's refusal threshold (it warns from half of it)
Image.MAX_IMAGE_PIXELS = None  # the limit is checked by _open, naming the file and the way to raise it
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey (modes I;16*, I, F) scaled to 8 bits by the type's range (Pillow's
    own convert clips them at 255, which turns a 16-bit frame all white)."""
    if not (im.mode.startswith("I;16") or im.mode in ("I", "F")):
        return im
    arr = np.asarray(im).astype(np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255) else 255.0
    if im.mode == "F":
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def max_image_pixels() -> int:
    """The largest image (width x height) BSS reads: ``$BSS_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get("BSS_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise BSSError(f"BSS_MAX_IMAGE_PIXELS={raw!r} is not a positive number of pixels (width x height), e.g. 250000000.")
    return value


def _open(path: Path) -> Image.Image:
    """``Image.open`` (the header only), refusing an image above :func:`max_image_pixels` by name."""
    im = Image.open(path)
    width, height = im.size
    limit = max_image_pixels()
    if width * height > limit:
        im.close()
        raise DatasetError(
            f"{path}: the image is {width}x{height} ({width * height:,} pixels), more than the limit of {limit:,} pixels "
            f"(a guard against decompression bombs). To read it, set BSS_MAX_IMAGE_PIXELS={width * height} (or more), or scale the image down."
        )
    return im


def orientation(im: Image.Image) -> int:
    """The EXIF Orientation of an open image (1: as stored; 3: turned 180 degrees; 6 and 8: turned
    90 degrees; 2, 4, 5, 7: mirrored); 1 where there is none or the EXIF cannot be read."""
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block is ignored, as browsers ignore it
        return 1
    return value if 1 <= value <= 8 else 1


def _upright(im: Image.Image) -> Image.Image:
    """The image as it is shown: its EXIF orientation applied to the pixels."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im  # Pillow's own transposes; a malformed EXIF reads as 1


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) as the image is shown (EXIF orientation applied); grey images
    are repeated over three channels, 16-bit ones scaled to 8 bits."""
    path = Path(path)
    try:
        with _open(path) as im:
            im.load()
            rgb = np.asarray(_to_8bit(_upright(im)).convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated image ({exc}). Replace or remove the file.") from None
    return rgb


def image_size(path: str | Path, stored: bool = False) -> tuple[int, int]:
    """(height, width) as the image is shown (EXIF orientation 5-8 swaps them; ``stored``: as
    its pixels are stored), from the header, without decoding the pixels."""
    try:
        with _open(Path(path)) as im:
            width, height = im.size
            if orientation(im) >= 5 and not stored:
                width, height = height, width
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt image ({exc}). Replace or remove the file.") from None
    return height, width


def image_orientation(path: str | Path) -> int:
    """The EXIF Orientation of the image file ``path`` (1 where there is none)."""
    try:
        with _open(Path(path)) as im:
            return orientation(im)
    except (OSError, SyntaxError, ValueError):
        return 1


def read_mask(path: str | Path) -> np.ndarray:
    """A binary uint8 mask (H, W) of 0/1 from a single-channel png of 0/255 or 0/1.

    Anything else is refused, naming the file and the values found: a colour mask, or grey
    values other than 0 and one foreground value (a noisy or anti-aliased mask would otherwise
    turn every non-zero pixel into a defect)."""
    path = Path(path)
    try:
        with _open(path) as im:
            im.load()
            im = _upright(im)
            if im.mode not in ("1", "L", "P", "I;16", "I;16B", "I;16L", "I", "LA", "PA"):
                raise DatasetError(f"{path}: the mask is {im.mode}, not single-channel; save it as a grey png of 0 (background) and 255 (defect).")
            if im.mode in ("P", "PA", "LA"):
                im = im.convert("L")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated mask ({exc}). Replace or remove the file.") from None
    values = np.unique(arr)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(int(v)) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DatasetError(
            f"{path}: the mask is not binary (values {shown}; {len(values)} distinct); a mask holds 0 (background) and one value for the defect (1 or 255)."
        )
    return (arr > 0).astype(np.uint8)


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Save a 0/1 (or boolean) mask as a 0/255 png."""
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(path)


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)


def check_folder_path(path: str | Path, what: str = "") -> Path:
    """Refuse, by name, a folder that cannot be made because a file stands where it or one of its
    parents would be (``--run-dir notes.txt/run``), before anything is written; ``what`` names the
    option (``--run-dir``). Returns ``path``."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    for part in (path, *path.parents):
        if part.is_dir():
            return path
        if part.exists() or part.is_symlink():
            if part == path:
                raise BSSError(f"{label} is a file, not a folder; choose another path.")
            raise BSSError(f"{label}: {part} is a file, not a folder, so nothing can be made under it; choose another path.")
    return path


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success rename it to ``target``; on error delete it.

    ``target`` must not exist unless ``overwrite`` is set, so nothing is replaced by surprise.
    """
    target = check_folder_path(target)  # a file in the way (the target, or one of its parents) is named
    if target.exists() and not overwrite:
        raise BSSError(f"{target} already exists; pass --overwrite to replace it, or choose another name.")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield tmp
        (tmp / OWNER).unlink(missing_ok=True)
        if target.exists() and not overwrite:  # another process made it meanwhile: keep theirs
            raise BSSError(f"{target} appeared while this one was being written (another run?); it is left as it is and nothing was written.")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(target.parent).free
            raise BSSError(
                f"{target}: the disk is full ({free / 2**20:.1f} MiB free in {target.parent}); nothing was written. Free some space, or write to another folder."
            ) from None
        raise
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


OWNER = ".owner"  # "<host> <pid>" of the process writing a temporary folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``.<target>.tmp-*`` folders left by a killed writer on this host (its process is
    gone); folders of a live writer, or of another host, are left alone. Returns what was removed."""
    removed = []
    host = socket.gethostname()
    for folder in Path(target).parent.glob(f".{Path(target).name}.tmp-*"):
        try:
            owner_host, pid = (folder / OWNER).read_text().split()
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if owner_host == host and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True):
    """Yield a temporary path beside ``path`` (``.<name>.<random>.tmp``, not created) for the
    caller to write; on success it replaces ``path`` in one rename (after ``fsync``), on any error
    it is deleted. A kill at any moment leaves the old file or the new one, never half of one.
    Every file BSS rewrites goes through here (or the helpers below), never written in place."""
    path = Path(path)
    check_folder_path(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (and a final newline) to ``path`` atomically; values JSON
    does not know (paths, dates) are written as their ``str``."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a file that is not JSON is one :class:`~bss.errors.BSSError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BSSError(f"{path} is not valid JSON ({exc}); it was not written by this version of BSS, or was edited.") from None


def publish_copy(src: str | Path, dst: str | Path) -> Path:
    """Put ``src``'s content at ``dst`` atomically, as a hard link where possible (a checkpoint
    promoted, then kept as the final model, costs its disk once). Safe because BSS never writes a
    file in place: every writer replaces it (:func:`atomic_path`), which leaves the other link as
    it was."""
    with atomic_path(dst, fsync=False) as tmp:  # a link adds no data to flush
        link_or_copy(Path(src), tmp)
    return Path(dst)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk) where the filesystem allows, else copy it.
    A symbolic link is followed: the file it points to is linked (never the link itself, which
    would dangle in another folder)."""
    src = Path(src)
    if src.is_symlink():
        real = src.resolve()
        if not real.is_file():
            raise DatasetError(f"{src}: symbolic link to {real}, which does not exist. Fix or remove the link.")
        src = real
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


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """``"256x192"`` -> (256, 192): every size on the command line is WIDTHxHEIGHT."""
    import re

    match = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", str(text))
    if not match:
        raise BSSError(f"{flag} {text!r} is not WIDTHxHEIGHT, e.g. 256x192.")
    return int(match.group(1)), int(match.group(2))
