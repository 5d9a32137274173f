"""Refining an ``H<n>`` on a Ray cluster: the box-only images split into chunks, refined by actors.

    make_hybrid("obstacle", "runs/train/best.pt", address="10.0.0.5:6379")

One actor per free CPU of the cluster (per GPU, ``num_gpus=1``, where the cluster has GPUs and the
device is not ``cpu``), at most one per chunk; each loads the checkpoint once and refines its
chunks with :func:`bss.hybrid.make.refine_samples`, the code the local path runs, with the same
torch thread count (:func:`~bss.environment.deterministic_inference`), so its masks are the same
bytes. Each image is written by the worker itself into the shared work folder
(:mod:`bss.hybrid.partial`): a task returns only its images' manifest rows and label-quality
counts, never arrays, so nothing but file paths and rows crosses the network. The data root, the
checkpoint and the work folder must be on storage every node mounts (the loop assumes the same
for checkpoints); a node that cannot see them is named in the error.

An actor lost with its node is restarted elsewhere and its chunk retried (a retried image is
rewritten with the same bytes); should the call fail anyway, the images done are kept and a rerun
resumes. Ray-specific code stays here: the refinement itself knows nothing of Ray.
"""

from __future__ import annotations

import math
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from bss.data.layout import Sample
from bss.errors import BSSError
from bss.hybrid.partial import PartialFolder
from bss.hybrid.refine import RefineRule

CHUNK_BATCHES = 4  # a chunk is at most this many batches: enough to keep an actor busy, small enough to spread


def _node_name() -> str:
    node_id = ray.get_runtime_context().get_node_id()
    return next((n.get("NodeName") for n in ray.nodes() if n.get("NodeID") == node_id), None) or node_id[:12]


@ray.remote(max_restarts=1, max_task_retries=1)
class Refiner:
    """One worker: the checkpoint loaded once, chunks of images refined into the work folder."""

    def __init__(self, checkpoint: str, partial: str, device: str, tta: bool, input_size, threads: int, rule: dict, batch_size: int):
        self.checkpoint, self.partial_path, self.device, self.tta = Path(checkpoint), partial, device, tta
        self.input_size, self.threads, self.rule, self.batch_size = input_size, threads, RefineRule.from_dict(rule), batch_size
        self.predictor = self.partial = None

    def prepare(self) -> dict:
        """Where this actor runs, the path it cannot see (None: all there), and its device."""
        node = _node_name()
        for path in (self.checkpoint, Path(self.partial_path)):
            if not path.exists():
                return {"node": node, "missing": str(path), "device": None}
        self._load()
        return {"node": node, "missing": None, "device": str(self.predictor.device)}

    def _load(self) -> None:
        if self.predictor is None:
            from bss.inference import Predictor

            self.partial = PartialFolder.attach(self.partial_path)
            self.predictor = Predictor.from_checkpoint(self.checkpoint, device=self.device, input_size=self.input_size, tta=self.tta)

    def refine(self, chunk: list[tuple[str, str, str, str | None]]) -> dict:
        """Refine ``(stem, image, box mask, truth or None)`` paths; their rows."""
        from bss.environment import deterministic_inference
        from bss.hybrid.make import refine_samples

        self._load()
        samples = [Sample(stem, Path(image), Path(mask)) for stem, image, mask, _ in chunk]
        truths = {stem: Path(truth) for stem, _, _, truth in chunk if truth is not None}
        with deterministic_inference(self.threads):
            rows = refine_samples(self.predictor, samples, truths, self.rule, self.partial, self.batch_size, 0, False)
        return {"node": _node_name(), "rows": rows}


class RayRefinement:
    """The cluster this process joined, and how it refines (:func:`connect`)."""

    def __init__(self, address: str, device: str, slots: int, use_gpu: bool, started: bool):
        self.address, self.device, self.slots, self.use_gpu, self.started = address, device, slots, use_gpu, started
        self.device_type = "cuda" if use_gpu else "cpu"
        self.actors = 0
        self.nodes: list[str] = []
        self.devices: list[str] = []

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
        rows = [(s.stem, str(s.image.resolve()), str(s.mask.resolve()), str(truths[s.stem].resolve()) if s.stem in truths else None) for s in samples]
        size = max(1, min(CHUNK_BATCHES * max(1, batch_size), math.ceil(len(rows) / self.slots)))
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        options = {"num_cpus": 1, "num_gpus": 1 if self.use_gpu else 0}
        args = (str(Path(checkpoint).resolve()), str(partial.path.resolve()), self.device, tta, input_size, threads, rule.to_dict(), batch_size)
        actors = [Refiner.options(**options).remote(*args) for _ in range(min(self.slots, len(chunks)))]
        self.actors = len(actors)
        try:
            ready = _get([a.prepare.remote() for a in actors], partial)
            blind = [r for r in ready if r["missing"]]
            if blind:
                raise BSSError(
                    f"Ray node {blind[0]['node']} cannot see {blind[0]['missing']}: to refine on a cluster, the data root, the checkpoint and the run folder must be on storage every node mounts at the same path."
                )
            self.devices = sorted({r["device"] for r in ready})
            nodes = set()
            todo = list(chunks)
            running = {actor.refine.remote(todo.pop(0)): actor for actor in actors if todo}
            with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress, leave=False) as bar:
                while running:
                    (ref,), _ = ray.wait(list(running), num_returns=1)
                    actor = running.pop(ref)
                    done = _get([ref], partial)[0]
                    nodes.add(done["node"])
                    bar.update(len(done["rows"]))
                    if todo:
                        running[actor.refine.remote(todo.pop(0))] = actor
        finally:
            for actor in actors:
                ray.kill(actor)
        self.nodes = sorted(nodes)
        return self.nodes

    def describe(self) -> dict:
        """What the manifest's ``inference`` records of a refinement on the cluster."""
        return {
            "device": ", ".join(self.devices) or self.device_type,
            "ray": {"actors": self.actors, "nodes": self.nodes, "gpus_per_actor": 1 if self.use_gpu else 0},
        }

    def close(self) -> None:
        """Leave Ray if this refinement started it (a Ray the caller had joined stays)."""
        if self.started:
            from bss.search.ray_cluster import stop_ray

            stop_ray()


def _get(refs: list, partial: PartialFolder) -> list:
    """``ray.get``; a refinement error is raised as itself (one line), a lost worker says how to resume."""
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        if isinstance(exc.cause, BSSError):
            raise exc.cause from None
        raise BSSError(f"refining on the Ray cluster failed: {type(exc.cause).__name__}: {exc.cause}") from None
    except RayActorError as exc:
        raise BSSError(
            f"a Ray worker was lost while refining ({type(exc).__name__}); the images done are kept in {partial.path}: rerun the same command to refine only the rest."
        ) from None


def connect(address: str, device: str = "auto") -> RayRefinement:
    """Join the cluster at ``address`` (or reuse the Ray this process joined) and size the refinement."""
    from bss.search.ray_cluster import node_resources, start_ray

    _, gpus, started = start_ray(address)
    nodes = node_resources()
    use_gpu = gpus > 0 and str(device) != "cpu"
    slots = sum(int(g) for c, g in nodes if c >= 1) if use_gpu else sum(int(c) for c, _ in nodes)
    if slots < 1:
        shown = ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in nodes)
        raise BSSError(f"the Ray cluster at {address} has no node with a free CPU{' and GPU' if use_gpu else ''} to refine on ({shown}).")
    return RayRefinement(address, str(device), slots, use_gpu, started)
