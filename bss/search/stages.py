"""The loop's stages, in data-flow order: search -> promote -> teacher -> decide -> next H<n>.

Each stage is a function of the loop's context (:class:`LoopContext`: typed settings, the state, the tracker)
and an iteration's record ``it`` (:class:`~bss.search.record.IterationRecord`); it fills in its
part of ``it``, saves the state, and returns that part. :class:`bss.search.loop.Loop` only
sequences them and skips what the record says is done (resume). Every decision (a new best,
stop, make the next H<n>) is the stop rule's (:mod:`bss.search.stop`), taken once in
:func:`decide_stage`; the other stages carry it out. The data stages that run before the first
iteration (:func:`prepare_data`, :func:`measure_boxes`) are in :mod:`bss.search.data_stage`; the
final report is :mod:`bss.search.final_report`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from bss.data.io import file_sha256
from bss.errors import BSSError
from bss.search.data_stage import count_images
from bss.search.plan import Plan, for_space, not_applied, trial_budget, whole_frame
from bss.search.promotion import PromotionRule, TeacherScore, promote
from bss.search.ray_cluster import Resources
from bss.search.record import BestRecord, HybridRecord, IterationRecord, LoopRecord, SearchRecord, TeacherRecord, TrialRecord
from bss.search.settings import LoopSettings
from bss.search.state import LoopState
from bss.search.stop import Decision, History, Outcome, StopRule
from bss.search.tune_search import run_search
from bss.tracking import Tracker


@dataclass
class LoopContext:
    """Everything the stages share: built whole, once, by :class:`bss.search.loop.Loop`."""

    run_dir: Path
    settings: LoopSettings
    state: LoopState
    tracker: Tracker
    base: dict  # the base training config (validated)
    space: object  # SearchSpace
    resources: Resources
    rule: PromotionRule
    stop_rule: StopRule
    gpus: int
    time_left: Callable[[], float | None]
    say: Callable[[str], None] = print
    reuse_actors: bool = True
    max_failures: int = 2
    progress: bool = True
    hybrid_batch_size: int = 8
    view: str | None = None  # the MLflow UI command and link to this loop's iterations (Loop.start_tracking)
    address: str | None = None  # the Ray cluster the loop joined (--address): H<n> is refined on its nodes; None: in the driver

    @property
    def record(self) -> LoopRecord:
        return self.state.record

    @property
    def plan(self) -> Plan | None:
        """The plan every searched trial starts from (:mod:`bss.search.plan`): the data stage's;
        for a run from before the plan, the whole frame at the fingerprint's input size (as it
        ran); its batch the search space's where the space sets one. None: the search space or the
        base config sizes the input itself, or no fingerprint."""
        data = self.record.data
        if data is None or data.fingerprint is None or not_applied(self.space, self.base):
            return None
        return for_space(data.plan, self.space) if data.plan else whole_frame(data.fingerprint, "a run from before the plan: the fingerprint's input size")

    @property
    def nothing_to_refine(self) -> bool:
        """The dataset has no box-only image (every image hand-labelled): no H<n>, no teacher."""
        return self.record.data is not None and self.record.data.box_only == 0

    def iterations_left(self, k: int) -> int:
        """Iterations that may run after iteration k (0 where nothing can be refined)."""
        return 0 if self.nothing_to_refine else max(0, self.settings.iterations - k - 1)


BUDGET_RESERVE = 0.15  # of the time left: teacher measurement, hybrid, TEST evaluation, report


def search_budget(time_left: float | None, searches_left: int, per_search: float | None) -> float | None:
    """Seconds for the next search: its share of the loop's time left (after a reserve for the
    stages around the searches), and never more than ``--time-budget``."""
    if time_left is None:
        return per_search
    share = max(1.0, time_left * (1.0 - BUDGET_RESERVE) / max(1, searches_left))
    return share if per_search is None else min(share, per_search)


def derive_seed(*parts: int) -> int:
    """A seed for (loop seed, iteration, ...) that does not collide across iterations."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2**31 - 1))


def trial_base(base: dict, settings: LoopSettings, train_dataset: str, plan: Plan | None = None) -> dict:
    """The config every trial starts from; the ``plan`` (from the dataset's fingerprint) sets its
    ``image_size`` and, for patches, ``patches.frame_size`` (None: the base config's as it is,
    e.g. where the search space fixes or searches ``image_size``)."""
    cfg = copy.deepcopy(base)
    if plan is not None:
        plan.apply(cfg)
    cfg.update(
        train_dataset=train_dataset, evaluation_dataset=f"{settings.dataset}_EVAL", data_root=str(Path(settings.data_root).resolve()), visualization_samples=0
    )
    cfg["tracking"] = dict(cfg.get("tracking") or {}, enabled=False)
    return cfg


