"""Rate-limited progress messages for long scoring and training loops."""

from __future__ import annotations

import time
from collections.abc import Callable


class ProgressReporter:
    """Send 'rows done, rate, time left' messages at most once every ``interval_seconds``.

    Args:
        total: How many items the loop will process.
        emit: Receives each message, for example ``context.log.info`` or ``logger.info``.
        label: What the items are, used in the message ("rows", "steps").
        interval_seconds: Minimum time between two messages; the last update always emits.
    """

    def __init__(
        self,
        total: int,
        emit: Callable[[str], None],
        label: str = "rows",
        interval_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.emit = emit
        self.label = label
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.started = clock()
        self.last_emit = self.started
        self.done = 0

    def update(self, done: int) -> None:
        """Record that ``done`` items are finished in total, and emit a message if due."""
        self.done = done
        now = self.clock()
        finished = done >= self.total
        if not finished and now - self.last_emit < self.interval_seconds:
            return
        self.last_emit = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        if finished:
            self.emit(
                f"{done}/{self.total} {self.label} done in {elapsed:.1f} s ({rate:.1f} {self.label}/s)"
            )
            return
        remaining = (self.total - done) / rate if rate > 0 else float("inf")
        self.emit(
            f"{done}/{self.total} {self.label} done, {rate:.1f} {self.label}/s, "
            f"about {remaining:.0f} s left"
        )
