"""Helpers for multi-process tests: a free local port and spawned ranks on gloo.

``run_ranks`` spawns one process per rank, each joins a gloo group over TCP on
127.0.0.1 and runs a module-level function; the parent gets every rank's return
value (plain, picklable data) or a failure with the rank's traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RankFn = Callable[..., Any]


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quiet_worker() -> None:
    """Silence torchrec's planner chatter and library warnings in a worker process."""
    logging.getLogger().setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")


def _entry(
    fn: RankFn, rank: int, world_size: int, port: int, init_group: bool, results: Any, args: tuple[Any, ...]
) -> None:
    quiet_worker()
    try:
        if init_group:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=120),
            )
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # the parent fails the test with this traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: RankFn, world_size: int, *args: Any, init_group: bool = True, timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return results by rank.

    ``fn`` must be a module-level function (spawn pickles it by name). With
    ``init_group`` each rank first joins a gloo group of ``world_size`` ranks;
    without it ``fn`` sets up whatever it needs itself. A rank that raises fails
    the calling test with its traceback and the other ranks are stopped.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, init_group, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    by_rank: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(by_rank) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    pytest.fail(f"a rank died without reporting (exit codes {dead})")
                if time.monotonic() > deadline:
                    pytest.fail(f"ranks did not finish within {timeout:.0f} s (reported: {sorted(by_rank)})")
                continue
            if status == "error":
                pytest.fail(f"rank {rank} of {world_size} failed:\n{payload}")
            by_rank[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    return [by_rank[r] for r in range(world_size)]


@contextlib.contextmanager
def in_process_run() -> Iterator[None]:
    """Around an in-process ``train``: one torch thread (tiny batches gain nothing from more, and
    spinning OpenMP threads slow a busy 2-core machine), and no process group left afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