def max_evaluations(space, base: dict, train_images: int = 1) -> int:
    """The most evaluations a trial on ``train_images`` images can report (ASHA's max_t)."""
    from bss.config import from_dict

    probes = [{}]
    if space is not None:
        for p in space.params:
            probes += [{p.key: v} for v in (p.labels if p.kind == "choice" else (p.low, p.high))]
    return max([1] + [from_dict(space.apply(base, probe) if space is not None else base).planned_evaluations(train_images) for probe in probes])


# --------------------------------------------------------------------------- search + promote


def incumbent(ctx: LoopContext) -> list[dict] | None:
    """The best model's searched params, tried first by the next search (Optuna's
    points_to_evaluate): with a handful of trials, the known-good config on the new labels is
    the most informative first trial, and TPE proposes the rest."""
    best = ctx.record.best
    if best is None:
        return None
    params = ctx.record.iterations[best.iteration].promoted.params
    return [dict(params)] if set(params) == {p.key for p in ctx.space.params} else None


def search_context(ctx: LoopContext, k: int, it: IterationRecord):
    """(TrialContext, searcher name, scheduler, points first, what the search does) of iteration k."""
    from bss.search.trial import TrialContext

    s, best = ctx.settings, ctx.record.best
    if s.retrain_best and k >= 1 and best is not None:
        promoted = ctx.record.iterations[best.iteration].promoted
        base, space, algorithm = trial_base(yaml.safe_load(Path(promoted.config_path).read_text()), s, it.train_dataset), None, "replicas"
        seeds = {j: derive_seed(s.seed, k, j) for j in range(1, s.trials + 1)}
        points, scheduler = None, {"name": "fifo"}
        what = f"retrain the best config (iteration {best.iteration}) with {s.trials} seed(s)"
    else:
        base, space, algorithm, seeds = trial_base(ctx.base, s, it.train_dataset, ctx.plan), ctx.space, s.algorithm, {}
        points, scheduler = incumbent(ctx), dict(ctx.space.scheduler, name=s.scheduler)
        what = f"search {s.trials} trials" + (" (the first: the best config so far)" if points else "")
    tracking = {"uri": ctx.tracker.uri, "experiment_id": ctx.tracker.experiment_id, "parent_run_id": it.run_id} if ctx.tracker.ok and it.run_id else None
    context = TrialContext(
        base=base,
        space=space,
        rule=ctx.rule,
        trials_dir=str((ctx.run_dir / f"iter_{k}" / "trials").resolve()),
        seed=derive_seed(s.seed, k),
        iteration=k,
        cpus=ctx.resources.cpus_per_trial,
        gpus=ctx.resources.gpus_per_trial,
        tracking=tracking,
        seeds=seeds,
        study={"storage": f"sqlite:///{(ctx.run_dir / 'optuna.db').resolve()}", "name": f"{s.dataset} iteration {k}"},
    )
    return context, algorithm, scheduler, points, what


def search_stage(ctx: LoopContext, k: int, it: IterationRecord) -> SearchRecord:
    """Search iteration k's training set; record every trial in ``it.search``, then promote."""
    s = ctx.settings
    context, algorithm, scheduler, points, what = search_context(ctx, k, it)
    n_images = count_images(Path(s.data_root) / it.train_dataset)
    ctx.say(f"\n== iteration {k}: {what} on {it.train_dataset} ({n_images} images), judged on {s.dataset}_EVAL ==")
    ctx.say("  " + trial_budget(context.space.apply(context.base, {}) if context.space is not None else context.base, n_images))
    mode = "retrain" if algorithm == "replicas" else "search"
    ctx.tracker.params(
        it.run_id, {"iteration": k, "train_dataset": it.train_dataset, "mode": mode, "trials": s.trials, "seed": context.seed, "algorithm": algorithm}
    )
    ctx.tracker.metrics(it.run_id, {"iteration": k})
    log_lineage(ctx, it.run_id, {it.train_dataset: "training", f"{s.dataset}_EVAL": "evaluation"})
    outcome = run_search(
        context,
        s.trials,
        ctx.resources,
        ctx.run_dir / f"iter_{k}",
        algorithm=algorithm,
        scheduler=scheduler,
        max_evaluations=max_evaluations(context.space, context.base, n_images),
        time_budget=search_budget(ctx.time_left(), s.iterations - k, s.time_budget),
        reuse_actors=ctx.reuse_actors,
        max_failures=ctx.max_failures,
        label=f"[iter {k}]",
        progress=ctx.progress,
        points=points,
    )
    counts = {state: sum(1 for c in outcome.candidates if c.state == state) for state in ("complete", "stopped", "failed", "lost")}
    trials = [
        TrialRecord(c.ordinal, c.key, c.state, c.params, c.evaluations, c.best, (c.error or "")[-300:] or None, c.run_id, **c.where) for c in outcome.candidates
    ]
    it.search = SearchRecord(mode, round(outcome.wall_seconds, 2), counts, trials, outcome.timings)
    ctx.tracker.metrics(
        it.run_id,
        {"search_seconds": outcome.wall_seconds, "trials_complete": counts["complete"], "trials_stopped": counts["stopped"], "trials_failed": counts["failed"]},
    )
    promote_stage(ctx, k, it, outcome)
    return it.search


