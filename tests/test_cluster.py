"""The loop on a real multi-node Ray cluster (``ray start`` head + worker nodes, one machine) with a
real ``mlflow server``, and what survives losing a node.

* two 1-CPU worker nodes, a head with 0 CPUs (no trial beside the driver), the driver
  ``drivers/search.py --address``, MLflow through ``--tracking-uri http://...``: the trials ran on
  both workers (their records name the node), the results equal a local run with the same seed
  and concurrency 1, every run, metric and artifact is on the server;
* a driver without the cluster's auth token gets one line saying how to pass it;
* a worker node killed mid-search: its trial is retried on the other node, the loop finishes, the
  lost attempt is recorded (record.json ``lost_attempts``, its MLflow run KILLED with
  ``bss.outcome=lost``), no run is left RUNNING;
* the head killed mid-search: the driver stops within seconds with one ``error:`` line (not Ray's
  own 60 s GCS timeout), and ``--resume`` against a new cluster finishes the loop with the local
  run's results (the trial that had finished is replayed, not trained again).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import MlflowServer, RayNodes  # noqa: E402
from conftest import make_source_dataset, tiny_config_dict  # noqa: E402

from bss.search.loop import LoopOptions, run_loop  # noqa: E402

# every proposal is one of Optuna's seeded start-up samples, and FIFO stops nothing: the trials do
# not depend on which finishes first, so 2 at a time on the cluster = 1 at a time locally
SPACE = {
    "fixed": {"train_steps": 8, "epochs": 1, "evaluations": 2, "batch_size": 2, "visualization_samples": 0},
    "params": {"learning_rate": {"loguniform": [3.0e-3, 3.0e-2]}, "criterion.args.alpha": {"uniform": [0.3, 0.7]}},
    "searcher": {"algorithm": "tpe", "trials": 2, "n_startup_trials": 2},
    "scheduler": {"name": "fifo"},
}
FLAGS = ["--dataset", "toy", "--iterations", "1", "--trials", "2", "--promotion", "floor", "--floor", "0.0", "--seed", "5", "--experiment", "bss-search"]


def make_inputs(folder: Path, space: dict = SPACE) -> dict:
    root = folder / "datasets"
    make_source_dataset(root)
    (folder / "config.yaml").write_text(yaml.safe_dump(tiny_config_dict(root, folder)))
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    return {"data_root": str(root), "config": str(folder / "config.yaml"), "space": str(folder / "space.yaml"), "run_dir": str(folder / "run")}


def driver(inputs: dict, *extra: str) -> list[str]:
    paths = ["--data-root", inputs["data_root"], "--config", inputs["config"], "--space", inputs["space"], "--run-dir", inputs["run_dir"]]
    return [sys.executable, str(REPO / "drivers" / "search.py"), *FLAGS, *paths, *extra]


def run_driver(cmd: list[str], env: dict, log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=dict(env, PYTHONUNBUFFERED="1", TQDM_DISABLE="1"), capture_output=True, text=True, timeout=timeout)
    log.write_text(result.stdout + result.stderr)
    return result


def outcome(run_dir: str) -> list:
    """What a cluster run and a local run must agree on."""
    state = json.loads((Path(run_dir) / "state.json").read_text())
    out = []
    for it in state["iterations"]:
        trials = sorted((t["ordinal"], t["state"], t["params"], t["best"] and round(t["best"]["eval_iou"], 5)) for t in it["search"]["trials"])
        promoted = (it["promoted"]["ordinal"], {k: round(v, 5) for k, v in it["promoted"]["metrics"].items()})
        out.append((it["train_dataset"], trials, promoted, it["decision"]["verdict"], {k: round(v, 5) for k, v in it["test"].items()}))
    return out


def records(run_dir: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("iter_*/trials/t*/record.json"))]


def server_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bss-search")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def nodes():
    """One cluster for the module: a head with no CPU for trials and two 1-CPU worker nodes
    (the node-loss test, last, kills w1)."""
    cluster = RayNodes()
    try:
        cluster.head(cpus=0)
        cluster.worker("w1")
        cluster.worker("w2")
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> list:
    """The same loop run locally (a local Ray in this process), one trial at a time: its outcome."""
    folder = tmp_path_factory.mktemp("local")
    local = make_inputs(folder)
    run_loop(
        LoopOptions(
            dataset="toy",
            iterations=1,
            trials=2,
            promotion="floor",
            floor=0.0,
            seed=5,
            concurrency=1,
            cpus_per_trial=1.0,  # as on the 1-CPU worker nodes: each trial trains with one torch thread there and here
            data_root=local["data_root"],
            config=local["config"],
            space=local["space"],
            run_dir=local["run_dir"],
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            progress=False,
        )
    )
    return outcome(local["run_dir"])


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "mlflow-server")
    yield srv
    srv.stop()


def test_search_on_two_worker_nodes_with_a_tracking_server_equals_a_local_run(nodes, server, local_run, tmp_path):
    inputs = make_inputs(tmp_path / "cluster")
    cmd = driver(inputs, "--address", nodes.address, "--concurrency", "2", "--tracking-uri", server.uri)
    result = run_driver(cmd, nodes.env, tmp_path / "cluster.log")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "View run" not in result.stdout  # MLflow's per-run URL lines are off
    # the trials ran on both worker nodes, never on the head (it has no CPU for them)
    where = [(r["node_name"], r["node_id"]) for r in records(inputs["run_dir"])]
    assert sorted(name for name, _ in where) == ["w1", "w2"] and len({node for _, node in where}) == 2, where

    assert outcome(inputs["run_dir"]) == local_run

    # the tracking server has the whole run tree, every trial's metrics, and the artifacts (through the server)
    runs = server_runs(server.uri)
    kinds = sorted(r.data.tags.get("bss.kind") for r in runs)
    assert kinds == ["iteration", "loop", "trial", "trial"], kinds
    assert all(r.info.status == "FINISHED" for r in runs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    for r in runs:
        if r.data.tags["bss.kind"] == "trial":
            assert len(client.get_metric_history(r.info.run_id, "eval_iou")) == 2 and "best_eval_iou" in r.data.metrics
    (loop,) = [r for r in runs if r.data.tags["bss.kind"] == "loop"]
    assert loop.info.artifact_uri.startswith("mlflow-artifacts:"), loop.info.artifact_uri
    logged = {f.path for f in client.list_artifacts(loop.info.run_id, "report")} | {f.path for f in client.list_artifacts(loop.info.run_id, "final")}
    assert {"report/report.md", "final/best.pt"} <= logged, logged
    stored = {p.name for p in server.artifacts.rglob("*") if p.is_file()}
    assert {"report.md", "best.pt", "base_config.yaml", "space.yaml"} <= stored, stored
    assert not (Path(inputs["run_dir"]).parent / "mlartifacts").exists() and not list(Path(inputs["run_dir"]).parent.glob("*.db"))


def test_a_driver_without_the_cluster_token_gets_one_clear_line(nodes, tmp_path):
    inputs = make_inputs(tmp_path)
    env = {k: v for k, v in nodes.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token of an earlier run either
    result = run_driver(driver(inputs, "--address", nodes.address), env, tmp_path / "driver.log", timeout=120)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "refused this driver's auth token" in line and "RAY_AUTH_MODE is unset here" in line and "RAY_AUTH_TOKEN_PATH" in line
    assert "Traceback" not in result.stderr and not Path(inputs["run_dir"]).exists()
    assert not (tmp_path / "home" / ".ray").exists()


def hooked_driver(inputs: dict, kill: dict, *extra: str) -> list[str]:
    """:func:`driver` through tests/driver_hook.py: the driver kills at an exact point of its
    Tune callback (``kill``, passed as ``BSS_TEST_KILL``), not when a polling test gets round to it."""
    cmd = driver(inputs, *extra)
    return [cmd[0], str(REPO / "tests" / "driver_hook.py"), *cmd[2:]]


def test_a_worker_node_lost_mid_search_is_survived(nodes, tmp_path):
    space = dict(SPACE, fixed=dict(SPACE["fixed"], train_steps=24, evaluations=4))
    inputs = make_inputs(tmp_path, space)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # one machine: the driver's SQLite is every node's
    # w1 dies at the first evaluation of its trial: that trial waits in tune.report for the driver,
    # which kills the node first, so the trial is cut off mid-training on every run
    kill = {"on": "result", "iteration": 0, "node": "w1", "kill": nodes.nodes["w1"].pid, "record": str(tmp_path / "victim.json")}
    cmd = hooked_driver(inputs, kill, "--address", nodes.address, "--concurrency", "2", "--tracking-uri", uri, "--max-failures", "2")
    env = dict(nodes.env, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", BSS_TEST_KILL=json.dumps(kill))
    with open(tmp_path / "driver.log", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode
    nodes.kill("w1")  # reaps the killed node's process
    assert code == 0, (tmp_path / "driver.log").read_text()[-4000:]
    victim = json.loads((tmp_path / "victim.json").read_text())
    assert victim["state"] == "running" and victim["node_name"] == "w1"
    state = json.loads((Path(inputs["run_dir"]) / "state.json").read_text())
    assert state["finished"]
    trials = state["iterations"][0]["search"]["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"]
    (retried,) = [t for t in trials if t["key"] == victim["key"]]
    assert retried["node_name"] == "w2" and [a["node_name"] for a in retried["lost_attempts"]] == ["w1"]
    assert retried["lost_attempts"][0]["run_id"] == victim["run_id"] and retried["run_id"] != victim["run_id"]
    from mlflow.tracking import MlflowClient

    runs = server_runs(uri)
    assert all(r.info.status != "RUNNING" for r in runs)
    lost = MlflowClient(uri).get_run(victim["run_id"])
    assert lost.info.status == "KILLED" and lost.data.tags["bss.outcome"] == "lost"
    assert sorted(r.data.tags.get("bss.outcome") for r in runs if r.data.tags.get("bss.kind") == "trial") == ["complete", "complete", "lost"]
    assert "LOST with its worker" in (tmp_path / "driver.log").read_text()


def test_a_lost_head_stops_the_driver_with_one_line_and_resume_continues_on_a_new_cluster(local_run, tmp_path):
    inputs = make_inputs(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RayNodes()
    try:
        first.head(cpus=0)
        first.worker("w1")
        # the head dies right after trial 1 completed (inside the driver's callback: trial 2 has not started)
        kill = {"on": "complete", "iteration": 0, "ordinal": 1, "kill": first.nodes["head"].pid}
        cmd = hooked_driver(inputs, kill, "--address", first.address, "--concurrency", "1", "--tracking-uri", uri)
        env = dict(first.env, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", BSS_TEST_KILL=json.dumps(kill))
        # no timing bound: the one "error: ... lost the Ray cluster" line and exit status 2 come from the
        # driver's own watch of the head (HeadWatch); Ray's 60 s GCS timeout would end it otherwise
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        err = proc.stderr
    finally:
        first.shutdown()
    assert "driver_hook: kill" in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 2, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "lost the Ray cluster" in line and "--resume" in line and "Traceback" not in err
    state = json.loads((Path(inputs["run_dir"]) / "state.json").read_text())
    assert not state.get("finished") and not state["iterations"][0].get("search", {}).get("done")

    second = RayNodes()
    try:
        second.head(cpus=0)
        second.worker("w1")
        result = run_driver(
            driver(inputs, "--address", second.address, "--concurrency", "1", "--tracking-uri", uri, "--resume"), second.env, tmp_path / "resume.log"
        )
    finally:
        second.shutdown()
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "(replayed)" in result.stdout  # trial 1 was not trained again
    assert outcome(inputs["run_dir"]) == local_run
    runs = server_runs(uri)
    assert all(r.info.status != "RUNNING" for r in runs)
    assert sorted(r.data.tags.get("bss.kind") for r in runs) == ["iteration", "loop", "trial", "trial"]


_PLAN_AND_RUN = """
import json, pathlib, sys, time
sys.path.insert(0, sys.argv[1])
from bss.search.ray_cluster import node_resources, plan_resources, start_ray
cpus, gpus, _ = start_ray(sys.argv[2])
nodes = node_resources()
plan = plan_resources(cpus, gpus, trials=8, nodes=nodes)
from ray import tune

