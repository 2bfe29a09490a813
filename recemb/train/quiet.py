"""Known-harmless library warnings, filtered out of training runs one by one.

Every run used to print about eight lines from torch, torchrec, FBGEMM and MLflow that
ask nothing of a user. ``quiet_known_warnings`` drops exactly those (by category and
message for ``warnings``, by logger and message for ``logging``); anything else, a new
warning of the same libraries included, still shows. The driver and every Ray worker
call it (``pipelines.train.quiet_logs``).

Example:
    >>> quiet_known_warnings()
    >>> import warnings
    >>> warnings.warn("`broadcast_buffers` is deprecated. Use ...", FutureWarning)  # prints nothing
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, start of the message, why it asks nothing of a user)
KNOWN_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues",
     "torchrec's planner default; our plans are checked against unsharded runs (tests/test_sharding.py)"),
    (FutureWarning, "`broadcast_buffers` is deprecated",
     "torchrec passes it to DDP inside DistributedModelParallel, not our code"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor",
     "torchrec's sharded tables and their optimizer state are ShardedTensors; checkpoints read both"),
    (UserWarning, "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
     "data_parallel tables' dense FBGEMM kernel; its gradients match the unsharded model's (tests/test_sharding.py)"),
]
# logger -> starts of the messages to drop (same reasons as above)
KNOWN_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    # the planner is built directly from our Topology (recemb.embeddings.sharding.make_plan)
    "torchrec.distributed.planner.types": ("The topology was constructed directly",),
    # a dry-run estimate note; tables are materialised by DMP
    "torchrec.distributed.planner.storage_reservations": ("There is a known issue with TorchRec's dense tensor size",),
    # torchrec asks is_fx_tracing() on every forward; we neither trace nor export while training
    "torch.fx._symbolic_trace": ("is_fx_tracing will return true",),
    # MLflow creating or upgrading its sqlite store on first use
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
}


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Drop the warnings of ``KNOWN_WARNINGS`` and the log records of ``KNOWN_LOG_RECORDS``
    in this process (idempotent: calling it again adds nothing)."""
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for name, prefixes in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


__all__ = ["KNOWN_LOG_RECORDS", "KNOWN_WARNINGS", "quiet_known_warnings"]
