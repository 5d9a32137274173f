"""drivers/import_yolo.py and bss.data.yolo_import: YOLO boxes of one class -> a BSS dataset."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bss.data.io import read_mask  # noqa: E402
from bss.data.layout import SourceDataset  # noqa: E402
from bss.data.via import read_via_csv  # noqa: E402
from bss.data.yolo_import import import_yolo  # noqa: E402
from bss.errors import BSSError, DatasetError  # noqa: E402

SEWER = Path(__file__).resolve().parents[2] / "shared" / "data" / "coudlabs_sewer"
W, H = 40, 30  # synthetic image size


def expected_mask(label_file: Path, class_id: int, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside a box of ``class_id``, computed without the module."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for line in label_file.read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[0] == str(class_id):
            cx, cy, w, h = (float(v) for v in fields[1:])
            x0, x1 = (cx - w / 2) * width, (cx + w / 2) * width
            y0, y1 = (cy - h / 2) * height, (cy + h / 2) * height
            mask |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return mask.astype(np.uint8)


def save_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def flat(tmp_path) -> Path:
    """images/{a,b,c,d}.png; a has bad lines, b a box reaching past the corner, c no labels, d only class 0."""
    src = tmp_path / "flat"
    write(src / "data.yaml", "names: [joint, obstacle]\n")
    for seed, stem in enumerate("abcd"):
        save_png(src / "images" / f"{stem}.png", seed)
    write(
        src / "labels" / "a.txt",
        "\n".join(
            [
                "1 0.5 0.5 0.5 0.5",  # line 1: good
                "1 0.5 0.5 0.2",  # line 2: 4 fields
                "1 x 0.5 0.2 0.2",  # line 3: not a number
                "7 0.5 0.5 0.2 0.2",  # line 4: class out of range
                "1 0.5 0.5 0 0.2",  # line 5: zero width
                "1 1.5 0.5 0.2 0.2",  # line 6: centre outside [0, 1]
                "",  # line 7: blank, ignored
                "0 0.1 0.1 0.1 0.1",  # line 8: good, another class
            ]
        )
        + "\n",
    )
    write(src / "labels" / "b.txt", "1 0.95 0.05 0.3 0.3\n")
    write(src / "labels" / "d.txt", "0 0.5 0.5 0.2 0.2\n")
    write(src / "labels" / "e.txt", "1 0.5 0.5 0.2 0.2\n")  # no image
    return src


@pytest.fixture
def splits(tmp_path) -> Path:
    """images/{train,val}/: train/0001 and val/0001 share a name, val/0002 is a byte copy of train/0001."""
    src = tmp_path / "splits"
    write(src / "dataset.yaml", "names:\n  0: joint\n  1: obstacle\n")
    save_png(src / "images" / "train" / "0001.png", 1)
    save_png(src / "images" / "val" / "0001.png", 2)
    (src / "images" / "val" / "0002.png").write_bytes((src / "images" / "train" / "0001.png").read_bytes())
    for rel in ("train/0001", "val/0001", "val/0002"):
        write(src / "labels" / f"{rel}.txt", "1 0.5 0.5 0.4 0.4\n")
    return src


# --- the real sewer data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sewer(tmp_path_factory):
    if not (SEWER / "dataset.yaml").is_file():
        pytest.skip(f"real sewer data not found at {SEWER} (the shared/ folder beside the repo)")
    root = tmp_path_factory.mktemp("data")
    manifest = import_yolo(SEWER, "obstacle", "sewer_obstacle", data_root=root)
    return root, manifest


def test_real_import_keeps_exactly_the_images_with_an_obstacle_box(sewer):
    root, manifest = sewer
    holding = [t for t in (SEWER / "labels").rglob("*.txt") if any(line.split()[:1] == ["1"] and len(line.split()) == 5 for line in t.read_text().splitlines())]
    images = sorted((root / "sewer_obstacle" / "images").iterdir())
    assert len(images) == len(holding) == manifest["counts"]["images_with_class"]
    assert {p.stem for p in images} == {t.stem for t in holding}
    all_images = [p for p in (SEWER / "images").rglob("*") if p.is_file()]
    assert manifest["counts"]["images_scanned"] == len(all_images)
    n_hashes = len({hashlib.sha1(p.read_bytes()).hexdigest() for p in all_images})
    assert manifest["counts"]["duplicates"] == len(all_images) - n_hashes


def test_real_masks_are_the_filled_obstacle_boxes(sewer):
    root, manifest = sewer
    folder = root / "sewer_obstacle"
    for name in sorted(manifest["images"])[::12]:  # a spread of images over the splits
        label = SEWER / "labels" / Path(manifest["images"][name]).relative_to("images").with_suffix(".txt")
        with Image.open(folder / "images" / name) as im:
            width, height = im.size
        mask = read_mask(folder / "masks" / f"{Path(name).stem}.png")
        assert mask.shape == (height, width)
        expected = expected_mask(label, 1, height, width)
        assert expected.any()
        np.testing.assert_array_equal(mask, expected, err_msg=name)


def test_real_output_is_a_valid_source_dataset(sewer):
    root, manifest = sewer
    dataset = SourceDataset.open("sewer_obstacle", data_root=root)
    assert len(dataset.samples) == manifest["counts"]["images_with_class"]
    assert len(dataset.box_only()) == len(dataset.samples)  # nothing hand-labelled yet
    written = json.loads((root / "sewer_obstacle" / "import.json").read_text())
    assert written["class_name"] == "obstacle" and written["class_id"] == 1
    assert written["labels_without_image"] == ["labels/training/labels.txt"]  # a class-name list, not labels


# --- synthetic datasets ------------------------------------------------------------------------


def test_malformed_lines_are_reported_with_file_and_line_and_skipped(flat, tmp_path):
    messages = []
    manifest = import_yolo(flat, "obstacle", "out", data_root=tmp_path / "data", log=messages.append)
    bad = [m for m in messages if "line skipped" in m]
    assert [m.split(": ")[0] for m in bad] == [f"{flat / 'labels' / 'a.txt'}:{n}" for n in (2, 3, 4, 5, 6)]
    assert manifest["counts"]["skipped_lines"] == 5
    assert any("e.txt: label file without an image" in m for m in messages)
    assert manifest["labels_without_image"] == ["labels/e.txt"]
    # a keeps its one good obstacle box (not the joint box), c (no labels) and d (only joints) are left out
    out = tmp_path / "data" / "out"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "b.png"]
    a = read_mask(out / "masks" / "a.png")
    expected = np.zeros((H, W), np.uint8)
    expected[7:22, 10:30] = 1  # y 7.5..22.5, x 10..30: the pixels whose centre lies inside
    np.testing.assert_array_equal(a, expected)
    assert manifest["counts"]["images_without_labels"] == 1
    SourceDataset.open("out", data_root=tmp_path / "data")


def test_boxes_are_clipped_to_the_image(flat, tmp_path):
    import_yolo(flat, "1", "out", data_root=tmp_path / "data")
    mask = np.asarray(Image.open(tmp_path / "data" / "out" / "masks" / "b.png"))
    expected = np.zeros((H, W), np.uint8)
    expected[0:6, 32:40] = 255  # x 0.8..1.1 -> 32..40, y -0.1..0.2 -> 0..6
    np.testing.assert_array_equal(mask, expected)


def test_split_layout_renames_clashing_stems_and_skips_duplicates(splits, tmp_path):
    messages = []
    manifest = import_yolo(splits, "Obstacle", "out", data_root=tmp_path / "data", log=messages.append)
    out = tmp_path / "data" / "out"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["train__0001.png", "val__0001.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["train__0001.png", "val__0001.png"]
    assert manifest["duplicates"] == [{"image": "images/val/0002.png", "same_as": "images/train/0001.png"}]
    assert manifest["counts"]["duplicates"] == 1
    assert any("0002.png: same bytes as" in m for m in messages)
    assert manifest["images"]["val__0001.png"] == "images/val/0001.png"
    labels = read_via_csv(out / "labels.csv")
    assert sorted(labels.unlabelled) == ["train__0001.png", "val__0001.png"] and not labels.labelled
    # hard links by default
    assert os.stat(out / "images" / "val__0001.png").st_ino == os.stat(splits / "images" / "val" / "0001.png").st_ino
    SourceDataset.open("out", data_root=tmp_path / "data")


def test_copy_makes_independent_files(splits, tmp_path):
    import_yolo(splits, 1, "out", data_root=tmp_path / "data", copy=True)
    copied = tmp_path / "data" / "out" / "images" / "val__0001.png"
    source = splits / "images" / "val" / "0001.png"
    assert os.stat(copied).st_ino != os.stat(source).st_ino
    assert copied.read_bytes() == source.read_bytes()


def test_unknown_class_lists_the_valid_names(flat, tmp_path):
    with pytest.raises(DatasetError, match=r"'crack'.*joint \(0\), obstacle \(1\)"):
        import_yolo(flat, "crack", "out", data_root=tmp_path / "data")
    with pytest.raises(DatasetError, match="joint"):
        import_yolo(flat, "5", "out", data_root=tmp_path / "data")
    assert not (tmp_path / "data" / "out").exists()


def test_corrupt_image_is_one_error_and_nothing_is_written(splits, tmp_path):
    broken = splits / "images" / "val" / "0001.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated png
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="0001.png.*corrupt"):
        import_yolo(splits, "obstacle", "out", data_root=root)
    assert not root.exists() or list(root.iterdir()) == []


def test_refuses_to_overwrite_unless_asked(flat, tmp_path):
    root = tmp_path / "data"
    import_yolo(flat, "obstacle", "out", data_root=root)
    marker = root / "out" / "note.txt"
    marker.write_text("mine")
    with pytest.raises(BSSError, match="--overwrite"):
        import_yolo(flat, "obstacle", "out", data_root=root)
    assert marker.read_text() == "mine"
    import_yolo(flat, "obstacle", "out", data_root=root, overwrite=True)
    assert not marker.exists() and (root / "out" / "labels.csv").is_file()


def test_refuses_to_replace_the_source(flat):
    with pytest.raises(BSSError, match="holds the source"):
        import_yolo(flat, "obstacle", "flat", data_root=flat.parent, overwrite=True)
    assert (flat / "images" / "a.png").is_file()


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda src: None, "source folder not found"),
        (lambda src: write(src / "data.yaml", "names: [a]\n") and (src / "images").mkdir() and None, "no labels/ folder"),
        (lambda src: [write(src / "data.yaml", "names: [a]\n"), (src / "images").mkdir(), (src / "labels").mkdir()], "no images"),
        (lambda src: (src / "images").mkdir(parents=True), "no data.yaml or dataset.yaml"),
        (lambda src: write(src / "data.yaml", "nc: 2\n"), "needs 'names:'"),
    ],
)
def test_bad_source_says_what_is_expected(tmp_path, breakage, message):
    src = tmp_path / "src"
    breakage(src)
    with pytest.raises(DatasetError, match=message):
        import_yolo(src, "a", "out", data_root=tmp_path / "data")


def test_no_image_with_the_class_is_an_error(flat, tmp_path):
    for label in (flat / "labels").glob("*.txt"):
        label.write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match="none of the 4 images"):
        import_yolo(flat, "obstacle", "out", data_root=tmp_path / "data")


# --- the command line --------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "drivers" / "import_yolo.py"), *args], capture_output=True, text=True, cwd=REPO)


def test_cli_bad_source_exits_2_with_one_error_line(tmp_path):
    result = run_cli("--source", str(tmp_path / "missing"), "--class", "obstacle", "--name", "x", "--data-root", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr and "data.yaml" in result.stderr


def test_cli_imports_and_prints_a_summary(flat, tmp_path):
    result = run_cli("--source", str(flat), "--class", "obstacle", "--name", "x", "--data-root", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert "images with the class: 2" in result.stdout and "label lines skipped:   5" in result.stdout
    assert result.stderr.count("warning: ") == 6  # five bad lines and one label without an image


def test_cli_yaml_with_a_tab_is_one_error_line_naming_the_line(flat, tmp_path):
    write(flat / "data.yaml", "names:\n\t- joint\n")
    result = run_cli("--source", str(flat), "--class", "obstacle", "--name", "x", "--data-root", str(tmp_path / "data"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {flat / 'data.yaml'}, line 2, column 1: not valid YAML") and "tab" in result.stderr
    assert not (tmp_path / "data").exists()