STARTED, RUNNING = pathlib.Path(sys.argv[4]) / "started", pathlib.Path(sys.argv[4]) / "running"

def trainable(config):
    # a barrier, not a clock: trials come in waves of the planned 4; each waits (2 min at most)
    # until its whole wave has started. Only 4 trials running at once can fill a wave: the first
    # 4 wait for each other, and the next 4 start as those end. It also counts the trials
    # running when it starts (itself included; a trial leaves before Ray can start another).
    import ray
    x = str(config["x"])
    (RUNNING / x).touch()
    running = len(list(RUNNING.iterdir()))
    (STARTED / x).touch()
    wave = 4 * ((len(list(STARTED.iterdir())) - 1) // 4 + 1)
    deadline = time.monotonic() + 120
    while len(list(STARTED.iterdir())) < wave:
        if time.monotonic() > deadline:
            wave = None  # the wave never filled
            break
        time.sleep(0.05)
    (RUNNING / x).unlink()
    node = ray.get_runtime_context().get_node_id()
    tune.report({"score": 0.0, "running": running, "wave": wave, "node": node, "gpu_ids": [str(g) for g in ray.get_gpu_ids()]})


tuner = tune.Tuner(
    tune.with_resources(trainable, {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}),
    param_space={"x": tune.grid_search(list(range(8)))},
    tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=plan.concurrency),
    run_config=tune.RunConfig(storage_path=sys.argv[3], verbose=0, log_to_file=False),
)
rows = [r.metrics for r in tuner.fit()]
print("RESULT " + json.dumps({"nodes": sorted(nodes), "plan": plan.__dict__, "rows": [{k: r[k] for k in ("running", "wave", "node", "gpu_ids")} for r in rows]}))
"""


def test_fractional_gpus_are_planned_node_by_node_on_nodes_with_different_gpu_counts(tmp_path):
    """Logical GPUs (``ray start --num-gpus``) on this CPU machine: nodes of 2 CPU + 1 GPU and
    2 CPU + 2 GPU. Half a GPU per trial would be 6 trials by the cluster's totals, but the
    2-GPU node has CPUs for only 2: the plan is 4 at a time, 1 CPU each, and Ray runs exactly that."""
    running = tmp_path / "barrier"
    (running / "started").mkdir(parents=True)
    (running / "running").mkdir()
    cluster = RayNodes()
    try:
        cluster.head(cpus=0)
        cluster.worker("g1", cpus=2, gpus=1)
        cluster.worker("g2", cpus=2, gpus=2)
        result = subprocess.run(
            [sys.executable, "-c", _PLAN_AND_RUN, str(REPO), cluster.address, str(tmp_path / "tune"), str(running)],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        cluster.shutdown()
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, (result.stdout + result.stderr)[-4000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["nodes"] == [[0.0, 0.0], [2.0, 1.0], [2.0, 2.0]]
    assert out["plan"] == {"cpus_per_trial": 1.0, "gpus_per_trial": 0.5, "concurrency": 4}
    rows = out["rows"]
    assert len(rows) == 8 and all(len(r["gpu_ids"]) == 1 for r in rows)  # each trial holds a share of one GPU
    # the planned concurrency ran at once (both waves of 4 filled: 2 trials on each node), and no
    # trial ever started beside 4 others
    assert sorted(r["wave"] or 0 for r in rows) == [4] * 4 + [8] * 4 and max(r["running"] for r in rows) <= 4, rows
    by_node = {}
    for r in rows:
        by_node.setdefault(r["node"], set()).update(r["gpu_ids"])
    assert len(by_node) == 2  # both GPU nodes (Ray packs the two half-GPU trials of a node onto one of its GPUs)
