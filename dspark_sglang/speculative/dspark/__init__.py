"""DSpark drafter: parallel block backbone, Markov head, confidence head, DeepSpec checkpoints."""

from dspark_sglang.speculative.dspark.checkpoint import (
    load_dspark_checkpoint,
    save_dspark_checkpoint,
)
from dspark_sglang.speculative.dspark.confidence import StsCalibration
from dspark_sglang.speculative.dspark.config import DSparkConfig
from dspark_sglang.speculative.dspark.model import DraftChain, DSparkDrafter

__all__ = [
    "DSparkConfig",
    "DSparkDrafter",
    "DraftChain",
    "StsCalibration",
    "load_dspark_checkpoint",
    "save_dspark_checkpoint",
]
