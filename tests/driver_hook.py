"""``drivers/search.py`` with a kill point at an event of its own Tune callback, for the kill tests.

    BSS_TEST_KILL='{"on": "complete", "iteration": 1, "ordinal": 1, "kill": "self"}' python tests/driver_hook.py --dataset ...

A test that polls trial files and then kills races the trials: by the time it acts, the next
trial may have finished. Here the driver acts inside Tune's callback, synchronously, so the point
is exact: ``on: complete`` right after trial ``ordinal`` of ``iteration`` completed (with one trial
at a time the next has not started); ``on: result`` at that trial's first evaluation, or at the
first evaluation of a trial on Ray node ``node`` (its worker is blocked in ``tune.report`` until the
driver asks for more, so it cannot finish meanwhile). ``kill``: ``"self"`` SIGKILLs the driver's
process group (the driver and its local Ray), a number SIGKILLs that process group (a Ray node
of :class:`cluster.RayNodes`) and the driver goes on. ``record``: a file to write the trial's
record to first (what the test needs to know about the victim). ``kill: "wait"`` kills nothing:
the driver waits there until the file ``release`` exists (the test does something to the world
meanwhile, e.g. stops the tracking server). Everything else is the real driver.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEC = json.loads(os.environ["BSS_TEST_KILL"])

from bss.search import tune_callback  # noqa: E402

_fired = False


def _matches(callback, trial, event: str) -> bool:
    if _fired or event != SPEC["on"] or callback.context.iteration != SPEC["iteration"]:
        return False
    if SPEC.get("ordinal") is not None and callback.order[trial.trial_id][0] != SPEC["ordinal"]:
        return False
    return not SPEC.get("node") or (callback.store(trial).record() or {}).get("node_name") == SPEC["node"]


def _fire(callback, trial) -> None:
    global _fired
    _fired = True
    if SPEC.get("record"):
        Path(SPEC["record"]).write_text(json.dumps(callback.store(trial).record()))
    print(f"driver_hook: kill {SPEC['kill']} at {SPEC['on']} of iteration {SPEC['iteration']} trial {callback.order[trial.trial_id][0]}", flush=True)
    if SPEC["kill"] == "wait":
        deadline = time.monotonic() + SPEC.get("timeout", 600)
        while not Path(SPEC["release"]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        print("driver_hook: released", flush=True)
        return
    if SPEC["kill"] == "self":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.killpg(int(SPEC["kill"]), signal.SIGKILL)


def _hooked(name: str, event: str):
    original = getattr(tune_callback.SearchCallback, name)

    def hook(self, iteration, trials, trial, *args, **info):
        original(self, iteration, trials, trial, *args, **info)
        if _matches(self, trial, event):
            _fire(self, trial)

    return hook


tune_callback.SearchCallback.on_trial_complete = _hooked("on_trial_complete", "complete")
tune_callback.SearchCallback.on_trial_result = _hooked("on_trial_result", "result")

if __name__ == "__main__":
    sys.argv = [str(REPO / "drivers" / "search.py"), *sys.argv[1:]]
    sys.path.insert(0, str(REPO / "drivers"))
    runpy.run_path(sys.argv[0], run_name="__main__")
