"""PNG charts of benchmark rows (matplotlib, imported lazily; Agg backend, no display).

Rows are the dicts the benchmarks put in their JSON ``results``: ``mode``, a load key
(``conc`` or ``rate``), ``output_tok_s``, ``per_user_tok_s``, ``tau_by_domain``,
``per_position_acceptance``, ``verify_tokens_per_batch_step``. Peer rows (``peer`` key) appear as
single points on the Pareto chart.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

PLOT_INSTALL_HINT = "pip install matplotlib"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(f"--plot needs matplotlib ({PLOT_INSTALL_HINT})") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error") and r.get("output_tok_s") is not None]


def _by_mode(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(rows):
        if "mode" in r:
            groups[str(r["mode"])].append(r)
    return groups


def _series(rows: list[dict[str, Any]], load_key: str
            ) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    """Rows grouped per mode and load kind (``conc`` / ``rate``), sorted by load value.
    Series of the other load kind than ``load_key`` are labelled ``mode [kind]``."""
    groups: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    for r in _ok(rows):
        if "mode" not in r:
            continue
        for kind in ("conc", "rate"):
            if r.get(kind) is not None:
                label = str(r["mode"]) if kind == load_key else f"{r['mode']} [{kind}]"
                groups[label].append((float(r[kind]), r))
                break
    return {k: sorted(v, key=lambda t: t[0]) for k, v in sorted(groups.items())}


def plot_pareto(rows: list[dict[str, Any]], path: Path, load_key: str,
                peers: list[dict[str, Any]] | None = None) -> Path:
    """Per-user tokens/s (y) against aggregate tokens/s (x), one line per mode over load."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, pts in _series(rows, load_key).items():
        xs = [r["output_tok_s"] for _, r in pts]
        ys = [r.get("per_user_tok_s") or 0.0 for _, r in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for (v, _), x, y in zip(pts, xs, ys):
            ax.annotate(f"{v:g}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for p in _ok(peers or []):
        ax.scatter([p["output_tok_s"]], [p.get("per_user_tok_s") or 0.0], marker="x",
                   label=f"peer: {p['peer']}")
    ax.set_xlabel("aggregate output tokens/s")
    ax.set_ylabel("per-user tokens/s")
    ax.set_title(f"throughput vs per-user speed (labels: {load_key})")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(plt, fig, path)


def plot_tau_by_domain(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: pooled accepted length per domain, one bar per mode (lowest load)."""
    plt = _pyplot()
    per_mode: dict[str, dict[str, float]] = {}
    for mode, rs in sorted(_by_mode(rows).items()):
        taus = rs[0].get("tau_by_domain") or {}
        per_mode[mode] = {d: t for d, t in taus.items() if t is not None}
    domains = sorted({d for taus in per_mode.values() for d in taus})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(per_mode), 1)
    for k, (mode, taus) in enumerate(per_mode.items()):
        xs = [i + k * width for i in range(len(domains))]
        ax.bar(xs, [taus.get(d, 0.0) for d in domains], width=width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))])
    ax.set_xticklabels(domains, rotation=20, fontsize=8)
    ax.set_ylabel("accepted tokens per verify step (tau)")
    ax.set_title("tau by domain")
    _legend(ax)
    return _save(plt, fig, path)


def plot_per_position(rows: list[dict[str, Any]], path: Path) -> Path:
    """Conditional acceptance at draft position k (given positions < k were accepted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rs in sorted(_by_mode(rows).items()):
        acc = rs[0].get("per_position_acceptance") or []
        if acc:
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=mode)
    ax.set_xlabel("draft position")
    ax.set_ylabel("conditional acceptance")
    ax.set_ylim(0, 1.05)
    ax.set_title("per-position conditional acceptance (lowest load)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(plt, fig, path)


def plot_verify_vs_load(rows: list[dict[str, Any]], path: Path, load_key: str) -> Path:
    """Verify tokens per request step against load (the scheduler should shrink it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, series in _series(rows, load_key).items():
        if label != label.split(" [")[0]:
            continue  # the other load kind has another x axis
        pts = [(v, r.get("verify_tokens_per_req_step")) for v, r in series]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set_xlabel(load_key)
    ax.set_ylabel("verify tokens per request step")
    ax.set_title("verify length vs load")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(plt, fig, path)


def write_plots(rows: list[dict[str, Any]], out_dir: str | Path, load_key: str = "conc",
                peers: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write the four charts into ``out_dir``; returns their paths. Raises RuntimeError
    naming the install command when matplotlib is missing."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    return [
        plot_pareto(rows, d / "pareto.png", load_key, peers),
        plot_tau_by_domain(rows, d / "tau_by_domain.png"),
        plot_per_position(rows, d / "per_position_acceptance.png"),
        plot_verify_vs_load(rows, d / "verify_tokens_vs_load.png", load_key),
    ]
