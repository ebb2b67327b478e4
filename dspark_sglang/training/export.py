"""Export a trained drafter in DeepSpec's checkpoint layout, plus SPS table and STS files.

``out_dir`` receives ``config.json`` + ``model.safetensors`` (via
:func:`save_dspark_checkpoint`; weights cast to ``dtype``, default bf16 to keep shipped
checkpoints small), ``sts_calibration.json`` when a calibration is given or installed, and
``sps_table.json`` when an SPS table file is given (copied as is). The directory loads with
:func:`load_dspark_checkpoint` and with upstream SGLang's ``--speculative-algorithm DSPARK``
(``--speculative-dspark-confidence-sts-path <dir>/sts_calibration.json``,
``--speculative-dspark-sps-table-path <dir>/sps_table.json``).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from dspark_sglang.speculative.dspark.checkpoint import save_dspark_checkpoint
from dspark_sglang.speculative.dspark.confidence import StsCalibration
from dspark_sglang.speculative.dspark.model import DSparkDrafter

SPS_FILE = "sps_table.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_drafter(
    drafter: DSparkDrafter,
    out_dir: str | Path,
    calibration: StsCalibration | None = None,
    sps_table_path: str | Path | None = None,
    dtype: str = "bfloat16",
) -> Path:
    """Write the checkpoint directory (the live drafter is not modified); returns it."""
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
    if calibration is None and any(t != 1.0 for t in drafter.sts_calibration().temperatures):
        calibration = drafter.sts_calibration()  # read from the float32 original
    save_dspark_checkpoint(tmp, clone, calibration=calibration)
    if sps_table_path is not None:
        shutil.copyfile(sps_table_path, tmp / SPS_FILE)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
