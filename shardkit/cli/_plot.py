"""``--plot``: a histogram PNG of keys per shard, drawn with matplotlib's Agg backend.

matplotlib is optional (``pip install 'shardkit[plot]'``).  No pyplot: a
:class:`~matplotlib.figure.Figure` on an Agg canvas has no global state and
never opens a window.  The image is 800 x 450 pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import CliError

__all__ = [
    "COMPARE_HEIGHT",
    "COMPARE_WIDTH",
    "HEIGHT",
    "WIDTH",
    "plot_compare",
    "plot_distribution",
    "require_matplotlib",
]

WIDTH, HEIGHT, DPI = 800, 450, 100
COMPARE_WIDTH, COMPARE_HEIGHT = 1200, 450


def require_matplotlib(option: str = "--plot") -> None:
    """Fail early, in one line, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(f"{option} needs matplotlib: pip install 'shardkit[plot]'") from None


def plot_distribution(stats: dict[str, Any], path: Path, *, title: str) -> None:
    """Write the bar chart of ``stats["shards"]`` (keys per shard, expected as a line) to ``path``."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = stats["shards"]
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [r["alias"] for r in rows]
    ax.bar(names, [r["keys"] for r in rows], color="#4c72b0", label="keys")
    ax.plot(names, [r["expected"] for r in rows], color="#dd8452", marker="o", linestyle="--", label="expected")
    ax.set_xlabel("shard")
    ax.set_ylabel("keys")
    pm = stats.get("peak_mean")
    ax.set_title(f"{title}\npeak/mean {pm:.4f}" if pm else title, fontsize=10)
    ax.legend(loc="lower right")
    if len(names) > 12:
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=DPI)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def plot_compare(data: dict[str, Any], path: Path) -> None:
    """``ring compare`` as one 1200 x 450 PNG: balance, movement over the ideal, memory per layout."""
    require_matplotlib("--png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layouts = data["layouts"]
    labels = [e["label"] for e in layouts]
    x = list(range(len(labels)))
    fig = Figure(figsize=(COMPARE_WIDTH / DPI, COMPARE_HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    bal, mov, mem = fig.subplots(1, 3)
    w = 0.4
    bal.bar([i - w / 2 for i in x], [e["balance"]["exact_peak_mean"] for e in layouts], w, label="exact")
    bal.bar([i + w / 2 for i in x], [e["balance"]["keys_peak_mean"] for e in layouts], w, label="keys")
    bal.axhline(1.0, color="grey", linewidth=0.8)
    low = min([1.0, *(e["balance"]["keys_peak_mean"] for e in layouts)])
    high = max(
        [1.0, *(e["balance"]["keys_peak_mean"] for e in layouts), *(e["balance"]["exact_peak_mean"] for e in layouts)]
    )
    bal.set_ylim(low - 0.02 * (high - low + 0.01), high + 0.1 * (high - low + 0.01))
    bal.set_title("balance: peak / mean (1 is perfect)", fontsize=9)
    bal.legend(fontsize=7)
    mov.bar([i - w / 2 for i in x], [e["add"]["keys_ratio"] or 0 for e in layouts], w, label="add a shard")
    mov.bar([i + w / 2 for i in x], [e["remove"]["keys_ratio"] or 0 for e in layouts], w, label="remove a shard")
    mov.axhline(1.0, color="grey", linewidth=0.8)
    mov.set_title("keys moved / ideal (1 is minimal)", fontsize=9)
    mov.legend(fontsize=7)
    mem.bar(x, [e["memory"]["bytes"] for e in layouts], 0.6, color="#55a868")
    mem.set_title("ring memory (bytes)", fontsize=9)
    for ax in (bal, mov, mem):
        ax.set_xticks(x)
        ax.set_xticklabels(
            labels, rotation=20 if len(labels) > 2 else 0, ha="right" if len(labels) > 2 else "center", fontsize=7
        )
    fig.suptitle(f"ring compare: {data['keys']:,} keys from {data['source']}", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=DPI)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
