"""The environment every entry point sets before importing Ray, MLflow or albumentations: no
usage statistics, no telemetry, no update checks (``os.environ.setdefault``: a user's own value
wins). Drivers and benchmarks call :func:`quiet` first; the Ray module adds Tune's own keys."""

from __future__ import annotations

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
