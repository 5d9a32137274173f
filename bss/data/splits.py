"""Split the hand-labelled subset into ``<name>_BASELINE`` (train), ``<name>_EVAL`` (model
selection) and ``<name>_TEST`` (held out: only ever reported).

Masks are drawn exactly from the VIA polygons. The split is deterministic by seed (images are
shuffled by a seeded generator over their sorted names), written atomically, and an existing
split is never replaced unless ``overwrite`` is set.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bss.data.io import atomic_folder, image_size, link_or_copy, write_mask
from bss.data.layout import SourceDataset
from bss.data.via import rasterize
from bss.errors import BSSError, DatasetError

SPLITS = ("BASELINE", "EVAL", "TEST")


def split_stems(folder: Path) -> set[str]:
    """Stems of a split's images: its ``images/`` folder and its manifest's list, together."""
    stems = {p.stem for p in (folder / "images").iterdir() if not p.name.startswith(".")} if (folder / "images").is_dir() else set()
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            stems |= {Path(n).stem for n in json.loads(manifest.read_text()).get("images", [])}
        except (json.JSONDecodeError, AttributeError) as exc:
            raise DatasetError(f"{manifest}: unreadable split manifest ({exc}); rerun drivers/preprocess.py --overwrite.") from None
    return stems


def split_counts(n: int, fractions: tuple[float, float, float], labels: Path | None = None) -> tuple[int, int, int]:
    """How many images go to BASELINE, EVAL and TEST; EVAL and TEST get at least one each.
    ``labels``: the dataset's labels.csv, named in the errors."""
    where = f"{labels.parent.name}: " if labels is not None else ""
    source = f" in {labels}" if labels is not None else ""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not abs(sum(fractions) - 1.0) < 1e-6:
        raise BSSError(f"split fractions must be three non-negative numbers summing to 1 (BASELINE EVAL TEST), got {list(fractions)}.")
    if n < 3:
        raise DatasetError(f"{where}only {n} hand-labelled image(s){source}; at least 3 are needed for BASELINE, EVAL and TEST. Label more in VIA.")
    n_eval = max(1, round(n * fractions[1]))
    n_test = max(1, round(n * fractions[2]))
    n_train = n - n_eval - n_test
    if n_train < 1:
        raise DatasetError(f"{where}{n} hand-labelled images{source} leave none for BASELINE with fractions {list(fractions)}.")
    return n_train, n_eval, n_test


def make_splits(
    dataset: str, data_root: str | Path = "datasets", fractions=(0.6, 0.2, 0.2), seed: int = 0, overwrite: bool = False, progress: bool = True
) -> dict[str, int]:
    source = SourceDataset.open(dataset, data_root)
    root = source.root.parent
    targets = {split: root / f"{source.name}_{split}" for split in SPLITS}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise BSSError(f"split already exists: {', '.join(existing)}. Pass --overwrite to redraw it.")
    source.check_files(progress)  # every image and box mask decodes (a truncated JPEG fails here, by name)
    labelled = sorted(source.hand_labelled(), key=lambda s: s.image.name)
    counts = split_counts(len(labelled), tuple(fractions), source.labels.path)
    order = np.random.default_rng(seed).permutation(len(labelled))
    bounds = np.cumsum((0,) + counts)
    members = {split: [labelled[i] for i in order[bounds[k] : bounds[k + 1]]] for k, split in enumerate(SPLITS)}
    # draw every mask before writing anything, so a bad polygon leaves no output
    masks = {}
    for sample in tqdm(labelled, desc="drawing hand masks", disable=not progress, leave=False):
        h, w = image_size(sample.image)
        masks[sample.stem] = rasterize(source.labels.regions[sample.image.name], h, w, sample.image.name)
    with contextlib.ExitStack() as stack:
        for split in SPLITS:
            tmp = stack.enter_context(atomic_folder(targets[split], overwrite=overwrite))
            (tmp / "images").mkdir()
            (tmp / "masks").mkdir()
            for sample in members[split]:
                link_or_copy(sample.image, tmp / "images" / sample.image.name)
                write_mask(tmp / "masks" / f"{sample.stem}.png", masks[sample.stem])
            manifest = {
                "source": str(source.root),
                "split": split,
                "seed": seed,
                "fractions": list(fractions),
                "images": sorted(s.image.name for s in members[split]),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {split: len(members[split]) for split in SPLITS}
