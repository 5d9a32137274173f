"""The on-disk dataset format.

A *source* dataset (one defect class) is ``datasets/<name>/`` with::

    images/      jpg/png, any size, grey or colour
    masks/       the filled detection boxes, png, same stem as the image, 0/255 or 0/1
    labels.csv   VIA CSV export: exact polygons for a hand-labelled subset (see bss.data.via)
    truth/       optional, synthetic datasets only: exact masks of every image (never trained on)

A *split* or *hybrid* dataset (``<name>_BASELINE``, ``<name>_EVAL``, ``<name>_TEST``, ``<name>_H<n>``)
is ``images/`` + ``masks/`` (+ a ``manifest.json``). Images and masks are paired by stem, never
by sort order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bss.data.io import image_orientation, image_size, is_image
from bss.data.via import ViaLabels, read_via_csv
from bss.errors import DatasetError


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path | None


def resolve_dataset(name_or_path: str | Path, data_root: str | Path) -> Path:
    """``data_root/name`` or an explicit folder; a missing one lists what is there."""
    candidate = Path(name_or_path)
    if candidate.is_dir() and (candidate / "images").is_dir():
        return candidate
    folder = Path(data_root) / str(name_or_path)
    if not folder.is_dir():
        root = Path(data_root)
        known = sorted(p.name for p in root.iterdir() if (p / "images").is_dir()) if root.is_dir() else []
        hint = f" Datasets in {root}: {', '.join(known)}." if known else f" {root} holds no dataset yet."
        raise DatasetError(
            f"dataset {str(name_or_path)!r} not found at {folder}.{hint} "
            "Create one with drivers/make_synthetic.py or drivers/import_yolo.py, or pass --data-root."
        )
    return folder


def _by_stem(folder: Path, kind: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_image(path):
            continue
        if path.stem in files:
            raise DatasetError(f"{folder}: two {kind} files share the stem {path.stem!r} ({files[path.stem].name}, {path.name}); keep one.")
        files[path.stem] = path
    return files


def list_samples(folder: str | Path, require_masks: bool = True) -> list[Sample]:
    """Pair ``folder/images`` with ``folder/masks`` by stem; every problem names the file."""
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir():
        raise DatasetError(f"{folder}: no images/ folder. A dataset is images/ + masks/ (+ labels.csv).")
    images = _by_stem(images_dir, "image")
    if not images:
        raise DatasetError(f"{images_dir}: the dataset is empty (no jpg/png images).")
    if not masks_dir.is_dir():
        if require_masks:
            raise DatasetError(f"{folder}: no masks/ folder. Every image needs a mask png with the same stem in masks/.")
        return [Sample(stem, path, None) for stem, path in images.items()]
    masks = _by_stem(masks_dir, "mask")
    missing = [images[s].name for s in images if s not in masks]
    if missing and require_masks:
        raise DatasetError(
            f"{masks_dir}: no mask for image {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + "; add masks/<stem>.png."
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DatasetError(f"{masks_dir}: mask {masks[orphans[0]].name} has no image in images/; remove it or add the image.")
    return [Sample(stem, path, masks.get(stem)) for stem, path in images.items()]


def check_mask_sizes(samples: list[Sample]) -> None:
    """Each mask must have its image's height and width (read from headers, cheap)."""
    for sample in samples:
        if sample.mask is None:
            continue
        if image_size(sample.image) != image_size(sample.mask):
            (h, w), (mh, mw) = image_size(sample.image), image_size(sample.mask)
            turned = ""
            if image_size(sample.image, stored=True) == (mh, mw):
                turned = (
                    f" (its EXIF orientation {image_orientation(sample.image)} turns the stored {mw}x{mh} pixels when shown, and BSS reads the picture as shown, "
                    "like VIA; draw the mask on the turned picture, or rotate the mask likewise)"
                )
            raise DatasetError(f"{sample.mask}: mask is {mw}x{mh} but its image {sample.image.name} is {w}x{h}{turned}; they must match.")


@dataclass
class SourceDataset:
    """A class dataset as delivered: images, coarse box masks and the VIA hand labels."""

    root: Path
    samples: list[Sample]
    labels: ViaLabels

    @classmethod
    def open(cls, name_or_path: str | Path, data_root: str | Path = "datasets") -> "SourceDataset":
        root = resolve_dataset(name_or_path, data_root)
        samples = list_samples(root)
        check_mask_sizes(samples)
        labels = read_via_csv(root / "labels.csv")
        names = {s.image.name for s in samples}
        unknown = [n for n in labels.regions if n not in names]
        if unknown:
            raise DatasetError(
                f"{labels.path}: {unknown[0]!r} is labelled but not in {root / 'images'}" + (f" ({len(unknown)} such rows)" if len(unknown) > 1 else "") + "."
            )
        return cls(root=root, samples=samples, labels=labels)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def truth_dir(self) -> Path | None:
        """Exact masks of every image, kept by synthetic datasets to measure label quality."""
        folder = self.root / "truth"
        return folder if folder.is_dir() else None

    def check_files(self, progress: bool = True) -> None:
        """Decode every image and box mask once: a truncated JPEG or a non-binary mask is refused
        here, naming the file, rather than failing every training trial later."""
        from tqdm.auto import tqdm

        from bss.data.io import read_image, read_mask

        for sample in tqdm(self.samples, desc=f"checking {self.name}", unit="img", disable=not progress, leave=False):
            read_image(sample.image)
            if sample.mask is not None:
                read_mask(sample.mask)

    def hand_labelled(self) -> list[Sample]:
        labelled = set(self.labels.labelled)
        return [s for s in self.samples if s.image.name in labelled]

    def box_only(self) -> list[Sample]:
        labelled = set(self.labels.labelled)
        return [s for s in self.samples if s.image.name not in labelled]


def dataset_digest(folder: str | Path) -> tuple[str, dict]:
    """A content digest of a dataset folder from its files' names and sizes (no reading: cheap
    for thousands of images; any added, removed, renamed or rewritten-to-another-size file
    changes it), and its profile: the number of images and masks."""
    import hashlib

    folder = Path(folder)
    digest, profile = hashlib.sha1(), {}
    for part in ("images", "masks"):
        files = sorted(p for p in (folder / part).iterdir() if p.is_file()) if (folder / part).is_dir() else []
        profile[part] = len(files)
        for path in files:
            digest.update(f"{part}/{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16], profile
