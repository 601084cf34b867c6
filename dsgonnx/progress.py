"""Progress and messages through :mod:`logging` (logger ``dsgonnx``, level INFO).

The library never writes to stderr itself: the command line attaches a handler (and
``--quiet`` raises its level); a Python caller sees progress with
``logging.basicConfig(level=logging.INFO)``. Long loops log a line every 10 % with the
elapsed time and an estimate of the time left.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("dsgonnx")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``label done/total [elapsed<left] note`` at every tenth of the way."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, max(total, 1)
        self.start = time.perf_counter()
        self._last_decile = -1

    @property
    def wanted(self) -> bool:
        """Whether a line would be shown (callers skip building notes that need a host sync)."""
        return log.isEnabledFor(logging.INFO)

    def update(self, done: int, note: str = "") -> None:
        decile = done * 10 // self.total
        if decile == self._last_decile or not self.wanted:
            return
        self._last_decile = decile
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done) if done else 0.0
        log.info(f"{self.label} {done}/{self.total} [{_clock(elapsed)}<{_clock(left)}] {note}".rstrip())

    def close(self, note: str = "") -> None:
        if note:
            log.info(f"{self.label} done in {time.perf_counter() - self.start:.1f}s {note}")


def say(message: str) -> None:
    """One progress message (INFO)."""
    log.info(message)