def log_lineage(ctx: LoopContext, run_id: str | None, datasets: dict[str, str]) -> None:
    """``mlflow.log_input`` for each dataset name -> context (training, evaluation, test)."""
    from bss.data.layout import dataset_digest

    for name, context in datasets.items():
        folder = Path(ctx.settings.data_root) / name
        if folder.is_dir():
            digest, profile = dataset_digest(folder)
            ctx.tracker.dataset(run_id, name, digest, folder.resolve(), profile, context)


def promote_stage(ctx: LoopContext, k: int, it: IterationRecord, outcome) -> None:
    """The promotion rule's winner of iteration k's search, copied to ``iter_<k>/`` (None: no
    trial finished an evaluation; at iteration 0 the dataset cannot train at all: an error)."""
    summary = ", ".join(f"{n} {state}" for state, n in it.search.counts.items() if n) or "no trial reported"
    teachers = measure_candidates(ctx, k, it, outcome.candidates)
    winner = ctx.rule.choose(outcome.candidates, {o: TeacherScore(t.label_iou_pixels, tuple(t.label_image_iou or ())) for o, t in teachers.items()})
    if winner is None:
        ctx.state.save()
        ctx.say(f"iteration {k}: no trial reached {ctx.rule.floor_text()} ({summary}, {outcome.wall_seconds:.0f} s)")
        if k == 0:
            raise BSSError(no_model_message(ctx, outcome.candidates))
        return
    iter_dir = ctx.run_dir / f"iter_{k}"
    it.promoted = promoted = promote(winner, k, iter_dir)
    if winner.ordinal in teachers:  # measured already: the teacher stage has nothing left to do
        it.teacher = teachers[winner.ordinal]
    ctx.state.save()
    overlays = draw_promoted_overlays(ctx, promoted.checkpoint, iter_dir)
    tr, run_id = ctx.tracker, it.run_id
    tr.metrics(run_id, promoted.metrics)
    tr.params(run_id, {f"promoted.{key}": v for key, v in promoted.params.items()} | {"promoted.trial": promoted.ordinal})
    tr.tag(run_id, "bss.promoted_trial_run", promoted.run_id or "")
    tr.tag(promoted.run_id, "bss.promoted", "true")
    for path in (promoted.checkpoint, promoted.config_path, iter_dir / "promotion.json"):
        tr.artifact(run_id, path, "promoted")
    if overlays:  # at the run's top level (MLflow's Compare shows only top-level files side by
        # side), and a step of the image slider over the iterations on the loop run
        from bss.data.io import read_image

        tr.artifact(run_id, overlays)
        tr.image(ctx.record.parent_run_id, read_image(overlays), key="eval_predictions", step=k)
    from bss.search.tune_callback import short_params

    m = promoted.metrics
    ctx.say(
        f"iteration {k}: promoted trial {promoted.ordinal} ({short_params(promoted.params)}) - EVAL recall {m['eval_recall']:.3f} precision {m['eval_precision']:.3f} IoU {m['eval_iou']:.3f} Dice {m['eval_dice']:.3f}   [{summary}; {outcome.wall_seconds:.0f} s]"
    )


def measure_teacher(ctx: LoopContext, checkpoint: str) -> TeacherRecord:
    """``checkpoint`` as a teacher on EVAL (:func:`bss.hybrid.teacher_quality.measure_teacher`)."""
    from bss.hybrid import teacher_quality

    start = time.perf_counter()
    s = ctx.settings
    quality = teacher_quality.measure_teacher(checkpoint, s.dataset, s.data_root, batch_size=ctx.hybrid_batch_size, device="cpu" if not ctx.gpus else "auto")
    return TeacherRecord(**quality.to_dict(), seconds=round(time.perf_counter() - start, 2), logged=False)


