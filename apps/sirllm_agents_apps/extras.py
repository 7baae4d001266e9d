"""Optional dependencies: a command that needs an extra checks for it first and exits with one clear line."""

from __future__ import annotations

import importlib.util
import sys


def require(command: str, modules: list[str], install: str) -> None:
    """Exit at once (status 2, one line naming what is missing and the install that fixes it) when any of
    ``modules`` is not installed."""
    missing = [name for name in dict.fromkeys(modules) if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{command} needs {', '.join(missing)}, not installed: {install}", file=sys.stderr)
        raise SystemExit(2)
