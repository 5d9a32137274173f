"""The loop's last stage: TEST evaluation of every promoted model (after the last decision, so
TEST never steers the loop), the report files, the final model, and the console summary."""

from __future__ import annotations

from bss.config import METRICS
from bss.data.io import publish_copy
from bss.search.record import IterationRecord, LoopRecord, RegisteredModel
from bss.search.settings import LoopSettings
from bss.search.stages import LoopContext


def evaluate_test(ctx: LoopContext) -> None:
    """TEST scores of every promoted model not scored yet (after the last decision)."""
    from bss.search.evaluate import evaluate_checkpoint

    s = ctx.settings
    for it in ctx.record.iterations:
        if it.promoted is not None and it.test is None and it.searched:
            it.test = evaluate_checkpoint(it.promoted.checkpoint, f"{s.dataset}_TEST", s.data_root, device="cpu")
            ctx.state.save()


def iteration_row(record: LoopRecord, it: IterationRecord) -> dict:
    """One row of the report: iteration ``it``'s search, promoted model, EVAL/TEST scores, labels."""
    promoted, counts = it.promoted, it.search.counts
    row = {
        "iteration": it.index,
        "train_dataset": it.train_dataset,
        "mode": it.search.mode,
        "trials": sum(counts.values()),
        "trials_ok": it.search.ok,
        "trials_failed": counts.get("failed", 0),
        "promoted_trial": promoted.ordinal if promoted else None,
        "decision": it.decision.verdict if it.decision else "",
        "final": bool(record.best and record.best.iteration == it.index),
        "search_seconds": it.search.wall_seconds,
    }
    for m in METRICS:
        row[f"eval_{m}"] = promoted.metrics.get(f"eval_{m}") if promoted else None
        row[f"test_{m}"] = (it.test or {}).get(m) if promoted else None
    if it.teacher:
        row["eval_label_iou"] = it.teacher.label_iou_pixels  # this model as a teacher, EVAL boxes refined
        row["eval_box_label_iou"] = it.teacher.box_iou_pixels
    if it.hybrid and it.hybrid.name:
        row["made"] = it.hybrid.name
        row.update({f"label_{key}": v for key, v in (it.hybrid.label_quality or {}).items() if isinstance(v, (int, float))})
    return row


def table_rows(record: LoopRecord) -> list[dict]:
    return [iteration_row(record, it) for it in record.iterations if it.searched]


def report_stage(ctx: LoopContext) -> list[dict]:
    """Write report.md/json/csv and metrics.png, copy the final model to ``best.pt``, log it all."""
    from bss.search.report import write_report

    s, record = ctx.settings, ctx.record
    evaluate_test(ctx)
    rows = table_rows(record)
    final = record.best.iteration if record.best else None
    notes = [
        f"Dataset `{s.dataset}`; promotion: {ctx.rule.describe()}; {s.trials} trials per iteration ({s.algorithm} + {s.scheduler}); seed {s.seed}.",
        f"Stopped: {record.stopped or 'ran all ' + str(len(rows)) + ' iteration(s)'}. Final model: iteration {final} (`{ctx.run_dir / 'best.pt'}`).",
        f"EVAL = `{s.dataset}_EVAL` (every decision); TEST = `{s.dataset}_TEST`, evaluated only after the last decision.",
    ]
    paths = write_report(rows, ctx.run_dir, f"BSS self-training loop: {s.dataset}", notes)
    if final is not None:
        promoted = record.iterations[final].promoted
        for name, src in (("best.pt", promoted.checkpoint), ("config.yaml", promoted.config_path)):
            publish_copy(src, ctx.run_dir / name)
    log_report(ctx, rows, paths, final)
    record.report = {k: str(v) for k, v in paths.items()}
    record.finished = True
    ctx.state.save()
    return rows


def log_report(ctx: LoopContext, rows: list[dict], paths: dict, final: int | None) -> None:
    """The loop run: report artifacts, the final model, and its metrics. The loop run's plain
    ``eval_*``/``test_*`` are the *final* model's (what a user sorts loops by); the per-iteration
    series is ``iteration_eval_*``/``iteration_test_*``, stepped by iteration."""
    tr, parent = ctx.tracker, ctx.record.parent_run_id
    for path in paths.values():
        tr.artifact(parent, path, "report")
    for r in rows:
        scores = {k: v for k, v in r.items() if k.startswith(("eval_", "test_")) and v is not None}
        tr.metrics(parent, {f"iteration_{k}": v for k, v in scores.items()} | {"iteration": r["iteration"]}, step=r["iteration"])
        if r.get("test_iou") is not None:
            tr.metrics(ctx.record.iterations[r["iteration"]].run_id, {f"test_{m}": r[f"test_{m}"] for m in METRICS})
    tr.describe(parent, paths["md"].read_text())
    if final is not None:
        tr.artifact(parent, ctx.run_dir / "best.pt", "final")
        tr.artifact(parent, ctx.run_dir / "config.yaml", "final")
        register_final_model(ctx, parent, final)
        row = next(r for r in rows if r["iteration"] == final)
        scores = {k: v for k, v in row.items() if k.startswith(("eval_", "test_")) and v is not None}
        tr.metrics(parent, scores | {f"final_{k}": v for k, v in scores.items()} | {"final_iteration": final}, step=final)
    tr.end(parent, "FINISHED")


def register_final_model(ctx: LoopContext, parent: str | None, final: int) -> None:
    """The final model in the MLflow model registry as ``bss-<dataset>``, alias ``best``."""
    if ctx.record.registered_model:
        return
    name = f"bss-{ctx.settings.dataset}"
    version = ctx.tracker.register_model(parent, ctx.run_dir / "best.pt", name, alias="best")
    if version is not None:
        ctx.record.registered_model = RegisteredModel(name, str(version), "best", final)
        ctx.state.save()
        ctx.say(f"registered the final model as {name} version {version} (models:/{name}@best)")


def print_summary(record: LoopRecord, settings: LoopSettings, run_dir, rows: list[dict], view: str | None, say) -> None:
    from bss.search.report import table_lines

    say("\nsummary (* = final model; EVAL decided everything, TEST is only reported):")
    for line in table_lines(rows):
        say("  " + line)
    stopped = record.stopped
    say("\n" + (f"stopped early: {stopped[len('stop: ') :] if stopped.startswith('stop: ') else stopped}" if stopped else f"ran all {len(rows)} iteration(s)"))
    if record.best is not None:
        say(f"final model: {run_dir / 'best.pt'} (iteration {record.best.iteration}); report: {run_dir / 'report.md'}, plot: {run_dir / 'metrics.png'}")
    if view:
        say(f"compare the iterations in MLflow: {view}")
