"""Bad input gets one clear error naming the file, and nothing is written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_source_dataset, run_driver

from bss.data.io import read_mask, write_mask
from bss.data.layout import SourceDataset
from bss.data.splits import make_splits
from bss.errors import BSSError, DatasetError


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
    # preprocess decodes every image once and names the file; nothing is written
    expect_error(data_root, "img_004.png: corrupt or truncated")
    # a box-only image too (the loop's trials would all fail on it)
    box_only = data_root / "toy" / "images" / "img_011.png"
    path.write_bytes((data_root / "toy" / "images" / "img_005.png").read_bytes())
    box_only.write_bytes(box_only.read_bytes()[:300])
    expect_error(data_root, "img_011.png: corrupt or truncated")


@pytest.mark.parametrize(
    "values, fragment",
    [
        ([0, 128, 255], "not binary (values 0, 128, 255; 3 distinct)"),
        ([0, 7], None),  # 0 and one foreground value: fine
        ([3, 7], "not binary (values 3, 7; 2 distinct)"),
    ],
)
def test_non_binary_box_mask_is_refused(data_root, values, fragment):
    from PIL import Image

    mask = np.zeros((64, 64), np.uint8)
    for band, v in zip(np.array_split(np.arange(64), len(values)), values):
        mask[:, band] = v
    Image.fromarray(mask).save(data_root / "toy" / "masks" / "img_010.png")
    if fragment is None:
        # accepted: the splits are made, and the mask reads as 0/1 with its foreground where the 7s are
        assert make_splits("toy", data_root, progress=False) == {"BASELINE": 5, "EVAL": 2, "TEST": 2}
        assert np.array_equal(read_mask(data_root / "toy" / "masks" / "img_010.png"), (mask == 7).astype(np.uint8))
        return
    msg = expect_error(data_root, fragment)
    assert "img_010.png" in msg


def test_colour_mask_and_noise_mask_are_refused(data_root):
    from PIL import Image

    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[10:20, 10:20] = 255
    Image.fromarray(rgb).save(data_root / "toy" / "masks" / "img_010.png")
    expect_error(data_root, "img_010.png: the mask is RGB, not single-channel")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    Image.fromarray(noise).save(data_root / "toy" / "masks" / "img_010.png")
    expect_error(data_root, "256 distinct")


def test_sixteen_bit_grey_image_is_scaled_not_white(tmp_path):
    from PIL import Image

    from bss.data.io import read_image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16") or Image.open(tmp_path / "g16.png").mode == "I"
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 120 <= rgb[32, 0, 0] <= 135  # a ramp, not all white


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
    proc = subprocess.run(
        [sys.executable, str(REPO / "drivers" / "preprocess.py"), "--dataset", "nope", "--data-root", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset 'nope' not found")


def test_make_source_dataset_has_no_hidden_errors(tmp_path):
    make_source_dataset(tmp_path, n=5, labelled=3)
    ds = SourceDataset.open("toy", tmp_path)
    assert len(ds.samples) == 5 and len(ds.hand_labelled()) == 3 and len(ds.box_only()) == 2


def png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header says ``width`` x ``height`` (grey) and holds no pixels: a few bytes on disk
    standing for a huge frame where only its size is read."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b""))


def preprocess(root, *extra, env=None):
    return run_driver("preprocess.py", "--dataset", "toy", "--data-root", root, *extra, env=env)


def test_huge_frame_is_one_error_line_naming_the_file_the_limit_and_the_setting(data_root):
    png_header_only(data_root / "toy" / "images" / "img_000.png", 16000, 12000)  # 192 megapixels: Pillow raised DecompressionBombError
    run = preprocess(data_root)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "img_000.png" in lines[0], run.stderr
    assert "16000x12000" in lines[0] and "178,956,970" in lines[0] and "BSS_MAX_IMAGE_PIXELS=192000000" in lines[0]
    assert outputs(data_root) == []


def test_the_pixel_limit_is_set_by_the_environment(data_root):
    run = preprocess(data_root, env={"BSS_MAX_IMAGE_PIXELS": "4000"})  # the toy frames are 64x64 = 4096 pixels
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "img_000.png" in run.stderr and "4,000 pixels" in run.stderr, run.stderr
    assert outputs(data_root) == []
    run = preprocess(data_root, env={"BSS_MAX_IMAGE_PIXELS": "lots"})
    assert run.returncode == 2 and run.stderr.startswith("error: BSS_MAX_IMAGE_PIXELS='lots'") and run.stderr.count("\n") == 1
    run = preprocess(data_root, env={"BSS_MAX_IMAGE_PIXELS": "4096"})
    assert run.returncode == 0 and "error" not in run.stderr and "Warning" not in run.stderr, run.stderr
    assert outputs(data_root) == ["toy_BASELINE", "toy_EVAL", "toy_TEST"]


def test_a_large_frame_under_the_limit_prints_no_anonymous_pillow_warning(tmp_path):
    import warnings

    from bss.data.io import image_size

    png_header_only(tmp_path / "big.png", 12000, 9000)  # above Pillow's warning threshold, below its error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(tmp_path / "big.png") == (9000, 12000)


def test_too_few_hand_labels_names_the_dataset_and_its_labels_csv(tmp_path):
    make_source_dataset(tmp_path, n=5, labelled=2)
    run = preprocess(tmp_path)
    lines = [line for line in run.stderr.strip().splitlines() if line.strip() and "checking toy" not in line]  # the progress bar aside
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("error: toy: only 2 hand-labelled image(s) in ") and str(tmp_path / "toy" / "labels.csv") in lines[0]
    assert outputs(tmp_path) == []
