"""The one-line text progress display of ``medattn-fast train`` and ``medattn-fast bench``.

On a terminal the line is rewritten in place; otherwise (a log file, CI) every update is its own
line, so that logs stay readable.
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    """``m:ss`` of a duration in seconds (negative durations read 0:00)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def progress_bar(done: int, total: int, width: int) -> str:
    """``[###.....]``: ``width`` cells, ``done / total`` of them filled."""
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class StatusLine:
    """Writes status lines to ``stream`` (stderr by default); nothing when ``enabled`` is False."""

    def __init__(self, stream: Optional[TextIO] = None, *, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write("\r\033[K" + text if self.tty else text + "\n")
        self.stream.flush()

    def close(self, *, keep: bool) -> None:
        """End the in-place line on a terminal: ``keep`` leaves the last status, else it is erased."""
        if self.tty:
            self.stream.write("\n" if keep else "\r\033[K")
            self.stream.flush()
