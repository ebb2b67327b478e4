"""Child-process helpers."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM ``proc``'s process group (a child started with ``start_new_session``), SIGKILL
    after ``grace`` seconds; nothing when it already exited."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
