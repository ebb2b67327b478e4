"""``Runtime(...)``: the HTTP server in a subprocess for the sglang frontend (as ``sgl.Runtime``).

    rt = Runtime(model_path=None, port=None)   # ServerArgs fields as keywords
    sgl.set_default_backend(rt)                # or rt.endpoint
    rt.generate("Hi", {"max_new_tokens": 8})   # JSON string, as sgl.Runtime returns it
    ...
    rt.shutdown()                              # also at interpreter exit, or use ``with``

``RuntimeClient(url)`` is the same surface for a server that is already running.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import requests

from dspark_sglang.server_args import ServerArgs, server_cli_args
from dspark_sglang.utils.net import free_port
from dspark_sglang.utils.proc import ChildProcess, wait_ready

__all__ = ["Runtime", "RuntimeClient", "free_port", "server_cli_args"]


class RuntimeClient:
    """``sgl.Runtime``'s methods over HTTP for the server at ``url``: ``generate`` and ``encode``
    (JSON strings, as ``sgl.Runtime`` returns them), ``async_generate`` (yields text deltas of a
    native stream), ``get_server_info`` (async), ``get_tokenizer``, ``cache_prefix``, and
    ``endpoint`` (an ``sglang.RuntimeEndpoint``, so ``sgl.set_default_backend(client)`` works)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.generate_url = self.url + "/generate"
        self.api_key = api_key
        self._endpoint: Any = None

    @property
    def endpoint(self) -> Any:
        if self._endpoint is None:
            from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

            self._endpoint = RuntimeEndpoint(self.url, api_key=self.api_key)
        return self._endpoint

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def generate(self, prompt: str | list[str], sampling_params: dict[str, Any] | None = None,
                 return_logprob: bool | list[bool] = False,
                 logprob_start_len: int | list[int] | None = None,
                 top_logprobs_num: int | list[int] | None = None) -> str:
        """POST /generate; the response body as a JSON string (a list for a batch)."""
        body = {"text": prompt, "sampling_params": sampling_params,
                "return_logprob": return_logprob, "logprob_start_len": logprob_start_len,
                "top_logprobs_num": top_logprobs_num}
        r = requests.post(self.generate_url, json=body, headers=self._headers(), timeout=3600)
        return json.dumps(r.json())

    async def async_generate(self, prompt: str, sampling_params: dict[str, Any] | None = None,
                             ) -> AsyncIterator[str]:
        """Stream ``prompt``'s completion; yields the new text of each event (non-empty)."""
        import aiohttp

        body = {"text": prompt, "sampling_params": sampling_params, "stream": True}
        sent = 0
        timeout = aiohttp.ClientTimeout(total=3 * 3600)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(self.generate_url, json=body, headers=self._headers()) as resp:
            if resp.status != 200:
                raise RuntimeError(await resp.text())
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                text = json.loads(line[5:])["text"]
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)

    add_request = async_generate

    def encode(self, prompt: str | list[str]) -> str:
        """POST /encode; ``{"input_ids": ...}`` (a list for a batch) as a JSON string."""
        r = requests.post(self.url + "/encode", json={"text": prompt}, headers=self._headers(),
                          timeout=60)
        return json.dumps(r.json())

    async def get_server_info(self) -> dict[str, Any]:
        import aiohttp

        async with aiohttp.ClientSession() as session, \
                session.get(self.url + "/server_info", headers=self._headers()) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"server_info failed: {data}")
            return data

    def get_tokenizer(self) -> Any:
        """The served model's tokenizer (``dspark_sglang.models.tokenizer.Tokenizer``)."""
        from dspark_sglang.models.loader import load_model_files
        from dspark_sglang.models.tokenizer import Tokenizer

        info = requests.get(self.url + "/get_model_info", headers=self._headers(),
                            timeout=60).json()
        path = Path(info.get("tokenizer_path") or info["model_path"])
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_dir(path)
        return load_model_files(str(path)).tokenizer

    def cache_prefix(self, prefix: str) -> None:
        """Compute ``prefix`` into the radix cache (a ``max_new_tokens: 0`` request)."""
        self.endpoint.cache_prefix(prefix)


class Runtime(RuntimeClient, ChildProcess):
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
        super().__init__(f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:"
                         f"{self.server_args.port}", self.server_args.api_key)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "dspark_sglang.launch_server",
               *server_cli_args(self.server_args)]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd, env=env, start_new_session=True)
        atexit.register(self.shutdown)
        self._wait_ready(launch_timeout)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None

        def ready() -> bool:
            return requests.get(self.url + "/health_generate", headers=self._headers(),
                                timeout=30).status_code == 200

        try:
            wait_ready(self._proc, ready, timeout, "server")
        except (RuntimeError, TimeoutError):
            self.shutdown()
            raise

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.shutdown()
