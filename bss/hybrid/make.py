"""Build a hybrid dataset ``<NAME>_H<n>``: box masks refined by a trained model, plus BASELINE.

    result = make_hybrid("obstacle", "runs/train/best.pt")      # -> datasets/obstacle_H1

Training set of ``H<n>``:

* every *box-only* image of NAME (no hand label): its box mask refined by the model's
  probability map with a :class:`~bss.hybrid.refine.RefineRule`,
* every image of ``NAME_BASELINE`` with its exact (hand-drawn) mask.

Images of ``NAME_EVAL`` and ``NAME_TEST`` never enter an ``H<n>`` (checked explicitly, recorded
in the manifest), and a checkpoint trained on EVAL or TEST is refused. Images are hard-linked
where the filesystem allows (copied otherwise). Each refined image is first written on its own into
the work folder ``.<NAME>_H<n>.partial/`` (:mod:`bss.hybrid.partial`), so a killed run resumes
where it stopped; ``H<n>`` is then assembled under a temporary name and renamed at the end; an
existing ``H<n>`` is replaced only with ``overwrite``. With ``address``, the images are refined by
Ray actors on a cluster's nodes (:mod:`bss.hybrid.distributed`). When the source
keeps ``truth/`` masks, the label quality of the boxes and of the refined masks is measured
(:mod:`bss.hybrid.label_quality`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bss.data.io import atomic_folder, file_sha256, link_or_copy, read_mask
from bss.data.layout import Sample, SourceDataset, list_samples, resolve_dataset
from bss.data.splits import split_stems
from bss.environment import available_cpus, deterministic_inference
from bss.errors import BSSError, DatasetError
from bss.hybrid.label_quality import LabelQuality, truth_files
from bss.hybrid.partial import PartialFolder, refinement_key
from bss.hybrid.refine import RefineRule, changed_fraction, refine
from bss.inference import ImageFolderDataset, Predictor
from bss.metrics import mask_counts

MANIFEST_VERSION = 1
WRITER_THREADS: int | None = None  # None: writer_threads() decides


def writer_threads() -> int:
    """Threads that refine and write masks beside the forward passes (zlib, numpy and OpenCV
    release the GIL): none on a machine of 2 cores or fewer, where they would only take cores
    from the model's own threads, else 2."""
    if WRITER_THREADS is not None:
        return int(WRITER_THREADS)
    return 0 if (os.cpu_count() or 1) <= 2 else 2


@dataclass
class HybridResult:
    path: Path
    number: int
    manifest: dict
    label_quality: dict | None
    refined: int = 0  # box-only images refined by this call
    resumed: int = 0  # box-only images a killed earlier run had refined (taken from its work folder)
    discarded: int = 0  # images of an earlier run with another checkpoint/rule/settings, deleted
    nodes: list[str] | None = None  # the Ray nodes that refined (None: this process)


def _hybrid_pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name) + r"_H(\d+)")


def next_number(dataset: str | Path, data_root: str | Path = "datasets") -> int:
    """1 + the highest n of an existing ``<dataset>_H<n>`` beside the dataset (1 when there is none)."""
    root = resolve_dataset(dataset, data_root)
    pattern = _hybrid_pattern(root.name)
    used = [int(m.group(1)) for p in root.parent.iterdir() if p.is_dir() and (m := pattern.fullmatch(p.name))]
    return max(used, default=0) + 1


def hybrid_name(dataset: str, number: int) -> str:
    return f"{dataset}_H{number}"


def _splits(source: SourceDataset) -> tuple[list[Sample], dict[str, set[str]]]:
    """BASELINE samples (exact masks) and the stems of EVAL and TEST; a missing split is an error."""
    folders = {split: source.root.parent / f"{source.name}_{split}" for split in ("BASELINE", "EVAL", "TEST")}
    missing = [str(p) for p in folders.values() if not p.is_dir()]
    if missing:
        raise DatasetError(
            f"{', '.join(missing)} not found: the hand-labelled split is needed to build a hybrid dataset; run drivers/preprocess.py --dataset {source.name} first."
        )
    baseline = list_samples(folders["BASELINE"])
    held_out = {split: split_stems(folders[split]) for split in ("EVAL", "TEST")}
    overlap = sorted({s.stem for s in baseline} & (held_out["EVAL"] | held_out["TEST"]))
    if overlap:
        raise DatasetError(
            f"{folders['BASELINE']}: image {overlap[0]!r} is also in EVAL or TEST; the split is inconsistent, rerun drivers/preprocess.py --dataset {source.name} --overwrite."
        )
    return baseline, held_out


