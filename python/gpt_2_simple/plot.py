"""Charts drawn without matplotlib (not a dependency of the package), written as 8-bit RGB PNG with zlib.

- ``loss_png``: ``loss.png`` for the run folder: training loss (blue) and validation loss (orange)
  against the step, light grid lines at round loss values labelled on the left, the first and last
  step under the axis. Exact numbers are in ``log.jsonl`` beside it.
- ``bar_chart_png``: grouped bar charts on a log scale around 1, for the benchmark results
  (each bar a speed relative to a reference peer).
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

__all__ = ["loss_png", "bar_chart_png", "png_bytes"]

WIDTH, HEIGHT, MARGIN = 640, 360, 40
TRAIN_RGB, VAL_RGB, GRID_RGB, AXIS_RGB = (31, 119, 180), (255, 127, 14), (225, 225, 225), (90, 90, 90)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG."""
    h, w, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")


# 3x5 pixel glyphs for the tick labels, one row of three bits per string.
_GLYPHS = {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111", "3": "111 001 111 001 111",
    "4": "101 101 111 001 001", "5": "111 100 111 001 111", "6": "111 100 111 101 111", "7": "111 001 010 010 010",
    "8": "111 101 111 101 111", "9": "111 101 111 001 111", ".": "000 000 000 000 010", "-": "000 000 111 000 000",
    "e": "000 111 111 100 111", "k": "100 101 110 101 101",
    "A": "010 101 111 101 101", "B": "110 101 110 101 110", "C": "011 100 100 100 011", "D": "110 101 101 101 110",
    "E": "111 100 110 100 111", "F": "111 100 110 100 100", "G": "011 100 101 101 011", "H": "101 101 111 101 101",
    "I": "111 010 010 010 111", "J": "001 001 001 101 010", "K": "101 101 110 101 101", "L": "100 100 100 100 111",
    "M": "101 111 111 101 101", "N": "110 101 101 101 101", "O": "010 101 101 101 010", "P": "110 101 110 100 100",
    "Q": "010 101 101 110 011", "R": "110 101 110 101 101", "S": "011 100 010 001 110", "T": "111 010 010 010 010",
    "U": "101 101 101 101 111", "V": "101 101 101 101 010", "W": "101 101 111 111 101", "X": "101 101 010 101 101",
    "Y": "101 101 010 010 010", "Z": "111 001 010 100 111", ",": "000 000 000 010 100", ":": "000 010 000 010 000",
    "/": "001 001 010 100 100", "(": "010 100 100 100 010", ")": "010 001 001 001 010", "%": "101 001 010 100 101",
    "=": "000 111 000 111 000", "+": "000 010 111 010 000", "_": "000 000 000 000 111",
}  # fmt: skip
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
           (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def _text(image: np.ndarray, x: int, y: int, text: str, rgb, scale: int = 2) -> None:
    """Draw ``text`` with its top-left corner at (x, y)."""
    for i, ch in enumerate(text):
        rows = _GLYPHS.get(ch, _GLYPHS.get(ch.upper(), "000 000 000 000 000")).split()  # lowercase drawn as capitals
        for r, bits in enumerate(rows):
            for c, bit in enumerate(bits):
                if bit == "1":
                    y0, x0 = y + r * scale, x + (i * 4 + c) * scale
                    image[max(y0, 0) : y0 + scale, max(x0, 0) : x0 + scale] = rgb


def _label(value: float) -> str:
    return f"{value:.3g}".replace("e+0", "e").replace("e-0", "e-")


def _polyline(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, rgb, thick: int = 1) -> None:
    """Draw straight segments between consecutive points, densely sampled (no gaps at any slope)."""
    if len(xs) == 1:
        xs, ys = np.repeat(xs, 2), np.repeat(ys, 2)
    for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        px = np.rint(np.linspace(x0, x1, n + 1)).astype(int)
        py = np.rint(np.linspace(y0, y1, n + 1)).astype(int)
        for d in range(thick):
            image[np.clip(py + d, 0, image.shape[0] - 1), np.clip(px, 0, image.shape[1] - 1)] = rgb


def loss_png(train: list[tuple[int, float]], val: list[tuple[int, float]] = ()) -> bytes:
    """PNG of the (step, loss) series ``train`` and ``val``."""
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    points = [p for p in (*train, *val) if math.isfinite(p[1])]
    if points:
        steps = np.array([p[0] for p in points], float)
        losses = np.array([p[1] for p in points], float)
        s0, s1 = steps.min(), max(steps.max(), steps.min() + 1)
        l0, l1 = losses.min(), max(losses.max(), losses.min() + 1e-3)
        l0, l1 = l0 - 0.05 * (l1 - l0), l1 + 0.05 * (l1 - l0)

        def to_x(s):
            return MARGIN + (np.asarray(s, float) - s0) / (s1 - s0) * (WIDTH - 2 * MARGIN)

        def to_y(v):
            return HEIGHT - MARGIN - (np.asarray(v, float) - l0) / (l1 - l0) * (HEIGHT - 2 * MARGIN)

        spacing = 10 ** math.floor(math.log10(l1 - l0))  # grid lines at round loss values
        if (l1 - l0) / spacing < 3:
            spacing /= 5
        for level in np.arange(math.ceil(l0 / spacing) * spacing, l1, spacing):
            y = int(round(float(to_y(level))))
            image[y, MARGIN : WIDTH - MARGIN] = GRID_RGB
            _text(image, 2, y - 5, _label(level), AXIS_RGB)
        for s, align in ((s0, 0), (s1, 1)):
            label = _label(s) if s < 1e5 else f"{s / 1e3:.0f}k"
            _text(image, int(to_x(s)) - align * len(label) * 8, HEIGHT - MARGIN + 6, label, AXIS_RGB)
        for series, rgb, thick in ((train, TRAIN_RGB, 1), (val, VAL_RGB, 2)):
            series = [p for p in series if math.isfinite(p[1])]
            if series:
                _polyline(image, to_x([p[0] for p in series]), to_y([p[1] for p in series]), rgb, thick)
    image[HEIGHT - MARGIN, MARGIN : WIDTH - MARGIN] = AXIS_RGB
    image[MARGIN : HEIGHT - MARGIN + 1, MARGIN] = AXIS_RGB
    return png_bytes(image)


def bar_chart_png(panels: list[dict], width: int = 960) -> bytes:
    """PNG of grouped bar charts stacked vertically, one per panel: ``{"title": str, "groups": [label],
    "series": [name], "values": [[value or None for each series] for each group]}``. Values are
    positive ratios drawn on a log scale: bars grow up from 1 for values above it and down for
    values below, with grid lines at powers of ten labelled on the left; each series has one
    colour (legend under the title) and each group its label under its bars."""
    panel_height, top, bottom, left = 260, 50, 34, 56
    image = np.full((max(1, len(panels)) * panel_height, width, 3), 255, np.uint8)
    for p, panel in enumerate(panels):
        y0 = p * panel_height
        _text(image, 8, y0 + 8, panel["title"].upper(), AXIS_RGB)
        x = 8
        for s, name in enumerate(panel["series"]):  # legend
            image[y0 + 28 : y0 + 38, x : x + 10] = PALETTE[s % len(PALETTE)]
            _text(image, x + 14, y0 + 28, name.upper(), AXIS_RGB)
            x += 14 + 8 * len(name) + 16
        values = [v for row in panel["values"] for v in row if v is not None and v > 0 and math.isfinite(v)]
        if not values:
            continue
        lo = 10 ** math.floor(math.log10(min(min(values), 1.0) / 1.2))
        hi = 10 ** math.ceil(math.log10(max(max(values), 1.0) * 1.2))
        plot_top, plot_bottom = y0 + top, y0 + panel_height - bottom

        def to_y(v: float) -> int:
            return int(round(plot_bottom - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (plot_bottom - plot_top)))

        for e in range(int(round(math.log10(lo))), int(round(math.log10(hi))) + 1):
            y = to_y(10.0**e)
            image[y, left : width - 8] = GRID_RGB if e else AXIS_RGB  # the line at 1 (the reference) darker
            _text(image, 4, y - 5, _label(10.0**e), AXIS_RGB)
        groups, series = panel["groups"], panel["series"]
        group_width = (width - left - 16) / max(1, len(groups))
        bar = max(2, int(group_width * 0.8 / max(1, len(series))))
        for g, (label, row) in enumerate(zip(groups, panel["values"])):
            gx = left + 8 + g * group_width
            for s, v in enumerate(row):
                if v is None or not (v > 0 and math.isfinite(v)):
                    continue
                bx = int(gx + group_width * 0.1 + s * bar)
                ya, yb = sorted((to_y(1.0), to_y(v)))
                image[ya : max(yb, ya + 1) + 1, bx : bx + bar - 1] = PALETTE[s % len(PALETTE)]
            fit = max(1, int(group_width // 8) - 2)  # a gap between neighbouring labels
            _text(image, int(gx + max(0.0, (group_width - 8 * min(len(label), fit)) / 2)), plot_bottom + 8, label[:fit].upper(), AXIS_RGB)
        image[plot_top : plot_bottom + 1, left] = AXIS_RGB
    return png_bytes(image)
