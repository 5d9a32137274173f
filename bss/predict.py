"""Predict masks for a folder of new images with a trained checkpoint.

    result = predict_folder("runs/train/best.pt", "new_frames/", "predictions/")

writes, for every image (any size) of the folder::

    predictions/masks/<stem>.png          0/255, the image's own size
    predictions/overlays/<stem>.png       the image with the predicted mask tinted red
    predictions/probabilities/<stem>.png  8-bit probability (round(255 p)), with probabilities=True
    predictions/predictions.json          checkpoint, threshold, and per image its foreground fraction

Inference goes through :mod:`bss.inference` (the training preprocessing, batched, streamed).
The output folder is written under a temporary name and renamed at the end, so a corrupt image
or an interruption leaves nothing half written. With ``address`` the images are predicted on the
Ray cluster there (:mod:`bss.distributed`, as ``make_hybrid`` refines): chunks of images go to
one actor per free CPU (per GPU where the cluster has GPUs), each computing with the driver's
torch thread count and writing its files itself, each atomically, into the temporary folder (the
images folder, the checkpoint and ``out``'s parent must be on storage every node mounts); the
files are the same bytes as without ``address``. An existing non-empty ``out`` is refused unless
``overwrite``, and even then only a folder that holds a previous prediction is replaced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bss.data.io import atomic_folder, atomic_path, check_folder_path, is_image
from bss.errors import BSSError, DatasetError
from bss.inference import ImageFolderDataset, Predictor
from bss.visualization import PRED_COLOUR, tint

OUTPUT_ENTRIES = {"masks", "overlays", "probabilities", "predictions.json"}


@dataclass
class PredictResult:
    out: Path
    count: int
    seconds: float
    summary: dict


def list_images(folder: str | Path) -> list[Path]:
    """The images of a folder (not recursive), sorted; one clear error when there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"images folder {folder} not found.")
    if not folder.is_dir():
        raise DatasetError(f"--images {folder} is not a folder; pass the folder that holds the images.")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_image(path):
            continue
        if path.stem in images:
            raise DatasetError(f"{folder}: {images[path.stem].name} and {path.name} share the stem {path.stem!r}, so their masks would collide; rename one.")
        images[path.stem] = path
    if not images:
        raise DatasetError(f"{folder}: no images (jpg, jpeg, png, bmp, tif) to predict.")
    return list(images.values())


def check_out(out: Path, source: Path, overwrite: bool, foreign_entry: Callable[[Path], str | None] | None = None, what: str = "images folder") -> None:
    """Refuse an output folder that would hold the input (``source``, a folder or a file), that is
    a file, or that is not empty without ``overwrite``; with ``overwrite``, refuse one that holds
    anything ``foreign_entry(out)`` names (default: not a previous ``predict_folder`` output)."""
    source, resolved = source.resolve(), out.resolve()
    if resolved == source or resolved in source.parents:
        raise BSSError(f"--out {out} holds the {what} {source}; choose an output folder outside it.")
    check_folder_path(out, "--out")  # --out a file, or below one
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise BSSError(f"--out {out} is not empty; pass --overwrite to replace a previous prediction there, or choose another folder.")
        foreign = (foreign_entry or _not_written_by_predict)(out)
        if foreign:
            raise BSSError(
                f"--out {out} holds {foreign}, which predict did not write; --overwrite only replaces a previous prediction (listed in its predictions.json), nothing else. Choose another folder."
            )