def _check_teacher(predictor: Predictor, source: SourceDataset, checkpoint: Path) -> None:
    trained_on = Path(str(predictor.config.train_dataset)).name
    for split in ("EVAL", "TEST"):
        if trained_on == f"{source.name}_{split}":
            raise BSSError(
                f"{checkpoint}: the model was trained on {trained_on}; its predictions would leak {split} into the hybrid dataset. Use a model trained on BASELINE or a hybrid dataset."
            )


def _first_box(samples: list[Sample]) -> bool:
    """Whether any box mask holds a box (stops at the first one found)."""
    return any(read_mask(sample.mask).any() for sample in samples)


@dataclass
class _Plan:
    """What one ``H<n>`` is made of and where it goes (checked before any model is loaded)."""

    source: SourceDataset
    baseline: list[Sample]
    held_out: dict[str, set[str]]
    to_refine: list[Sample]
    number: int
    target: Path


def _plan(dataset: str, data_root: str | Path, number: int | None, overwrite: bool) -> _Plan:
    source = SourceDataset.open(dataset, data_root)  # no masks/ folder -> DatasetError
    baseline, held_out = _splits(source)
    excluded = held_out["EVAL"] | held_out["TEST"] | {s.stem for s in baseline}
    to_refine = [s for s in source.box_only() if s.stem not in excluded]
    if not to_refine:
        raise DatasetError(f"{source.root}: no box-only image to refine (every image has a hand label or is in a split); nothing to build.")
    if not _first_box(to_refine):
        raise DatasetError(f"{source.root / 'masks'}: no box-only image has a box (every mask is empty); a hybrid dataset refines box masks.")
    if number is None:
        number = next_number(source.root, data_root)
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 1:
        raise BSSError(f"hybrid number must be a positive integer, got {number!r}.")
    target = source.root.parent / hybrid_name(source.name, int(number))
    if target.exists() and not overwrite:
        raise BSSError(
            f"{target} already exists; pass --overwrite to replace it, or leave out --number to use the next free one ({next_number(source.root, data_root)})."
        )
    return _Plan(source, baseline, held_out, to_refine, int(number), target)


def _refine_one(
    sample: Sample,
    box: np.ndarray,
    truth: np.ndarray | None,
    prob: np.ndarray,
    rgb: np.ndarray | None,
    rule: RefineRule,
    truth_path: Path | None,
    partial: PartialFolder,
) -> dict:
    """Refine one image and write it into the work folder; its row (manifest entry and label-quality counts, None without a truth)."""
    if box.shape != prob.shape:
        raise DatasetError(f"{sample.mask}: mask is {box.shape[1]}x{box.shape[0]} but its image {sample.image.name} is {prob.shape[1]}x{prob.shape[0]}.")
    if truth is not None and truth.shape != box.shape:
        raise DatasetError(f"{truth_path}: truth mask is {truth.shape[1]}x{truth.shape[0]} but its image {sample.image.name} is {box.shape[1]}x{box.shape[0]}.")
    refined = refine(prob, box, rule, image=rgb)
    entry = {
        "image": sample.image.name,
        "origin": "refined",
        "changed_fraction": round(changed_fraction(box, refined.mask), 5),
        "boxes": [b.to_dict() for b in refined.boxes],
    }
    counts = [[int(v) for v in mask_counts(box, truth)], [int(v) for v in mask_counts(refined.mask, truth)]] if truth is not None else None
    row = {"entry": entry, "counts": counts}
    partial.write(sample.stem, refined.mask, refined.soft, row)
    return row


def refine_samples(
    predictor: Predictor,
    samples: list[Sample],
    truths: dict[str, Path],
    rule: RefineRule,
    partial: PartialFolder,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str = "refining",
) -> int:
    """Predict every sample, refine it and write it into ``partial`` (each image on its own, so a
    kill keeps what was done, its manifest row with it); how many were refined. No per-image
    result is kept here (the rows are read back from ``partial`` when ``H<n>`` is assembled, and
    a Ray chunk returns only its count). Writer threads refine and write while the model
    runs (where there are cores to spare); the queue is bounded so memory stays flat (at most ~2
    batches of probability maps wait). The caller fixes torch's threads
    (:func:`~bss.environment.deterministic_inference`). Runs in the driver, or in a Ray worker
    (:mod:`bss.hybrid.distributed`) on a chunk of the images."""
    if not samples:
        return 0
    images = ImageFolderDataset(
        [s.image for s in samples],
        predictor.input_size,
        extras={"box": [s.mask for s in samples], "truth": [truths.get(s.stem) for s in samples]},
        keep_image=rule.needs_image,  # e.g. the colour refinement (grabcut) needs the image itself
    )
    done = 0
    pending: deque = deque()
    threads = writer_threads()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="hybrid-writer") as pool:
        try:
            for item, prob in predictor.predict(images, batch_size, num_workers, progress, desc=desc):
                sample = samples[item["index"]]
                args = (sample, item["box"], item["truth"], prob, item.get("rgb"), rule, truths.get(sample.stem), partial)
                if threads == 0:
                    _refine_one(*args)
                    done += 1
                    continue
                pending.append(pool.submit(_refine_one, *args))
                while len(pending) > 2 * max(1, batch_size):
                    pending.popleft().result()
                    done += 1
            while pending:
                pending.popleft().result()
                done += 1
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return done