def measure_candidates(ctx: LoopContext, k: int, it: IterationRecord, candidates) -> dict[int, TeacherRecord]:
    """Step 2 of the promotion rule: the near-equal candidates (:meth:`PromotionRule.near`), each
    measured as a teacher on EVAL, by ordinal; their label IoU goes into the trials' records. Empty
    when the rule does not compare teachers, nothing can be refined, or fewer than two are near."""
    if not ctx.rule.compares_teachers or ctx.nothing_to_refine:
        return {}
    near = ctx.rule.near(candidates)
    if len(near) < 2:
        return {}
    measured = {c.ordinal: measure_teacher(ctx, c.checkpoint) for c in near}
    for trial in it.search.trials:
        if trial.ordinal in measured:
            trial.eval_label_iou = measured[trial.ordinal].label_iou_pixels
            ctx.tracker.metrics(trial.run_id, {"eval_label_iou": trial.eval_label_iou})
    ranked = sorted(measured.items(), key=lambda kv: -kv[1].label_iou_pixels)
    ctx.say(
        f"iteration {k}: {len(near)} models within {ctx.rule.margin:g} of the best EVAL IoU, as teachers on EVAL (label IoU): "
        + ", ".join(f"trial {o} {m.label_iou_pixels:.3f}" for o, m in ranked)
    )
    return measured


def draw_promoted_overlays(ctx: LoopContext, checkpoint: str, iter_dir: Path) -> Path | None:
    """The promoted model's EVAL overlays (None, with a warning, when they cannot be drawn)."""
    from bss.search.evaluate import draw_overlays

    s = ctx.settings
    try:
        return draw_overlays(
            checkpoint, f"{s.dataset}_EVAL", s.data_root, iter_dir / "overlays.png", samples=int(ctx.base.get("visualization_samples", 4)) or 4
        )
    except BSSError as exc:  # a picture is not worth stopping the loop
        ctx.say(f"warning: could not draw the overlays: {exc}")
        return None


def no_model_message(ctx: LoopContext, candidates) -> str:
    """Why iteration 0 has nothing to promote, with the numbers and what to change."""
    s = ctx.settings
    failed = sum(c.state == "failed" for c in candidates)
    budget = f" (the --time-budget of {s.time_budget:g} s may have cut them short)" if s.time_budget else ""
    errors = sorted({(c.error or "").strip().splitlines()[-1] for c in candidates if c.error})
    return (
        f"iteration 0: none of the {len(candidates)} trials reached {ctx.rule.floor_text()}{budget}"
        + (f", {failed} failed" if failed else "")
        + (f" (last error: {errors[0][:200]})" if errors else "")
        + ", so there is no model. Give the trials more training (the space's fixed: train_steps), a longer --time-budget or --budget, or more --trials; start again with another --run-dir."
    )


# --------------------------------------------------------------------------- teacher + decide


def teacher_stage(ctx: LoopContext, k: int, it: IterationRecord) -> TeacherRecord | None:
    """EVAL label IoU of the promoted model as a teacher, and the refinement rule chosen on EVAL
    (skipped when no later iteration could train on what it would refine)."""
    if it.promoted is None or ctx.nothing_to_refine or (it.teacher is not None and it.teacher.logged):
        return it.teacher
    if it.teacher is None:
        it.teacher = measure_teacher(ctx, it.promoted.checkpoint)
    t = it.teacher
    ctx.tracker.metrics(
        it.run_id,
        {
            "eval_label_iou": t.label_iou_pixels,
            "eval_box_label_iou": t.box_iou_pixels,
            "eval_raw_label_iou": t.raw_iou_pixels,
            "eval_default_rule_label_iou": t.default_rule_iou_pixels,
        },
    )
    ctx.tracker.params(it.run_id, {f"refine.{key}": v for key, v in t.rule.items()})
    t.logged = True
    ctx.state.save()
    from bss.hybrid.refine import describe

    ctx.say(
        f"iteration {k}: as a teacher on EVAL: label IoU {t.label_iou_pixels:.3f} with the chosen rule ({describe(t.rule)}; default rule {t.default_rule_iou_pixels:.3f}); "
        f"the EVAL boxes {t.box_iou_pixels:.3f}, raw prediction {t.raw_iou_pixels:.3f}"
    )
    return t


