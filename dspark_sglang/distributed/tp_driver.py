"""One scheduler, many ranks: rank 0 broadcasts every ForwardBatch, ranks > 0 replay it.

Rank 0 (the server process) runs the whole engine -- scheduler, sampling, speculation, the
drafter -- and a sharded target. Before each target forward its ``ModelRunner`` calls
:meth:`TPDriver.send`, which broadcasts the batch's inputs over the gloo control group; the
follower processes (``python -m dspark_sglang.distributed.tp_worker``) run the same forward on
their shards, so every collective inside the model has all ranks present. Followers keep a KV
pool for their own heads; slot numbers are the driver's (one allocator, as without TP).

Only the rows of ``req_to_token`` the batch reads travel (``[bs, max(seq_lens)]``); the
follower indexes them with ``req_pool_indices = arange(bs)``.

The DSpark drafter is **not** sharded: it runs on rank 0 only, with its context pool, over the
full (unsharded) embedding and LM head that rank 0 keeps for it. Its layers are a small fraction
of the target's, its context K/V is computed from the target's captured hidden states (whole on
every rank after each layer's all-reduce), and keeping it off the collectives means a draft step
costs no communication at all.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from dspark_sglang.core.forward_batch import ForwardBatch
from dspark_sglang.distributed.parallel_state import TPGroup, destroy_tp_group, init_tp_group

logger = logging.getLogger(__name__)


def pack_forward_batch(fb: ForwardBatch) -> dict[str, Any]:
    """The inputs a follower needs to replay ``fb`` (CPU tensors, picklable)."""
    rows = fb.req_to_token[fb.req_pool_indices, : max(fb.seq_lens_list or [0]) or 1]
    cpu = (lambda t: None if t is None else t.cpu())  # noqa: E731
    return {"mode": fb.mode, "input_ids": cpu(fb.input_ids), "positions": cpu(fb.positions),
            "out_cache_loc": cpu(fb.out_cache_loc), "seq_lens": cpu(fb.seq_lens),
            "extend_lens": cpu(fb.extend_lens), "req_to_token": rows.cpu(),
            "custom_masks": None if fb.custom_masks is None else
            [cpu(m) for m in fb.custom_masks],
            "logits_indices": cpu(fb.logits_indices),
            "capture_layer_ids": tuple(fb.capture_layer_ids),
            "capture_final_hidden": fb.capture_final_hidden,
            "seq_lens_list": list(fb.seq_lens_list), "extend_lens_list": list(fb.extend_lens_list)}


def unpack_forward_batch(d: dict[str, Any], device: str) -> ForwardBatch:
    bs = d["seq_lens"].shape[0]
    return ForwardBatch(
        mode=d["mode"], input_ids=d["input_ids"], positions=d["positions"],
        out_cache_loc=d["out_cache_loc"], req_pool_indices=torch.arange(bs, dtype=torch.int64),
        seq_lens=d["seq_lens"], extend_lens=d["extend_lens"],
        req_to_token=d["req_to_token"].to(device), custom_masks=d["custom_masks"],
        logits_indices=d["logits_indices"], capture_layer_ids=d["capture_layer_ids"],
        capture_final_hidden=d["capture_final_hidden"], seq_lens_list=d["seq_lens_list"],
        extend_lens_list=d["extend_lens_list"])


class TPDriver:
    """Rank 0's side: the group, the follower processes, ``send`` per forward, ``stop``."""

    def __init__(self, group: TPGroup, followers: list[subprocess.Popen[bytes]]) -> None:
        self.group = group
        self.followers = followers
        self._stopped = False
        atexit.register(self.stop)

    def send(self, fb: ForwardBatch) -> None:
        self.group.broadcast_object(pack_forward_batch(fb))

    def stop(self) -> None:
        """Tell followers to exit (``None`` message), reap them, leave the process group."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            self.group.broadcast_object(None)
        for p in self.followers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        with contextlib.suppress(Exception):
            destroy_tp_group()


def start_tp_driver(args: Any, model: torch.nn.Module, device: str) -> TPDriver:
    """Spawn ranks 1..tp_size-1 with the same server args, join the group as rank 0 and shard
    ``model`` (loaded, in its dtype) in place. Followers load the weights themselves."""
    from dspark_sglang.distributed.tp_layers import shard_llama_
    from dspark_sglang.server_args import server_cli_args
    from dspark_sglang.utils.net import free_port

    size = int(args.tp_size)
    init = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    followers = []
    for rank in range(1, size):
        cmd = [sys.executable, "-m", "dspark_sglang.distributed.tp_worker",
               "--tp-rank", str(rank), "--tp-init-method", init, *server_cli_args(args)]
        followers.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    try:
        group = init_tp_group(0, size, init, device)
    except BaseException:
        for p in followers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        raise
    shard_llama_(model, group)
    logger.info("tensor parallel: %d ranks (%s)", size, "nccl" if device == "cuda" else "gloo")
    return TPDriver(group, followers)
