"""Where the project's shared material (workloads, drafter data) lives.

Never an absolute machine path: ``$DSPARK_SHARED_DIR`` if set; else the ``shared`` folder beside
the checkout that holds this package (``<checkout>/../shared``); else ``../shared`` relative to
the working directory. ``$DSPARK_WORKLOADS_DIR`` overrides the workloads folder alone.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV_VAR = "DSPARK_SHARED_DIR"
WORKLOADS_ENV_VAR = "DSPARK_WORKLOADS_DIR"


def shared_dir() -> Path:
    env = os.environ.get(SHARED_ENV_VAR)
    if env:
        return Path(env)
    beside_checkout = Path(__file__).resolve().parents[3] / "shared"
    return beside_checkout if beside_checkout.is_dir() else Path("..") / "shared"


def workloads_dir() -> Path:
    env = os.environ.get(WORKLOADS_ENV_VAR)
    return Path(env) if env else shared_dir() / "workloads"
