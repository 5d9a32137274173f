"""Refining an ``H<n>`` on a Ray cluster: the box-only images split into chunks, refined by actors.

    make_hybrid("obstacle", "runs/train/best.pt", address="10.0.0.5:6379")

The actors and their scheduling are :mod:`bss.distributed` (shared with ``predict.py --address``):
one actor per free CPU of the cluster (per GPU where the cluster has GPUs and the device is not
``cpu``), at most one per chunk; each loads the checkpoint once and refines its chunks with
:func:`bss.hybrid.make.refine_samples`, the code the local path runs, with the same torch thread
count (:func:`~bss.environment.deterministic_inference`), so its masks are the same bytes. Each
image, with its manifest row and label-quality counts, is written by the worker itself into the
shared work folder (:mod:`bss.hybrid.partial`): a chunk returns only how many images it refined,
so nothing but file paths and counts crosses the network, and the driver keeps nothing per image. The data root, the checkpoint and the work folder
must be on storage every node mounts (the loop assumes the same for checkpoints); a node that
cannot see them is named in the error.

An actor lost with its node is restarted elsewhere and its chunk retried (a retried image is
rewritten with the same bytes); should the call fail anyway, the images done are kept and a rerun
resumes. The refinement itself knows nothing of Ray: :class:`RefineJob` is a plain class.
"""

from __future__ import annotations

from pathlib import Path

from bss.data.layout import Sample
from bss.distributed import RayPool
from bss.hybrid.partial import PartialFolder
from bss.hybrid.refine import RefineRule


class RefineJob:
    """What one worker does: the checkpoint loaded once, chunks of images refined into the work folder."""

    def __init__(self, checkpoint: str, partial: str, device: str, tta: bool, input_size, rule: dict, batch_size: int):
        from bss.inference import Predictor

        self.partial = PartialFolder.attach(partial)
        self.predictor = Predictor.from_checkpoint(checkpoint, device=device, input_size=input_size, tta=tta)
        self.rule, self.batch_size = RefineRule.from_dict(rule), batch_size
        self.device = self.predictor.device

    def run(self, chunk: list[tuple[str, str, str, str | None]]) -> int:
        """Refine ``(stem, image, box mask, truth or None)`` paths; how many."""
        from bss.hybrid.make import refine_samples

        samples = [Sample(stem, Path(image), Path(mask)) for stem, image, mask, _ in chunk]
        truths = {stem: Path(truth) for stem, _, _, truth in chunk if truth is not None}
        return refine_samples(self.predictor, samples, truths, self.rule, self.partial, self.batch_size, 0, False)


class RayRefinement(RayPool):
    """The cluster this process joined, and how it refines (:func:`connect`)."""

    def refine(
        self,
        checkpoint: Path,
        samples: list[Sample],
        truths: dict[str, Path],
        rule: RefineRule,
        partial: PartialFolder,
        batch_size: int,
        threads: int,
        tta: bool,
        input_size,
        progress: bool,
        desc: str,
    ) -> list[str]:
        """Refine ``samples`` into ``partial`` on the cluster; the names of the nodes that did."""
        if not samples:
            return []
        from bss.distributed import chunked

        rows = [(s.stem, str(s.image.resolve()), str(s.mask.resolve()), str(truths[s.stem].resolve()) if s.stem in truths else None) for s in samples]
        checkpoint, folder = Path(checkpoint).resolve(), partial.path.resolve()
        kwargs = {"checkpoint": str(checkpoint), "partial": str(folder), "device": self.device, "tta": tta, "input_size": input_size}
        kwargs.update(rule=rule.to_dict(), batch_size=batch_size)
        self.map(
            "bss.hybrid.distributed:RefineJob",
            kwargs,
            [checkpoint, folder],
            chunked(rows, self.slots, batch_size),
            threads,
            progress,
            desc,
            verb="refining",
            shared="to refine on a cluster, the data root, the checkpoint and the run folder",
            lost=f"the images done are kept in {partial.path}: rerun the same command to refine only the rest.",
        )
        return self.nodes


def connect(address: str, device: str = "auto") -> RayRefinement:
    """Join the cluster at ``address`` (or reuse the Ray this process joined) and size the refinement."""
    from bss.distributed import connect as join

    pool = join(address, device, what="refine")
    return RayRefinement(pool.address, pool.device, pool.slots, pool.use_gpu, pool.started)
