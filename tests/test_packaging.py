"""The kernels folder is the package ``dspark_kernels``: no clash with PyPI's ``kernels``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_code_imports_top_level_kernels():
    pat = re.compile(r"^\s*(from|import)\s+kernels(\.|\s|$)", re.M)
    offenders = [str(p) for p in (ROOT / "dspark_sglang").rglob("*.py")
                 if pat.search(p.read_text())]
    assert offenders == []


def test_pyproject_maps_kernels_to_unique_name():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"dspark_kernels"' in text.split("packages = [", 1)[1]
    assert (ROOT / "dspark_kernels" / "__init__.py").is_file()


def test_checkout_does_not_shadow_huggingface_kernels():
    """transformers >= 5.2x imports Hugging Face's top-level ``kernels`` package; a ``kernels/``
    folder at the checkout root (on ``sys.path`` under ``python -m pytest``) used to shadow it."""
    code = ("import importlib.util, sys; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else '')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    origin = r.stdout.strip()
    assert not origin or Path(origin).resolve().parent.parent != ROOT.resolve(), origin


def test_import_package_without_gpu_libraries(tmp_path):
    code = ("import sys; sys.modules['triton'] = None; sys.modules['flashinfer'] = None; "
            "import dspark_sglang, dspark_sglang.entrypoints.engine; "
            "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


def test_every_package_folder_is_installed():
    """A subpackage missing from pyproject's list would be absent from an installed wheel."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "dspark_sglang").rglob("__init__.py")}
    assert found and not found - listed, sorted(found - listed)
    # data files the package reads by path ship with it
    assert "training/*.jsonl" in cfg["package-data"]["dspark_sglang"]
    assert list((ROOT / "dspark_sglang" / "training").glob("*.jsonl"))
