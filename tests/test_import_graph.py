"""The import graph of ``dspark_sglang`` follows the layer order in docs/architecture.md.

Every module is parsed with ``ast`` (no import is executed): module-level imports, imports inside
functions and methods, and relative imports all count. A component is a top-level sub-package or
top-level module of ``dspark_sglang``. A component may import components of its own rank or
below, never above, and the graph between components has no cycle.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dspark_sglang"
DOC = ROOT / "docs" / "architecture.md"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every ``dspark_sglang`` import anywhere in ``source``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when it exists
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            found += [(t, node.lineno) for t in (subs or [target])]
    return [(t, line) for t, line in found if t == "dspark_sglang" or
            t.startswith("dspark_sglang.")]


def _is_module(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _documented_order() -> list[list[str]]:
    """Ranks from the ``Import direction`` section: lowest first; ``a, b`` share a rank."""
    text = DOC.read_text().split("## Import direction", 1)[1]
    block = re.search(r"```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md: Import direction needs a ``` block with the order"
    ranks = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ranks.append([c.strip() for c in line.split(",") if c.strip()])
    return ranks


def _graph() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PKG.rglob("*.py")):
        src = _module_name(path)
        for target, line in _imports(path):
            a, b = _component(src), _component(target)
            if a != b:
                edges[(a, b)].append(f"{path.relative_to(ROOT)}:{line} -> {target}")
    return edges


def _components() -> set[str]:
    names = {p.stem for p in PKG.glob("*.py")}
    names |= {p.parent.name for p in PKG.glob("*/__init__.py")}
    return names


def test_every_component_has_a_documented_rank() -> None:
    ranked = [c for rank in _documented_order() for c in rank]
    assert len(ranked) == len(set(ranked)), "a component is listed twice"
    assert sorted(_components() - set(ranked)) == []
    assert sorted(set(ranked) - _components()) == []


def test_no_upward_import() -> None:
    rank = {c: i for i, cs in enumerate(_documented_order()) for c in cs}
    upward = [where for (a, b), sites in _graph().items() if rank[a] < rank[b] for where in sites]
    assert upward == []


def test_no_cycle_between_components() -> None:
    succ: dict[str, set[str]] = defaultdict(set)
    for a, b in _graph():
        succ[a].add(b)
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(succ[node]):
            if state.get(nxt) == 1:
                return stack + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(_components()):
        if start not in state:
            assert visit(start, []) is None


def test_the_checker_sees_function_level_and_relative_imports() -> None:
    src = ("def f():\n    from ..entrypoints import engine\n    import dspark_sglang.server_args\n"
           "    from . import verify\n")
    found = _imports_of(src, "dspark_sglang.speculative.probe", is_package=False)
    assert ("dspark_sglang.entrypoints.engine", 2) in found
    assert ("dspark_sglang.server_args", 3) in found
    assert ("dspark_sglang.speculative.verify", 4) in found


def test_sampling_lives_in_the_decoder_not_the_scheduler() -> None:
    """The scheduler hands the prefill's last logits to ``SpecDecoder.sample_first_token``; it
    imports neither the sampler nor logits processing."""
    sampling = {"dspark_sglang.layers.sampler", "dspark_sglang.layers.coupling",
                "dspark_sglang.layers.logits_processing"}
    for path in (PKG / "scheduler").glob("*.py"):
        assert not sampling & {m for m, _ in _imports(path)}, path
