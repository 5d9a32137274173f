"""Read and write VIA (VGG Image Annotator) CSV exports and draw their regions as masks.

The CSV has one row per region::

    filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes

``region_shape_attributes`` is JSON: ``{"name": "polygon", "all_points_x": [...], "all_points_y": [...]}``,
``{"name": "rect", "x", "y", "width", "height"}``, ``{"name": "circle", "cx", "cy", "r"}`` or
``{"name": "ellipse", "cx", "cy", "rx", "ry", "theta"}`` (theta in radians, as VIA writes it).
A row with ``region_count`` 0 means the image has no hand label. An image's hand mask is the
union of its regions.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from bss.errors import DatasetError

VIA_COLUMNS = [
    "filename",
    "file_size",
    "file_attributes",
    "region_count",
    "region_id",
    "region_shape_attributes",
    "region_attributes",
]
SHAPES = ("polygon", "rect", "circle", "ellipse")
_REQUIRED = {
    "polygon": ("all_points_x", "all_points_y"),
    "rect": ("x", "y", "width", "height"),
    "circle": ("cx", "cy", "r"),
    "ellipse": ("cx", "cy", "rx", "ry"),
}
_POSITIVE = {"rect": ("width", "height"), "circle": ("r",), "ellipse": ("rx", "ry")}
# A drawn point may sit this many pixels outside the image (VIA snaps to the border loosely).
EDGE_TOLERANCE_PX = 2.0


@dataclass(frozen=True)
class Region:
    """One drawn shape: ``shape`` is one of :data:`SHAPES`, ``attrs`` its VIA attributes."""

    shape: str
    attrs: dict
    where: str = ""  # "labels.csv line 7", for error messages

    def extent(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the shape, in pixels."""
        a = self.attrs
        if self.shape == "polygon":
            return min(a["all_points_x"]), min(a["all_points_y"]), max(a["all_points_x"]), max(a["all_points_y"])
        if self.shape == "rect":
            return a["x"], a["y"], a["x"] + a["width"], a["y"] + a["height"]
        if self.shape == "circle":
            return a["cx"] - a["r"], a["cy"] - a["r"], a["cx"] + a["r"], a["cy"] + a["r"]
        half = max(a["rx"], a["ry"])
        return a["cx"] - half, a["cy"] - half, a["cx"] + half, a["cy"] + half


@dataclass
class ViaLabels:
    """The parsed export: ``regions[filename]`` lists the regions of every image in the CSV."""

    path: Path
    regions: dict[str, list[Region]] = field(default_factory=dict)

    @property
    def labelled(self) -> list[str]:
        """Filenames with at least one hand-drawn region, in CSV order."""
        return [name for name, regs in self.regions.items() if regs]

    @property
    def unlabelled(self) -> list[str]:
        return [name for name, regs in self.regions.items() if not regs]


def _number(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"{where}: '{key}' must be a finite number, got {value!r}. Fix the region in the VIA export.")
    return float(value)


def parse_region(text: str, where: str) -> Region:
    """Parse one ``region_shape_attributes`` JSON cell; raise :class:`DatasetError` naming ``where``."""
    try:
        attrs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: region_shape_attributes is not valid JSON ({exc.msg}): {text[:80]!r}") from None
    if not isinstance(attrs, dict):
        raise DatasetError(f"{where}: region_shape_attributes must be a JSON object, got {text[:80]!r}")
    shape = attrs.get("name")
    if shape not in SHAPES:
        raise DatasetError(f"{where}: unsupported region shape {shape!r}; BSS draws {', '.join(SHAPES)}.")
    for key in _REQUIRED[shape]:
        if key not in attrs:
            raise DatasetError(f"{where}: {shape} region lacks '{key}'.")
    if shape == "polygon":
        xs, ys = attrs["all_points_x"], attrs["all_points_y"]
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
            raise DatasetError(f"{where}: polygon all_points_x and all_points_y must be lists of equal length.")
        if len(xs) < 3:
            raise DatasetError(f"{where}: polygon has {len(xs)} points; it needs at least 3.")
        attrs["all_points_x"] = [_number(v, where, "all_points_x") for v in xs]
        attrs["all_points_y"] = [_number(v, where, "all_points_y") for v in ys]
    else:
        for key in _REQUIRED[shape] + (("theta",) if shape == "ellipse" and "theta" in attrs else ()):
            attrs[key] = _number(attrs[key], where, key)
        for key in _POSITIVE[shape]:
            if attrs[key] <= 0:
                raise DatasetError(f"{where}: {shape} region has {key} {attrs[key]:g}; it must be positive. Redraw the region in VIA.")
    return Region(shape=shape, attrs=attrs, where=where)


def check_filename(name: str, where: str) -> str:
    """Reject names with a path component or that are empty; return the name unchanged."""
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name:
        raise DatasetError(f"{where}: filename {name!r} must be a bare file name without a folder (no '/', '\\' or '..').")
    return name


