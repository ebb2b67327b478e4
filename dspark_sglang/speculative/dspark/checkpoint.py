"""Reading and writing DSpark drafters in DeepSpec's checkpoint layout.

A checkpoint directory holds:

- ``config.json``: :meth:`DSparkConfig.to_dict` (DeepSpec's fields, ``Qwen3DSparkModel``);
- ``model.safetensors``: the drafter's tensors under DeepSpec's names (``fc.weight``,
  ``hidden_norm.weight``, ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
  ``layers.{i}.self_attn.{q,k}_norm.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``,
  ``layers.{i}.{input,post_attention}_layernorm.weight``, ``norm.weight``,
  ``markov_head.markov_w1.weight``, ``markov_head.markov_w2.weight`` (+ ``gate_proj`` /
  ``joint_proj`` for gated / rnn heads), ``confidence_head.proj.{weight,bias}``). DeepSpec's own
  checkpoints also carry copies of the target's ``embed_tokens.weight`` and ``lm_head.weight``;
  we write them only with ``include_shared_weights=True`` and ignore them on load (the target's
  live modules are used instead);
- ``sts_calibration.json`` (optional): the STS file in the format SGLang's
  ``--speculative-dspark-confidence-sts-path`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dspark_sglang.speculative.dspark.confidence import StsCalibration
from dspark_sglang.speculative.dspark.config import DSparkConfig
from dspark_sglang.speculative.dspark.model import DSparkDrafter

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STS_FILE = "sts_calibration.json"
SHARED_TENSOR_NAMES = ("embed_tokens.weight", "lm_head.weight")


def save_dspark_checkpoint(
    directory: str | Path,
    drafter: DSparkDrafter,
    calibration: StsCalibration | Sequence[float] | None = None,
    include_shared_weights: bool = False,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (if given) ``sts_calibration.json``.

    ``calibration=None`` writes the drafter's installed STS temperatures when they are not all
    1.0, else no STS file. ``include_shared_weights`` also stores the target's embedding and
    LM-head weights (as DeepSpec does); ``lm_head`` must then expose ``.weight``.
    Returns the directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    drafter.config.save(out / CONFIG_FILE)
    tensors = {name: t.detach().contiguous().cpu() for name, t in drafter.state_dict().items()}
    if include_shared_weights:
        head_weight = getattr(drafter.lm_head, "weight", None)
        if head_weight is None:
            raise ValueError("include_shared_weights needs an lm_head with a .weight")
        tensors["embed_tokens.weight"] = drafter.embed_tokens.weight.detach().contiguous().cpu()
        tensors["lm_head.weight"] = head_weight.detach().contiguous().cpu()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    if calibration is None:
        installed = drafter.sts_calibration()
        calibration = None if all(t == 1.0 for t in installed.temperatures) else installed
    if calibration is not None:
        if not isinstance(calibration, StsCalibration):
            calibration = StsCalibration(temperatures=[float(t) for t in calibration])
        if len(calibration.temperatures) != drafter.gamma:
            raise ValueError("STS calibration needs one temperature per block position")
        calibration.save(out / STS_FILE)
    return out


def load_dspark_checkpoint(
    directory: str | Path,
    embed_tokens: nn.Embedding,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    sts_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> DSparkDrafter:
    """Build a drafter from a DeepSpec-layout directory over the target's shared modules.

    Loading is strict: every drafter tensor must be present with the right shape, and any other
    tensor except the shared ``embed_tokens`` / ``lm_head`` copies is an error. STS temperatures
    come from ``sts_path`` or, if absent, ``<directory>/sts_calibration.json`` (identity if
    neither exists). The vocab and hidden sizes of the shared modules must match the config.
    """
    src = Path(directory)
    config = DSparkConfig.load(src / CONFIG_FILE)
    emb_shape = tuple(embed_tokens.weight.shape)
    if emb_shape != (config.vocab_size, config.hidden_size):
        raise ValueError(f"target embedding {emb_shape} does not match the drafter config "
                         f"({config.vocab_size}, {config.hidden_size})")
    drafter = DSparkDrafter(config, embed_tokens, lm_head)
    tensors = load_file(str(src / WEIGHTS_FILE))
    for name in SHARED_TENSOR_NAMES:
        tensors.pop(name, None)
    expected = drafter.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(expected[name].shape)}")
    drafter.load_state_dict(tensors, strict=True)
    drafter.to(device=device)
    if dtype is not None:
        drafter.to(dtype=dtype)
        drafter.inv_freq.data = drafter.inv_freq.float()
        drafter.sts_temperatures.data = drafter.sts_temperatures.float()
    sts_file = Path(sts_path) if sts_path is not None else src / STS_FILE
    if sts_file.exists():
        drafter.set_sts(StsCalibration.load(sts_file))
    return drafter


def read_checkpoint_tensor_names(directory: str | Path) -> list[str]:
    """Tensor names stored in ``model.safetensors`` (sorted), for layout checks."""
    with open(Path(directory) / WEIGHTS_FILE, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    return sorted(k for k in header if k != "__metadata__")
