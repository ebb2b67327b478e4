"""DSpark drafter configuration in DeepSpec's ``config.json`` layout.

DeepSpec builds the drafter config by deep-copying the *target's* HF config and overriding a few
fields (``deepspec/modeling/dspark/qwen3/config.py``): ``architectures = ["Qwen3DSparkModel"]``,
``num_hidden_layers`` (= draft layers), ``num_target_layers``, ``block_size``, ``mask_token_id``,
``target_layer_ids``, ``num_anchors``, ``enable_confidence_head`` (+ ``confidence_head_with_markov``
when enabled), ``markov_rank`` (+ ``markov_head_type`` when > 0), ``tie_word_embeddings = False``,
``layer_types``. Everything else (hidden size, heads, rope) is the target's. We keep unknown keys in
``extra`` so a loaded config writes back unchanged.

Other published layouts read here (docs/dspark_format.md has the table): upstream SGLang's nested
``dflash_config`` / ``dspark_config`` (their keys win over top-level ones), a ``text_config``
wrapper, transformers-5 ``rope_parameters`` (no top-level ``rope_theta``). A *target* config that
bundles its drafter (``dspark_block_size`` / ``dspark_markov_rank`` / ``dspark_noise_token_id`` /
``dspark_target_layer_ids``, weights under ``mtp.N.*``, DeepSeek-V4-Flash style) is refused with an
error that names what is unsupported. Defaults for absent keys follow upstream: a missing
``markov_head_type`` with ``markov_rank > 0`` is an error, ``confidence_head_with_markov``
defaults to ``markov_rank > 0``, ``enable_confidence_head`` to true, ``sample_from_anchor`` to
true, rope base to 10000 (transformers' default).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
DSPARK_ARCHITECTURE = "Qwen3DSparkModel"
# Qwen3-shaped DSpark drafters (upstream SGLang maps all of these to the same network)
SUPPORTED_ARCHITECTURES = (DSPARK_ARCHITECTURE, "LingDSparkModel", "DSparkDraftModel",
                           "DFlashDraftModel")
BUNDLED_DSPARK_KEYS = ("dspark_block_size", "dspark_markov_rank", "dspark_noise_token_id",
                       "dspark_target_layer_ids")
DEFAULT_ROPE_THETA = 10_000.0  # transformers' default when a config names no rope base
NESTED_CONFIG_KEYS = ("dflash_config", "dspark_config")


def dspark_num_draft_from_num_draft_tokens(num_draft_tokens: int | None, block_size: int) -> int:
    """Drafts per step for DSPARK from ``--speculative-num-draft-tokens``, as upstream reads it.

    Upstream SGLang's DSPARK takes ``num_draft_tokens`` as the verify window ``gamma + 1`` (anchor
    plus drafts), so ``gamma = num_draft_tokens - 1`` (must be >= 1). The drafter proposes at most
    ``block_size`` tokens per forward, so a larger request is capped there (upstream would draft
    beyond the trained block; we do not). ``None`` means the whole block.
    """
    if num_draft_tokens is None:
        return block_size
    gamma = int(num_draft_tokens) - 1
    if gamma < 1:
        raise ValueError("for DSPARK speculative_num_draft_tokens is the verify window gamma + 1 "
                         f"and must be >= 2, got {num_draft_tokens}")
    return min(gamma, block_size)


def default_target_layer_ids(num_target_layers: int, num_features: int = 5) -> list[int]:
    """Target layers whose outputs feed the drafter, by the rule DFlash / DSpark use upstream
    (z-lab ``build_target_layer_ids``, mirrored by SGLang): evenly from layer 1 to layer
    ``num_target_layers - 3``, rounded (Qwen3-8B, 36 layers: 1, 9, 17, 25, 33). The last layers
    are never read; llama.cpp's graph exposes layer inputs only, so it cannot read the final
    layer's output at all."""
    if num_target_layers < 1 or num_features < 1:
        raise ValueError("num_target_layers and num_features must be >= 1")
    if num_features == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (num_features - 1)))
            for i in range(num_features)]