class _Assembly:
    """Writes one ``H<n>`` into its temporary folder: BASELINE's files as they are, then every
    refined image from the work folder, with the manifest's rows and label quality in the order
    of the images."""

    def __init__(self, folder: Path, rule: RefineRule, partial: PartialFolder):
        self.folder, self.partial = folder, partial
        self.quality = LabelQuality()
        self.entries: list[dict] = []
        self.boxes = self.fallbacks = 0
        self.soft = rule.soft
        for sub in ("images", "masks") + (("soft",) if rule.soft else ()):
            (folder / sub).mkdir()

    def copy_baseline(self, baseline: list[Sample]) -> None:
        for sample in baseline:
            link_or_copy(sample.image, self.folder / "images" / sample.image.name)
            link_or_copy(sample.mask, self.folder / "masks" / sample.mask.name)
            self.entries.append({"image": sample.image.name, "origin": "baseline"})

    def add_refined(self, sample: Sample) -> None:
        row = self.partial.row(sample.stem)
        link_or_copy(self.partial.mask(sample.stem), self.folder / "masks" / f"{sample.stem}.png")
        if self.soft:
            link_or_copy(self.partial.soft(sample.stem), self.folder / "soft" / f"{sample.stem}.png")
        link_or_copy(sample.image, self.folder / "images" / sample.image.name)
        entry = row["entry"]
        if row["counts"] is not None:
            entry.update({k: round(v, 4) for k, v in self.quality.add_counts(*row["counts"]).items()})
        self.boxes += len(entry["boxes"])
        self.fallbacks += sum(b["fallback"] for b in entry["boxes"])
        self.entries.append(entry)


def _manifest(plan: _Plan, predictor: Predictor, checkpoint: Path, sha256: str, rule: RefineRule, writer: _Assembly, start: float) -> dict:
    held_out = plan.held_out["EVAL"] | plan.held_out["TEST"]
    config = predictor.config
    return {
        "format_version": MANIFEST_VERSION,
        "name": plan.target.name,
        "number": plan.number,
        "source": str(plan.source.root.resolve()),
        "checkpoint": {
            "path": str(checkpoint.resolve()),
            "sha256": sha256,
            "model": {"name": config.model.name, "args": config.model.args},
            "image_size": [config.height, config.width],
            "train_dataset": config.train_dataset,
            "evaluation_dataset": config.evaluation_dataset,
        },
        "inference": predictor.describe(),
        "rule": {**rule.to_dict(), "description": rule.explain()},
        "counts": {
            "images": len(writer.entries),
            "refined": len(writer.entries) - len(plan.baseline),
            "baseline": len(plan.baseline),
            "boxes": writer.boxes,
            "fallback_boxes": writer.fallbacks,
            "excluded_eval": len(plan.held_out["EVAL"]),
            "excluded_test": len(plan.held_out["TEST"]),
        },
        "leakage": {
            "excluded_splits": [f"{plan.source.name}_EVAL", f"{plan.source.name}_TEST"],
            "excluded_images": sorted(held_out),
            "eval_or_test_images_included": 0,
        },
        "label_quality": writer.quality.result(),
        "seconds": round(time.perf_counter() - start, 2),
        "images": writer.entries,
    }


