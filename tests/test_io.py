"""Atomic folders and links: a writer killed mid-way leaves nothing for good, a folder that
appears meanwhile is never replaced, a symbolic link is followed (never copied as a link)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from bss.data.io import OWNER, atomic_folder, link_or_copy, remove_stale_temporaries
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
