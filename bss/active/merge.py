"""Merge a VIA CSV export of newly hand-labelled images into a dataset's ``labels.csv``.

    result = merge_labels("obstacle", "via_export.csv")

The export is read and checked like any VIA export (:func:`bss.data.via.read_via_csv`: JSON,
shapes, ``region_count``, duplicate region ids), and then against the dataset. Every problem is
one :class:`~bss.errors.DatasetError` naming the export and its line, and nothing is written:

* a row naming a file that is not in ``images/``;
* a labelled image whose ``file_size`` is not the image's size in bytes (VIA matched another
  file of that name: re-export from a project that loaded the dataset's own images);
* a shape reaching outside the image (:func:`bss.data.via.rasterize`);
* a duplicate: an image that already has regions in ``labels.csv``, or whose rows appear in
  two places of the export;
* an export without any labelled image.

Rows of the export with ``region_count`` 0 (images left unlabelled) are ignored. In the new
``labels.csv`` each merged image's ``region_count`` 0 row is replaced, in place, by its region
rows (the export's own cells); every other line of the file is kept byte for byte, in the
file's encoding (UTF-8 with or without BOM, or UTF-16) and line ending. The new file is written
to a temporary file beside it, read back and checked, flushed to disk and renamed over
``labels.csv`` (``os.replace``): a crash leaves the old file or the new one, never half of one.
The previous file is kept as ``labels.csv.bak``.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bss.data.io import atomic_path, image_size
from bss.data.layout import SourceDataset
from bss.data.via import VIA_COLUMNS, check_filename, delimiter, rasterize, read_text, read_via_csv
from bss.errors import DatasetError

BACKUP_SUFFIX = ".bak"


@dataclass
class MergeResult:
    labels: Path
    backup: Path | None
    merged: list[str]  # file names, in export order
    regions: int
    ignored_unlabelled: int
    masks: dict = field(default_factory=dict, repr=False)  # filename -> drawn 0/1 mask


def _records(text: str, sep: str = ",") -> tuple[list[str], list[tuple[list[str], str]]]:
    """The CSV's header and its records, each with its raw text (physical lines, endings kept)."""
    lines = list(io.StringIO(text, newline=""))
    reader = csv.reader(iter(lines), delimiter=sep)
    records = []
    done = 0
    header = None
    for row in reader:
        raw = "".join(lines[done : reader.line_num])
        done = reader.line_num
        if header is None:
            header = (row, raw)
            continue
        records.append((row, raw))  # a blank line too: kept as it is
    if header is None:
        raise DatasetError("the labels file is empty.")
    return header, records


def _encoding(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    return "utf-8-sig" if data[:3] == b"\xef\xbb\xbf" else "utf-8"


def _export_rows(path: Path) -> dict[str, list[tuple[int, dict]]]:
    """``{filename: [(line, row dict), ...]}``; an image whose rows are not consecutive appears twice."""
    out: dict[str, list[tuple[int, dict]]] = {}
    previous = None
    text = read_text(path)
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter(text))
        for line, row in enumerate(reader, start=2):
            name = check_filename((row.get("filename") or "").strip(), f"{path} line {line}")
            if name in out and previous != name:
                raise DatasetError(
                    f"{path} line {line}: duplicate: {name!r} appears twice in the export (first on line {out[name][0][0]}); export each image once."
                )
            out.setdefault(name, []).append((line, row))
            previous = name
    return out


def merge_labels(dataset: str, export: str | Path, data_root: str | Path = "datasets", backup: bool = True) -> MergeResult:
    """Merge the labelled images of ``export`` into ``<dataset>/labels.csv`` (see the module doc)."""
    export = Path(export)
    source = SourceDataset.open(dataset, data_root)  # the current labels.csv must read cleanly
    labels_path = source.root / "labels.csv"
    parsed = read_via_csv(export)  # shapes, JSON, region_count, duplicate region ids
    rows = _export_rows(export)
    masks, ignored = _checked_masks(export, source, parsed, rows)
    merged = list(masks)
    text, encoding = _merged_text(labels_path, rows, merged)
    backup_path = _replace_checked(labels_path, text.encode(encoding), merged, set(source.labels.labelled), backup)
    return MergeResult(labels_path, backup_path, merged, sum(len(parsed.regions[n]) for n in merged), ignored, masks)


