"""Export a trained drafter in DeepSpec's checkpoint layout, plus SPS table and STS files.

``out_dir`` receives ``config.json`` + ``model.safetensors`` (via
:func:`save_dspark_checkpoint`; weights cast to ``dtype``, default bf16 to keep shipped
checkpoints small), ``sts_calibration.json`` when a calibration is given or installed, and
``sps_table.json`` when an SPS table file is given (rewritten in upstream SGLang's
``SpsCostTable`` JSON). ``config.json`` carries ``dtype`` (upstream SGLang and transformers read
it). The directory loads with :func:`load_dspark_checkpoint`, with upstream SGLang's
``--speculative-algorithm DSPARK`` (``--speculative-dspark-confidence-sts-path
<dir>/sts_calibration.json``, ``--speculative-dspark-sps-table-path <dir>/sps_table.json``) when
:func:`upstream_problems` is empty, and with DeepSpec when written with
``include_shared_weights=True`` (DeepSpec initialises a missing embedding / LM head randomly).
For llama.cpp see :mod:`dspark_sglang.training.export_gguf`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from dspark_sglang.speculative.dspark.checkpoint import save_dspark_checkpoint
from dspark_sglang.speculative.dspark.confidence import StsCalibration
from dspark_sglang.speculative.dspark.config import DSparkConfig
from dspark_sglang.speculative.dspark.model import DSparkDrafter
from dspark_sglang.speculative.sps_profile import SPSTable

logger = logging.getLogger(__name__)

SPS_FILE = "sps_table.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def upstream_problems(cfg: DSparkConfig) -> list[str]:
    """Why DeepSpec / upstream SGLang could not load this drafter (empty list: they can).

    Upstream SGLang's DSPARK refuses ``markov_rank == 0`` and always builds the confidence head
    (a checkpoint without its weights fails), rejects target layer ids outside
    ``[0, num_target_layers)``; its and DeepSpec's Qwen3 drafter layers always carry per-head
    ``q_norm`` / ``k_norm`` and project ``len(target_layer_ids) * hidden_size`` context inputs.
    """
    problems = []
    if cfg.markov_rank <= 0:
        problems.append("markov_rank 0: upstream SGLang DSPARK requires a Markov head")
    if not cfg.enable_confidence_head:
        problems.append("disabled confidence head: upstream SGLang builds one and fails on its "
                        "missing weights")
    if any(i < 0 for i in cfg.target_layer_ids):
        problems.append("target_layer_ids -1 (embedding output): upstream rejects ids < 0")
    if not cfg.qk_norm:
        problems.append("no q_norm/k_norm: DeepSpec and upstream SGLang drafters are Qwen3 layers "
                        "with per-head norms")
    if cfg.target_hidden_size not in (None, cfg.hidden_size):
        problems.append("target_hidden_size != hidden_size: upstream's fc takes "
                        "len(target_layer_ids) * hidden_size inputs")
    return problems


def export_drafter(
    drafter: DSparkDrafter,
    out_dir: str | Path,
    calibration: StsCalibration | None = None,
    sps_table_path: str | Path | None = None,
    dtype: str = "bfloat16",
    include_shared_weights: bool = False,
    strict_upstream: bool = False,
) -> Path:
    """Write the checkpoint directory (the live drafter is not modified); returns it.

    ``include_shared_weights`` also stores the target's embedding and LM head (needed by
    DeepSpec). :func:`upstream_problems` are logged, or raised as ``ValueError`` with
    ``strict_upstream``.
    """
    problems = upstream_problems(drafter.config)
    if problems and strict_upstream:
        raise ValueError("upstream SGLang / DeepSpec cannot load this drafter: "
                         + "; ".join(problems))
    for p in problems:
        logger.warning("exported drafter will not load upstream: %s", p)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shared = drafter._shared
    drafter._shared = (None, None)  # type: ignore[assignment]  # keep deepcopy off the target
    try:
        clone = copy.deepcopy(drafter)
    finally:
        drafter._shared = shared
    clone._shared = shared
    clone.to(_DTYPES[dtype])
    clone.config = dataclasses.replace(clone.config, extra={**clone.config.extra, "dtype": dtype})
    if calibration is None and any(t != 1.0 for t in drafter.sts_calibration().temperatures):
        calibration = drafter.sts_calibration()  # read from the float32 original
    save_dspark_checkpoint(tmp, clone, calibration=calibration,
                           include_shared_weights=include_shared_weights)
    if include_shared_weights:
        _cast_file(tmp, _DTYPES[dtype])
    if sps_table_path is not None:
        SPSTable.load(sps_table_path).save(tmp / SPS_FILE)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _cast_file(directory: Path, dtype: torch.dtype) -> None:
    """Store the shared embedding / LM head copies in the export dtype too."""
    from safetensors.torch import load_file, save_file

    from dspark_sglang.speculative.dspark.checkpoint import WEIGHTS_FILE

    path = directory / WEIGHTS_FILE
    tensors = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
