"""DSpark confidence head, STS calibration file, and the grammar-mask correction.

Head (DeepSpec ``AcceptRatePredictor``, tensor names ``confidence_head.proj.{weight,bias}``):
``z_k = w · [h_k ; W1[x_{k-1}]] + b`` (the Markov part only when ``confidence_head_with_markov``),
``c_k = sigmoid(z_k)``: the predicted probability that draft ``k`` is accepted given that drafts
``< k`` were. It is trained against ``sum_v min(p_t, p_d) = 1 - ½‖p_d − p_t‖₁``.

Sequential Temperature Scaling (SGLang ``dspark_sts.py`` / ``dspark_sts_fit``): one temperature
per block position, ``calibrated_k = sigmoid(z_k / T_k)``. The file that
``--speculative-dspark-confidence-sts-path`` reads is JSON
``{"temperatures": [T_0..T_{gamma-1}], "dataset": str, "num_samples": int, "ece_before": [...],
"ece_after": [...]}`` (only ``temperatures`` is required, all ``> 0``). Some runtimes write the
key ``sts_temperatures``; we read either. We never write NaN (see :meth:`StsCalibration.to_dict`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ConfidenceHead(nn.Module):
    """``Linear(input_dim, 1)`` returning raw logits ``z`` (apply sigmoid / STS outside)."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1).float()  # [...]


@dataclass
class StsCalibration:
    """Per-position STS temperatures plus how well they fitted (SGLang's JSON fields)."""

    temperatures: list[float]
    dataset: str = ""
    num_samples: int = 0
    ece_before: list[float] = field(default_factory=list)
    ece_after: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise ValueError("STS calibration needs at least one temperature")
        if any(not (t > 0 and math.isfinite(t)) for t in self.temperatures):
            raise ValueError(f"STS temperatures must all be > 0, got {self.temperatures}")

    @staticmethod
    def identity(gamma: int) -> StsCalibration:
        return StsCalibration(temperatures=[1.0] * gamma)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: never NaN/inf (upstream's msgspec parser rejects them).

        An ECE list with a non-finite entry (a position without samples) is omitted as a whole,
        since upstream types it ``list[float]`` (no nulls) and dropping single entries would
        shift positions."""
        d: dict[str, Any] = {
            "temperatures": [float(t) for t in self.temperatures],
            "dataset": self.dataset,
            "num_samples": int(self.num_samples),
        }
        for key in ("ece_before", "ece_after"):
            values = [float(e) for e in getattr(self, key)]
            if all(math.isfinite(e) for e in values):
                d[key] = values
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> StsCalibration:
        temps = d.get("temperatures", d.get("sts_temperatures"))
        if temps is None:
            raise KeyError("STS file has neither 'temperatures' nor 'sts_temperatures'")
        return StsCalibration(
            temperatures=[float(t) for t in temps],
            dataset=str(d.get("dataset", "")),
            num_samples=int(d.get("num_samples", 0)),
            ece_before=[math.nan if e is None else float(e) for e in d.get("ece_before", [])],
            ece_after=[math.nan if e is None else float(e) for e in d.get("ece_after", [])],
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @staticmethod
    def load(path: str | Path) -> StsCalibration:
        return StsCalibration.from_dict(json.loads(Path(path).read_text()))


def apply_sts_torch(conf_logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """``sigmoid(z_k / T_k)``: ``conf_logits [..., k]``, ``temperatures [>= k]`` -> ``[..., k]``."""
    k = conf_logits.shape[-1]
    return torch.sigmoid(conf_logits.float() / temperatures[:k].to(conf_logits.device).float())


def mask_adjusted_confidence(
    confidence: torch.Tensor,
    logits: torch.Tensor,
    masked_logits: torch.Tensor,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """Correct a calibrated confidence for a grammar mask applied to draft *and* target.

    The head was trained on unmasked distributions. Under a grammar both the draft and the
    target are restricted to the same allowed set, which can only remove disagreement. We model
    the rejection risk ``1 - c`` as proportional to the draft's mass on *alternatives* to the
    token it chose, ``1 - q(x)``, and let the mask remove invalid alternatives:
    ``1 - c' = (1 - c) · (1 - q_masked(x)) / (1 - q(x))`` with ``q`` / ``q_masked`` the
    temperature-1 softmax of the logits before / after the mask. Consequences: no mask ⇒
    ``c' = c``; a mask that leaves one token ⇒ ``c' = 1`` (draft and target are both forced);
    ``c' >= c`` always. When ``q(x) = 1`` there is no alternative mass and ``c' = c``.

    Shapes: ``confidence [bs]``, ``logits``/``masked_logits`` ``[bs, V]``, ``tokens [bs]``.
    Under sampling ``tokens`` must not be the drawn draft token (the verify decision would then
    anticipate it and bias the output): the sampler passes the masked distribution's mode.
    """
    idx = tokens.long().unsqueeze(-1)
    q = torch.softmax(logits.float(), dim=-1).gather(-1, idx).squeeze(-1)  # [bs]
    q_masked = torch.softmax(masked_logits.float(), dim=-1).gather(-1, idx).squeeze(-1)
    alt, alt_masked = 1.0 - q, (1.0 - q_masked).clamp(min=0.0)
    ratio = torch.where(alt > 1e-12, (alt_masked / alt.clamp(min=1e-12)).clamp(max=1.0),
                        torch.ones_like(alt))
    return 1.0 - (1.0 - confidence.float()) * ratio
