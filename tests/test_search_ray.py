"""The search and the loop with real Ray Tune, real MLflow (SQLite) and real images (64 px).

* the end-to-end loop: 2 iterations x 2 trials -> the MLflow run tree, BASELINE -> H1, promoted
  checkpoints that load, the report;
* a failing trial (NaN loss, and a model that cannot be built) is recorded as failed while the
  others finish;
* resume after SIGKILL: the driver is killed in the middle of iteration 1's search; --resume
  finishes the loop with the same results as the uninterrupted run, no H<n> made twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster import answers, free_port, wait_for  # noqa: E402
from conftest import make_source_dataset, tiny_config_dict  # noqa: E402

from bss.data.splits import make_splits  # noqa: E402
from bss.search.loop import LoopOptions, run_loop  # noqa: E402
from bss.search.promotion import FloorRule as PromotionRule  # noqa: E402
from bss.search.promotion import choose  # noqa: E402
from bss.search.space import load_space  # noqa: E402
from bss.search.trial import TrialContext  # noqa: E402
from bss.search.tune_search import Resources, run_search  # noqa: E402
from bss.training.checkpoint import load_model  # noqa: E402

SPACE = {
    # 40 steps (20 epochs of the 5 BASELINE images): enough for a teacher that beats the boxes, so H1 is made
    "fixed": {"train_steps": 40, "epochs": 1, "evaluations": 4, "batch_size": 2, "visualization_samples": 2},
    "params": {
        "learning_rate": {"loguniform": [3.0e-3, 3.0e-2]},
        "criterion.args.alpha": {"uniform": [0.3, 0.7]},
        "criterion.args.beta": {"uniform": [0.3, 0.7]},
    },
    "searcher": {"algorithm": "tpe", "trials": 2, "n_startup_trials": 1},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
}
# the seed's floor rule: trials of 8 steps on 64 px toys do not beat the boxes' IoU, which the
# default rule requires (its decisions are tested with crafted numbers in test_search_loop.py)
LOOP = ["--dataset", "toy", "--iterations", "2", "--trials", "2", "--concurrency", "1", "--promotion", "floor", "--floor", "0.05", "--seed", "3"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def make_inputs(folder: Path) -> dict:
    """Dataset (identical for the same seed), config and space files for one loop."""
    root = folder / "datasets"
    make_source_dataset(root)
    cfg = tiny_config_dict(root, folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return {
        "data_root": str(root),
        "config": str(folder / "config.yaml"),
        "space": str(folder / "space.yaml"),
        "run_dir": str(folder / "run"),
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
    }


def cli(inputs: dict) -> list[str]:
    return LOOP + [
        "--data-root",
        inputs["data_root"],
        "--config",
        inputs["config"],
        "--space",
        inputs["space"],
        "--run-dir",
        inputs["run_dir"],
        "--tracking-uri",
        inputs["tracking_uri"],
    ]


def options(inputs: dict, **over) -> LoopOptions:
    return LoopOptions(
        dataset="toy",
        iterations=2,
        trials=2,
        concurrency=1,
        promotion="floor",
        floor=0.05,
        seed=3,
        data_root=inputs["data_root"],
        config=inputs["config"],
        space=inputs["space"],
        run_dir=inputs["run_dir"],
        tracking_uri=inputs["tracking_uri"],
        **over,
    )


def mlflow_runs(uri: str, deleted: bool = False) -> dict:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bss-search")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY)
    out: dict = {}
    for run in runs:
        out.setdefault(run.data.tags.get("bss.kind"), []).append(run)
    return out


def summary(state: dict) -> list[dict]:
    """What must be equal between an interrupted+resumed loop and an uninterrupted one."""
    out = []
    for it in state["iterations"]:
        out.append(
            {
                "train_dataset": it["train_dataset"],
                "trials": [(t["ordinal"], t["state"], t["params"], t["best"] and round(t["best"]["eval_iou"], 6)) for t in it["search"]["trials"]],
                "promoted": (it["promoted"]["ordinal"], it["promoted"]["params"], {k: round(v, 6) for k, v in it["promoted"]["metrics"].items()}),
                "decision": it["decision"]["verdict"],
                "hybrid": (it.get("hybrid") or {}).get("name"),
                # unrounded: the driver fixes its own thread count (Loop._run), so both runs make H1 alike to the last bit
                "label_quality": (it.get("hybrid") or {}).get("label_quality"),
                "test": {k: round(v, 6) for k, v in it["test"].items()},
            }
        )
    return out


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """One uninterrupted loop, shared by the end-to-end and the resume tests."""
    folder = tmp_path_factory.mktemp("reference")
    inputs = make_inputs(folder)
    result = run_loop(options(inputs, progress=True))
    return inputs, result


def test_end_to_end_loop(reference):
    inputs, result = reference
    run = Path(inputs["run_dir"])
    root = Path(inputs["data_root"])
    state = json.loads((run / "state.json").read_text())
    assert state["finished"] and len(state["iterations"]) == 2
    # the driver made the splits, iteration 0 made H1 with its promoted model, iteration 1 trained on it
    assert all((root / f"toy_{s}").is_dir() for s in ("BASELINE", "EVAL", "TEST"))
    assert [it["train_dataset"] for it in state["iterations"]] == ["toy_BASELINE", "toy_H1"]
    manifest = json.loads((root / "toy_H1" / "manifest.json").read_text())
    assert manifest["checkpoint"]["train_dataset"] == "toy_BASELINE" and manifest["counts"]["refined"] == 3
    assert not (root / "toy_H2").exists()  # the last iteration refines nothing
    # iteration 1's search tries the best config so far first (Optuna's points_to_evaluate)
    first = min(state["iterations"][1]["search"]["trials"], key=lambda t: t["ordinal"])
    assert first["params"] == pytest.approx(state["iterations"][0]["promoted"]["params"])
    # promoted checkpoints load, with the config of the trial that won
    for k, it in enumerate(state["iterations"]):
        model, cfg = load_model(run / f"iter_{k}" / "best.pt")
        assert cfg.train_dataset == it["train_dataset"] and cfg.learning_rate == pytest.approx(it["promoted"]["params"]["learning_rate"])
        rule = PromotionRule(floor=0.05)
        admissible = [t for t in it["search"]["trials"] if t["best"] and rule.admissible(t["best"])]
        assert it["promoted"]["metrics"]["eval_recall"] == max(t["best"]["eval_recall"] for t in admissible)
        assert (run / f"iter_{k}" / "overlays.png").is_file()
    load_model(run / "best.pt")
    assert {r["iteration"] for r in result.rows} == {0, 1} and all(r["test_recall"] is not None for r in result.rows)
    assert (run / "report.md").is_file() and (run / "metrics.png").is_file()
    # MLflow: 1 loop run -> 2 iteration runs -> 2 trial runs each; none left RUNNING
    runs = mlflow_runs(inputs["tracking_uri"])
    (parent,) = runs["loop"]
    iterations = {r.data.tags["bss.iteration"]: r for r in runs["iteration"]}
    assert set(iterations) == {"0", "1"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in iterations.values())
    trials = runs["trial"]
    assert len(trials) == 4
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == iterations[r.data.tags["bss.iteration"]].info.run_id
        assert r.info.status in ("FINISHED", "KILLED") and r.data.tags["bss.outcome"] in ("complete", "stopped")
        assert "eval_recall" in r.data.metrics and "learning_rate" in r.data.params
    assert all(r.info.status == "FINISHED" for r in runs["loop"] + runs["iteration"])
    from mlflow.tracking import MlflowClient

    history = MlflowClient(inputs["tracking_uri"]).get_metric_history(trials[0].info.run_id, "eval_iou")
    assert len(history) >= 1  # per-evaluation metrics of every trial
    assert "final_test_recall" in parent.data.metrics and "final_eval_recall" in parent.data.metrics


def test_the_mlflow_record_of_a_loop(reference, tmp_path):
    """What a user sees in MLflow: the experiment opens on its runs, the loop run's top-level
    figures are the final model's, iterations and trials say what they are, datasets, images,
    source, description and a registered model that predicts like drivers/predict.py."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from bss.data.io import read_image, read_mask
    from bss.predict import predict_folder

    inputs, result = reference
    uri, run = inputs["tracking_uri"], Path(inputs["run_dir"])
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bss-search")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = mlflow_runs(uri)
    (parent,) = runs["loop"]
    final = result.final_iteration
    row = next(r for r in result.rows if r["iteration"] == final)
    assert parent.data.metrics["eval_iou"] == pytest.approx(row["eval_iou"]) == pytest.approx(parent.data.metrics["final_eval_iou"])
    assert parent.data.metrics["test_iou"] == pytest.approx(row["test_iou"])
    series = client.get_metric_history(parent.info.run_id, "iteration_eval_iou")
    assert sorted((m.step, round(m.value, 6)) for m in series) == sorted((r["iteration"], round(r["eval_iou"], 6)) for r in result.rows)
    assert parent.data.tags["mlflow.note.content"].startswith("# BSS self-training loop")
    assert len(parent.data.tags.get("mlflow.source.git.commit", "")) == 40
    assert any(k.startswith("system/cpu_utilization") for k in parent.data.metrics)
    for it in runs["iteration"]:
        k = int(it.data.tags["bss.iteration"])
        assert it.data.params["iteration"] == str(k) and it.data.metrics["iteration"] == k
        inputs_logged = {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for d in client.get_run(it.info.run_id).inputs.dataset_inputs}
        assert inputs_logged == {state_train(run, k): "training", "toy_EVAL": "evaluation"}
    state = json.loads((run / "state.json").read_text())
    promoted = {it["promoted"]["run_id"] for it in state["iterations"]}
    for t in runs["trial"]:
        assert (t.data.tags.get("bss.promoted") == "true") == (t.info.run_id in promoted)
        assert "best_eval_iou" in t.data.metrics and t.info.status == "FINISHED"  # stopped trials too
        assert not any(k.startswith(("tracking.", "output_dir")) for k in t.data.params)
    # the printed link's shared view: its filter finds exactly this loop's iterations, and each
    # has its overlays at the top level (the only files MLflow's Compare shows side by side)
    view = json.loads(exp.tags[f"mlflow.sharedViewState.bss-loop-{parent.info.run_id}"])
    found = client.search_runs([exp.experiment_id], view["searchFilter"], order_by=["metrics.iteration ASC"])
    assert [r.info.run_id for r in found] == [it.info.run_id for it in sorted(runs["iteration"], key=lambda r: int(r.data.tags["bss.iteration"]))]
    assert view["orderByKey"] == "metrics.`iteration`" and "metrics.`eval_iou`" in view["selectedColumns"]
    for it in runs["iteration"]:
        assert "overlays.png" in {f.path for f in client.list_artifacts(it.info.run_id)}
    assert len({it.data.tags["mlflow.runColor"] for it in runs["iteration"]}) == len(runs["iteration"])  # one colour each
    images = [f.path for f in client.list_artifacts(parent.info.run_id, "images")]
    assert any("eval_predictions" in p for p in images) and any("refined_masks" in p for p in images)
    # the Optuna study of each search, for optuna-dashboard
    import optuna

    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{run / 'optuna.db'}")}
    assert studies == {"toy iteration 0": 2, "toy iteration 1": 2}
    # the registered model predicts the masks drivers/predict.py writes
    version = client.get_model_version_by_alias("bss-toy", "best")
    assert state["registered_model"]["version"] == str(version.version)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/bss-toy@best")
    images_dir = Path(inputs["data_root"]) / "toy_TEST" / "images"
    predicted = predict_folder(run / "best.pt", images_dir, tmp_path / "pred", progress=False)
    for path in sorted(images_dir.iterdir())[:2]:
        mask = model.predict(read_image(path))[0]
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and mask.any()
        assert np.array_equal(mask > 0, read_mask(predicted.out / "masks" / f"{path.stem}.png") > 0)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture
