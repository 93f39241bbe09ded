"""``loss.png``: the run's training and validation loss against the step, drawn with matplotlib
from the run folder's ``log.jsonl`` (so the picture always shows what the log holds).

matplotlib is a training dependency: it is imported here, inside the functions, so that
``import gpt_2_simple`` and generation never load it. Figures are drawn on their own Agg canvas
(no pyplot, no global figure state), which also works without a display and in worker threads.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

__all__ = ["read_log", "loss_figure", "loss_png", "png_of"]

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 4.5, 100  # loss.png is 800 x 450 pixels
TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#ff7f0e"  # matplotlib's first two default colours


def read_log(path: str | os.PathLike) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The (step, loss) and (step, val_loss) series of a ``log.jsonl``; lines that are not a JSON
    object with those keys (a line cut by a crash, a future field) are skipped."""
    train, val = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            step = int(entry["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        for key, series in (("loss", train), ("val_loss", val)):
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.append((step, float(value)))
    return train, val


def loss_figure(train: list[tuple[int, float]], val: list[tuple[int, float]], title: str):
    """A matplotlib Figure: loss against step, a 'train' line and 'validation' points joined by a
    line, axis names, a legend and ``title``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), color=TRAIN_COLOR, linewidth=1.2, label="train")
    if val:
        ax.plot(*zip(*val), color=VAL_COLOR, linewidth=2.0, marker="o", markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(True, color="#e0e0e0", linewidth=0.8)
    if train or val:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no steps logged yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    return fig


def png_of(fig) -> bytes:
    """The figure as PNG bytes (Agg; no text chunk with a date, so equal figures give equal files)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def loss_png(log_path: str | os.PathLike, title: str) -> bytes:
    """``loss.png`` for the run whose ``log.jsonl`` is at ``log_path``."""
    return png_of(loss_figure(*read_log(log_path), title))
