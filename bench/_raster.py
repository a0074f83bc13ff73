"""A minimal RGB rasteriser for the benchmark figures: filled rectangles, lines, markers and text.

No imaging dependency: a :class:`Canvas` is a ``uint8 (H, W, 3)`` NumPy array (written to PNG by
:func:`medattn_fast.png.write_png`). Coordinates are pixels, ``x`` to the right, ``y`` down;
rectangles are half-open ``[x0, x1) × [y0, y1)`` and clipped to the canvas.

Text uses a built-in 5×7 bitmap font (:data:`FONT`, one string of 7 rows of 5 bits per glyph, in
the style of the classic LCD character ROMs): digits, upper- and lower-case ASCII letters and the
symbols the figures need (``. , : ; × % / - + ( ) [ ] = ² ³ _ ' < > | ! ? # ·``); letters with
descenders (``g j p q y``) and ``, ;`` use an 8th row below the baseline. A glyph cell is 6×10 font
pixels (one column and two rows of spacing), each font pixel drawn as a ``scale × scale``
block; characters outside the table are drawn as ``?``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

Color = Tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)

_GLYPHS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 10001 11111 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    "a": "00000 00000 01110 00001 01111 10001 01111", "b": "10000 10000 10110 11001 10001 10001 11110",
    "c": "00000 00000 01110 10000 10000 10001 01110", "d": "00001 00001 01101 10011 10001 10001 01111",
    "e": "00000 00000 01110 10001 11111 10000 01110", "f": "00110 01001 01000 11100 01000 01000 01000",
    "g": "00000 00000 01111 10001 10001 01111 00001 01110", "h": "10000 10000 10110 11001 10001 10001 10001",
    "i": "00100 00000 01100 00100 00100 00100 01110", "j": "00010 00000 00110 00010 00010 00010 10010 01100",
    "k": "10000 10000 10010 10100 11000 10100 10010", "l": "01100 00100 00100 00100 00100 00100 01110",
    "m": "00000 00000 11010 10101 10101 10001 10001", "n": "00000 00000 10110 11001 10001 10001 10001",
    "o": "00000 00000 01110 10001 10001 10001 01110", "p": "00000 00000 11110 10001 10001 11110 10000 10000",
    "q": "00000 00000 01111 10001 10001 01111 00001 00001", "r": "00000 00000 10110 11001 10000 10000 10000",
    "s": "00000 00000 01110 10000 01110 00001 11110", "t": "01000 01000 11100 01000 01000 01001 00110",
    "u": "00000 00000 10001 10001 10001 10011 01101", "v": "00000 00000 10001 10001 10001 01010 00100",
    "w": "00000 00000 10001 10001 10101 10101 01010", "x": "00000 00000 10001 01010 00100 01010 10001",
    "y": "00000 00000 10001 10001 10001 01111 00001 01110", "z": "00000 00000 11111 00010 00100 01000 11111",
    " ": "00000 00000 00000 00000 00000 00000 00000", ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 00000 01100 00100 01000", ":": "00000 01100 01100 00000 01100 01100 00000",
    ";": "00000 01100 01100 00000 00000 01100 00100 01000", "×": "00000 10001 01010 00100 01010 10001 00000",
    "%": "11000 11001 00010 00100 01000 10011 00011", "/": "00000 00001 00010 00100 01000 10000 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000", "+": "00000 00100 00100 11111 00100 00100 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "[": "01110 01000 01000 01000 01000 01000 01110", "]": "01110 00010 00010 00010 00010 00010 01110",
    "=": "00000 00000 11111 00000 11111 00000 00000", "²": "01100 10010 00100 01000 11110 00000 00000",
    "³": "11100 00010 01100 00010 11100 00000 00000", "_": "00000 00000 00000 00000 00000 00000 11111",
    "'": "01100 00100 01000 00000 00000 00000 00000", "<": "00010 00100 01000 10000 01000 00100 00010",
    ">": "01000 00100 00010 00001 00010 00100 01000", "|": "00100 00100 00100 00100 00100 00100 00100",
    "!": "00100 00100 00100 00100 00100 00000 00100", "?": "01110 10001 00001 00010 00100 00000 00100",
    "#": "01010 01010 11111 01010 11111 01010 01010",
    "·": "00000 00000 00000 01100 01100 00000 00000",
}
GLYPH_W, GLYPH_H = 5, 8
CELL_W, CELL_H = GLYPH_W + 1, GLYPH_H + 2
#: glyph -> bool array (8, 5): 7 rows above the baseline, an 8th for descenders (g j p q y , ;)
FONT = {ch: np.array([[b == "1" for b in row] for row in (rows.split() + ["00000"])[:GLYPH_H]], dtype=bool)
        for ch, rows in _GLYPHS.items()}


def text_size(text: str, scale: int = 2) -> Tuple[int, int]:
    """(width, height) in pixels of one line of ``text`` (no trailing column of spacing)."""
    return (max(len(text) * CELL_W - 1, 0) * scale, GLYPH_H * scale)


class Canvas:
    """An RGB image to draw on; ``pixels`` is the ``uint8 (height, width, 3)`` array."""

    def __init__(self, width: int, height: int, background: Color = WHITE):
        if width < 1 or height < 1:
            raise ValueError(f"Canvas: size must be positive, got {width}×{height}")
        self.pixels = np.empty((height, width, 3), np.uint8)
        self.pixels[:] = background

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: Color) -> None:
        """Fill ``[x0, x1) × [y0, y1)`` (corners in any order, rounded to pixels, clipped)."""
        xa, xb = sorted((int(round(x0)), int(round(x1))))
        ya, yb = sorted((int(round(y0)), int(round(y1))))
        xa, xb = max(xa, 0), min(xb, self.width)
        ya, yb = max(ya, 0), min(yb, self.height)
        if xa < xb and ya < yb:
            self.pixels[ya:yb, xa:xb] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1) -> None:
        """A straight line ``width`` pixels thick: squares stamped at every pixel step along it."""
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        half = (width - 1) / 2.0
        for t in np.linspace(0.0, 1.0, steps + 1):
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            self.rect(x - half, y - half, x - half + width, y - half + width, color)

    def dashed_line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1,
                    dash: int = 6, gap: int = 4) -> None:
        """A dashed straight line: ``dash`` pixels drawn, ``gap`` skipped, along its length."""
        length = float(np.hypot(x1 - x0, y1 - y0))
        if length == 0:
            return self.line(x0, y0, x1, y1, color, width)
        pos = 0.0
        while pos < length:
            end = min(pos + dash, length)
            a, b = pos / length, end / length
            self.line(x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0), color, width)
            pos = end + gap

    def marker(self, x: float, y: float, color: Color, size: int = 7, shape: str = "square") -> None:
        """A filled marker centred at (x, y): ``"square"`` or ``"diamond"``."""
        r = size // 2
        if shape == "square":
            self.rect(x - r, y - r, x + r + 1, y + r + 1, color)
        elif shape == "diamond":
            for dy in range(-r, r + 1):
                w = r - abs(dy)
                self.rect(x - w, y + dy, x + w + 1, y + dy + 1, color)
        else:
            raise ValueError(f"Canvas.marker: shape must be 'square' or 'diamond', got {shape!r}")

    def text(self, x: float, y: float, text: str, color: Color = BLACK, scale: int = 2,
             anchor: str = "left") -> Tuple[int, int]:
        """Draw one line of ``text`` with its top at ``y``; ``anchor`` says whether ``x`` is its
        ``"left"`` edge, ``"center"`` or ``"right"`` edge. Returns its (width, height)."""
        w, h = text_size(text, scale)
        x = {"left": x, "center": x - w / 2, "right": x - w}[anchor]
        x, y = int(round(x)), int(round(y))
        for i, ch in enumerate(text):
            glyph = FONT.get(ch, FONT["?"])
            rows, cols = np.nonzero(glyph)
            for r, c in zip(rows, cols):
                gx, gy = x + (i * CELL_W + c) * scale, y + r * scale
                self.rect(gx, gy, gx + scale, gy + scale, color)
        return w, h


def log_ticks(low: float, high: float, mantissas: Sequence[float] = (1, 2, 5)) -> list:
    """The values ``m·10^k`` (m in ``mantissas``) inside ``[low, high]``, ascending."""
    out = []
    for k in range(int(np.floor(np.log10(low))) - 1, int(np.ceil(np.log10(high))) + 1):
        for m in mantissas:
            v = m * 10.0 ** k
            if low <= v <= high:
                out.append(v)
    return out
