"""``recemb train``: one experiment, single process (multi-worker Ray comes next).

Loads the experiment YAML with overrides, silences torchrec/fbgemm's INFO logs,
and runs ``recemb.train.loop.train``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recemb.config.experiment import load_experiment
from recemb.train.loop import TrainResult, train


def quiet_logs() -> None:
    """torchrec and fbgemm log at INFO by default; keep the console readable."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def run_train(config: str | Path, overrides: list[str] | None = None, resume: str | Path | None = None) -> TrainResult:
    """Train the experiment at ``config``; returns its result (also in ``runs/<expid>``)."""
    quiet_logs()
    cfg = load_experiment(config, overrides)
    return train(cfg, resume=resume)
