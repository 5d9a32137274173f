"""VIA CSV parsing and mask drawing: shapes, the union, and every malformed input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bss.data.via import rasterize, read_via_csv, write_via_csv
from bss.errors import DatasetError

HEADER = "filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes\n"


def csv_row(name, count, rid, shape):
    text = json.dumps(shape).replace('"', '""')
    return f'{name},100,"{{}}",{count},{rid},"{text}","{{}}"\n'


def write(tmp_path, body: str):
    path = tmp_path / "labels.csv"
    path.write_text(HEADER + body)
    return path


def test_round_trip_and_labelled_split(tmp_path):
    poly = {"name": "polygon", "all_points_x": [1, 8, 8, 1], "all_points_y": [1, 1, 6, 6]}
    write_via_csv(tmp_path / "l.csv", {"a.png": [poly, {"name": "rect", "x": 10, "y": 2, "width": 3, "height": 4}], "b.png": []})
    labels = read_via_csv(tmp_path / "l.csv")
    assert labels.labelled == ["a.png"] and labels.unlabelled == ["b.png"]
    assert [r.shape for r in labels.regions["a.png"]] == ["polygon", "rect"]


def test_rasterize_union_of_shapes():
    labels_rect = {"name": "rect", "x": 2, "y": 3, "width": 4, "height": 2}
    from bss.data.via import parse_region

    rect = parse_region(json.dumps(labels_rect), "t")
    circle = parse_region(json.dumps({"name": "circle", "cx": 15, "cy": 15, "r": 2}), "t")
    ellipse = parse_region(json.dumps({"name": "ellipse", "cx": 5, "cy": 15, "rx": 3, "ry": 1, "theta": 0}), "t")
    mask = rasterize([rect, circle, ellipse], 20, 20)
    assert mask[3:5, 2:6].all() and mask[3:5, 2:6].sum() == 8
    assert mask[:3].sum() == 0 and mask[5:10].sum() == 0  # nothing outside the rectangle rows
    assert mask[15, 15] == 1 and mask[15, 13] == 1 and mask[15, 18] == 0
    assert mask[15, 2] == 1 and mask[15, 8] == 1 and mask[13, 5] == 0  # ellipse wide, not tall
    assert set(np.unique(mask)) == {0, 1}


def test_polygon_fills_its_interior():
    from bss.data.via import parse_region

    tri = parse_region(json.dumps({"name": "polygon", "all_points_x": [0, 9, 0], "all_points_y": [0, 0, 9]}), "t")
    mask = rasterize([tri], 10, 10)
    assert mask[1, 1] == 1 and mask[8, 8] == 0
    assert 45 <= mask.sum() <= 60  # about half of the 10x10 square


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('a.png,1,"{}",1,0,"{not json}","{}"\n', "not valid JSON"),
        (csv_row("a.png", 1, 0, {"name": "polyline", "all_points_x": [1, 2], "all_points_y": [1, 2]}), "unsupported region shape"),
        (csv_row("a.png", 1, 0, {"name": "polygon", "all_points_x": [1, 2], "all_points_y": [1, 2]}), "at least 3"),
        (csv_row("a.png", 1, 0, {"name": "polygon", "all_points_x": [1, 2, 3], "all_points_y": [1, 2]}), "equal length"),
        (csv_row("a.png", 1, 0, {"name": "polygon", "all_points_x": [1, "x", 3], "all_points_y": [1, 2, 3]}), "finite number"),
        (csv_row("a.png", 1, 0, {"name": "rect", "x": 1, "y": 1, "width": 2}), "lacks 'height'"),
        (csv_row("../a.png", 1, 0, {"name": "rect", "x": 1, "y": 1, "width": 2, "height": 2}), "without a folder"),
        (csv_row("a.png", 2, 0, {"name": "rect", "x": 1, "y": 1, "width": 2, "height": 2}) * 2, "duplicate entry"),
        ('a.png,1,"{}",x,0,"{}","{}"\n', "integers"),
        (csv_row("a.png", 5, 0, {"name": "rect", "x": 1, "y": 1, "width": 2, "height": 2}), "declares region_count 5 but the file has 1 region row(s)"),
        (
            csv_row("a.png", 2, 0, {"name": "rect", "x": 1, "y": 1, "width": 2, "height": 2})
            + csv_row("a.png", 3, 1, {"name": "rect", "x": 1, "y": 1, "width": 2, "height": 2}),
            "region_count 3 here but 2 on line 2",
        ),
        (csv_row("a.png", 1, 0, {"name": "rect", "x": 10, "y": 1, "width": -50, "height": 5}), "width -50; it must be positive"),
        (csv_row("a.png", 1, 0, {"name": "circle", "cx": 10, "cy": 1, "r": 0}), "r 0; it must be positive"),
        ("", "no rows"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, body, fragment):
    path = write(tmp_path, body)
    with pytest.raises(DatasetError) as err:
        read_via_csv(path)
    assert fragment in str(err.value)
    if body:
        assert "line 2" in str(err.value) or "line 3" in str(err.value) or "no rows" in str(err.value)


def test_not_a_via_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="not a VIA CSV export"):
        read_via_csv(path)


def test_polygon_outside_image_is_an_error(tmp_path):
    path = write(tmp_path, csv_row("a.png", 1, 0, {"name": "polygon", "all_points_x": [1, 50, 1], "all_points_y": [1, 1, 9]}))
    region = read_via_csv(path).regions["a.png"][0]
    with pytest.raises(DatasetError, match="outside the 20x10 image"):
        rasterize([region], 10, 20, "a.png")


def test_encodings_utf16_is_read_latin1_is_one_clear_error(tmp_path):
    body = HEADER + csv_row("café.png", 1, 0, {"name": "rect", "x": 1, "y": 1, "width": 2, "height": 2})
    path = tmp_path / "labels.csv"
    path.write_bytes(body.encode("utf-16"))  # Excel's "Unicode text": UTF-16 with a BOM
    assert read_via_csv(path).labelled == ["café.png"]
    path.write_bytes(("\ufeff" + body).encode("utf-8"))  # VIA's own export: UTF-8 with a BOM
    assert read_via_csv(path).labelled == ["café.png"]
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"labels.csv: not UTF-8 text \(byte 0xe9 on line 2"):
        read_via_csv(path)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_csv_saved_with_semicolons_or_tabs_reads_like_the_comma_one(tmp_path, sep):
    import csv

    from conftest import make_source_dataset, run_driver

    root = tmp_path / "datasets"
    folder = make_source_dataset(root, n=5, labelled=4, size=(32, 32))
    comma = read_via_csv(folder / "labels.csv")
    with open(folder / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8-sig") as fh:  # as European Excel saves it
        csv.writer(fh, delimiter=sep).writerows(rows)
    assert sep in (folder / "labels.csv").read_text().splitlines()[0]
    other = read_via_csv(folder / "labels.csv")
    assert {n: [r.attrs for r in regs] for n, regs in other.regions.items()} == {n: [r.attrs for r in regs] for n, regs in comma.regions.items()}
    run = run_driver("preprocess.py", "--dataset", "toy", "--data-root", root)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in root.iterdir()) == ["toy", "toy_BASELINE", "toy_EVAL", "toy_TEST"]


def test_a_csv_without_the_via_columns_says_what_the_header_must_be(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("filename|file_size|region_count\na.png|1|0\n")
    with pytest.raises(DatasetError, match=r"labels\.csv: not a VIA CSV export, columns .* are missing .*separated by ',' \(or ';' or a tab\)"):
        read_via_csv(path)
