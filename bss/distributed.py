"""Image work spread over a Ray cluster: chunks of images handed to actors, one per free CPU or GPU.

    pool = connect("10.0.0.5:6379", device="auto", what="refine")
    results = pool.map("bss.hybrid.make:ChunkRefiner", kwargs, needs, chunks, threads, ...)

Both ``make_hybrid(address=...)`` (:mod:`bss.hybrid.distributed`) and ``predict.py --address``
(:func:`bss.predict.predict_folder`) go through here. A *job* is a plain class named by
``"module:Class"`` (it knows nothing of Ray): ``Job(**kwargs)`` is built once per actor (the
checkpoint loaded once), ``job.device`` names its device, and ``job.run(chunk)`` does one chunk of
images, writing its files itself, each atomically, into a folder every node mounts, and returns
something small (rows, a count; never arrays): nothing but paths and rows crosses the network.

One actor per free CPU of the cluster (per GPU, ``num_gpus=1``, where the cluster has GPUs and the
device is not ``cpu``), at most one per chunk. Each runs its chunks under
:func:`~bss.environment.deterministic_inference` with the thread count the caller gives (the one
the local path computes with), so its files are the same bytes as the local path's. Before any
chunk, every actor checks that it sees the ``needs`` paths; a node that cannot is named.

An actor lost with its node is restarted elsewhere and its chunk retried (a retried image is
rewritten with the same bytes, atomically); should the call fail anyway, one :class:`BSSError`
line says so, with the caller's ``lost`` hint (what is kept, how to resume).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from bss.errors import BSSError

CHUNK_BATCHES = 4  # a chunk is at most this many batches: enough to keep an actor busy, small enough to spread


def node_name() -> str:
    node_id = ray.get_runtime_context().get_node_id()
    return next((n.get("NodeName") for n in ray.nodes() if n.get("NodeID") == node_id), None) or node_id[:12]


def chunked(items: Sequence, slots: int, batch_size: int) -> list[list]:
    """``items`` in consecutive chunks: at most ``CHUNK_BATCHES`` batches each, and at least one chunk per slot where there are enough."""
    size = max(1, min(CHUNK_BATCHES * max(1, batch_size), math.ceil(len(items) / max(1, slots))))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@ray.remote(max_restarts=1, max_task_retries=1)
class ChunkWorker:
    """One worker: a job (``"module:Class"``) built once, chunks of images run through it."""

    def __init__(self, job: str, kwargs: dict, needs: list[str], threads: int):
        self.job_name, self.kwargs, self.needs, self.threads = job, kwargs, [Path(p) for p in needs], threads
        self.job = None

    def prepare(self) -> dict:
        """Where this actor runs, the path it cannot see (None: all there), and its device."""
        node = node_name()
        for path in self.needs:
            if not path.exists():
                return {"node": node, "missing": str(path), "device": None}
        self._load()
        return {"node": node, "missing": None, "device": str(self.job.device)}

    def _load(self) -> None:
        if self.job is None:
            module, _, name = self.job_name.partition(":")
            self.job = getattr(importlib.import_module(module), name)(**self.kwargs)

    def run(self, chunk: list) -> dict:
        from bss.environment import deterministic_inference

        self._load()
        with deterministic_inference(self.threads):
            rows = self.job.run(chunk)
        return {"node": node_name(), "rows": rows}


class RayPool:
    """The cluster this process joined (:func:`connect`), and how it spreads chunks of images."""

    def __init__(self, address: str, device: str, slots: int, use_gpu: bool, started: bool):
        self.address, self.device, self.slots, self.use_gpu, self.started = address, device, slots, use_gpu, started
        self.device_type = "cuda" if use_gpu else "cpu"
        self.actors = 0
        self.nodes: list[str] = []
        self.devices: list[str] = []

    def map(
        self,
        job: str,
        kwargs: dict,
        needs: Sequence[str | Path],
        chunks: list[list],
        threads: int,
        progress: bool,
        desc: str,
        verb: str,
        shared: str,
        lost: str,
    ) -> list[list]:
        """Run ``job`` on every chunk across the cluster; what each chunk returned, in the order of ``chunks``.

        ``needs``: paths every actor must see, else the node and the path are named with
        ``shared`` (what must be on storage every node mounts); ``verb`` ("refining") and
        ``lost`` (what is kept, how to resume) word the error when a worker is lost for good."""
        if not chunks:
            return []
        options = {"num_cpus": 1, "num_gpus": 1 if self.use_gpu else 0}
        needs = [str(Path(p).resolve()) for p in needs]
        actors = [ChunkWorker.options(**options).remote(job, kwargs, needs, int(threads)) for _ in range(min(self.slots, len(chunks)))]
        self.actors = len(actors)
        results: list[list | None] = [None] * len(chunks)
        try:
            ready = _get([a.prepare.remote() for a in actors], verb, lost)
            blind = [r for r in ready if r["missing"]]
            if blind:
                raise BSSError(f"Ray node {blind[0]['node']} cannot see {blind[0]['missing']}: {shared} must be on storage every node mounts at the same path.")
            self.devices = sorted({r["device"] for r in ready})
            nodes = set()
            todo = list(enumerate(chunks))
            running = {}
            for actor in actors:
                if todo:
                    index, chunk = todo.pop(0)
                    running[actor.run.remote(chunk)] = (actor, index)
            with tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="img", disable=not progress, leave=False) as bar:
                while running:
                    (ref,), _ = ray.wait(list(running), num_returns=1)
                    actor, index = running.pop(ref)
                    done = _get([ref], verb, lost)[0]
                    nodes.add(done["node"])
                    results[index] = done["rows"]
                    bar.update(len(chunks[index]))
                    if todo:
                        index, chunk = todo.pop(0)
                        running[actor.run.remote(chunk)] = (actor, index)
        finally:
            for actor in actors:
                ray.kill(actor)
        self.nodes = sorted(nodes)
        return results

    def describe(self) -> dict:
        """What a manifest's ``inference`` records of work done on the cluster."""
        return {
            "device": ", ".join(self.devices) or self.device_type,
            "ray": {"actors": self.actors, "nodes": self.nodes, "gpus_per_actor": 1 if self.use_gpu else 0},
        }

    def close(self) -> None:
        """Leave Ray if :func:`connect` started it (a Ray the caller had joined stays)."""
        if self.started:
            from bss.search.ray_cluster import stop_ray

            stop_ray()