def _rope_from(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from v4 keys or transformers-5 ``rope_parameters``.

    ``rope_parameters`` may be flat or keyed by layer type (``{"full_attention": {...}}``); a
    drafter uses full attention, so that entry is taken."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    theta = cfg.get("rope_theta")
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict):
        if theta is None:
            theta = params.get("rope_theta")
        kind = params.get("rope_type", params.get("type", "default"))
        if scaling is None and kind not in (None, "default"):
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta if theta is not None else DEFAULT_ROPE_THETA), scaling


def normalize_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """Flatten a published DSpark config into DeepSpec's top-level layout (see module doc).

    Raises ``ValueError`` for layouts this drafter cannot run: a target config that bundles its
    drafter (``dspark_*`` keys), ``sample_from_anchor: false`` (DFlash-style block where the
    anchor row predicts nothing), non-``full_attention`` ``layer_types``, an activation other than
    SiLU, an unknown architecture.
    """
    bundled = [k for k in BUNDLED_DSPARK_KEYS if raw.get(k) is not None]
    if bundled:
        raise ValueError(
            f"this config bundles a DSpark drafter inside the target ({', '.join(bundled)}; "
            "weights under mtp.N.*, DeepSeek-V4-Flash style with a DeepSeek-V4 MoE backbone): "
            "not supported. Only standalone Qwen3-style DSpark drafter checkpoints load here.")
    cfg = dict(raw.get("text_config") or raw)
    if "architectures" in raw and "architectures" not in cfg:
        cfg["architectures"] = raw["architectures"]
    for key in NESTED_CONFIG_KEYS:
        nested = raw.get(key) or cfg.get(key)
        if isinstance(nested, dict):
            cfg.update(nested)
    archs = cfg.get("architectures") or []
    unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unknown:
        raise ValueError(f"unsupported DSpark drafter architecture {unknown}; "
                         f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    if not bool(cfg.get("sample_from_anchor", True)):
        raise ValueError("sample_from_anchor=false (the anchor row predicts no draft, "
                         "DFlash 1+N block layout) is not supported")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != int(cfg["num_hidden_layers"]):
            raise ValueError(f"layer_types has {len(layer_types)} entries for "
                             f"{cfg['num_hidden_layers']} draft layers")
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"only full_attention draft layers are supported, got {layer_types}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"only hidden_act='silu' (SwiGLU MLP) is supported, got {act!r}")
    return cfg


@dataclass(frozen=True)
class DSparkConfig:
    """Shape and wiring of a DSpark drafter. Field names follow DeepSpec's ``config.json``.

    ``target_layer_ids``: target layers whose *output* hidden states feed the drafter (HF
    ``hidden_states[i + 1]``); ``-1`` means the embedding output. The context projection ``fc``
    takes ``len(target_layer_ids) * target_hidden_size`` inputs.
    ``block_size`` (gamma): positions per block ``[anchor, mask * (gamma - 1)]``; block row ``j``
    predicts the token at ``anchor_pos + j + 1``, so one block yields up to ``gamma`` drafts.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # draft layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    markov_rank: int = 0  # 0 = no Markov head
    markov_head_type: str = "vanilla"  # "vanilla" | "gated" | "rnn"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    target_hidden_size: int | None = None  # None = hidden_size (DeepSpec: always equal)
    num_target_layers: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    qk_norm: bool = True  # Qwen3 drafters carry per-head q_norm / k_norm
    num_anchors: int = 512  # training only
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids must not be empty")
        ids = list(self.target_layer_ids)
        if any(b <= a for a, b in itertools.pairwise(ids)) or ids[0] < -1:
            raise ValueError(f"target_layer_ids must be strictly increasing >= -1, got {ids}")
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.markov_rank > 0 and self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}")
        if self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError("confidence_head_with_markov needs markov_rank > 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def ctx_input_size(self) -> int:
        """Width of the concatenated target hidden states fed to ``fc``."""
        return len(self.target_layer_ids) * (self.target_hidden_size or self.hidden_size)

    def rope_parameters(self) -> dict[str, Any]:
        """transformers-5 ``rope_parameters`` for this config (``rope_theta`` plus scaling)."""
        scaling = dict(self.rope_scaling or {})
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        return {"rope_type": kind, **scaling, "rope_theta": self.rope_theta}

    @property
    def confidence_input_size(self) -> int:
        with_markov = self.enable_confidence_head and self.confidence_head_with_markov
        return self.hidden_size + (self.markov_rank if with_markov else 0)

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> DSparkConfig:
        """Parse a DeepSpec / upstream-SGLang DSpark ``config.json`` (:func:`normalize_layout`)."""
        cfg = normalize_layout(raw)
        known = {f.name for f in fields(DSparkConfig)} - {"extra"}
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        archs = cfg.get("architectures") or []
        markov_rank = int(cfg.get("markov_rank") or 0)
        head_type = cfg.get("markov_head_type")
        if markov_rank > 0 and head_type is None:
            raise ValueError("markov_head_type is required when markov_rank > 0 "
                             "(DeepSpec and upstream SGLang refuse a config without it)")
        enable_conf = bool(cfg.get("enable_confidence_head", True))
        with_markov = cfg.get("confidence_head_with_markov")
        rope_theta, rope_scaling = _rope_from(cfg)
        kwargs: dict[str, Any] = {
            "vocab_size": int(cfg["vocab_size"]),
            "hidden_size": hidden,
            "intermediate_size": int(cfg["intermediate_size"]),
            "num_hidden_layers": int(cfg["num_hidden_layers"]),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(cfg.get("num_key_value_heads") or n_heads),
            "head_dim": int(cfg.get("head_dim") or hidden // n_heads),
            "block_size": int(cfg["block_size"]),
            "target_layer_ids": tuple(int(i) for i in cfg["target_layer_ids"]),
            "mask_token_id": int(cfg["mask_token_id"]),
            "markov_rank": markov_rank,
            "markov_head_type": str(head_type or "vanilla").lower(),
            "enable_confidence_head": enable_conf,
            "confidence_head_with_markov": enable_conf and bool(
                markov_rank > 0 if with_markov is None else with_markov),
            "target_hidden_size": cfg.get("target_hidden_size"),
            "num_target_layers": cfg.get("num_target_layers"),
            "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "rope_theta": rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": int(cfg.get("max_position_embeddings", 40960)),
            "attention_bias": bool(cfg.get("attention_bias", False)),
            "qk_norm": bool(cfg.get("qk_norm", DSPARK_ARCHITECTURE in archs
                                 or cfg.get("model_type") == "qwen3")),
            "num_anchors": int(cfg.get("num_anchors", 512)),
        }
        passthrough = {"architectures", "model_type", "head_dim", "markov_head_type",
                       "confidence_head_with_markov", "qk_norm", "target_hidden_size",
                       "num_target_layers", "rope_scaling", "rope_parameters",
                       "sample_from_anchor", *NESTED_CONFIG_KEYS}
        extra = {k: v for k, v in cfg.items() if k not in known and k not in passthrough}
        return DSparkConfig(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """DeepSpec-layout ``config.json`` dict (optional keys written only when they apply)."""
        d: dict[str, Any] = {
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            **self.extra,
            "architectures": [DSPARK_ARCHITECTURE],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": self.rope_parameters(),
            "sample_from_anchor": True,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "block_size": self.block_size,
            "target_layer_ids": list(self.target_layer_ids),
            "mask_token_id": self.mask_token_id,
            "num_anchors": self.num_anchors,
            "enable_confidence_head": self.enable_confidence_head,
            "markov_rank": self.markov_rank,
        }
        if self.enable_confidence_head:
            d["confidence_head_with_markov"] = self.confidence_head_with_markov
        if self.markov_rank > 0:
            d["markov_head_type"] = self.markov_head_type
        if self.num_target_layers is not None:
            d["num_target_layers"] = self.num_target_layers
        if self.target_hidden_size is not None and self.target_hidden_size != self.hidden_size:
            d["target_hidden_size"] = self.target_hidden_size
        if not self.qk_norm:
            d["qk_norm"] = False  # our extension; DeepSpec Qwen3 drafters always have it
        return d

    @staticmethod
    def load(path: str | Path) -> DSparkConfig:
        """Read ``config.json`` (a file, or a directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return DSparkConfig.from_dict(json.loads(p.read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
