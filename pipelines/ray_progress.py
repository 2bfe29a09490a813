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

The same board carries the start-up marks (``mark``): rank 0 posts when its worker function
starts, its model is sharded, its first batch is read and its first step is done, and the
driver prints where the seconds to the first step went (``StartupClock``), once.

It also carries rank 0's MLflow records (``BoardTracker``: tags, metrics, dicts), which the
driver writes to its own run (``TrackingRelay``): the workers never import MLflow nor open its
store, which took rank 0 3.6-3.8 s of its start-up here (import, SQL store, run fetch).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any


class ProgressBoard:
    """Where rank 0 posts ``(epoch, rows trained in it)``; run as a zero-CPU Ray actor."""

    def __init__(self) -> None:
        self.epoch, self.rows, self.total = 0, 0, 0
        self.updated: float | None = None
        self.marks: dict[str, float] = {}
        self.events: list[tuple[Any, ...]] = []

    def post(self, event: tuple[Any, ...]) -> None:
        """One MLflow record from rank 0 (``BoardTracker``), kept until the driver takes it."""
        self.events.append(event)

    def take(self) -> list[tuple[Any, ...]]:
        """The records posted since the last ``take``, in posting order."""
        events, self.events = self.events, []
        return events

    def mark(self, name: str, at: float) -> None:
        """A start-up stage ``name`` reached at wall-clock time ``at`` (the first one counts:
        a restarted worker group does not move the first start-up's marks)."""
        self.marks.setdefault(name, at)

    def read_marks(self) -> dict[str, float]:
        """The start-up marks posted so far (name -> wall-clock time)."""
        return dict(self.marks)

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

    def mark(self, name: str, at: float | None = None) -> None:
        """Post that start-up stage ``name`` is reached now (or at ``at``; a handful per run)."""
        self.board.mark.remote(name, time.time() if at is None else at)

    def rows(self, epoch: int, rows_in_epoch: int, batch_rows: int) -> None:
        """Count ``batch_rows`` more; post when the last post is older than ``every_s``."""
        self.total += batch_rows
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.board.update.remote(epoch, rows_in_epoch, self.total)