def _not_written_by_predict(out: Path) -> str | None:
    """The first entry of ``out`` that a previous prediction (its predictions.json) does not account for."""
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_ENTRIES)
    if foreign:
        return repr(foreign[0])
    try:
        listed = {Path(row["image"]).stem for row in json.loads((out / "predictions.json").read_text())["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return "files but no readable predictions.json (so not a previous prediction)"
    for sub in sorted(OUTPUT_ENTRIES - {"predictions.json"}):
        folder = out / sub
        if folder.exists():
            for path in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
                if not folder.is_dir() or path.suffix != ".png" or path.stem not in listed:
                    return repr(str(path.relative_to(out)))
    return None


def predict_folder(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    overwrite: bool = False,
    probabilities: bool = False,
    overlays: bool = True,
    threshold: float | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str = "auto",
    tta: bool = False,
    progress: bool = True,
    address: str | None = None,
) -> PredictResult:
    """``address``: predict on the Ray cluster there (``host:port``, ``auto``; a Ray this process
    joined is reused), the same files as without it; None (the default): in this process, no Ray."""
    start = time.perf_counter()
    images_dir, out = Path(images), Path(out)
    paths = list_images(images_dir)
    check_out(out, images_dir, overwrite)
    predictor = Predictor.from_checkpoint(checkpoint, device=device, tta=tta)
    threshold = predictor.config.threshold if threshold is None else float(threshold)
    if not 0.0 < threshold < 1.0:
        raise BSSError(f"--threshold must be between 0 and 1, got {threshold}.")
    cluster = None
    if address:
        from bss.distributed import connect

        cluster = connect(address, device, what="predict")
    was_empty_dir = out.is_dir() and not any(out.iterdir())
    if was_empty_dir:
        out.rmdir()  # an empty folder given as --out: fill it atomically (recreated on failure)
    try:
        return _write(
            predictor,
            paths,
            images_dir,
            out,
            Path(checkpoint),
            threshold,
            overwrite,
            probabilities,
            overlays,
            batch_size,
            num_workers,
            progress,
            start,
            cluster,
        )
    except BaseException:
        if was_empty_dir and not out.exists():
            out.mkdir()
        raise
    finally:
        if cluster is not None:
            cluster.close()


def write_prediction(folder: Path, item: dict, prob: np.ndarray, threshold: float, overlays: bool, probabilities: bool, atomic: bool = False) -> dict:
    """One image's files in ``folder`` (mask, overlay, probability); its row of predictions.json.
    ``atomic``: each file written under a temporary name and renamed (a worker on a cluster,
    whose chunk may be retried); the bytes are the same either way."""
    path = item["path"]
    mask = prob > threshold
    files = [("masks", (mask > 0).astype(np.uint8) * 255)]  # write_mask's 0/255
    if overlays:
        files.append(("overlays", np.asarray(tint(item["rgb"], mask, PRED_COLOUR), dtype=np.uint8)))
    if probabilities:
        files.append(("probabilities", np.clip(prob * 255.0 + 0.5, 0, 255).astype(np.uint8)))
    for sub, array in files:
        target = folder / sub / f"{path.stem}.png"
        if not atomic:
            Image.fromarray(array).save(target)  # as write_mask / write_image save it
            continue
        with atomic_path(target, fsync=False) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
    return {"image": path.name, "height": int(prob.shape[0]), "width": int(prob.shape[1]), "foreground_fraction": round(float(mask.mean()), 5)}


class PredictJob:
    """What one Ray worker of ``predict_folder(address=...)`` does (:mod:`bss.distributed`): the
    checkpoint loaded once, chunks of image paths predicted into the output's temporary folder."""

    def __init__(self, checkpoint: str, folder: str, device: str, tta: bool, threshold: float, overlays: bool, probabilities: bool, batch_size: int):
        self.predictor = Predictor.from_checkpoint(checkpoint, device=device, tta=tta)
        self.folder, self.threshold, self.overlays, self.probabilities, self.batch_size = Path(folder), threshold, overlays, probabilities, batch_size
        self.device = self.predictor.device

    def run(self, chunk: list[str]) -> list[dict]:
        dataset = ImageFolderDataset(chunk, self.predictor.input_size, keep_image=self.overlays)
        return [
            write_prediction(self.folder, item, prob, self.threshold, self.overlays, self.probabilities, atomic=True)
            for item, prob in self.predictor.predict(dataset, self.batch_size, 0, False)
        ]


def _write(
    predictor, paths, images_dir, out, checkpoint, threshold, overwrite, probabilities, overlays, batch_size, num_workers, progress, start, cluster=None
) -> PredictResult:
    rows = []
    inference = predictor.describe()
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for sub in ("masks",) + (("overlays",) if overlays else ()) + (("probabilities",) if probabilities else ()):
            (tmp / sub).mkdir()
        if cluster is None:
            dataset = ImageFolderDataset(paths, predictor.input_size, keep_image=overlays)
            for item, prob in predictor.predict(dataset, batch_size, num_workers, progress, desc="predicting"):
                rows.append(write_prediction(tmp, item, prob, threshold, overlays, probabilities))
        else:
            rows, threads = _predict_on_cluster(
                cluster, predictor, paths, images_dir, tmp, Path(checkpoint), threshold, overlays, probabilities, batch_size, progress
            )
            inference.update(cluster.describe(), torch_threads=threads)
        summary = {
            "checkpoint": str(Path(checkpoint).resolve()),
            "images_dir": str(images_dir.resolve()),
            "threshold": threshold,
            "inference": inference,
            "count": len(rows),
            "images": rows,
        }
        (tmp / "predictions.json").write_text(json.dumps(summary, indent=1) + "\n")
    return PredictResult(out=out, count=len(rows), seconds=time.perf_counter() - start, summary=summary)


def _predict_on_cluster(
    cluster, predictor, paths, images_dir, tmp, checkpoint, threshold, overlays, probabilities, batch_size, progress
) -> tuple[list[dict], int]:
    """The images predicted by the cluster's actors into ``tmp``: their rows in the images' order, and the actors' torch threads."""
    import torch

    from bss.distributed import chunked

    threads = torch.get_num_threads()  # what this process would compute with: the same bytes as the local path
    checkpoint, folder = checkpoint.resolve(), tmp.resolve()
    kwargs = {"checkpoint": str(checkpoint), "folder": str(folder), "device": cluster.device, "tta": predictor.tta, "threshold": threshold}
    kwargs.update(overlays=overlays, probabilities=probabilities, batch_size=batch_size)
    chunks = cluster.map(
        "bss.predict:PredictJob",
        kwargs,
        [checkpoint, images_dir.resolve(), folder],
        chunked(
            [str(images_dir.resolve() / p.name) for p in paths], cluster.slots, batch_size
        ),  # the folder resolved, not a linked image (its name is the mask's)
        threads,
        progress,
        "predicting",
        verb="predicting",
        shared="to predict on a cluster, the images folder, the checkpoint and the --out folder's parent",
        lost="nothing was written: rerun the same command.",
    )
    for stray in folder.glob("*/.*.tmp"):  # a file a killed worker left half written (its chunk was retried)
        stray.unlink(missing_ok=True)
    return [row for chunk in chunks for row in chunk], threads


__all__ = ["PredictJob", "PredictResult", "check_out", "list_images", "predict_folder", "write_prediction"]
