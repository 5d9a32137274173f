"""``drivers/predict.py --images DIR --address`` on a real multi-node Ray cluster (``ray start`` head
with no CPU for work + 2 one-CPU worker nodes, one token file, as test_hybrid_ray.py):

* every mask, overlay and probability map is the same bytes as the local path's, the rows of
  predictions.json are the same, and both worker nodes predicted;
* an address where no cluster answers is one ``error:`` line naming it, and nothing is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import RayNodes, free_port  # noqa: E402
from conftest import make_source_dataset, train_toy_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy checkpoint, a folder of 13 new frames of two sizes (64x64, 72x40; one a symbolic
    link, named by the link), and a cluster: a head with no CPU for work and two 1-CPU worker nodes."""
    folder = tmp_path_factory.mktemp("predict-ray")
    checkpoint, _ = train_toy_checkpoint(folder / "teacher")
    images = folder / "new"
    images.mkdir()
    for name, size in (("a", (64, 64)), ("b", (40, 72))):
        source = make_source_dataset(folder / "footage", name=name, n=6, labelled=3, size=size, seed=7)
        for path in (source / "images").iterdir():
            shutil.copy(path, images / f"{name}_{path.name}")
    (images / "c_link.png").symlink_to(folder / "footage" / "a" / "images" / "img_000.png")
    cluster = RayNodes()
    try:
        cluster.head(cpus=0)
        cluster.worker("w1")
        cluster.worker("w2")
        yield checkpoint, images, cluster, folder
    finally:
        cluster.shutdown()


def predict(checkpoint: Path, images: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "drivers" / "predict.py"), "--model", str(checkpoint), "--images", str(images), "--out", str(out)]
    cmd += ["--probabilities", "--batch-size", "4", "--quiet", *extra]
    return subprocess.run(cmd, env=dict(env, TQDM_DISABLE="1"), capture_output=True, text=True, timeout=300)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_a_folder_predicted_on_two_worker_nodes_equals_the_local_path(world):
    checkpoint, images, cluster, folder = world
    local = predict(checkpoint, images, folder / "local", cluster.env)
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    expected = files(folder / "local")
    assert len(expected) == 3 * 13 and "masks/c_link.png" in expected  # masks, overlays, probabilities

    run = predict(checkpoint, images, folder / "ray", cluster.env, "--address", cluster.address)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "13 images -> " in run.stdout and "on Ray nodes w1, w2" in run.stdout, run.stdout
    assert files(folder / "ray") == expected
    summary = {name: json.loads((folder / name / "predictions.json").read_text()) for name in ("local", "ray")}
    assert summary["ray"]["images"] == summary["local"]["images"]
    assert summary["ray"]["inference"]["ray"] == {"actors": 2, "nodes": ["w1", "w2"], "gpus_per_actor": 0}
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_address_where_no_cluster_answers_is_one_error_line_and_nothing_is_written(world):
    checkpoint, images, cluster, folder = world
    address = f"127.0.0.1:{free_port()}"
    run = predict(checkpoint, images, folder / "nowhere", cluster.env, "--address", address)
    assert run.returncode == 2, (run.stdout + run.stderr)[-4000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and address in errors[0], run.stderr[-4000:]
    assert not (folder / "nowhere").exists()


def test_address_is_refused_with_a_video(world, tmp_path):
    checkpoint, images, cluster, folder = world
    cmd = [sys.executable, str(REPO / "drivers" / "predict.py"), "--model", str(checkpoint), "--video", str(tmp_path / "a.mp4")]
    cmd += ["--out", str(tmp_path / "out"), "--address", cluster.address]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--address is for --images" in run.stderr, run.stderr
