"""Child-process helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Self


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


def wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float,
               what: str, interval: float = 0.2) -> None:
    """Poll ``ready()`` until it is True. RuntimeError when ``proc`` exits first, TimeoutError
    after ``timeout`` seconds (the caller stops the process). Exceptions of ``ready`` count as
    not ready (the server is not listening yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001, S110 - not listening yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not become ready within {timeout} s")


class ChildProcess:
    """Owner of a child started in its own process group (``start_new_session``): ``shutdown``
    stops it (idempotent); a context manager that shuts it down on exit."""

    _proc: subprocess.Popen[bytes] | None = None

    def shutdown(self) -> None:
        proc, self._proc = self._proc, None
        stop_process_group(proc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
