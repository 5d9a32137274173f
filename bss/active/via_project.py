"""A VIA 2.x project file (VGG Image Annotator 2.0.10, *Project > Load*) holding pre-annotations.

The layout is VIA's own (``via.html`` 2.0.10, ``project_save_with_confirm`` /
``project_open_parse_json_file``)::

    {"_via_settings": {"ui": {...}, "core": {"buffer_size": 18, "filepath": {}, "default_filepath": "<images>/"},
                       "project": {"name": "..."}},
     "_via_img_metadata": {"<filename><size>": {"filename": "a.png", "size": 12345,
                            "regions": [{"shape_attributes": {"name": "polygon", "all_points_x": [...],
                                         "all_points_y": [...]}, "region_attributes": {}}],
                            "file_attributes": {}}},
     "_via_attributes": {"region": {}, "file": {}},
     "_via_data_format_version": "2.0.10",
     "_via_image_id_list": ["<filename><size>", ...]}

VIA identifies an image by its file name followed by its size in bytes (``_via_get_image_id``),
so ``size`` must be the file's byte size: VIA then attaches the images the user adds (*Project >
Add local files*) to these entries, or finds them under ``default_filepath``. The order of
``_via_image_id_list`` is the order VIA shows the images in: the ranking's.
"""

from __future__ import annotations

import json
from pathlib import Path

from bss.data.io import atomic_write_text
from bss.data.via import parse_region
from bss.errors import DatasetError

VIA_VERSION = "2.0.10"


def image_id(filename: str, size: int) -> str:
    """VIA's key of an image: the file name followed by its size in bytes."""
    return f"{filename}{int(size)}"


def settings(project_name: str, default_filepath: str = "") -> dict:
    """VIA 2.0.10's default settings (as ``via.html`` writes them), with the project name and image folder."""
    return {
        "ui": {
            "annotation_editor_height": 25,
            "annotation_editor_fontsize": 0.8,
            "leftsidebar_width": 18,
            "image_grid": {
                "img_height": 80,
                "rshape_fill": "none",
                "rshape_fill_opacity": 0.3,
                "rshape_stroke": "yellow",
                "rshape_stroke_width": 2,
                "show_region_shape": True,
                "show_image_policy": "all",
            },
            "image": {
                "region_label": "__via_region_id__",
                "region_color": "__via_default_region_color__",
                "region_label_font": "10px Sans",
                "on_image_annotation_editor_placement": "NEAR_REGION",
            },
        },
        "core": {"buffer_size": 18, "filepath": {}, "default_filepath": default_filepath},
        "project": {"name": project_name},
    }


def build_project(entries: list[tuple[str, int, list[dict]]], project_name: str, default_filepath: str = "") -> dict:
    """A project dict from ``(filename, size in bytes, [polygon shape attributes, ...])`` in display order."""
    metadata: dict[str, dict] = {}
    for filename, size, shapes in entries:
        key = image_id(filename, size)
        if key in metadata:
            raise ValueError(f"{filename} is listed twice in the VIA project")
        metadata[key] = {
            "filename": filename,
            "size": int(size),
            "regions": [{"shape_attributes": dict(shape), "region_attributes": {}} for shape in shapes],
            "file_attributes": {},
        }
    return {
        "_via_settings": settings(project_name, default_filepath),
        "_via_img_metadata": metadata,
        "_via_attributes": {"region": {}, "file": {}},
        "_via_data_format_version": VIA_VERSION,
        "_via_image_id_list": list(metadata),
    }


def write_project(path: str | Path, project: dict) -> Path:
    """Write the project as JSON atomically (a temporary file beside it, then a rename)."""
    return atomic_write_text(path, json.dumps(project, separators=(",", ":")) + "\n")


def read_project(path: str | Path) -> dict[str, tuple[int, list]]:
    """``{filename: (size, [Region, ...])}`` of a VIA 2 project file, every shape checked by
    :func:`bss.data.via.parse_region` (the same rules as a CSV export)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable VIA project file ({exc}).") from None
    if not isinstance(data, dict) or "_via_img_metadata" not in data:
        raise DatasetError(f"{path}: not a VIA 2 project file (no '_via_img_metadata'); save it with Project > Save in VIA 2.")
    out: dict[str, tuple[int, list]] = {}
    for key, meta in data["_via_img_metadata"].items():
        where = f"{path} image {key!r}"
        if key != image_id(meta.get("filename", ""), meta.get("size", -1)):
            raise DatasetError(f"{where}: the key is not filename + size ({meta.get('filename')!r}, {meta.get('size')!r}), as VIA keys images.")
        regions = [parse_region(json.dumps(r["shape_attributes"]), f"{where} region {i}") for i, r in enumerate(meta.get("regions", []))]
        out[meta["filename"]] = (int(meta["size"]), regions)
    return out
