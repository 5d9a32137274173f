"""The environment every entry point sets before importing Ray, MLflow or albumentations: no
usage statistics, no telemetry, no update checks (``os.environ.setdefault``: a user's own value
wins). Drivers and benchmarks call :func:`quiet` first; the Ray module adds Tune's own keys.

:func:`set_threads`: how many threads torch computes with, decided by the process that computes
(torch is imported only when it is called, so importing this module stays cheap)."""

from __future__ import annotations

import contextlib
import os

QUIET = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run ... at http://..." line per run ended on a tracking server
}
OFFLINE = {"HF_HUB_OFFLINE": "1"}  # no weight downloads: tests and benchmarks
NO_BARS = {"TQDM_DISABLE": "1"}  # benchmarks print their own figures


def quiet(offline: bool = False, bars: bool = True, extra: dict | None = None) -> None:
    for group in (QUIET, OFFLINE if offline else {}, {} if bars else NO_BARS, extra or {}):
        for key, value in group.items():
            os.environ.setdefault(key, value)


def available_cpus() -> int:
    """The CPUs this process may use (its affinity mask: ``taskset``, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(cpus: float | None = None) -> int:
    """Fix torch's intra-op thread count for this process and return it: ``cpus`` rounded (at
    least 1), or by default every CPU the process may use.

    Each process whose figures are recorded or compared decides it at its start: the loop's
    driver (teacher measurement, ``H<n>``, TEST) and each trial (its CPU share). Torch's own
    default depends on the machine and on whatever ran in the process before (a test module, a
    benchmark), and a float sum split over another number of threads rounds differently: two runs
    of one seed would then refine a pixel differently and disagree in the sixth decimal.
    """
    import torch

    threads = max(1, int(round(cpus))) if cpus is not None else available_cpus()
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def deterministic_inference(threads: int | None = None):
    """Within: torch computes with ``threads`` threads (default every CPU of the process, as
    :func:`set_threads`) and cuDNN picks deterministic kernels, not the fastest it timed; the
    caller's settings come back afterwards. Yields the thread count.

    For steps whose output is compared bit for bit between runs (a hybrid dataset, the teacher's
    rule): a convolution's float sums are split over torch's threads, so another thread count
    moves a probability in its sixth decimal and may flip a pixel at the threshold."""
    import torch

    before = (torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    count = max(1, int(threads)) if threads is not None else available_cpus()
    torch.set_num_threads(count)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield count
    finally:
        torch.set_num_threads(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