def labels_to_beat(ctx: LoopContext, k: int) -> tuple[float, str, tuple[float, ...] | None]:
    """EVAL label IoU of the labels iteration k trained on: the teacher that made its H<n> (with its
    per-image figures, where recorded), or the boxes (None)."""
    train = ctx.record.iterations[k].train_dataset
    for prev in reversed(ctx.record.iterations[:k]):
        if prev.hybrid is not None and prev.hybrid.name == train:
            per_image = prev.teacher.label_image_iou
            return prev.teacher.label_iou_pixels, f"the EVAL label IoU of the teacher that made {train}", tuple(per_image) if per_image else None
    boxes = ctx.record.iterations[k].teacher
    return (boxes.box_iou_pixels if boxes else 0.0), "the EVAL boxes' own label IoU", None


def history(ctx: LoopContext, k: int) -> History:
    """Iterations 0..k as the stop rule sees them."""
    iterations = ctx.record.iterations[: k + 1]
    made = [x.hybrid.name for x in iterations if x.hybrid is not None]  # in the order this run made them
    outcomes = tuple(
        Outcome(
            j,
            x.promoted.metrics if x.promoted else None,
            x.teacher.label_iou_pixels if x.teacher else None,
            bool(x.decision and x.decision.new_best),
            made.index(x.train_dataset) + 1 if x.train_dataset in made else 0,
            x.train_dataset,
            tuple(x.eval_image_iou) if x.eval_image_iou is not None else None,
            tuple(x.teacher.label_image_iou) if x.teacher and x.teacher.label_image_iou is not None else None,
        )
        for j, x in enumerate(iterations)
    )
    value, name, per_image = labels_to_beat(ctx, k)
    return History(outcomes, value, name, ctx.iterations_left(k), ctx.time_left(), per_image)


def measure_eval_images(ctx: LoopContext, k: int) -> None:
    """Per-image EVAL IoU of every promoted model up to iteration k that lacks it (once each,
    kept in the record): the stop rule's estimate of how far EVAL can tell two models apart."""
    from bss.search.evaluate import image_iou

    if not getattr(ctx.stop_rule, "noise_z", 0):
        return
    s = ctx.settings
    for x in ctx.record.iterations[: k + 1]:
        if x.promoted is not None and x.eval_image_iou is None:
            x.eval_image_iou = [round(v, 6) for v in image_iou(x.promoted.checkpoint, f"{s.dataset}_EVAL", s.data_root, device="cpu")]


def decide_stage(ctx: LoopContext, k: int, it: IterationRecord) -> Decision:
    """The stop rule on this run's history (bss.search.stop); the record keeps the best so far."""
    measure_eval_images(ctx, k)
    decision = ctx.stop_rule.decide(history(ctx, k))
    if decision.new_best:
        ctx.record.best = BestRecord(k, decision.value, it.promoted.checkpoint)
    it.decision = decision
    if decision.stop:
        ctx.record.stopped = decision.stop_text
    ctx.state.save()
    ctx.tracker.tag(it.run_id, "bss.decision", decision.verdict)
    best = ctx.record.best
    ctx.say(f"iteration {k}: {decision.verdict}" + ("" if decision.stop else f"; best so far: iteration {best.iteration}"))
    if k == 0 and decision.reason == "labels_not_better":
        ctx.say(
            "  the loop ends with iteration 0's model as the final model. What would help: more hand-labelled images (a better teacher), "
            "a longer search (--trials, the space's train_steps), or a refinement rule that suits these defects (bss/hybrid/refine.py)."
        )
    return decision


# --------------------------------------------------------------------------- the next training set


def next_dataset_stage(ctx: LoopContext, k: int, it: IterationRecord, decision: Decision) -> HybridRecord:
    """The training set of iteration k+1, as the decision says: a new ``H<n>`` refined by this
    iteration's model, or (no new best) the same one again with new seeds."""
    if decision.make_hybrid:
        return make_hybrid_stage(ctx, k, it)
    it.hybrid = HybridRecord(done=True, reused=it.train_dataset)
    ctx.record.iteration(k + 1).train_dataset = it.train_dataset
    ctx.state.save()
    ctx.say(f"iteration {k}: no new best, iteration {k + 1} trains again on {it.train_dataset} with new seeds")
    return it.hybrid


