"""Bad input gets one clear error naming the file, and nothing is written."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bss.data.io import write_mask
from bss.data.layout import SourceDataset
from bss.data.splits import make_splits
from bss.errors import BSSError, DatasetError
from conftest import REPO, make_source_dataset


def outputs(root):
    return sorted(p.name for p in root.iterdir() if p.name != "toy")


def expect_error(root, fragment):
    with pytest.raises(DatasetError) as err:
        make_splits("toy", root, progress=False)
    assert fragment in str(err.value), str(err.value)
    assert outputs(root) == [], "nothing may be written on error"
    return str(err.value)


def test_missing_dataset_lists_what_exists(data_root):
    with pytest.raises(DatasetError) as err:
        SourceDataset.open("nope", data_root)
    assert "'nope' not found" in str(err.value) and "toy" in str(err.value)


def test_image_without_mask(data_root):
    (data_root / "toy" / "masks" / "img_003.png").unlink()
    expect_error(data_root, "no mask for image img_003.png")


def test_mask_without_image(data_root):
    write_mask(data_root / "toy" / "masks" / "stray.png", np.zeros((64, 64)))
    expect_error(data_root, "stray.png has no image")


def test_mask_of_another_size(data_root):
    write_mask(data_root / "toy" / "masks" / "img_002.png", np.zeros((32, 64)))
    expect_error(data_root, "img_002.png: mask is 64x32 but its image img_002.png is 64x64")


def test_corrupt_image(data_root):
    (data_root / "toy" / "images" / "img_001.png").write_bytes(b"not an image at all")
    msg = expect_error(data_root, "img_001.png")
    assert "corrupt" in msg


def test_truncated_image(data_root):
    path = data_root / "toy" / "images" / "img_004.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="img_004.png: corrupt or truncated"):
        from bss.data.io import read_image

        read_image(path)
    # the split decodes labelled images' headers only; training then names the file
    from bss.data.segmentation_dataset import SegmentationDataset

    ds = SegmentationDataset(data_root / "toy", (64, 64))
    with pytest.raises(DatasetError, match="img_004.png"):
        ds[4]


def test_duplicate_stems(data_root):
    src = data_root / "toy" / "images" / "img_000.png"
    (data_root / "toy" / "images" / "img_000.jpg").write_bytes(src.read_bytes())
    expect_error(data_root, "share the stem 'img_000'")


def test_labelled_file_not_in_images(data_root):
    with open(data_root / "toy" / "labels.csv", "a") as fh:
        fh.write('ghost.png,1,"{}",0,0,"{}","{}"\n')
    expect_error(data_root, "'ghost.png' is labelled but not in")


def test_malformed_polygon_json(data_root):
    path = data_root / "toy" / "labels.csv"
    text = path.read_text().splitlines()
    text[1] = text[1].replace('""name""', '""nam')  # break the JSON of the first region
    path.write_text("\n".join(text) + "\n")
    expect_error(data_root, "labels.csv line 2")


def test_polygon_outside_image(data_root):
    path = data_root / "toy" / "labels.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('""all_points_x"":[', '""all_points_x"":[900,', 1).replace('""all_points_y"":[', '""all_points_y"":[5,', 1)
    path.write_text("\n".join(lines) + "\n")
    expect_error(data_root, "outside the 64x64 image")


def test_path_component_in_filename(data_root):
    path = data_root / "toy" / "labels.csv"
    path.write_text(path.read_text().replace("img_000.png", "../img_000.png", 1))
    expect_error(data_root, "without a folder")


def test_empty_dataset(tmp_path):
    (tmp_path / "toy" / "images").mkdir(parents=True)
    (tmp_path / "toy" / "masks").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        make_splits("toy", tmp_path, progress=False)


def test_split_refuses_to_overwrite_and_source_untouched(data_root):
    before = {p: p.read_bytes() for p in (data_root / "toy").rglob("*") if p.is_file()}
    make_splits("toy", data_root, progress=False)
    with pytest.raises(BSSError, match="already exists"):
        make_splits("toy", data_root, progress=False)
    after = {p: p.read_bytes() for p in (data_root / "toy").rglob("*") if p.is_file()}
    assert before == after


def test_driver_prints_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "drivers" / "preprocess.py"), "--dataset", "nope", "--data-root", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset 'nope' not found")


def test_make_source_dataset_has_no_hidden_errors(tmp_path):
    make_source_dataset(tmp_path, n=5, labelled=3)
    ds = SourceDataset.open("toy", tmp_path)
    assert len(ds.samples) == 5 and len(ds.hand_labelled()) == 3 and len(ds.box_only()) == 2