def read_text(path: Path) -> str:
    """The CSV's text: UTF-8 (with or without a BOM, as VIA writes it) or UTF-16 with a BOM (as
    Excel's "Unicode text" saves it); anything else is one error naming the encoding problem."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}; a latin-1/Windows-1252 save?). "
            "Export the CSV from VIA again, or save it as UTF-8."
        ) from None


DELIMITERS = (",", ";", "\t")  # VIA writes ","; Excel in many European locales saves ";"; "Unicode text" is tab-separated
_KEY_COLUMNS = ("filename", "region_count", "region_id", "region_shape_attributes")


def delimiter(text: str) -> str:
    """The CSV's delimiter: the first of :data:`DELIMITERS` whose header row holds the VIA columns
    (``,`` where none does, so the missing columns are named)."""
    header = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    for candidate in DELIMITERS:
        fields = next(csv.reader([header], delimiter=candidate), [])
        if all(c in [f.strip() for f in fields] for c in _KEY_COLUMNS):
            return candidate
    return ","


def read_via_csv(path: str | Path) -> ViaLabels:
    """Parse a VIA CSV export; every problem raises one :class:`DatasetError` naming the line."""
    import io

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found. Export it from VIA as CSV (see README).")
    labels = ViaLabels(path=path)
    seen_ids: set[tuple[str, int]] = set()
    declared: dict[str, tuple[int, int]] = {}  # filename -> (region_count, first line)
    text = read_text(path)
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter(text))
        missing = [c for c in _KEY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{path}: not a VIA CSV export, columns {missing} are missing (found {reader.fieldnames}); "
                "its header must be filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes "
                "separated by ',' (or ';' or a tab). Export it from VIA again (Annotation > Export annotations (as csv))."
            )
        for line, row in enumerate(reader, start=2):
            where = f"{path} line {line}"
            name = check_filename((row["filename"] or "").strip(), where)
            try:
                count = int(row["region_count"])
                region_id = int(row["region_id"] or 0)
            except ValueError:
                raise DatasetError(f"{where}: region_count and region_id must be integers.") from None
            regions = labels.regions.setdefault(name, [])
            if declared.setdefault(name, (count, line))[0] != count:
                raise DatasetError(
                    f"{where}: {name!r} has region_count {count} here but {declared[name][0]} on line {declared[name][1]}; the export is inconsistent."
                )
            if (name, region_id) in seen_ids:
                raise DatasetError(f"{where}: duplicate entry for {name!r} region {region_id}; each image and region may appear once.")
            seen_ids.add((name, region_id))
            if count == 0:
                if regions:
                    raise DatasetError(f"{where}: {name!r} has region_count 0 here but regions elsewhere in the file.")
                continue
            regions.append(parse_region(row["region_shape_attributes"] or "", where))
    if not labels.regions:
        raise DatasetError(f"{path}: the labels file has no rows.")
    for name, (count, line) in declared.items():
        if count and len(labels.regions[name]) != count:
            raise DatasetError(
                f"{path} line {line}: {name!r} declares region_count {count} but the file has {len(labels.regions[name])} region row(s); the export is incomplete. Export it from VIA again."
            )
    return labels


def write_via_csv(path: str | Path, rows: dict[str, list[dict]], file_sizes: dict[str, int] | None = None) -> None:
    """Write ``{filename: [shape attrs, ...]}`` as a VIA CSV export (an empty list: region_count 0)."""
    file_sizes = file_sizes or {}
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(VIA_COLUMNS)
        for name, shapes in rows.items():
            size = file_sizes.get(name, 0)
            if not shapes:
                writer.writerow([name, size, "{}", 0, 0, "{}", "{}"])
            for i, shape in enumerate(shapes):
                writer.writerow([name, size, "{}", len(shapes), i, json.dumps(shape, separators=(",", ":")), "{}"])


def rasterize(regions: list[Region], height: int, width: int, image_name: str = "") -> np.ndarray:
    """Draw the union of ``regions`` as a uint8 mask of 0/1; a shape outside the image is an error."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for region in regions:
        x0, y0, x1, y1 = region.extent()
        tol = EDGE_TOLERANCE_PX
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise DatasetError(
                f"{region.where}: {region.shape} of {image_name or 'the image'} reaches ({x0:.0f},{y0:.0f})-({x1:.0f},{y1:.0f}), "
                f"outside the {width}x{height} image. Redraw it inside the image."
            )
        a = region.attrs
        if region.shape == "polygon":
            pts = np.stack([a["all_points_x"], a["all_points_y"]], axis=1)
            cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
        elif region.shape == "rect":
            cv2.rectangle(mask, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), 1, thickness=-1)
        elif region.shape == "circle":
            cv2.circle(mask, (round(a["cx"]), round(a["cy"])), max(round(a["r"]), 0), 1, thickness=-1)
        else:
            angle = math.degrees(a.get("theta", 0.0))
            axes = (max(round(a["rx"]), 0), max(round(a["ry"]), 0))
            cv2.ellipse(mask, (round(a["cx"]), round(a["cy"])), axes, angle, 0, 360, 1, thickness=-1)
    return mask
