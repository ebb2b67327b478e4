"""Boolean switches read from the environment (``DSPARK_*`` A/B flags)."""

from __future__ import annotations

import os


def env_on(name: str, default: bool = True) -> bool:
    """``name`` unset: ``default``; ``0`` / ``false`` / ``off`` (any case): False; else True."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "off")
