"""``--plot``: a histogram PNG of keys per shard, drawn with matplotlib's Agg backend.

matplotlib is optional (``pip install 'shardkit[plot]'``).  No pyplot: a
:class:`~matplotlib.figure.Figure` on an Agg canvas has no global state and
never opens a window.  The image is 800 x 450 pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import CliError

__all__ = ["HEIGHT", "WIDTH", "plot_distribution", "require_matplotlib"]

WIDTH, HEIGHT, DPI = 800, 450, 100


def require_matplotlib() -> None:
    """Fail early, in one line, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'shardkit[plot]'") from None


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
