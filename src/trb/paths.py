"""Names of files shipped with trb (`trb:...`), resolved without importing torch (configs name them)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "trb:"


def resolve_builtin(path: str) -> Path:
    """trb:<name> names a file shipped with the package (under trb/assets); anything else is a filesystem path."""
    if path.startswith(BUILTIN_PREFIX):
        return Path(str(resources.files("trb") / "assets")) / path[len(BUILTIN_PREFIX) :]
    return Path(path).expanduser()