def make_hybrid_stage(ctx: LoopContext, k: int, it: IterationRecord) -> HybridRecord:
    """Refine the box-only images with this iteration's model and the rule chosen on EVAL into
    ``H<n>``. Its number is fixed in the state before the folder exists, so a resume never makes
    a second one, and an existing folder is adopted only if its manifest names our checkpoint."""
    from bss.hybrid import hybrid_name, next_number, read_manifest

    s = ctx.settings
    root, checkpoint = Path(s.data_root), Path(it.promoted.checkpoint)
    if it.hybrid is None or it.hybrid.number is None:
        it.hybrid = HybridRecord(number=int(next_number(s.dataset, root)), checkpoint_sha256=file_sha256(checkpoint))
        ctx.state.save()
    hybrid = it.hybrid
    folder = root / hybrid_name(s.dataset, hybrid.number)
    start = time.perf_counter()
    if folder.exists():
        manifest = read_manifest(folder)
        if (manifest.get("checkpoint") or {}).get("sha256") != hybrid.checkpoint_sha256:
            raise BSSError(
                f"{folder} exists but was not made by this run's iteration-{k} model (its manifest names another checkpoint); it is left alone. Move it away and --resume, or start a new run."
            )
        label_quality = manifest.get("label_quality")
        ctx.say(f"iteration {k}: {folder.name} already made by this run (adopted after a resume)")
    else:
        ctx.say(f"iteration {k}: refining the box-only images of {s.dataset} with the promoted model -> {folder.name} ...")
        label_quality, folder = refine_into(ctx, checkpoint, hybrid.number, it.teacher.rule)
    hybrid.done, hybrid.path, hybrid.name, hybrid.images = True, str(folder), folder.name, count_images(folder)
    hybrid.label_quality, hybrid.seconds = label_quality, round(time.perf_counter() - start, 2)
    ctx.record.iteration(k + 1).train_dataset = folder.name
    ctx.state.save()
    log_hybrid(ctx, k, it, folder)
    return hybrid


def refine_into(ctx: LoopContext, checkpoint: Path, number: int, rule: dict) -> tuple[dict | None, Path]:
    """make_hybrid with the loop's settings: (label quality against truth/, the folder)."""
    from bss.hybrid import RefineRule, make_hybrid

    s = ctx.settings
    result = make_hybrid(
        s.dataset,
        checkpoint,
        data_root=Path(s.data_root),
        number=number,
        rule=RefineRule.from_dict(rule),
        overwrite=False,
        batch_size=ctx.hybrid_batch_size,
        progress=False,
        address=ctx.address,
    )
    if result.resumed:
        ctx.say(f"    resumed: {result.resumed} images refined before the interruption were kept, {result.refined} refined now")
    return result.label_quality, Path(result.path)


def log_hybrid(ctx: LoopContext, k: int, it: IterationRecord, folder: Path) -> None:
    """The new H<n> in MLflow (manifest, label quality, the refined-mask sheet) and on the console."""
    hybrid, tr, run_id = it.hybrid, ctx.tracker, it.run_id
    tr.artifact(run_id, folder / "manifest.json", "hybrid")
    tr.artifact(run_id, folder / "label_quality.json", "hybrid")
    tr.metrics(run_id, {f"hybrid_{key}": v for key, v in (hybrid.label_quality or {}).items()})
    tr.tag(run_id, "bss.hybrid", folder.name)
    draw_refined_sheet(ctx, k, folder)
    lq = hybrid.label_quality
    quality = (
        f"; label IoU vs truth: boxes {lq.get('box_iou_pixels', float('nan')):.3f} -> refined {lq.get('hybrid_iou_pixels', float('nan')):.3f}" if lq else ""
    )
    ctx.say(f"iteration {k}: {folder.name}: {hybrid.images} images{quality}")


def draw_refined_sheet(ctx: LoopContext, k: int, folder: Path) -> None:
    """box | H<n> | truth for a few refined images: an artifact of iteration k, and a step of the
    loop run's ``refined_masks`` image slider."""
    from bss.data.io import read_image
    from bss.hybrid.sheet import refined_sheet

    try:
        sheet = refined_sheet(folder, ctx.run_dir / f"iter_{k}" / "refined_masks.png")
    except (BSSError, OSError, KeyError, ValueError) as exc:  # a picture is not worth stopping the loop
        ctx.say(f"warning: could not draw the refined masks of {folder.name}: {exc}")
        return
    if sheet is not None:
        ctx.tracker.artifact(ctx.record.iterations[k].run_id, sheet)
        ctx.tracker.image(ctx.record.parent_run_id, read_image(sheet), key="refined_masks", step=k)
