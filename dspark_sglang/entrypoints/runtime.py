"""``Runtime(...)``: the HTTP server in a subprocess, for the sglang frontend (like ``sgl.Runtime``).

    rt = Runtime(model_path=None, port=None)   # ServerArgs fields as keywords
    sgl.set_default_backend(rt.endpoint)
    ...
    rt.shutdown()                              # also at interpreter exit, or use ``with``
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import requests

from dspark_sglang.server_args import ServerArgs


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just reported free (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_cli_args(args: ServerArgs) -> list[str]:
    """ServerArgs -> the launch_server command line (only fields that differ from defaults)."""
    out: list[str] = []
    for f in dataclasses.fields(ServerArgs):
        value = getattr(args, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                out.append(flag)
            continue
        out += [flag, str(value)]
    return out


class Runtime:
    """Starts ``python -m dspark_sglang.launch_server`` and waits for ``/health_generate``.

    ``url`` is the base URL, ``endpoint`` an ``sglang.RuntimeEndpoint`` bound to it. The child
    runs in its own process group; ``shutdown`` terminates it (SIGTERM, then SIGKILL).
    """

    def __init__(self, model_path: str | None = None, launch_timeout: float = 300.0,
                 log_level: str = "error", **kwargs: Any) -> None:
        if kwargs.get("port") is None:
            kwargs["port"] = free_port(kwargs.get("host", "127.0.0.1"))
        self.server_args = ServerArgs(model_path=model_path, log_level=log_level, **kwargs)
        host = self.server_args.host
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:" \
                   f"{self.server_args.port}"
        self.generate_url = self.url + "/generate"
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "dspark_sglang.launch_server",
               *server_cli_args(self.server_args)]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd, env=env, start_new_session=True)
        atexit.register(self.shutdown)
        self._wait_ready(launch_timeout)
        from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

        self.endpoint = RuntimeEndpoint(self.url, api_key=self.server_args.api_key)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _headers(self) -> dict[str, str]:
        key = self.server_args.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.shutdown()
                raise RuntimeError(f"server exited with code {code} during start-up")
            try:
                r = requests.get(self.url + "/health_generate", headers=self._headers(),
                                 timeout=30)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.shutdown()
        raise TimeoutError(f"server did not become ready within {timeout} s")

    def shutdown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.shutdown()
