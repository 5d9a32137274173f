"""Import one class of a YOLO detection dataset as a BSS source dataset.

The source is laid out the Ultralytics way, with or without split subfolders::

    SOURCE/data.yaml (or dataset.yaml)   names: [joint, obstacle]   or   names: {0: joint, 1: obstacle}
    SOURCE/images/[<split>/]x.png        any of bss.data.io.IMAGE_SUFFIXES
    SOURCE/labels/[<split>/]x.txt        one box a line: "class cx cy w h", normalised to [0, 1]

Images and labels are paired by walking ``images/`` and mapping each relative path to
``labels/<same path>.txt``; an image without a label file has no boxes. Only images holding at
least one box of the chosen class are imported, into ``<data_root>/<name>/``:

* ``images/``: hard links to the source images (copies with ``copy=True`` or across filesystems).
  If two splits hold the same file name, the split path is prefixed: ``training__0001.png``.
* ``masks/<stem>.png``: the class's boxes filled, 0/255, the image's size. A box covers the
  pixels whose centre lies inside it, after clipping to the image, and at least one pixel.
* ``labels.csv``: a VIA CSV with one region_count-0 row per image, ready for hand-drawn polygons.
* ``import.json``: where it came from and what was found (counts, duplicates, skipped lines).

Malformed label lines are warnings, not errors: the line is skipped and reported as
``file:line: reason``. Exact duplicate images (same sha1 of the bytes) keep the first copy in
sorted path order; later copies are skipped whatever their labels say, and listed. A corrupt
image is an error and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from bss.data.io import IMAGE_SUFFIXES, atomic_folder, is_image, link_or_copy, read_image, write_mask
from bss.data.via import write_via_csv
from bss.errors import BSSError, DatasetError, yaml_problem

YAML_NAMES = ("data.yaml", "dataset.yaml")
EXPECTED = (
    "A YOLO dataset is a folder with data.yaml (or dataset.yaml) listing 'names:', "
    "images/[<split>/]*.png|jpg and labels/[<split>/]*.txt with one 'class cx cy w h' line per box."
)
PROGRESS_MIN = 200  # show a progress bar from this many images on

Box = tuple[float, float, float, float]  # cx, cy, w, h, normalised


@dataclass
class Pair:
    image: Path
    label: Path | None
    rel: Path  # the image's path under images/


@dataclass
class Scan:
    kept: list[tuple[Pair, list[Box], tuple[int, int]]] = field(default_factory=list)  # pair, boxes, (h, w)
    duplicates: list[dict] = field(default_factory=list)
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason"
    warnings: list[str] = field(default_factory=list)  # everything else worth a line


def read_class_names(source: Path) -> tuple[Path, dict[int, str]]:
    """The yaml file and its ``names`` as {id: name}."""
    path = next((source / n for n in YAML_NAMES if (source / n).is_file()), None)
    if path is None:
        raise DatasetError(f"{source}: no data.yaml or dataset.yaml. {EXPECTED}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DatasetError(yaml_problem(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8.") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{path}: needs 'names:' as a list ([joint, obstacle]) or a mapping ({{0: joint, 1: obstacle}}).")
    try:
        return path, {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: the class ids in 'names:' must be integers, got {list(names)}.") from None


def resolve_class(spec: str, names: dict[int, str], where: Path) -> int:
    """A class name (case-insensitive) or an integer id; an unknown one lists the valid ones."""
    wanted = str(spec).strip()
    for cid, name in names.items():
        if name.lower() == wanted.lower():
            return cid
    if wanted.lstrip("-").isdigit() and int(wanted) in names:
        return int(wanted)
    valid = ", ".join(f"{name} ({cid})" for cid, name in sorted(names.items()))
    raise DatasetError(f"class {spec!r} is not in {where}; choose one of: {valid}.")


def find_pairs(source: Path) -> list[Pair]:
    """Every image under images/ (sorted) with its label file, or None when it has none."""
    images_dir, labels_dir = source / "images", source / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetError(f"{source}: no {folder.name}/ folder. {EXPECTED}")
    pairs = []
    for path in sorted(images_dir.rglob("*")):
        if is_image(path):
            rel = path.relative_to(images_dir)
            label = labels_dir / rel.with_suffix(".txt")
            pairs.append(Pair(path, label if label.is_file() else None, rel))
    if not pairs:
        raise DatasetError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) found. {EXPECTED}")
    return pairs


def orphan_labels(source: Path, pairs: list[Pair]) -> list[str]:
    """Label files under labels/ that no image points to, relative to the source."""
    used = {p.label for p in pairs}
    return [p.relative_to(source).as_posix() for p in sorted((source / "labels").rglob("*.txt")) if p not in used]


def parse_line(line: str, names: dict[int, str]) -> tuple[int, Box]:
    """(class id, box) of one label line; a ValueError says what is wrong."""
    fields = line.split()
    if len(fields) != 5:
        hint = " (a segmentation polygon? only boxes are read)" if len(fields) > 5 else ""
        raise ValueError(f"expected 5 fields 'class cx cy w h', found {len(fields)}{hint}")
    try:
        cid = int(fields[0])
    except ValueError:
        raise ValueError(f"class id {fields[0]!r} is not an integer") from None
    if cid not in names:
        raise ValueError(f"class id {cid} is not in names (valid: {', '.join(map(str, sorted(names)))})")
    try:
        cx, cy, w, h = (float(f) for f in fields[1:])
    except ValueError:
        raise ValueError(f"'{' '.join(fields[1:])}' are not all numbers") from None
    if not all(math.isfinite(v) for v in (cx, cy, w, h)):
        raise ValueError("coordinates must be finite numbers")
    if w <= 0 or h <= 0:
        raise ValueError(f"width and height must be > 0, got {w:g} x {h:g}")
    if not (0 <= cx <= 1 and 0 <= cy <= 1):
        raise ValueError(f"centre ({cx:g}, {cy:g}) is outside [0, 1]; YOLO coordinates are normalised")
    return cid, (cx, cy, w, h)


def read_labels(path: Path | None, names: dict[int, str], bad_lines: list[str]) -> list[tuple[int, Box]]:
    """Every valid box of a label file; each bad line adds ``file:line: reason`` to ``bad_lines``."""
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the label file ({exc}).") from None
    boxes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            boxes.append(parse_line(line, names))
        except ValueError as exc:
            bad_lines.append(f"{path}:{number}: {exc}; line skipped")
    return boxes


def _span(centre: float, size: float, n: int) -> tuple[int, int]:
    """Pixels [lo, hi) whose centre lies in [centre - size/2, centre + size/2) * n, clipped, >= 1 pixel."""
    lo = min(max(math.ceil((centre - size / 2) * n - 0.5), 0), n - 1)
    hi = min(max(math.ceil((centre + size / 2) * n - 0.5), lo + 1), n)
    return lo, hi


def box_mask(boxes: list[Box], height: int, width: int) -> np.ndarray:
    """The union of the boxes as a 0/1 uint8 mask (height, width)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for cx, cy, w, h in boxes:
        (x0, x1), (y0, y1) = _span(cx, w, width), _span(cy, h, height)
        mask[y0:y1, x0:x1] = 1
    return mask