def _get(refs: list, verb: str, lost: str) -> list:
    """``ray.get``; a job's :class:`BSSError` is raised as itself (one line), a lost worker says ``lost``."""
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        if isinstance(exc.cause, BSSError):
            raise exc.cause from None
        raise BSSError(f"{verb} on the Ray cluster failed: {type(exc.cause).__name__}: {exc.cause}") from None
    except RayActorError as exc:
        raise BSSError(f"a Ray worker was lost while {verb} ({type(exc).__name__}); {lost}") from None


def connect(address: str, device: str = "auto", what: str = "work") -> RayPool:
    """Join the cluster at ``address`` (or reuse the Ray this process joined) and size the pool;
    ``what`` names the work in the error for a cluster with no free CPU (or GPU)."""
    from bss.search.ray_cluster import node_resources, start_ray

    _, gpus, started = start_ray(address)
    nodes = node_resources()
    use_gpu = gpus > 0 and str(device) != "cpu"
    slots = sum(int(g) for c, g in nodes if c >= 1) if use_gpu else sum(int(c) for c, _ in nodes)
    if slots < 1:
        shown = ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in nodes)
        pool = RayPool(address, str(device), 0, use_gpu, started)
        pool.close()
        raise BSSError(f"the Ray cluster at {address} has no node with a free CPU{' and GPU' if use_gpu else ''} to {what} on ({shown}).")
    return RayPool(address, str(device), slots, use_gpu, started)
