"""One way to draw a PNG: headless (Agg), laid out, saved and closed even when drawing fails."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figure(
    path: str | Path, size: tuple[float, float], *, ncols: int = 1, dpi: int = 100
) -> Iterator[tuple[Any, Any]]:
    """``with figure(path, (6, 4)) as (fig, ax): ax.bar(...)`` writes ``path`` on leaving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=size)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
