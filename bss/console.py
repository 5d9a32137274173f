"""The one way the library talks to the console: a line, flushed at once (the loop's lines must
reach a log file or a pipe as they happen, not when a buffer fills)."""

from __future__ import annotations


def say(text: str = "") -> None:
    print(text, flush=True)