def _checked_masks(export: Path, source: SourceDataset, parsed, rows: dict) -> tuple[dict[str, np.ndarray], int]:
    """The masks of the export's labelled images (in export order), each checked against the
    dataset: a known image, the same file size, not labelled already; and how many rows had no
    regions. Any problem is one error naming the export's line."""
    labels_path = source.root / "labels.csv"
    images = {s.image.name: s.image for s in source.samples}
    already = set(source.labels.labelled)
    masks, ignored = {}, 0
    for name, entries in rows.items():
        line, first = entries[0]
        where = f"{export} line {line}"
        if name not in images:
            raise DatasetError(
                f"{where}: {name!r} is not an image of {source.root / 'images'}; the export belongs to another dataset, or the file was renamed."
            )
        regions = parsed.regions.get(name, [])
        if not regions:
            ignored += 1
            continue
        actual = images[name].stat().st_size
        try:
            declared = int(first.get("file_size") or -1)
        except ValueError:
            declared = -1
        if declared != actual:
            raise DatasetError(
                f"{where}: {name!r} has file_size {first.get('file_size')!r} in the export but {images[name]} is {actual} bytes; VIA labelled another file of that name. Load the dataset's own images in VIA and export again."
            )
        if name in already:
            raise DatasetError(
                f"{where}: duplicate: {name!r} already has hand-drawn regions in {labels_path}; remove its rows from the export (or from labels.csv) so each image is labelled once."
            )
        h, w = image_size(images[name])
        masks[name] = rasterize(regions, h, w, name)
    if not masks:
        raise DatasetError(
            f"{export}: no image with regions in the export ({ignored} unlabelled row(s)); nothing to merge. Draw the polygons in VIA, then Annotation > Export annotations (as csv)."
        )
    return masks, ignored


def _merged_text(labels_path: Path, rows: dict, merged: list[str]) -> tuple[str, str]:
    """labels.csv with the merged images' rows in place of their empty ones (appended if it did
    not list them); every other line byte for byte. The text and the file's encoding."""
    encoding = _encoding(labels_path.read_bytes())
    text = read_text(labels_path)
    sep = delimiter(text)  # a ';' file stays a ';' file
    (header, header_raw), records = _records(text, sep)
    ending = "\r\n" if header_raw.endswith("\r\n") else ("\r" if header_raw.endswith("\r") else "\n")
    columns = {c: header.index(c) for c in header}
    if "filename" not in columns or "region_count" not in columns:
        raise DatasetError(f"{labels_path}: not a VIA CSV export (no filename/region_count column).")

    def new_rows(name: str) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator=ending, delimiter=sep)
        for _, row in rows[name]:
            writer.writerow([(row.get(c) if row.get(c) not in (None, "") else ("{}" if c.endswith("attributes") else "")) for c in header])
        return buf.getvalue()

    out = [header_raw if header_raw.endswith(("\n", "\r")) else header_raw + ending]
    chosen, placed = set(merged), set()
    for row, raw in records:
        name = row[columns["filename"]].strip() if len(row) > columns["filename"] else ""
        if name in chosen and name not in placed:
            out.append(new_rows(name))
            placed.add(name)
        elif name in chosen:
            continue  # a second row of a merged image (cannot happen: region_count 0 rows are unique)
        else:
            out.append(raw if raw.endswith(("\n", "\r")) else raw + ending)
    for name in merged:
        if name not in placed:  # an image that labels.csv did not list: appended
            out.append(new_rows(name))
    return "".join(out), encoding


def _replace_checked(labels_path: Path, data: bytes, merged: list[str], already: set[str], backup: bool) -> Path | None:
    """Write ``data`` as labels.csv atomically, once it reads back as a VIA export holding every
    merged and every earlier label; keep the old file as labels.csv.bak. The backup's path."""
    backup_path = None
    with atomic_path(labels_path) as tmp:  # replaces labels.csv only if the block ends without an error
        tmp.write_bytes(data)
        check = read_via_csv(tmp)  # the new file must read as a VIA export again
        missing = [n for n in merged if n not in check.labelled]
        lost = [n for n in already if n not in check.labelled]
        if missing or lost:
            raise DatasetError(f"internal error: the merged labels.csv would lose {(missing or lost)[0]!r}; nothing written.")
        if backup:
            backup_path = labels_path.with_name(labels_path.name + BACKUP_SUFFIX)
            with atomic_path(backup_path) as bak_tmp:
                shutil.copy2(labels_path, bak_tmp)
    return backup_path


__all__ = ["MergeResult", "merge_labels", "VIA_COLUMNS"]
