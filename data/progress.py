"""One progress line for every long loop: the shard job's stages, the probe, the evaluator.

    [write] 3/8 shards (38%) | 0.52 shards/s | 41 clips (7.1/s) | 0:00:06 elapsed | ETA 0:00:10

at most every `every` seconds, a heartbeat every 5 x `every` while nothing finishes (`step(0)`),
and once when the last item is done or the caller says it is finished (`update(done, final=True)`),
that line ending in `ETA 0:00:00 (done)`.
"""
from __future__ import annotations

import math
import time
from typing import Callable


def hms(seconds: float) -> str:
    """H:MM:SS of a duration (`?` when it is not finite)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _print(line: str) -> None:
    print(line, flush=True)  # sys.stdout as it is at the call (pytest's capture swaps it)


class Progress:
    """`[stage] done/total unit`, rate and ETA of a loop over `total` items.

    stage: the tag in brackets; unit: what is counted (plural); rate_unit: a second amount
    counted with `step(n, amount)` (e.g. clips inside shards), shown with its own rate;
    emit: where a line goes (default: stdout); quiet: print nothing.
    """

    def __init__(self, stage: str, total: int, unit: str, quiet: bool = False, every: float = 2.0,
                 rate_unit: str | None = None, emit: Callable[[str], None] | None = None):
        self.stage, self.total, self.unit, self.quiet, self.every = stage, total, unit, quiet, every
        self.rate_unit, self.emit = rate_unit, emit or _print
        self.t0 = self.last = time.monotonic()
        self.done = 0
        self.amount = 0  # of rate_unit, when given
        self.finished = False

    def step(self, n: int = 1, amount: int = 0) -> None:
        """`n` more items done (0: a heartbeat while waiting), `amount` more of `rate_unit`."""
        self.done += n
        self.amount += amount
        self._maybe_emit(final=False, wait=self.every if n else 5 * self.every)

    def update(self, done: int, final: bool = False) -> None:
        """`done` items so far; `final`: the loop is over (prints its last line even short of `total`)."""
        self.done = done
        self._maybe_emit(final=final, wait=self.every)

    def _maybe_emit(self, final: bool, wait: float) -> None:
        final = final or self.done >= self.total
        now = time.monotonic()
        if self.quiet or self.finished or (not final and now - self.last < wait):
            return
        self.last, self.finished = now, final
        self.emit(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        dt = max(now - self.t0, 1e-9)
        rate = self.done / dt
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = f" | {self.amount} {self.rate_unit} ({self.amount / dt:.1f}/s)" if self.rate_unit else ""
        if self.finished:
            eta = "ETA 0:00:00 (done)"
        else:
            eta = f"ETA {hms((self.total - self.done) / rate) if rate > 0 else '?'}"
        return (f"[{self.stage}] {self.done}/{self.total} {self.unit} ({pct:.0f}%) | {rate:.2f} {self.unit}/s{extra} | "
                f"{hms(dt)} elapsed | {eta}")