def make_hybrid(
    dataset: str,
    checkpoint: str | Path,
    data_root: str | Path = "datasets",
    number: int | None = None,
    rule: RefineRule | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    *,
    device: str = "auto",
    tta: bool = False,
    input_size: tuple[int, int] | None = None,
    threads: int | None = None,
    address: str | None = None,
) -> HybridResult:
    """Write ``<dataset>_H<number>`` beside the dataset and return where, with its manifest.

    Deterministic: the same checkpoint, rule, images and ``threads`` (torch's threads for the
    forward passes; default every CPU of the process, whatever the caller set) write the same
    bytes, with any ``batch_size``, ``num_workers``, writer threads or OpenCV state
    (``tests/test_hybrid.py``). The manifest records the thread count.

    Resumable: each refined image is written on its own into ``.<NAME>_H<n>.partial/``
    (:mod:`bss.hybrid.partial`); a killed run, rerun with the same arguments, refines only the
    images missing there and writes the same ``H<n>`` as an uninterrupted run.

    ``address``: refine on the Ray cluster there (``"auto"``, ``host:port``; a Ray this process
    already joined is reused) by one actor per free CPU, or per GPU where the cluster has GPUs
    (:mod:`bss.hybrid.distributed`); each uses ``threads`` torch threads, as the local path does,
    so the masks are the same bytes. None (the default): in this process, no Ray."""
    start = time.perf_counter()
    rule = rule or RefineRule()
    checkpoint = Path(checkpoint)
    plan = _plan(dataset, data_root, number, overwrite)
    predictor = Predictor.from_checkpoint(checkpoint, device=device, input_size=input_size, tta=tta)  # bad weights / input size -> BSSError
    _check_teacher(predictor, plan.source, checkpoint)
    count = max(1, int(threads)) if threads is not None else available_cpus()
    cluster = None
    if address:
        from bss.hybrid import distributed

        cluster = distributed.connect(address, device)
    try:
        result = _build(plan, predictor, checkpoint, rule, overwrite, batch_size, num_workers, progress, tta, input_size, count, cluster, start)
    finally:
        if cluster is not None:
            cluster.close()
    return result


def _build(plan, predictor, checkpoint, rule, overwrite, batch_size, num_workers, progress, tta, input_size, count, cluster, start) -> HybridResult:
    """make_hybrid once the plan, the teacher and (with an address) the cluster are there."""
    device_type = cluster.device_type if cluster is not None else predictor.device.type
    sha256 = file_sha256(checkpoint)
    partial = PartialFolder.open(plan.target, refinement_key(sha256, rule.to_dict(), predictor.input_size, tta, device_type, count))
    try:
        done = partial.done()
        missing = [s for s in plan.to_refine if s.stem not in done]
        truths = truth_files(plan.source.truth_dir)
        desc = f"refining {plan.source.name}"
        nodes = None
        if cluster is not None:
            nodes = cluster.refine(checkpoint, missing, truths, rule, partial, batch_size, count, tta, input_size, progress, desc)
        else:
            with deterministic_inference(count):
                refine_samples(predictor, missing, truths, rule, partial, batch_size, num_workers, progress, desc)
        lost = sorted({s.stem for s in plan.to_refine} - partial.done())
        if lost:  # a worker that wrote elsewhere (not the shared folder) would end here
            raise BSSError(
                f"{partial.path}: no refined mask for {lost[0]!r} ({len(lost)} missing) after refinement; is {partial.path.parent} on storage every node mounts?"
            )
        predictor.threads = count
        with atomic_folder(plan.target, overwrite=overwrite) as tmp:
            writer = _Assembly(tmp, rule, partial)
            writer.copy_baseline(plan.baseline)
            for sample in plan.to_refine:
                writer.add_refined(sample)
            leaked = sorted({p.stem for p in (tmp / "images").iterdir()} & (plan.held_out["EVAL"] | plan.held_out["TEST"]))
            if leaked:  # cannot happen by construction; checked anyway before the folder becomes visible
                raise BSSError(f"internal error: EVAL/TEST image {leaked[0]!r} would enter {plan.target.name}; nothing written.")
            manifest = _manifest(plan, predictor, checkpoint, sha256, rule, writer, start)
            if cluster is not None:
                manifest["inference"].update(cluster.describe())
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            if manifest["label_quality"] is not None:
                (tmp / "label_quality.json").write_text(json.dumps(manifest["label_quality"], indent=2) + "\n")
    except BaseException:
        partial.release()  # the refined images stay for the next run
        raise
    partial.remove()
    return HybridResult(
        path=plan.target,
        number=plan.number,
        manifest=manifest,
        label_quality=manifest["label_quality"],
        refined=len(missing),
        resumed=len(plan.to_refine) - len(missing),
        discarded=partial.discarded,
        nodes=nodes,
    )


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{path} not found: {folder} is not a hybrid dataset made by make_hybrid.")
    return json.loads(path.read_text())


__all__ = ["HybridResult", "make_hybrid", "next_number", "hybrid_name", "read_manifest"]
