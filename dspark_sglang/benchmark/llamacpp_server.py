"""llama.cpp's own ``llama-server`` as a serving peer: plain decoding and its DSpark drafting.

``bench_serving --peers llamacpp-server llamacpp-server-dspark`` launches the ``llama-server``
binary on the same GGUF and drives it with the same prompts, load levels and client code as our
server (its ``/completion`` endpoint: ``api="llamacpp"`` in :mod:`http_load`). The DSpark variant
loads our drafter exported to llama.cpp's GGUF (:mod:`dspark_sglang.training.export_gguf`) with
``--spec-type draft-dspark``.

No wheel on PyPI bundles a llama.cpp with ``draft-dspark`` for this interpreter (``cyllama`` here
is 0.2.x, older than the 2026-07 merge); ``llama-cpp-python`` 0.3.36's sdist vendors a llama.cpp
that has it. ``scripts/build_llamacpp.sh`` builds just ``llama-server`` and ``llama-bench`` from
that source (6 minutes on two cores here). The binary is found through ``--llama-server``,
``$DSPARK_LLAMA_SERVER`` or ``PATH``.

τ of a llama.cpp request: its response carries the tokens generated (``tokens_predicted``) and the
draft tokens accepted (``timings.draft_n_accepted``); every target decode emits one token plus the
accepted drafts, so target steps = tokens - accepted and τ = tokens / steps (the prefill's token
counts as one step, as ours does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_sglang.utils.net import free_port
from dspark_sglang.utils.proc import ChildProcess, wait_ready

SERVER_PEERS = ("llamacpp-server", "llamacpp-server-dspark")
ENV_BINARY = "DSPARK_LLAMA_SERVER"


def find_llama_server(explicit: str | None = None) -> Path | None:
    """The ``llama-server`` binary: ``explicit``, ``$DSPARK_LLAMA_SERVER``, then ``PATH``."""
    for cand in (explicit, os.environ.get(ENV_BINARY), shutil.which("llama-server")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    return None


def supports_dspark(binary: Path) -> bool:
    """Whether this ``llama-server`` lists ``draft-dspark`` among its ``--spec-type`` values."""
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "draft-dspark" in (out.stdout + out.stderr)


def drafter_gguf(drafter_dir: str | Path | None, target_gguf: Path, cache_dir: Path) -> Path:
    """Our drafter as llama.cpp's DSpark GGUF, exported once into ``cache_dir`` (re-exported
    when the checkpoint is newer than the file)."""
    from dspark_sglang.speculative.dspark_worker import DEFAULT_DRAFTER_DIR
    from dspark_sglang.training.export_gguf import export_drafter_dir

    src = Path(drafter_dir or DEFAULT_DRAFTER_DIR)
    out = cache_dir / f"{src.name}-dspark-f16.gguf"
    newest = max(p.stat().st_mtime for p in src.iterdir())
    if not out.is_file() or out.stat().st_mtime < newest:
        export_drafter_dir(src, out, target_gguf, "float16")
    return out


@dataclass
class LlamaServerConfig:
    binary: Path
    model_gguf: Path
    drafter_gguf: Path | None = None  # set: --spec-type draft-dspark
    threads: int | None = None
    parallel: int = 1  # slots (-np): the highest concurrency it will be driven at
    ctx_per_slot: int = 4096
    draft_max: int = 7  # --spec-draft-n-max; clamped by llama.cpp to the block size
    draft_p_min: float = 0.0  # confidence threshold (0: llama.cpp's default)
    extra_args: list[str] = field(default_factory=list)

    def command(self, port: int) -> list[str]:
        threads = self.threads or len(os.sched_getaffinity(0))
        cmd = [str(self.binary), "-m", str(self.model_gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(threads), "-tb", str(threads),
               "-np", str(self.parallel), "-c", str(self.ctx_per_slot * self.parallel),
               "-ngl", "0", "--no-webui", "--metrics"]
        if self.drafter_gguf is not None:
            cmd += ["-md", str(self.drafter_gguf), "--spec-type", "draft-dspark",
                    "--spec-draft-n-max", str(self.draft_max),
                    "--spec-draft-p-min", str(self.draft_p_min),
                    "-td", str(threads), "-tbd", str(threads), "-ngld", "0"]
        return cmd + list(self.extra_args)


class LlamaServer(ChildProcess):
    """A running ``llama-server`` (own process group, log in ``log_path``); ``url`` when
    ``/health`` answers 200."""

    def __init__(self, cfg: LlamaServerConfig, log_path: Path | None = None,
                 launch_timeout: float = 300.0) -> None:
        import requests

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cfg.command(port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(self._proc, lambda: requests.get(self.url + "/health",
                                                        timeout=10).status_code == 200,
                       launch_timeout, "llama-server" + (f" (log: {log_path})" if log_path
                                                         else ""), interval=0.3)
        except (RuntimeError, TimeoutError):
            self.shutdown()
            raise


def completion_output(body: dict[str, Any]) -> dict[str, Any]:
    """A llama-server ``/completion`` reply as an SGLang-shaped output dict (see module doc)."""
    tokens = int(body.get("tokens_predicted") or 0)
    timings = body.get("timings") or {}
    accepted = int(timings.get("draft_n_accepted") or 0)
    drafted = int(timings.get("draft_n") or 0)
    return {"text": str(body.get("content", "")),
            "output_ids": [int(t) for t in body.get("tokens") or []],
            "meta_info": {"completion_tokens": tokens,
                          "spec_verify_ct": max(tokens - accepted, 1) if tokens else 0,
                          "spec_draft_tokens": drafted}}


def completion_payload(text: str, sp: dict[str, Any]) -> dict[str, Any]:
    """llama-server ``/completion`` request for one prompt and our sampling params."""
    payload: dict[str, Any] = {"prompt": text, "n_predict": int(sp["max_new_tokens"]),
                               "temperature": float(sp.get("temperature", 0.0)),
                               "cache_prompt": True, "return_tokens": True}
    if float(sp.get("temperature", 0.0)) > 0:
        payload.update(top_k=0, top_p=1.0, min_p=0.0)
    if sp.get("seed") is not None:
        payload["seed"] = int(sp["seed"])
    if sp.get("ignore_eos"):
        payload["ignore_eos"] = True
    return payload
