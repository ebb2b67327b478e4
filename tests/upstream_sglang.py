"""Upstream SGLang's own DSpark parsing code, loaded from the installed ``sglang`` package.

``sglang.srt.speculative.dspark_components.dspark_config`` does not import on a CPU box without
torchvision (its import chain pulls in multimodal processors), so we compile just the pure
functions and classes we need from the installed source files into a private namespace. Nothing
is copied into this repository: the code runs from the wheel, so a change upstream shows here.
The STS and SPS modules import normally and are used directly.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import msgspec
import pytest

_WANTED = {
    "speculative/dflash_utils.py": (
        "_cfg_get", "_get_text_config", "_get_dflash_config", "_parse_optional_int",
        "DFlashDraftConfig", "build_target_layer_ids", "parse_dflash_draft_config",
        "get_dflash_layer_types"),
    "speculative/dspark_components/dspark_config.py": (
        "DEFAULT_DSPARK_GAMMA", "SUPPORTED_DSPARK_MARKOV_HEAD_TYPES",
        "get_dspark_sample_from_anchor", "dspark_gamma_from_num_draft_tokens",
        "DSparkDraftConfig", "DSparkRuntimeConfig", "resolve_runtime_config",
        "_get_nested_config", "_get_dspark_config", "parse_dspark_draft_config"),
    "utils/hf_transformers/common.py": ("get_rope_config",),
}


def _srt_dir() -> Path:
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        pytest.skip("sglang is not installed")
    return Path(spec.origin).parent / "srt"


def _node_names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    return []


def load_upstream_parsers() -> SimpleNamespace:
    """Namespace with upstream's ``parse_dspark_draft_config``, ``resolve_runtime_config``, ..."""
    module_obj = types.ModuleType("upstream_sglang_dspark")
    sys.modules[module_obj.__name__] = module_obj  # dataclasses looks its module up
    ns = module_obj.__dict__
    ns.update({
        "Any": Any, "List": list, "Optional": Optional,
        "Sequence": Sequence, "Integral": Integral, "dataclass": dataclass, "msgspec": msgspec,
        "logger": logging.getLogger("upstream_sglang_dspark"),
        "DEFAULT_DFLASH_MASK_TOKEN": "<|MASK|>",
    })
    # every ``@dataclass`` upstream uses here is a plain (frozen) dataclass
    srt = _srt_dir()
    for rel, names in _WANTED.items():
        path = srt / rel
        if not path.is_file():
            pytest.skip(f"installed sglang has no {rel}")
        tree = ast.parse(path.read_text())
        picked = [n for n in tree.body if set(_node_names(n)) & set(names)]
        missing = set(names) - {x for n in picked for x in _node_names(n)}
        if missing:
            pytest.skip(f"installed sglang {rel} lacks {sorted(missing)}")
        module = ast.Module(body=picked, type_ignores=[])
        exec(compile(module, str(path), "exec"), ns)  # noqa: S102  (upstream's own source)
    return SimpleNamespace(**{k: v for k, v in ns.items() if not k.startswith('__')})
