"""H<n> refined on a real multi-node Ray cluster (``ray start`` head + 2 worker nodes, one token file,
as in test_cluster.py) by ``drivers/make_hybrid.py --address``:

* the masks, soft labels, manifest rows and label quality equal the local path's, byte for byte,
  and both worker nodes refined (the head has no CPU for work);
* a local refinement interrupted half-way is finished on the cluster: only the missing images are
  refined there, and the result is again the local one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import RayNodes  # noqa: E402
from conftest import make_source_dataset, train_toy_checkpoint  # noqa: E402

from bss.data.splits import make_splits  # noqa: E402
from bss.hybrid import RefineRule, make_hybrid  # noqa: E402

RULE = ["--min-fill", "0.3", "--soft"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy checkpoint, a dataset of 24 images (14 box-only) split, and a cluster: a head with
    no CPU for work and two 1-CPU worker nodes."""
    folder = tmp_path_factory.mktemp("hybrid-ray")
    checkpoint, _ = train_toy_checkpoint(folder / "teacher")
    root = folder / "datasets"
    make_source_dataset(root, n=24, labelled=10)
    make_splits("toy", root, progress=False)
    cluster = RayNodes()
    try:
        cluster.head(cpus=0)
        cluster.worker("w1")
        cluster.worker("w2")
        yield checkpoint, root, cluster
    finally:
        cluster.shutdown()


def built(folder: Path) -> tuple[dict, list, dict | None, dict]:
    """What the cluster and the local path must agree on: every mask and soft label (bytes), the
    manifest's rows, its label quality, and its inference settings less how the work was spread."""
    files = {f"{sub}/{p.name}": p.read_bytes() for sub in ("masks", "soft") for p in sorted((folder / sub).iterdir())}
    manifest = json.loads((folder / "manifest.json").read_text())
    inference = {k: v for k, v in manifest["inference"].items() if k != "ray"}
    return files, manifest["images"], manifest["label_quality"], inference


def driver(checkpoint: Path, root: Path, cluster: RayNodes, number: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "drivers" / "make_hybrid.py"), "--dataset", "toy", "--model", str(checkpoint), "--data-root", str(root)]
    cmd += ["--number", str(number), "--address", cluster.address, "--quiet", *RULE]
    return subprocess.run(cmd, env=dict(cluster.env, TQDM_DISABLE="1"), capture_output=True, text=True, timeout=300)


def test_hybrid_refined_on_two_worker_nodes_equals_the_local_path(world):
    checkpoint, root, cluster = world
    local = make_hybrid("toy", checkpoint, root, number=1, rule=RefineRule(min_fill=0.3, soft=True), progress=False)
    expected = built(local.path)
    assert len(expected[0]) == 20 + 14 and expected[2]["images"] == 14
    shutil.rmtree(local.path)

    run = driver(checkpoint, root, cluster, 1)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "refined on Ray nodes w1, w2" in run.stdout, run.stdout
    assert built(root / "toy_H1") == expected
    ray = json.loads((root / "toy_H1" / "manifest.json").read_text())["inference"]["ray"]
    assert ray == {"actors": 2, "nodes": ["w1", "w2"], "gpus_per_actor": 0}
    assert not (root / ".toy_H1.partial").exists()
    shutil.rmtree(root / "toy_H1")


def test_a_local_refinement_interrupted_half_way_is_finished_on_the_cluster(world, monkeypatch):
    import bss.hybrid.make as make

    checkpoint, root, cluster = world
    rule = RefineRule(min_fill=0.3, soft=True)
    local = make_hybrid("toy", checkpoint, root, number=2, rule=rule, progress=False)
    expected = built(local.path)
    shutil.rmtree(local.path)

    real, seen = make.refine, {"n": 0}

    def refine(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(make, "WRITER_THREADS", 0)
    monkeypatch.setattr(make, "refine", refine)
    with pytest.raises(KeyboardInterrupt):
        make_hybrid("toy", checkpoint, root, number=2, rule=rule, progress=False)
    assert len(os.listdir(root / ".toy_H2.partial" / "rows")) == 7 and not (root / "toy_H2").exists()

    run = driver(checkpoint, root, cluster, 2)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "resumed: 7 images refined by an earlier run were kept, 7 refined now" in run.stdout, run.stdout
    assert built(root / "toy_H2") == expected
    shutil.rmtree(root / "toy_H2")


_LOOP_STAGE = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from bss.search.ray_cluster import start_ray, stop_ray
from bss.search.stages import refine_into
checkpoint, root, address = sys.argv[1:4]
start_ray(address)  # as the loop does with --address, before its stages
ctx = SimpleNamespace(settings=SimpleNamespace(dataset="toy", data_root=root), hybrid_batch_size=8, address=address, say=print)
quality, folder = refine_into(ctx, Path(checkpoint), 3, {"min_fill": 0.3, "soft": True})
import ray
print("STILL", ray.is_initialized())  # the loop's Ray is the loop's: make_hybrid leaves it joined
stop_ray()
print("RESULT", json.dumps({"folder": str(folder), "quality": quality}))
"""


def test_the_loops_hybrid_stage_refines_on_the_cluster_the_loop_joined(world):
    """bss.search.stages.refine_into (the loop's H<n> stage) with the loop's --address, in a
    driver that joined the cluster first: H3 is refined on the worker nodes, equal to the local path."""
    checkpoint, root, cluster = world
    local = make_hybrid("toy", checkpoint, root, number=3, rule=RefineRule(min_fill=0.3, soft=True), progress=False)
    expected = built(local.path)
    shutil.rmtree(local.path)
    run = subprocess.run(
        [sys.executable, "-c", _LOOP_STAGE, str(checkpoint), str(root), cluster.address],
        env=dict(cluster.env, TQDM_DISABLE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line and "STILL True" in run.stdout, (run.stdout + run.stderr)[-4000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["folder"] == str(root / "toy_H3") and out["quality"] == expected[2]
    assert built(root / "toy_H3") == expected
    assert json.loads((root / "toy_H3" / "manifest.json").read_text())["inference"]["ray"]["nodes"] == ["w1", "w2"]
    shutil.rmtree(root / "toy_H3")
