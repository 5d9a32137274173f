"""Put newly hand-labelled images into ``NAME_BASELINE``; ``NAME_EVAL`` and ``NAME_TEST`` stay as they are.

:func:`bss.data.splits.make_splits` draws the three splits once, from the hand labels of the
time; redrawing them (``--overwrite``) after more labels arrive would move images between
EVAL, TEST and BASELINE (an image a model was trained on could land in TEST, and no figure
would compare with the previous loop's). Images labelled after the split, i.e. hand-labelled
in ``labels.csv`` but in no split, belong to no split: the loop would neither train on them
(``NAME_BASELINE`` lacks them) nor refine their boxes (they are no longer box-only), so they
would be lost. :func:`add_to_baseline` adds them to ``NAME_BASELINE`` with the exact masks of
their regions; the folder is rewritten atomically (a temporary folder, then a rename), its
manifest lists them under ``added``. EVAL and TEST are never touched, so the next loop's
figures compare with the previous ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bss.data.io import atomic_folder, image_size, link_or_copy, write_mask
from bss.data.layout import SourceDataset, list_samples
from bss.data.splits import SPLITS, split_stems
from bss.data.via import rasterize
from bss.errors import DatasetError


def unsplit_labelled(dataset: str, data_root: str | Path = "datasets") -> tuple[SourceDataset, list, dict[str, Path]]:
    """The hand-labelled samples that are in no split, and the split folders (None if there are no splits yet)."""
    source = SourceDataset.open(dataset, data_root)
    folders = {s: source.root.parent / f"{source.name}_{s}" for s in SPLITS}
    present = [s for s, p in folders.items() if p.is_dir()]
    if not present:
        return source, [], {}
    if len(present) < len(SPLITS):
        missing = [str(folders[s]) for s in SPLITS if s not in present]
        raise DatasetError(
            f"the splits of {source.name} are incomplete: {', '.join(missing)} missing; run drivers/preprocess.py --dataset {source.name} --overwrite."
        )
    in_splits = set().union(*(split_stems(p) for p in folders.values()))
    return source, [s for s in source.hand_labelled() if s.stem not in in_splits], folders


def add_to_baseline(dataset: str, data_root: str | Path = "datasets") -> list[str]:
    """Add every hand-labelled image that is in no split to ``NAME_BASELINE``; return their file
    names (empty when there is nothing to add, or when there are no splits yet: preprocess then
    draws them from all the labels)."""
    source, new, folders = unsplit_labelled(dataset, data_root)
    if not new:
        return []
    target = folders["BASELINE"]
    masks = {}
    for sample in new:  # draw everything before writing anything
        h, w = image_size(sample.image)
        masks[sample.stem] = rasterize(source.labels.regions[sample.image.name], h, w, sample.image.name)
    existing = list_samples(target)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"source": str(source.root), "split": "BASELINE"}
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for sample in existing:
            link_or_copy(sample.image, tmp / "images" / sample.image.name)
            link_or_copy(sample.mask, tmp / "masks" / sample.mask.name)
        for sample in new:
            link_or_copy(sample.image, tmp / "images" / sample.image.name)
            write_mask(tmp / "masks" / f"{sample.stem}.png", masks[sample.stem])
        names = sorted(s.image.name for s in new)
        manifest["images"] = sorted(set(manifest.get("images", [s.image.name for s in existing])) | set(names))
        manifest.setdefault("added", []).append({"images": names, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return names