def _progress(items: list, desc: str):
    if len(items) < PROGRESS_MIN:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="img", file=sys.stderr)


def scan(pairs: list[Pair], class_id: int, names: dict[int, str]) -> Scan:
    """Parse every label file, drop duplicates, and decode the images that hold the class."""
    result, first_by_hash = Scan(), {}
    for pair in _progress(pairs, "scanning"):
        boxes = [box for cid, box in read_labels(pair.label, names, result.bad_lines) if cid == class_id]
        digest = hashlib.sha1(pair.image.read_bytes()).hexdigest()
        if digest in first_by_hash:
            original = first_by_hash[digest]
            result.duplicates.append({"image": f"images/{pair.rel.as_posix()}", "same_as": f"images/{original.rel.as_posix()}"})
            result.warnings.append(f"{pair.image}: same bytes as {original.image}; duplicate skipped, the first copy is kept")
            continue
        first_by_hash[digest] = pair
        if boxes:
            height, width = read_image(pair.image).shape[:2]  # raises on a corrupt file
            result.kept.append((pair, boxes, (height, width)))
    return result


def output_stems(pairs: list[Pair]) -> list[str]:
    """Unique stems: a name shared by several folders gets its folder path as a prefix."""
    counts = Counter(p.rel.stem for p in pairs)
    stems = ["__".join(p.rel.parent.parts + (p.rel.stem,)) if counts[p.rel.stem] > 1 else p.rel.stem for p in pairs]
    clash = [s for s, n in Counter(stems).items() if n > 1]
    if clash:
        files = [str(p.image) for p, s in zip(pairs, stems) if s == clash[0]]
        raise DatasetError(f"{' and '.join(files)} would both become {clash[0]!r}; rename one (stems must be unique).")
    return stems


