"""Progress of a Ray Train run, visible from the driver: never a silent wait.

Workers log only to Ray's session files (``log_to_driver=False`` keeps the console
readable), so without this the driver prints nothing between "run started" and the
result, and a run that cannot be scheduled waits forever without a word. Rank 0
posts its trained rows to a zero-CPU actor (``ProgressBoard``, a few calls a minute);
``ProgressWatch``, a thread in the driver, prints a line when they move and, when they
do not, says so after a bounded time with the cluster's free resources.

Example:
    >>> board = start_board()                                     # doctest: +SKIP
    >>> watch = ProgressWatch(board, workers=2, cpus_per_worker=0.5)  # doctest: +SKIP
    >>> watch.start(); trainer.fit(); watch.stop()                # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from typing import Any


class ProgressBoard:
    """Where rank 0 posts ``(epoch, rows trained in it)``; run as a zero-CPU Ray actor."""

    def __init__(self) -> None:
        self.epoch, self.rows, self.total = 0, 0, 0
        self.updated: float | None = None

    def update(self, epoch: int, rows: int, total: int) -> None:
        """Rank 0's position: ``rows`` trained in ``epoch``, ``total`` since the run (re)started."""
        self.epoch, self.rows, self.total, self.updated = epoch, rows, total, time.time()

    def read(self) -> tuple[int, int, int, float | None]:
        """``(epoch, rows in epoch, rows in all, time of the last update or None)``."""
        return self.epoch, self.rows, self.total, self.updated


def start_board() -> Any:
    """A ``ProgressBoard`` actor (zero CPUs: it must never wait for a free CPU itself)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


class ProgressPoster:
    """Rank 0's side: counts trained rows and posts them at most every ``every_s`` seconds."""

    def __init__(self, board: Any, every_s: float = 2.0) -> None:
        self.board, self.every_s = board, every_s
        self.total, self._last = 0, 0.0

    def rows(self, epoch: int, rows_in_epoch: int, batch_rows: int) -> None:
        """Count ``batch_rows`` more; post when the last post is older than ``every_s``."""
        self.total += batch_rows
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.board.update.remote(epoch, rows_in_epoch, self.total)


class ProgressWatch(threading.Thread):
    """Prints the run's progress every ``every_s`` seconds while it moves, and, when no row
    has been trained for ``stall_s`` seconds, a line saying so with the cluster's resources
    (repeated every ``stall_s``). Runs until ``stop()``."""

    def __init__(self, board: Any, workers: int, cpus_per_worker: float, every_s: float = 30.0,
                 stall_s: float = 60.0) -> None:
        super().__init__(name="recemb-progress", daemon=True)
        self.board, self.workers, self.cpus_per_worker = board, workers, cpus_per_worker
        self.every_s, self.stall_s = every_s, stall_s
        self._stop_event = threading.Event()
        self.lines: list[str] = []

    def stop(self) -> None:
        """Stop the thread (waits for it a moment)."""
        self._stop_event.set()
        self.join(timeout=5)

    def _say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def run(self) -> None:
        import ray

        start = time.monotonic()
        last_total, last_move, last_stall_note = 0, start, start
        tick = min(self.every_s, self.stall_s, 5.0)
        last_print = start
        while not self._stop_event.wait(tick):
            try:
                epoch, rows, total, _ = ray.get(self.board.read.remote(), timeout=10)
            except Exception:  # a busy or restarting cluster: try again next tick
                continue
            now = time.monotonic()
            if total != last_total:
                if now - last_print >= self.every_s:
                    rate = (total - last_total) / max(now - last_move, 1e-9)
                    self._say(f"[ray] epoch {epoch}: {rows:,} rows trained on rank 0 "
                              f"({rate:,.0f} rows/s), {now - start:.0f} s")
                    last_print = now
                    last_total, last_move = total, now
                continue
            if now - last_move >= self.stall_s and now - last_stall_note >= self.stall_s:
                last_stall_note = now
                free = ray.available_resources().get("CPU", 0.0)
                have = ray.cluster_resources().get("CPU", 0.0)
                what = "no training step yet" if total == 0 else "no new training rows (evaluating, or stalled)"
                self._say(
                    f"[ray] {what} for {now - last_move:.0f} s; cluster CPUs: {free:g} free of {have:g}; "
                    f"the run asks {self.workers} x {self.cpus_per_worker:g} CPU for workers plus Ray Data's "
                    f"read tasks (see Ray's logs in its temp dir if this lasts)")
