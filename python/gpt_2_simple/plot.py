"""``loss.png`` for the run folder, drawn without matplotlib (not a dependency of the package).

A plain line chart: training loss (blue) and validation loss (orange) against the step, light
grid lines at round loss values labelled on the left, the first and last step under the axis,
written as an 8-bit RGB PNG with zlib. Exact numbers are in ``log.jsonl`` beside it.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

__all__ = ["loss_png", "png_bytes"]

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
}  # fmt: skip


def _text(image: np.ndarray, x: int, y: int, text: str, rgb, scale: int = 2) -> None:
    """Draw ``text`` with its top-left corner at (x, y)."""
    for i, ch in enumerate(text):
        rows = _GLYPHS.get(ch, "000 000 000 000 000").split()
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