class BoardTracker:
    """Rank 0's tracker in a Ray worker: what it would write to MLflow, posted to the board for the
    driver's ``TrackingRelay`` (the ``Tracker`` methods the worker loop calls). Without a board
    (ranks other than 0) every call does nothing, as a ``Tracker`` on those ranks does.

    Calls from one process to one actor run in order, so the driver writes the records in the
    order they were made; ``flush`` waits until the board holds all of them (before the worker
    function returns, so the driver's last take after the run has every record).
    """

    def __init__(self, board: Any | None) -> None:
        self.board = board
        self._last: Any = None

    def _post(self, *event: Any) -> None:
        if self.board is not None:
            self._last = self.board.post.remote(event)

    def resumed(self) -> None:
        """The worker group (re)started: the driver resumes the run (``Tracker.start`` with its id)."""
        self._post("resumed")

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._post("tags", dict(tags))

    def log_metrics(self, step: int, metrics: dict[str, Any], split: str | None = None) -> None:
        self._post("metrics", step, dict(metrics), split)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._post("dict", data, name)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every record posted so far is on the board."""
        if self._last is not None:
            import ray

            ray.get(self._last, timeout=timeout_s)


class TrackingRelay(threading.Thread):
    """The driver's side of ``BoardTracker``: takes rank 0's records from the board every
    ``every_s`` seconds and writes them to ``tracker`` (the driver's MLflow run), until ``stop()``,
    which takes what is left and returns the first error a write raised (the driver raises it: the
    run then fails, as it did when rank 0 wrote to MLflow itself)."""

    def __init__(self, board: Any, tracker: Any, cfg: Any, every_s: float = 1.0) -> None:
        super().__init__(name="recemb-tracking", daemon=True)
        self.board, self.tracker, self.cfg, self.every_s = board, tracker, cfg, every_s
        self._stop_event = threading.Event()
        self.error: BaseException | None = None

    def _apply(self, event: tuple[Any, ...]) -> None:
        kind, args = event[0], event[1:]
        if kind == "resumed":
            self.tracker.start(self.cfg, run_id=self.tracker.run_id)
        elif kind == "tags":
            self.tracker.set_tags(*args)
        elif kind == "metrics":
            step, metrics, split = args
            self.tracker.log_metrics(step, metrics, split=split)
        elif kind == "dict":
            self.tracker.log_dict(*args)
        else:
            raise ValueError(f"unknown tracking record {kind!r} on the progress board")

    def drain(self, timeout_s: float = 10.0) -> None:
        """Take and write every record on the board now (an error is kept for ``stop``)."""
        import ray

        try:
            events = ray.get(self.board.take.remote(), timeout=timeout_s)
        except Exception:  # a busy or restarting cluster: the next drain takes them
            return
        for event in events:
            if self.error is not None:
                return
            try:
                self._apply(event)
            except Exception as exc:  # kept; the driver raises it after the run (stop)
                self.error = exc

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.drain()

    def stop(self) -> BaseException | None:
        """Stop, write what is left on the board; the first write error, if any (the caller
        raises it once the run itself has ended, so a failed run's own error is not hidden)."""
        self._stop_event.set()
        if self.ident is not None:  # started
            self.join(timeout=30)
        self.drain(timeout_s=30)
        return self.error


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


def process_start_time() -> float:
    """Wall-clock time this process was started (from ``/proc``; Linux), so the start-up figure
    includes the interpreter and the command's imports; elsewhere the time this module loaded."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _LOADED_AT


_LOADED_AT = time.time()

# Start-up stages: (mark that ends the stage, its name in the printed line). The driver's marks,
# then rank 0's: "workers up" runs from the data open (the trainer's start) to rank 0 having
# loaded this module (Ray's controller and worker actors, torch, the process group), "fn call"
# to its worker function's start, "worker imports" to torchrec and the loop being imported,
# "model+plan" to the sharded model. (Rank 0 no longer opens MLflow: ``BoardTracker``.)
STARTUP_STAGES = (
    ("imported", "imports"),
    ("config", "config"),
    ("checked", "preflight"),
    ("ray", "ray.init"),
    ("mlflow", "mlflow run"),
    ("data", "data open"),
    ("wimported", "workers up"),
    ("worker", "fn call"),
    ("wlibs", "worker imports"),
    ("model", "model+plan"),
    ("batch", "first batch"),
    ("step", "first step"),
)


class StartupClock:
    """The driver's start-up marks (wall clock), merged with rank 0's from the ``ProgressBoard``
    into one line: the seconds each stage took and the total to the first training step."""

    def __init__(self, start: float | None = None) -> None:
        self.marks: dict[str, float] = {"start": start if start is not None else process_start_time()}

    def mark(self, name: str, at: float | None = None) -> None:
        """Stage ``name`` reached now (or at ``at``); the first mark of a name counts."""
        self.marks.setdefault(name, time.time() if at is None else at)

    def line(self, worker_marks: dict[str, float] | None = None) -> str:
        """``[ray] start-up: 9.8 s to the first step (imports 2.1 s, ...)``; stages with no mark
        (a run of one batch never asks for a second) are left out."""
        marks = {**(worker_marks or {}), **self.marks}
        start, last, parts = marks["start"], marks["start"], []
        # In the order reached: stages that overlap (the preflight runs while Ray starts) show
        # what each added to the wait once the one before it was done.
        for key, name in sorted(((k, n) for k, n in STARTUP_STAGES if k in marks), key=lambda kn: marks[kn[0]]):
            parts.append(f"{name} {max(marks[key] - last, 0.0):.1f} s")
            last = marks[key]
        head = f"{marks['step'] - start:.1f} s to the first step" if "step" in marks else \
            f"{last - start:.1f} s to the last stage seen"
        return f"[ray] start-up: {head} ({', '.join(parts)})"
