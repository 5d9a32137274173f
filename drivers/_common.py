"""Shared start-up for the command-line drivers: import path, quiet libraries, clean errors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bss.environment import quiet  # noqa: E402

quiet()


def run(main) -> None:
    """Call ``main()``; a :class:`bss.errors.BSSError` becomes one ``error:`` line and exit code 2."""
    from bss.errors import BSSError

    try:
        code = main()
    except BSSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
