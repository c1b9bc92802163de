"""Chart output shared by every stage: figures are written atomically so a kill never leaves half a PNG."""

from __future__ import annotations

import io
from pathlib import Path

from gptforge.io import atomic_write_bytes


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure to ``path`` as PNG (rendered in memory, written atomically), then close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getbuffer())