def check_target(target: Path, source: Path, name: str, overwrite: bool) -> None:
    if not name or name != Path(name).name or name in (".", "..") or name.startswith("."):
        raise BSSError(f"--name {name!r} must be a plain folder name (no '/', not starting with '.').")
    if target.exists() and not overwrite:
        raise BSSError(f"{target} already exists; pass --overwrite to replace it, or choose another name.")
    src, dst = source.resolve(), target.resolve()
    if src == dst or dst in src.parents:
        raise BSSError(f"{target} holds the source {source}; choose another --name or --data-root.")


def write_dataset(folder: Path, kept: list, stems: list[str], copy: bool) -> dict[str, str]:
    """images/, masks/ and labels.csv; returns {output file name: source path under images/}."""
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    origins, sizes = {}, {}
    for (pair, boxes, (height, width)), stem in zip(_progress(kept, "writing"), stems):
        name = stem + pair.image.suffix
        (shutil.copy2 if copy else link_or_copy)(pair.image, folder / "images" / name)
        write_mask(folder / "masks" / f"{stem}.png", box_mask(boxes, height, width))
        origins[name] = f"images/{pair.rel.as_posix()}"
        sizes[name] = pair.image.stat().st_size
    write_via_csv(folder / "labels.csv", {name: [] for name in origins}, sizes)
    return origins


def import_yolo(source, class_spec, name: str, data_root="datasets", overwrite: bool = False, copy: bool = False, log=None) -> dict:
    """Import ``class_spec`` of the YOLO dataset at ``source`` as ``data_root/name``; return the manifest.

    ``log(message)`` receives one warning per problem found (bad label line, duplicate, label without image).
    """
    source, target = Path(source), Path(data_root) / name
    if not source.is_dir():
        raise DatasetError(f"{source}: source folder not found. {EXPECTED}")
    yaml_path, names = read_class_names(source)
    class_id = resolve_class(class_spec, names, yaml_path)
    check_target(target, source, name, overwrite)
    pairs = find_pairs(source)
    found = scan(pairs, class_id, names)
    orphans = orphan_labels(source, pairs)
    found.warnings += [f"{source / rel}: label file without an image; ignored" for rel in orphans]
    for message in found.bad_lines + found.warnings:
        (log or (lambda m: None))(message)
    if not found.kept:
        raise DatasetError(
            f"none of the {len(pairs)} images under {source / 'images'} has a box of class {names[class_id]!r} (id {class_id}); nothing to import."
        )
    stems = output_stems([pair for pair, _, _ in found.kept])
    manifest = {
        "source": str(source.resolve()),
        "class_id": class_id,
        "class_name": names[class_id],
        "counts": {
            "images_scanned": len(pairs),
            "images_with_class": len(found.kept),
            "boxes": sum(len(boxes) for _, boxes, _ in found.kept),
            "skipped_lines": len(found.bad_lines),
            "duplicates": len(found.duplicates),
            "images_without_labels": sum(p.label is None for p in pairs),
            "labels_without_image": len(orphans),
        },
        "duplicates": found.duplicates,
        "labels_without_image": orphans,
        "skipped_lines": found.bad_lines,
    }
    with atomic_folder(target, overwrite) as tmp:
        manifest["images"] = write_dataset(tmp, found.kept, stems, copy)
        (tmp / "import.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest["folder"] = str(target)
    return manifest


def summary(manifest: dict) -> str:
    """A few lines for the terminal."""
    c = manifest["counts"]
    return "\n".join(
        [
            f"imported class {manifest['class_name']!r} (id {manifest['class_id']}) from {manifest['source']} into {manifest['folder']}",
            f"  images scanned:        {c['images_scanned']}",
            f"  images with the class: {c['images_with_class']} ({c['boxes']} boxes)",
            f"  duplicates skipped:    {c['duplicates']}",
            f"  label lines skipped:   {c['skipped_lines']}",
            f"  images without labels: {c['images_without_labels']}",
            f"  labels without image:  {c['labels_without_image']}",
            "next: hand-label some images in VIA and save the export over labels.csv (docs/bring_your_own_data.md)",
        ]
    )
