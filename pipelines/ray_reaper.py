"""Kills what a local Ray leaves behind when the driver that started it dies, even by SIGKILL.

Ray ties its head processes (GCS, raylet) to the driver, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) notice a dead raylet only after
trying to report to a GCS that is gone: measured here, they outlive a SIGKILLed driver
by 45-75 s. This reaper is started by ``init_ray`` beside a local Ray it started. It
watches the driver through a pipe (EOF = the driver is gone, however it died), keeps a
fresh list of the driver's descendants (pid and start time, from ``/proc``), and when
the driver is gone terminates those still alive: SIGTERM, then SIGKILL after a grace
period. Start times guard against killing a process that reused a pid.

Linux only (``/proc``); elsewhere ``init_ray`` does not start it. Written by hand: no
library in the stack does this, and Ray's own reaper is skipped when the kernel
offers fate sharing, which is what leaves the agents behind.

Example:
    $ python -m pipelines.ray_reaper <driver pid>     # stdin: a pipe the driver holds open
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 3.0


def process_table(proc: Path = Path("/proc")) -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, start time in clock ticks)`` of every process now running."""
    table: dict[int, tuple[int, int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def is_ray_process(pid: int) -> bool:
    """Whether ``pid``'s command line is Ray's (its binaries, scripts or ``ray::`` workers)."""
    try:
        return b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def descendants(root: int, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """``pid -> start time`` of every descendant of ``root`` (not ``root`` itself)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return out


def _alive(pid: int, start: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19]) == start and fields[0] != "Z"


def terminate(processes: dict[int, int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM the processes (``pid -> start time``) still alive, SIGKILL those left after
    ``grace_s``; returns the pids that were signalled."""
    signalled = []
    for pid, start in processes.items():
        if _alive(pid, start):
            try:
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
            except OSError:
                pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p, processes[p]) for p in signalled):
        time.sleep(0.1)
    for pid in signalled:
        if _alive(pid, processes[pid]):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return signalled


def watch(driver: int, gone: threading.Event, poll_s: float = POLL_S) -> dict[int, int]:
    """Track ``driver``'s descendants until ``gone`` is set; returns the last ones seen alive."""
    me = os.getpid()
    known: dict[int, int] = {}
    while True:
        # Only Ray's processes: a driver's other children are not ours to kill.
        known.update({p: s for p, s in descendants(driver).items()
                      if p != me and p not in known and is_ray_process(p)})
        known = {p: s for p, s in known.items() if _alive(p, s)}
        if gone.wait(poll_s):
            return known


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m pipelines.ray_reaper <driver pid>`` with the driver's pipe on stdin."""
    args = sys.argv[1:] if argv is None else argv
    driver = int(args[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the driver's to handle
    gone = threading.Event()

    def wait_for_eof() -> None:
        while sys.stdin.buffer.read(1):
            pass
        gone.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    leftovers = watch(driver, gone)
    terminate(leftovers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
