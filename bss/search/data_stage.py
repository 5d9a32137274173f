"""The loop's first stage, before any training: the source dataset (generated when it is a
missing synthetic class), its splits, its fingerprint, its box-only images, and the EVAL boxes'
own figures. Everything later reads what this stage recorded (:class:`DataRecord`,
:class:`BoxScores`), never the folders again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from bss.errors import BSSError, DatasetError
from bss.search.record import BoxScores, DataRecord
from bss.search.settings import LoopSettings

# The embedded default: a synthetic dataset generated when --dataset names a defect class that
# the data root does not hold. CPU: small enough for the whole loop in minutes on 2 cores.
SYNTHETIC = {
    "cpu": {"count": 300, "hand_labelled": 120, "width": 256, "height": 192},
    "gpu": {"count": 1000, "hand_labelled": 200, "width": 256, "height": 192},
}


def count_images(folder: Path) -> int:
    images = Path(folder) / "images"
    return sum(1 for _ in images.iterdir()) if images.is_dir() else 0


def generate_default(settings: LoopSettings, cpus: int, say: Callable[[str], None]) -> None:
    """The synthetic class ``settings.dataset`` (the embedded default), written under the data root."""
    from bss.data.synthetic import SynthConfig, generate_dataset

    dataset, root = settings.dataset, Path(settings.data_root)
    spec = SYNTHETIC[settings.device_kind]
    say(
        f"dataset {root / dataset} not found: generating the synthetic '{dataset}' dataset, the embedded default "
        f"({spec['count']} images {spec['width']}x{spec['height']}, {spec['hand_labelled']} hand-labelled, seed {settings.seed}) ..."
    )
    start = time.perf_counter()
    report = generate_dataset(
        SynthConfig(dataset, dataset, spec["count"], spec["hand_labelled"], spec["width"], spec["height"], settings.seed), root, workers=max(1, min(2, cpus))
    )
    say(f"  wrote {report.folder} in {time.perf_counter() - start:.0f} s")


def ensure_splits(settings: LoopSettings, check_files: bool, progress: bool, say: Callable[[str], None]) -> bool:
    """NAME_BASELINE/EVAL/TEST, drawn when none exists (True: drawn now); incomplete ones are an error."""
    from bss.data.layout import SourceDataset
    from bss.data.splits import SPLITS, make_splits

    dataset, root = settings.dataset, Path(settings.data_root)
    splits = {s: root / f"{dataset}_{s}" for s in SPLITS}
    present = [s for s, p in splits.items() if p.is_dir()]
    if not present:  # make_splits checks the files itself
        counts = make_splits(dataset, root, tuple(settings.split_fractions), settings.seed, progress=False)
        say(f"made the splits of {dataset}: " + ", ".join(f"{dataset}_{s} {n}" for s, n in counts.items()) + f" images (seed {settings.seed})")
        return True
    if len(present) < len(SPLITS):
        missing = [str(splits[s]) for s in SPLITS if s not in present]
        raise DatasetError(
            f"the splits of {dataset} are incomplete: {', '.join(missing)} missing. Remove the other {dataset}_BASELINE/EVAL/TEST folders to redraw them, or run drivers/preprocess.py."
        )
    if check_files:
        SourceDataset.open(dataset, root).check_files(progress)
    return False


def prepare_data(settings: LoopSettings, cpus: int, progress: bool, say: Callable[[str], None], check_files: bool = True) -> DataRecord:
    """The source dataset and its splits, checked; ``check_files`` decodes every image and box
    mask once (a resumed run checked them at its start)."""
    from bss.data.layout import SourceDataset
    from bss.data.splits import SPLITS
    from bss.data.synthetic import DEFECTS
    from bss.search.fingerprint import fingerprint
    from bss.search.plan import make_plan

    dataset, root = settings.dataset, Path(settings.data_root)
    if not dataset or dataset != Path(dataset).name:
        raise BSSError(f"--dataset {dataset!r} must be a dataset name under --data-root (a folder name, no '/').")
    generated = not (root / dataset / "images").is_dir()
    if generated:
        if dataset not in DEFECTS:
            from bss.data.layout import resolve_dataset

            resolve_dataset(dataset, root)  # raises DatasetError listing what is there
        generate_default(settings, cpus, say)
    splits_made = ensure_splits(settings, check_files and not generated, progress, say)
    source = SourceDataset.open(dataset, root)
    box_only = source.box_only()
    if not box_only:
        say(f"  {dataset} has no box-only image (every image is hand-labelled): nothing to refine, so the loop runs one plain search (iteration 0).")
    counts = {s: count_images(root / f"{dataset}_{s}") for s in SPLITS}
    boxes = [s.mask for s in (box_only or source.samples) if s.mask is not None]  # every box where none is box-only
    found = fingerprint(root / dataset, hand_masks=root / f"{dataset}_BASELINE" / "masks", box_masks=boxes)
    plan = make_plan(found, settings.device_kind, settings.resolution, settings.patch_size)
    return DataRecord(generated, splits_made, counts, found, len(box_only), plan)


def measure_boxes(settings: LoopSettings) -> BoxScores:
    """The EVAL box masks' own IoU/Dice/Recall/Precision against the exact masks (once per run)."""
    from bss.hybrid.teacher_quality import box_quality

    scores = box_quality(settings.dataset, settings.data_root)
    return BoxScores(scores["iou"], scores["dice"], scores["recall"], scores["precision"])
