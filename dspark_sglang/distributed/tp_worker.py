"""A follower rank: ``python -m dspark_sglang.distributed.tp_worker --tp-rank R
--tp-init-method tcp://... [server flags]`` (started by rank 0, never by hand).

Loads the target like rank 0, shards it for rank R, then replays every ForwardBatch rank 0
broadcasts until it receives ``None`` or rank 0's process disappears.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from dspark_sglang.distributed.parallel_state import destroy_tp_group, init_tp_group
from dspark_sglang.distributed.tp_driver import unpack_forward_batch
from dspark_sglang.distributed.tp_layers import shard_llama_
from dspark_sglang.server_args import ServerArgs


def _exit_with_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    from dspark_sglang.model_executor.model_loader import (
        build_target_model,
        resolve_device,
        resolve_dtype,
    )
    from dspark_sglang.model_executor.model_runner import ModelRunner
    from dspark_sglang.models.loader import load_model_files

    parser = argparse.ArgumentParser(prog="python -m dspark_sglang.distributed.tp_worker")
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--tp-rank", type=int, required=True)
    parser.add_argument("--tp-init-method", required=True)
    ns = parser.parse_args(argv)
    args = ServerArgs.from_cli_args(ns)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_model_files(args.model_path)
    cfg = loaded.config
    context_len = args.context_length or cfg.max_position_embeddings
    model = build_target_model(cfg, loaded.state_dict, dtype, device, context_len + 64)
    del loaded
    group = init_tp_group(ns.tp_rank, args.tp_size, ns.tp_init_method, device)
    shard_llama_(model, group)
    runner = ModelRunner(model, args.max_total_tokens, dtype, args.attention_backend, device,
                         disable_cuda_graph=True)
    while True:
        msg = group.broadcast_object()
        if msg is None:
            break
        runner.forward(unpack_forward_batch(msg, device))
    destroy_tp_group()


if __name__ == "__main__":
    main()
