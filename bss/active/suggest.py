"""Rank the box-only images of a dataset by how much a hand label would teach, and pre-annotate
the chosen ones for VIA.

    result = suggest("obstacle", "runs/obstacle/best.pt", count=40)   # -> suggestions/obstacle/

The teacher predicts every *box-only* image (a ``labels.csv`` row with ``region_count`` 0)
exactly as :func:`bss.hybrid.make.make_hybrid` would, and the refinement rule turns box +
probability into the refined mask the next ``H<n>`` would hold. From these, every score of
:mod:`bss.active.scores` is computed; the images are chosen by one of them, with near-duplicate
frames skipped (:mod:`bss.active.select`). The rule is the one the teacher's EVAL images choose
(:func:`bss.hybrid.teacher_quality.measure_teacher`, as the loop does) when ``NAME_EVAL`` exists,
else the default rule.

The output folder (written atomically; an existing one is replaced only with ``overwrite``)::

    via_project.json   VIA 2.0.10 project: the chosen images in rank order, each with the refined
                       mask as simplified polygons (Project > Load in VIA, then correct and export CSV)
    ranking.csv        every box-only image: rank (chosen ones), score values, reason
    suggestions.json   checkpoint, rule, score, counts, and the same table
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bss.active.polygons import DEFAULT_EPSILON, DEFAULT_MAX_POINTS, mask_to_polygons
from bss.active.scores import BASE_SCORES, DEFAULT_SCORE, ImageScores, check_score, image_scores, reason, score_table
from bss.active.select import DEFAULT_NEAR, choose, signature
from bss.active.via_project import build_project, write_project
from bss.data.io import atomic_folder, file_sha256
from bss.data.layout import SourceDataset
from bss.errors import BSSError, DatasetError
from bss.hybrid.refine import RefineRule, refine


@dataclass
class Pool:
    """The box-only images of a dataset as the teacher sees them (pool order = the dataset's)."""

    dataset: str
    names: list[str]
    sizes: list[int]  # bytes, as VIA keys images
    shapes: list[tuple[int, int]]
    scores: list[ImageScores]
    refined: list[np.ndarray]  # packed bits of each refined mask (np.packbits of the flat mask)
    signatures: list[np.ndarray]
    rule: RefineRule
    rule_source: str

    def refined_mask(self, index: int) -> np.ndarray:
        h, w = self.shapes[index]
        return np.unpackbits(self.refined[index], count=h * w).reshape(h, w)

    def table(self, seed: int = 0) -> dict[str, np.ndarray]:
        return score_table(self.scores, seed)


@dataclass
class Suggestion:
    out: Path | None
    pool: Pool
    score: str
    chosen: list[int]  # pool indices in rank order
    skipped: list[tuple[int, int, float]]  # near-duplicates passed over
    rows: list[dict] = field(default_factory=list)
    polygons: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0


def teacher_rule(checkpoint: str | Path, dataset: str, data_root: str | Path, device: str = "auto") -> tuple[RefineRule, str]:
    """The rule the teacher's EVAL images choose (as the loop does), or the default without EVAL."""
    root = Path(data_root)
    name = Path(dataset).name
    if not (root / f"{name}_EVAL" / "images").is_dir():
        return RefineRule(), f"default rule ({name}_EVAL not found, so no rule could be measured)"
    from bss.hybrid.teacher_quality import measure_teacher

    quality = measure_teacher(checkpoint, dataset, root, device=device)
    return quality.best.rule, f"chosen on {name}_EVAL (EVAL label IoU {quality.label_iou:.3f}; boxes {quality.box_iou_pixels:.3f})"


def score_pool(
    dataset: str,
    checkpoint: str | Path,
    data_root: str | Path = "datasets",
    rule: RefineRule | None = None,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = False,
) -> Pool:
    """Predict and refine every box-only image of ``dataset``; compute its scores and signature."""
    from bss.inference import ImageFolderDataset, Predictor

    source = SourceDataset.open(dataset, data_root)
    samples = source.box_only()
    if not samples:
        raise DatasetError(f"{source.root / 'labels.csv'}: every image already has a hand label; there is nothing left to suggest.")
    if rule is None:
        rule, rule_source = teacher_rule(checkpoint, source.name, source.root.parent, device)
    else:
        rule_source = "given"
    predictor = Predictor.from_checkpoint(checkpoint, device=device)  # not a checkpoint -> BSSError
    data = ImageFolderDataset([s.image for s in samples], predictor.input_size, extras={"box": [s.mask for s in samples]}, keep_image=True)
    pool = Pool(source.name, [], [], [], [], [], [], rule, rule_source)
    for item, prob in predictor.predict(data, batch_size, 0, progress, desc=f"scoring {source.name}"):
        sample = samples[item["index"]]
        box = item["box"]
        if box.shape != prob.shape:
            raise DatasetError(f"{sample.mask}: mask is {box.shape[1]}x{box.shape[0]} but its image {sample.image.name} is {prob.shape[1]}x{prob.shape[0]}.")
        refined = refine(prob, box, rule, image=item["rgb"])
        pool.names.append(sample.image.name)
        pool.sizes.append(sample.image.stat().st_size)
        pool.shapes.append(box.shape)
        pool.scores.append(image_scores(sample.image.name, prob, box, refined, rule.min_fill))
        pool.refined.append(np.packbits(refined.mask.reshape(-1)))
        pool.signatures.append(signature(item["rgb"]))
    return pool


def rank(pool: Pool, count: int, score: str = DEFAULT_SCORE, near: float = DEFAULT_NEAR, seed: int = 0) -> Suggestion:
    """Choose ``count`` images of the pool by ``score`` (images without a box are never chosen)."""
    check_score(score)
    if isinstance(count, bool) or int(count) < 1:
        raise BSSError(f"--count must be a positive number of images, got {count!r}.")
    table = pool.table(seed)
    eligible = np.array([s.box_pixels > 0 for s in pool.scores], dtype=bool)
    picks, skipped = choose(table[score], int(count), pool.signatures, near, eligible)
    chosen = [p.index for p in picks]
    rank_of = {p.index: p.rank for p in picks}
    look_alike = {i: (j, d) for i, j, d in skipped}
    rows = []
    order = chosen + sorted((i for i in range(len(pool.names)) if i not in rank_of), key=lambda i: (-table[score][i], i))
    for i in order:
        s = pool.scores[i]
        if i in rank_of:
            why = reason(s, score, float(table[score][i]), rank_of[i], pool.rule.min_fill)
        elif i in look_alike:
            j, d = look_alike[i]
            why = f"not chosen: near-duplicate of {pool.names[j]} (signature distance {d:.3f} < {near:g})"
        elif not eligible[i]:
            why = "not chosen: no box in the image"
        else:
            why = f"not chosen: {score} {table[score][i]:.3g} below the {count} chosen"
        rows.append(
            {
                "rank": rank_of.get(i, ""),
                "filename": pool.names[i],
                "file_size": pool.sizes[i],
                "score": score,
                "value": round(float(table[score][i]), 5),
                **{k: round(float(table[k][i]), 5) for k in BASE_SCORES + ("combined",)},
                "boxes": s.boxes,
                "fallback_boxes": s.fallbacks,
                "reason": why,
            }
        )
    return Suggestion(None, pool, score, chosen, skipped, rows)


def suggest(
    dataset: str,
    checkpoint: str | Path,
    count: int,
    data_root: str | Path = "datasets",
    out: str | Path | None = None,
    score: str = DEFAULT_SCORE,
    near: float = DEFAULT_NEAR,
    seed: int = 0,
    rule: RefineRule | None = None,
    epsilon: float = DEFAULT_EPSILON,
    max_points: int = DEFAULT_MAX_POINTS,
    overwrite: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
) -> Suggestion:
    """Rank, choose ``count`` images and write the VIA project, ranking CSV and manifest to ``out``
    (default ``suggestions/<dataset>``)."""
    start = time.perf_counter()
    check_score(score)
    if isinstance(count, bool) or int(count) < 1:
        raise BSSError(f"--count must be a positive number of images, got {count!r}.")
    source = SourceDataset.open(dataset, data_root)
    out = Path(out) if out is not None else Path("suggestions") / source.name
    if out.exists() and not overwrite:
        raise BSSError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    pool = score_pool(dataset, checkpoint, data_root, rule, batch_size, device, progress)
    result = rank(pool, count, score, near, seed)
    entries = _chosen_polygons(pool, result, epsilon, max_points)
    images_dir = str((source.root / "images").resolve()) + "/"
    project = build_project(entries, f"bss_{source.name}_suggestions", images_dir)
    manifest = {
        "dataset": source.name,
        "source": str(source.root.resolve()),
        "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": file_sha256(checkpoint)},
        "rule": pool.rule.to_dict(),
        "rule_source": pool.rule_source,
        "score": score,
        "near": near,
        "seed": seed,
        "polygons": {"epsilon": epsilon, "max_points": max_points},
        "counts": {
            "box_only": len(pool.names),
            "chosen": len(result.chosen),
            "near_duplicates_skipped": len(result.skipped),
            "regions": sum(len(e[2]) for e in entries),
        },
        "ranking": result.rows,
    }
    _write_folder(out, overwrite, project, manifest, result, start)
    return result


def _chosen_polygons(pool: Pool, result: Suggestion, epsilon: float, max_points: int) -> list[tuple[str, int, list]]:
    """(name, file size, polygons) of each chosen image: its refined mask drawn as VIA polygons
    (also kept in ``result.polygons``)."""
    entries = []
    for i in result.chosen:
        shapes = mask_to_polygons(pool.refined_mask(i), epsilon, max_points)
        result.polygons[pool.names[i]] = shapes
        entries.append((pool.names[i], pool.sizes[i], shapes))
    return entries


def _write_folder(out: Path, overwrite: bool, project: dict, manifest: dict, result: Suggestion, start: float) -> None:
    """The VIA project, the ranking CSV and the manifest, written to ``out`` atomically."""
    with atomic_folder(out, overwrite=overwrite) as tmp:
        write_project(tmp / "via_project.json", project)
        with (tmp / "ranking.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(result.rows[0]))
            writer.writeheader()
            writer.writerows(result.rows)
        result.seconds = round(time.perf_counter() - start, 2)
        manifest["seconds"] = result.seconds
        (tmp / "suggestions.json").write_text(json.dumps(manifest, indent=1) + "\n")
    result.out = out
