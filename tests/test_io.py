"""Atomic folders, files and links: a writer killed mid-way leaves nothing for good, a folder that
appears meanwhile is never replaced, a file is the old one or the new one (never half), a
symbolic link is followed (never copied as a link)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from bss.data.io import (
    OWNER,
    atomic_folder,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    link_or_copy,
    publish_copy,
    read_json,
    remove_stale_temporaries,
    write_image,
)
from bss.errors import BSSError, DatasetError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / ".toy_H1.tmp-dead0001"
    live = tmp_path / ".toy_H1.tmp-live0001"
    foreign = tmp_path / ".toy_H1.tmp-other001"
    for folder, owner in ((dead, f"{host} {dead_pid()}"), (live, f"{host} {os.getpid()}"), (foreign, f"another-host {dead_pid()}")):
        folder.mkdir()
        (folder / OWNER).write_text(owner)
    assert remove_stale_temporaries(tmp_path / "toy_H1") == [dead]
    with atomic_folder(tmp_path / "toy_H1") as tmp:
        (tmp / "a.txt").write_text("x")
    assert not dead.exists() and live.exists() and foreign.exists()
    assert sorted(p.name for p in (tmp_path / "toy_H1").iterdir()) == ["a.txt"]  # the owner stamp is not left in it


def test_a_target_that_appears_meanwhile_is_kept_and_nothing_is_written(tmp_path):
    target = tmp_path / "toy_H5"
    with pytest.raises(BSSError, match="appeared while this one was being written"):
        with atomic_folder(target) as tmp:
            (tmp / "mine.txt").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["toy_H5"]  # no temporary folder left
    with atomic_folder(target, overwrite=True) as tmp:  # --overwrite still replaces
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_symbolic_links_are_followed(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "x.png").write_bytes(b"png bytes")
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").symlink_to("../store/x.png")
    out = tmp_path / "split"
    out.mkdir()
    link_or_copy(images / "x.png", out / "x.png")
    assert not (out / "x.png").is_symlink() and (out / "x.png").read_bytes() == b"png bytes"
    (images / "gone.png").symlink_to("../store/gone.png")
    with pytest.raises(DatasetError, match="gone.png: symbolic link to .*store/gone.png, which does not exist"):
        link_or_copy(images / "gone.png", out / "gone.png")


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 512 KiB filesystem (tmpfs), so a write really runs out of space."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_error_naming_the_path_and_nothing_is_left(tiny_disk, data_root):
    import numpy as np

    from bss.data.io import write_image

    rng = np.random.default_rng(0)
    images = tiny_disk.parent / "frames"
    images.mkdir()
    for i in range(3):
        write_image(images / f"f{i}.png", rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))  # ~120 KB of noise each
    with pytest.raises(BSSError, match=r"tiny/copies: the disk is full \(.* MiB free in .*tiny\); nothing was written"):
        with atomic_folder(tiny_disk / "copies") as tmp:
            for i in range(3):
                for j in range(3):
                    shutil.copyfile(images / f"f{i}.png", tmp / f"f{i}-{j}.png")
    assert list(tiny_disk.iterdir()) == []  # the temporary folder is gone, no half output


def test_predict_on_a_full_disk_is_one_error_line(tiny_disk, tmp_path):
    """The real driver: one error line, exit 2, no traceback, nothing left in --out's folder."""
    import numpy as np
    from conftest import REPO, tiny_config_dict

    from bss.config import from_dict
    from bss.data.io import write_image
    from bss.models import build_model
    from bss.training.checkpoint import save_checkpoint

    cfg = from_dict(tiny_config_dict(tmp_path, tmp_path))
    ckpt = save_checkpoint(tmp_path / "best.pt", build_model(cfg.model), cfg, {"iou": 0.0}, 1.0)
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        write_image(frames / f"f{i}.png", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    proc = subprocess.run(
        [sys.executable, str(REPO / "drivers" / "predict.py"), "--model", str(ckpt), "--images", str(frames), "--out", str(tiny_disk / "pred"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tiny_disk / 'pred'}: the disk is full"), proc.stderr[-2000:]
    assert list(tiny_disk.iterdir()) == []


def test_publish_copy_links_atomically_and_a_later_rewrite_of_the_source_leaves_it(tmp_path):
    src, dst = tmp_path / "promote.pt", tmp_path / "best.pt"
    src.write_bytes(b"weights v1")
    dst.write_bytes(b"an older model")
    publish_copy(src, dst)
    assert dst.read_bytes() == b"weights v1" and os.stat(dst).st_ino == os.stat(src).st_ino  # no second copy on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "promote.pt"]  # no temporary left
    (tmp_path / "new.tmp").write_bytes(b"weights v2")  # how every BSS writer replaces a file
    os.replace(tmp_path / "new.tmp", src)
    assert dst.read_bytes() == b"weights v1"


def test_atomic_writes_replace_the_file_whole_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, None], "where": tmp_path})  # a Path is written as its text
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    1.5,\n    null\n  ],\n  "where": "' + str(tmp_path) + '"\n}\n'
    assert read_json(path) == {"b": 1, "a": [1.5, None], "where": str(tmp_path)}
    atomic_write_text(path, "{}\n")
    assert read_json(path) == {} and os.listdir(path.parent) == ["state.json"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_path(path) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("half way")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["labels.csv"]
    with pytest.raises(TypeError):  # a key JSON cannot hold: nothing replaced either
        atomic_write_json(path, {("tuple", "key"): 1})
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["labels.csv"]


def test_read_json_names_a_file_that_is_not_json(tmp_path):
    (tmp_path / "state.json").write_text('{"iterations": [')
    with pytest.raises(BSSError, match=r"state\.json is not valid JSON"):
        read_json(tmp_path / "state.json")


def one_error_line(run, *fragments):
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("where", ["below", "itself"])
def test_an_output_folder_where_a_file_stands_is_one_error_line_and_nothing_is_written(tmp_path, where):
    from conftest import REPO, run_driver

    (tmp_path / "notes.txt").write_text("keep me")
    path = tmp_path / "notes.txt" / "run" if where == "below" else tmp_path / "notes.txt"
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png", np.zeros((8, 8, 3), np.uint8))
    fragment = "notes.txt is a file, not a folder"
    one_error_line(run_driver("search.py", "--dataset", "toy", "--data-root", tmp_path / "datasets", "--run-dir", path), "--run-dir", fragment)
    one_error_line(run_driver("train.py", "--config", REPO / "config.yaml", "--no-mlflow", "--output-dir", path), "output_dir", fragment)
    one_error_line(run_driver("predict.py", "--model", tmp_path / "none.pt", "--images", images, "--out", path), "--out", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(BSSError, match=fragment):
        with atomic_folder(path / "H1"):
            pass
    with pytest.raises(BSSError, match=fragment):
        atomic_write_text(path / "x.txt", "x")
