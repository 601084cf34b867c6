"""Progress lines on stderr: a live bar on a terminal, a line every 10 % in logs."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, quiet: bool = False, stream=None):
        self.label, self.total, self.quiet = label, max(total, 1), quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, done: int, note: str = "") -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = f"{self.label} {done}/{self.total} [{_clock(elapsed)}<{_clock(eta)}] {note}".rstrip()
        if self.tty:
            if now - self._last_draw >= 0.2 or done >= self.total:
                width = 24
                filled = int(width * done / self.total)
                bar = "#" * filled + "." * (width - filled)
                self.stream.write(f"\r{self.label} |{bar}| {done}/{self.total} [{_clock(elapsed)}<{_clock(eta)}] {note}\033[K")
                self.stream.flush()
                self._last_draw = now
        else:
            decile = done * 10 // self.total
            if decile != self._last_decile:
                self.stream.write(line + "\n")
                self.stream.flush()
                self._last_decile = decile

    def close(self, note: str = "") -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\n")
        elapsed = time.perf_counter() - self.start
        if note:
            self.stream.write(f"{self.label} done in {elapsed:.1f}s {note}\n")
        self.stream.flush()


def say(message: str, quiet: bool = False) -> None:
    """One progress message on stderr."""
    if not quiet:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
