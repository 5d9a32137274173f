"""Training sets to compare the loop against, on the loop's own split (hard links, never copies).

For a source dataset NAME with its splits NAME_BASELINE/EVAL/TEST, the training images are
BASELINE plus every box-only image (EVAL and TEST never enter, as in NAME_H<n>):

* ``NAME_REF_boxes``          every training image with its box mask (detection labels only)
* ``NAME_REF_baseline_boxes`` BASELINE's exact masks + the boxes of the box-only images (the naive use)
* ``NAME_REF_full``           every training image with its true mask (``truth/``): the ceiling

BASELINE alone is ``NAME_BASELINE`` itself. ``full`` needs ``truth/`` (synthetic data, neu_seg).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bss.data.io import link_or_copy
from bss.data.layout import SourceDataset, list_samples

KINDS = ("boxes", "baseline_boxes", "full")


def reference_sets(dataset: str, data_root: str | Path, kinds=KINDS) -> dict[str, str]:
    """Make (or re-make) the reference training sets; returns kind -> dataset name."""
    root = Path(data_root)
    source = SourceDataset.open(dataset, root)
    baseline = {s.stem: s for s in list_samples(root / f"{dataset}_BASELINE")}
    held_out = {p.stem for split in ("EVAL", "TEST") for p in (root / f"{dataset}_{split}" / "images").iterdir()}
    truth = source.truth_dir
    train = [s for s in source.samples if s.stem not in held_out]
    names = {}
    for kind in kinds:
        if kind == "full" and truth is None:
            continue
        name = f"{dataset}_REF_{kind}"
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        for s in train:
            if kind == "full":
                mask = next(truth.glob(f"{s.stem}.*"))
            elif kind == "baseline_boxes" and s.stem in baseline:
                mask = baseline[s.stem].mask
            elif kind == "baseline_boxes" or s.stem not in baseline or kind == "boxes":
                mask = s.mask
            link_or_copy(s.image, folder / "images" / s.image.name)
            link_or_copy(mask, folder / "masks" / f"{s.stem}{mask.suffix}")
        names[kind] = name
    return names


if __name__ == "__main__":
    import sys

    print(reference_sets(sys.argv[1], sys.argv[2]))
