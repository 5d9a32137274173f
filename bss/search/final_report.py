"""The loop's last stage: TEST evaluation of every promoted model (after the last decision, so
TEST never steers the loop), the report files, the final model, and the console summary."""

from __future__ import annotations

from bss.config import METRICS
from bss.data.io import publish_copy
from bss.search.stages import LoopRun


def iteration_row(run: LoopRun, it: dict, evaluate_test: bool) -> dict:
    """One row of the report: iteration ``it``'s search, promoted model, EVAL/TEST scores, labels."""
    s, best = run.settings, run.state.get("best")
    promoted = it.get("promoted")
    if promoted and "test" not in it and evaluate_test:
        from bss.search.evaluate import evaluate_checkpoint

        it["test"] = evaluate_checkpoint(promoted["checkpoint"], f"{s.dataset}_TEST", s.data_root, device="cpu")
        run.state.save()
    counts = it["search"]["counts"]
    row = {
        "iteration": it["index"],
        "train_dataset": it["train_dataset"],
        "mode": it["search"]["mode"],
        "trials": sum(counts.values()),
        "trials_ok": counts.get("complete", 0) + counts.get("stopped", 0),
        "trials_failed": counts.get("failed", 0),
        "promoted_trial": promoted["ordinal"] if promoted else None,
        "decision": (it.get("decision") or {}).get("verdict", ""),
        "final": bool(best and best["iteration"] == it["index"]),
        "search_seconds": it["search"]["wall_seconds"],
    }
    for m in METRICS:
        row[f"eval_{m}"] = promoted["metrics"].get(f"eval_{m}") if promoted else None
        row[f"test_{m}"] = it.get("test", {}).get(m) if promoted else None
    if it.get("teacher"):
        row["eval_label_iou"] = it["teacher"]["label_iou_pixels"]  # this model as a teacher, EVAL boxes refined
        row["eval_box_label_iou"] = it["teacher"]["box_iou_pixels"]
    if it.get("hybrid", {}).get("name"):
        row["made"] = it["hybrid"]["name"]
        row.update({f"label_{key}": v for key, v in (it["hybrid"].get("label_quality") or {}).items() if isinstance(v, (int, float))})
    return row


def table_rows(run: LoopRun, evaluate_test: bool = False) -> list[dict]:
    return [iteration_row(run, it, evaluate_test) for it in run.state.iterations if it.get("search", {}).get("done")]


def report_stage(run: LoopRun) -> list[dict]:
    """Write report.md/json/csv and metrics.png, copy the final model to ``best.pt``, log it all."""
    from bss.search.report import write_report

    s, st = run.settings, run.state
    rows = table_rows(run, evaluate_test=True)
    best = st.get("best")
    final = best["iteration"] if best else None
    notes = [
        f"Dataset `{s.dataset}`; promotion: {run.rule.describe()}; {s.trials} trials per iteration ({s.algorithm} + {s.scheduler}); seed {s.seed}.",
        f"Stopped: {st.get('stopped') or 'ran all ' + str(s.iterations) + ' iterations'}. Final model: iteration {final} (`{run.run_dir / 'best.pt'}`).",
        f"EVAL = `{s.dataset}_EVAL` (every decision); TEST = `{s.dataset}_TEST`, evaluated only after the last decision.",
    ]
    paths = write_report(rows, run.run_dir, f"BSS self-training loop: {s.dataset}", notes)
    if final is not None:
        promoted = st.iterations[final]["promoted"]
        for name, src in (("best.pt", promoted["checkpoint"]), ("config.yaml", promoted["config_path"])):
            publish_copy(src, run.run_dir / name)
    log_report(run, rows, paths, final)
    st.data["report"] = {k: str(v) for k, v in paths.items()}
    st.data["finished"] = True
    st.save()
    return rows


def log_report(run: LoopRun, rows: list[dict], paths: dict, final: int | None) -> None:
    """The loop run: report artifacts, the final model, and its metrics. The loop run's plain
    ``eval_*``/``test_*`` are the *final* model's (what a user sorts loops by); the per-iteration
    series is ``iteration_eval_*``/``iteration_test_*``, stepped by iteration."""
    tr, parent = run.tracker, run.state.get("parent_run_id")
    for path in paths.values():
        tr.artifact(parent, path, "report")
    for r in rows:
        scores = {k: v for k, v in r.items() if k.startswith(("eval_", "test_")) and v is not None}
        tr.metrics(parent, {f"iteration_{k}": v for k, v in scores.items()} | {"iteration": r["iteration"]}, step=r["iteration"])
        if r.get("test_iou") is not None:
            tr.metrics(run.state.iterations[r["iteration"]]["run_id"], {f"test_{m}": r[f"test_{m}"] for m in METRICS})
    tr.describe(parent, paths["md"].read_text())
    if final is not None:
        tr.artifact(parent, run.run_dir / "best.pt", "final")
        tr.artifact(parent, run.run_dir / "config.yaml", "final")
        register_final_model(run, parent, final)
        row = next(r for r in rows if r["iteration"] == final)
        scores = {k: v for k, v in row.items() if k.startswith(("eval_", "test_")) and v is not None}
        tr.metrics(parent, scores | {f"final_{k}": v for k, v in scores.items()} | {"final_iteration": final}, step=final)
    tr.end(parent, "FINISHED")


def register_final_model(run: LoopRun, parent: str | None, final: int) -> None:
    """The final model in the MLflow model registry as ``bss-<dataset>``, alias ``best``."""
    if run.state.get("registered_model"):
        return
    name = f"bss-{run.settings.dataset}"
    version = run.tracker.register_model(parent, run.run_dir / "best.pt", name, alias="best")
    if version is not None:
        run.state.data["registered_model"] = {"name": name, "version": version, "alias": "best", "iteration": final}
        run.state.save()
        run.say(f"registered the final model as {name} version {version} (models:/{name}@best)")


def print_summary(run: LoopRun, rows: list[dict]) -> None:
    from bss.search.report import table_lines

    st = run.state
    best = st.get("best")
    run.say("\nsummary (* = final model; EVAL decided everything, TEST is only reported):")
    for line in table_lines(rows):
        run.say("  " + line)
    stopped = st.get("stopped")
    run.say(
        "\n" + (f"stopped early: {stopped[len('stop: ') :] if stopped.startswith('stop: ') else stopped}" if stopped else f"ran all {len(rows)} iteration(s)")
    )
    if best is not None:
        run.say(
            f"final model: {run.run_dir / 'best.pt'} (iteration {best['iteration']}); report: {run.run_dir / 'report.md'}, plot: {run.run_dir / 'metrics.png'}"
        )
    if run.view:
        run.say(f"compare the iterations in MLflow: {run.view}")