def mlflow_ui(reference, tmp_path):
    """``mlflow ui`` on 127.0.0.1 over the reference loop's store (stopped after the test)."""
    port = free_port()
    log = open(tmp_path / "mlflow-ui.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", reference[0]["tracking_uri"], "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(base + "/health") or proc.poll() is not None, 90, "mlflow ui", tmp_path / "mlflow-ui.log")
        assert proc.poll() is None, (tmp_path / "mlflow-ui.log").read_text()[-2000:]
    except BaseException:
        proc.kill()
        raise
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _shots() -> Path:
    shots = Path(os.environ.get("BSS_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def _chromium(tmp_path: Path):
    """Headless Chromium driven by selenium (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=2800,1000",  # wide enough for every column of the shared view (the grid draws only visible ones)
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _quick_start_ui_command() -> list[str]:
    """The README Quick start's command that opens the results (``python drivers/ui.py ...``), as argv."""
    import shlex

    quick = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (line,) = [line.strip() for line in quick.splitlines() if line.strip().startswith("python drivers/ui.py")]
    argv = shlex.split(line)
    return [sys.executable, str(REPO / argv[1]), *argv[2:]]


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
def test_the_quick_start_ui_command_opens_the_loops_iterations(reference, tmp_path):
    """README Quick start: ``python drivers/ui.py`` where the loop ran (its default store,
    ``sqlite:///mlflow.db`` in that folder) starts mlflow ui, waits for it and prints a link; that
    link, opened in headless Chromium, shows the loop's iterations (not MLflow's GenAI home) with
    no filter typed. The UI is stopped with the command (SIGTERM to its process group)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    folder = Path(reference[0]["tracking_uri"][len("sqlite:///") :]).parent  # the loop's working folder: mlflow.db is there
    log_path = tmp_path / "ui.log"
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_quick_start_ui_command(), cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    driver = None
    try:
        wait_for(lambda: "the loop's iterations: http" in log_path.read_text() or proc.poll() is not None, 180, "drivers/ui.py", log_path)
        text = log_path.read_text()
        assert proc.poll() is None, text[-3000:]
        url = text.split("the loop's iterations: ", 1)[1].split()[0]
        parent = json.loads((Path(reference[0]["run_dir"]) / "state.json").read_text())["parent_run_id"]
        assert url.startswith("http://127.0.0.1:") and "workflowType=machine_learning" in url and url.endswith(f"viewStateShareKey=bss-loop-{parent}")
        driver = _chromium(tmp_path)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        rows = [wait.until(EC.presence_of_element_located((By.XPATH, f"//*[@role='row'][.//a[normalize-space()='iteration {k}']]"))) for k in range(2)]
        driver.save_screenshot(str(_shots() / "quick-start.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "/runs" in driver.current_url and "Token Usage" not in body and "loop toy" not in body
        assert rows[0].location["y"] < rows[1].location["y"]
    finally:
        if driver is not None:
            driver.quit()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        log.close()


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
def test_the_readme_mlflow_recipe_in_a_real_browser(reference, mlflow_ui, tmp_path):
    """The README's "MLflow: comparing iterations" steps, clicked in headless Chromium: the link
    the loop prints opens the runs table (not the GenAI overview) on this loop's iterations, flat,
    in order, with their figures as columns; Compare on them offers the iteration as an axis and
    shows their overlays side by side. Screenshots: test-artifacts/browser/."""
    from mlflow.tracking import MlflowClient
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from bss.tracking import ui_url

    shots = _shots()
    exp = MlflowClient(reference[0]["tracking_uri"]).get_experiment_by_name("bss-search")
    driver = _chromium(tmp_path)
    wait = WebDriverWait(driver, 60)

    def row(name: str):
        return wait.until(EC.presence_of_element_located((By.XPATH, f"//*[@role='row'][.//a[normalize-space()='{name}']]")))

    try:
        # 1. the link the loop prints: a shared view of this loop's iterations, flat and in order
        view = f"bss-loop-{json.loads((Path(reference[0]['run_dir']) / 'state.json').read_text())['parent_run_id']}"
        driver.get(ui_url(exp.experiment_id, base=mlflow_ui, view=view))
        iterations = [row(f"iteration {k}") for k in range(2)]  # no + to press

        def headers(d) -> set:
            return {h.text.strip() for h in d.find_elements(By.CSS_SELECTOR, "[role='columnheader']")}

        wanted = {"eval_iou", "eval_recall", "test_iou", "bss.decision"}
        try:  # the page renders the view's columns (no fixed wait: until they are there, 60 s at most)
            wait.until(lambda d: wanted <= headers(d))
        except TimeoutException:
            raise AssertionError(f"the shared view's columns never appeared: {sorted(headers(driver))}") from None
        driver.save_screenshot(str(shots / "1-iterations.png"))
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "/runs" in driver.current_url and "Token Usage" not in text  # not the GenAI overview
        assert "loop toy" not in text and "Error loading shared view state" not in text
        top = [r.location["y"] for r in iterations]
        assert top[0] < top[1]  # sorted by iteration
        # 2. tick them and press Compare
        for r in iterations:
            r.find_element(By.CSS_SELECTOR, "input.ag-checkbox-input").click()
        compare = wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Compare']")))
        compare.click()
        wait.until(EC.url_contains("compare-runs"))
        # wait.until raises TimeoutException (the test fails) if the page never says it compares 2 runs
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Comparing 2 Runs')]")))
        # the plot controls render: both axis lists are on the page (no fixed wait)
        wait.until(lambda d: "Metrics:" in d.find_element(By.TAG_NAME, "body").text.split("Parameters:", 1)[-1])
        driver.save_screenshot(str(shots / "2-compare.png"))
        text = driver.find_element(By.TAG_NAME, "body").text
        # the iteration is an axis: a param and a metric of every iteration run
        parameters, metrics = text.split("Parameters:", 1)[1].split("Metrics:", 1)
        assert "iteration" in parameters.split("Clear All")[0] and "iteration" in metrics.split("Clear All")[0]
        assert "iteration 0" in text and "iteration 1" in text
        # the iterations' overlays, side by side
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[normalize-space()='overlays.png']")))
        assert "No common artifacts" not in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.save_screenshot(str(shots / "last.png"))
        driver.quit()


def test_optuna_dashboard_opens_the_studies_of_the_run(reference, tmp_path):
    """The README's ``optuna-dashboard sqlite:///<run-dir>/optuna.db``: a real dashboard serves each
    iteration's study with every trial the search ran."""
    import urllib.request

    run = Path(reference[0]["run_dir"])
    port = free_port()
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen(
        [shutil.which("optuna-dashboard") or "optuna-dashboard", f"sqlite:///{run / 'optuna.db'}", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/studies"
        wait_for(lambda: answers(api) or proc.poll() is not None, 60, "optuna-dashboard", tmp_path / "dashboard.log")
        studies = json.loads(urllib.request.urlopen(api, timeout=10).read())["study_summaries"]
        assert sorted(s["study_name"] for s in studies) == ["toy iteration 0", "toy iteration 1"]
        first = next(s for s in studies if s["study_name"] == "toy iteration 0")
        detail = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{first['study_id']}?after=0", timeout=10).read())
        state = json.loads((run / "state.json").read_text())
        assert len(detail["trials"]) == len(state["iterations"][0]["search"]["trials"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def state_train(run: Path, k: int) -> str:
    return json.loads((run / "state.json").read_text())["iterations"][k]["train_dataset"]


def test_failing_trials_are_recorded_and_the_search_goes_on(ray_cluster, tmp_path, capfd):
    from bss import tracking

    root = tmp_path / "datasets"
    make_source_dataset(root)
    make_splits("toy", root, progress=False)
    # visualization_samples > 0 and FIFO (no ASHA stop at the last evaluation): trials still draw nothing
    base = tiny_config_dict(root, tmp_path, train_dataset="toy_BASELINE", max_steps_per_epoch=2, epochs=2, visualization_samples=2)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "params": {
                    "learning_rate": {"choice": {"ok": 0.01, "huge": 1.0e30}},  # 1e30: the loss turns NaN
                    "model.args": {"choice": {"good": {"decoder_channels": [32, 16, 8]}, "broken": {"decoder_channels": [32, 16]}}},  # cannot be built
                }
            }
        )
    )
    space = load_space(space_file, base)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.setup(uri, "bss-search")
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(uri).create_run(exp, run_name="iteration 0").info.run_id
    context = TrialContext(
        base=base,
        space=space,
        rule=PromotionRule(floor=0.0),
        trials_dir=str(tmp_path / "trials"),
        seed=0,
        iteration=0,
        tracking={"uri": uri, "experiment_id": exp, "parent_run_id": parent},
    )
    points = [{"learning_rate": "ok", "model.args": "good"}, {"learning_rate": "huge", "model.args": "good"}, {"learning_rate": "ok", "model.args": "broken"}]
    capfd.readouterr()
    outcome = run_search(context, 3, Resources(1, 0, 2), tmp_path, algorithm="tpe", scheduler={"name": "fifo"}, max_evaluations=2, points=points, progress=True)
    console = "".join(capfd.readouterr())
    # one line per failed trial on the console; the traceback stays in the record and MLflow
    assert console.count("FAILED: ") == 2 and "Traceback" not in console and "ERROR" not in console, console[-3000:]
    by = {c.ordinal: c for c in outcome.candidates}
    assert [by[i].state for i in (1, 2, 3)] == ["complete", "failed", "failed"]
    assert "TrainingDiverged" in by[2].error and "loss became" in by[2].error
    assert "ConfigError" in by[3].error and "model.args" in by[3].error
    assert by[1].evaluations == 2 and choose(outcome.candidates, context.rule) is by[1]
    assert sorted(p.name for p in (Path(context.trials_dir) / by[1].key).iterdir()) == ["promote.pt", "record.json", "rows.jsonl"]
    runs = {r.data.tags["bss.trial"]: r for r in mlflow_runs(uri)["trial"]}
    assert runs["1"].info.status == "FINISHED"
    assert runs["2"].info.status == "FAILED" and "loss became" in runs["2"].data.tags["bss.error"]
    assert runs["3"].info.status == "FAILED" and "ConfigError" in runs["3"].data.tags["bss.error"]


def test_resume_after_sigkill_equals_the_uninterrupted_run(reference, tmp_path):
    ref_inputs, _ = reference
    inputs = make_inputs(tmp_path)
    # the driver SIGKILLs itself and its Ray inside its Tune callback, right after iteration 1's
    # first trial completed (one trial at a time: the second has not started): mid-search, exactly
    kill = {"on": "complete", "iteration": 1, "ordinal": 1, "kill": "self"}
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", BSS_TEST_KILL=json.dumps(kill))
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "driver_hook.py"), *cli(inputs)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert "driver_hook: kill self at complete of iteration 1 trial 1" in (tmp_path / "killed.log").read_text()
    state = json.loads((Path(inputs["run_dir"]) / "state.json").read_text())
    assert state["iterations"][0]["done"] and not state["iterations"][1].get("search", {}).get("done")
    assert not state.get("finished")
    root = Path(inputs["data_root"])
    h1 = (root / "toy_H1" / "manifest.json").stat().st_mtime_ns

    result = run_loop(options(inputs, resume=True, progress=True))
    resumed = json.loads((Path(inputs["run_dir"]) / "state.json").read_text())
    reference_state = json.loads((Path(ref_inputs["run_dir"]) / "state.json").read_text())
    assert summary(resumed) == summary(reference_state)
    assert result.final_iteration == reference[1].final_iteration
    # nothing redone, nothing duplicated
    assert (root / "toy_H1" / "manifest.json").stat().st_mtime_ns == h1
    assert sorted(p.name for p in root.glob("toy_H*")) == ["toy_H1"]
    timings = resumed["iterations"][1]["search"]["timings"]
    assert timings[0]["replayed"] and not timings[1]["replayed"]  # trial 1 replayed, trial 2 trained again
    runs = mlflow_runs(inputs["tracking_uri"])
    assert len(runs["loop"]) == 1 and len(runs["iteration"]) == 2 and len(runs["trial"]) == 4
    assert all(r.info.status != "RUNNING" for kind in runs.values() for r in kind)


# --------------------------------------------------------------------------- kill races (no Ray)


def _context(tmp_path: Path, tracking: dict | None = None) -> TrialContext:
    return TrialContext(base={}, space=None, rule=PromotionRule(floor=0.0), trials_dir=str(tmp_path / "trials"), seed=0, iteration=1, tracking=tracking)


def test_cleanup_waits_for_a_worker_of_the_killed_driver_that_still_holds_its_trial(tmp_path, monkeypatch):
    """A Ray worker can outlive the SIGKILLed driver for a moment: the resumed search's cleanup
    waits for it (trial lock) before deleting its MLflow run and folder, so the worker cannot
    reopen the deleted run and record a bogus failure that the resume would then replay.

    No clock: the "worker" holds the trial's lock (its own open file: flock locks of two open
    files conflict even in one process); the cleanup runs in a thread, and each of its lock
    attempts is recorded. Only after two refused attempts (it tried, and it kept trying) with the
    folder still there does the worker let go; then the cleanup removes the folder."""
    import fcntl
    import threading
    from types import SimpleNamespace

    from bss import filelock
    from bss.search.trial_store import TrialStore
    from bss.search.tune_search import clean_interrupted

    context = _context(tmp_path)
    store = TrialStore(context.trials_dir, "t002-abcdef12")
    store.folder.mkdir(parents=True)
    (store.folder / TrialStore.RECORD).write_text(json.dumps({"state": "running", "attempt": "old", "run_id": None}))
    worker = filelock.acquire(store.lock_path)
    refused = threading.Semaphore(0)

    def flock(fd, operation):
        try:
            fcntl.flock(fd, operation)
        except OSError:
            refused.release()
            raise

    monkeypatch.setattr(filelock, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    result = {}
    cleanup = threading.Thread(target=lambda: result.setdefault("removed", clean_interrupted(context.trials_dir, context)))
    cleanup.start()
    try:
        assert refused.acquire(timeout=60) and refused.acquire(timeout=60), "the cleanup never tried the trial's lock"
        assert store.folder.is_dir() and (store.folder / TrialStore.RECORD).is_file()  # untouched while the worker holds it
    finally:
        worker.close()  # the worker dies
        cleanup.join(60)
    assert not cleanup.is_alive() and result == {"removed": 1}
    assert not store.folder.exists()


def test_a_superseded_attempt_never_writes_into_its_trial_folder(tmp_path):
    from bss.data.io import atomic_write_json
    from bss.search.trial_store import Superseded, TrialStore

    store = TrialStore(tmp_path / "trials", "t002-abcdef12")
    RECORD, folder = TrialStore.RECORD, store.folder
    folder.mkdir(parents=True)
    mine = {"state": "running", "attempt": "mine", "run_id": "r1"}
    atomic_write_json(folder / RECORD, mine)
    store.save(dict(mine, evaluations=1))  # still the owner
    atomic_write_json(folder / RECORD, {"state": "running", "attempt": "newer", "run_id": "r2"})  # taken over
    with pytest.raises(Superseded):
        store.save(dict(mine, state="failed", error="MlflowException: deleted"))
    assert json.loads((folder / RECORD).read_text())["attempt"] == "newer"
    import shutil

    shutil.rmtree(folder)  # removed by the resumed search's cleanup
    with pytest.raises(Superseded):
        store.save(dict(mine, state="failed"))
    with pytest.raises(Superseded):
        store.append_row({"epoch": 1.0})
    assert not folder.exists()  # not recreated


def test_cleanup_deletes_trial_runs_no_record_names_and_finishes_the_others(tmp_path):
    """A kill between creating a trial's MLflow run and recording its id leaves a RUNNING run
    that no record names: deleted on resume. A kill between a trial's 'complete' record and its
    MLflow end leaves the run RUNNING: finished on resume. Deleted runs are never reopened."""
    from mlflow.tracking import MlflowClient

    from bss import tracking
    from bss.data.io import atomic_write_json
    from bss.search.trial_store import TrialStore
    from bss.search.tune_search import clean_interrupted

    RECORD = TrialStore.RECORD

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.setup(uri, "bss-search")
    client = MlflowClient(uri)
    parent = client.create_run(exp, run_name="iteration 1").info.run_id
    context = _context(tmp_path, {"uri": uri, "experiment_id": exp, "parent_run_id": parent})

    def trial_run(key):
        return client.create_run(exp, run_name=key, tags={"mlflow.parentRunId": parent, "bss.kind": "trial", "bss.trial_key": key}).info.run_id

    orphan = trial_run("t001-aaaaaaaa")  # its record was written before the run existed: names no run
    atomic_write_json(Path(context.trials_dir) / "t001-aaaaaaaa" / RECORD, {"state": "complete", "attempt": "a", "run_id": None})
    done = trial_run("t002-bbbbbbbb")
    atomic_write_json(Path(context.trials_dir) / "t002-bbbbbbbb" / RECORD, {"state": "complete", "attempt": "b", "run_id": done})
    cut = trial_run("t003-cccccccc")
    atomic_write_json(Path(context.trials_dir) / "t003-cccccccc" / RECORD, {"state": "running", "attempt": "c", "run_id": cut})
    assert clean_interrupted(context.trials_dir, context) == 1
    assert client.get_run(orphan).info.lifecycle_stage == "deleted"
    assert client.get_run(done).info.lifecycle_stage == "active" and client.get_run(done).info.status == "FINISHED"
    assert client.get_run(cut).info.lifecycle_stage == "deleted" and not (Path(context.trials_dir) / "t003-cccccccc").exists()
    assert not context.tracker().usable(cut) and context.tracker().usable(done)


def test_trials_train_on_when_the_tracking_store_is_lost(ray_cluster, tmp_path):
    """A tracking failure is not a training failure: with the store deleted before the trials
    start, they complete, promote normally, and say what happened in their records."""
    from bss import tracking

    root = tmp_path / "datasets"
    make_source_dataset(root)
    make_splits("toy", root, progress=False)
    base = tiny_config_dict(root, tmp_path, train_dataset="toy_BASELINE", max_steps_per_epoch=2, epochs=2, visualization_samples=0)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"params": {"learning_rate": {"loguniform": [1e-3, 1e-2]}}}))
    space = load_space(space_file, base)
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    exp = tracking.setup(uri, "bss-search")
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(uri).create_run(exp, run_name="iteration 0").info.run_id
    db.unlink()
    context = TrialContext(
        base=base,
        space=space,
        rule=PromotionRule(floor=0.0),
        trials_dir=str(tmp_path / "trials"),
        seed=0,
        iteration=0,
        tracking={"uri": uri, "experiment_id": exp, "parent_run_id": parent},
    )
    outcome = run_search(context, 2, Resources(1, 0, 2), tmp_path, algorithm="tpe", scheduler={"name": "fifo"}, max_evaluations=2, progress=False)
    assert [c.state for c in outcome.candidates] == ["complete", "complete"]
    assert choose(outcome.candidates, context.rule) is not None
    records = [json.loads((Path(context.trials_dir) / c.key / "record.json").read_text()) for c in outcome.candidates]
    assert all(r["run_id"] is None and "tracking_error" in r for r in records)
