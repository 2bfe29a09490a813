"""Loading a trained model for inference: find the checkpoint, rebuild the model unsharded.

A checkpoint (``runs/<expid>/checkpoints/{best,last}``) carries the resolved config in
``meta.json`` and the full tensors in per-rank safetensors files, so one folder rebuilds
the model on CPU as plain torchrec modules: no process group, no DistributedModelParallel,
whatever world size and sharding wrote it. ``resolve_checkpoint`` turns what a user types
(a checkpoint folder, a run folder or an MLflow run id) into that folder.

Example:
    >>> path = resolve_checkpoint("runs/deepfm_synthetic_ctr")        # doctest: +SKIP
    >>> model, cfg = load_trained_model(path)                          # doctest: +SKIP
    >>> logits = model(batch)                                          # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recemb.config.experiment import ExperimentConfig
from recemb.config.loader import from_dict
from recemb.data.schema import FeatureMap
from recemb.errors import DataError, RecembError
from recemb.models.registry import build_model
from recemb.train.checkpoint import assemble_full, read_meta

# Which checkpoint of a run serves inference: the best validation one, else the latest.
CHECKPOINT_PREFERENCE = ("best", "last")
_MODEL_PREFIX = "model/"  # TrainState.tensors() names the model's tensors model/<state_dict key>
_WRAPPER_PREFIX = "model."  # TrainModel holds the model (of any family) as its ``model`` attribute
_MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint folder, and the MLflow run it came from (if named by run id)."""

    path: Path
    run_id: str | None = None
    mlflow_uri: str | None = None


def _pick_in(folder: Path) -> Path | None:
    """``folder/best`` or ``folder/last``, whichever holds a checkpoint first."""
    for name in CHECKPOINT_PREFERENCE:
        if (folder / name / "meta.json").is_file():
            return folder / name
    return None


def _from_folder(path: Path) -> Path:
    if (path / "meta.json").is_file():
        return path
    found = _pick_in(path / "checkpoints") or _pick_in(path)
    if found is None:
        raise RecembError(
            f"{path}: neither a checkpoint (no meta.json) nor a run folder with "
            f"checkpoints/best or checkpoints/last; pass runs/<expid>, a checkpoint folder or an MLflow run id"
        )
    return found


def locate_checkpoint(run_or_path: str | Path, mlflow_uri: str | None = None) -> CheckpointRef:
    """Like ``resolve_checkpoint``, also saying which MLflow run (if any) it came from.

    Example:
        >>> ref = locate_checkpoint("4f1c0d...", "sqlite:////tmp/m.db")   # doctest: +SKIP
        >>> ref.path, ref.run_id                                            # doctest: +SKIP
        (PosixPath('/abs/runs/deepfm_synthetic_ctr/checkpoints/best'), '4f1c0d...')
    """
    text = str(run_or_path).strip()
    if not text:
        raise RecembError("no run given; pass a checkpoint folder, a run folder or an MLflow run id")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecembError(f"{path}: is a file; pass a checkpoint folder, a run folder or an MLflow run id")
        return CheckpointRef(_from_folder(path))
    if not _MLFLOW_RUN_ID.match(text):
        raise RecembError(
            f"{text!r}: no such folder, and not an MLflow run id (32 hex digits); "
            f"pass runs/<expid>, a checkpoint folder or a run id from `recemb runs list`"
        )
    from recemb.tracking import resolve_run, resolve_tracking_uri

    uri = resolve_tracking_uri(mlflow_uri)
    run = resolve_run(uri, text)
    ckpt_dir = run["checkpoint_dir"]
    if not ckpt_dir:
        raise RecembError(
            f"MLflow run {text} has no recemb.checkpoint_dir tag (status {run['status']}); "
            f"only finished training runs record where their checkpoints are"
        )
    folder = Path(ckpt_dir)
    found = _pick_in(folder) if folder.is_dir() else None
    if found is None:
        raise RecembError(
            f"MLflow run {text}: its checkpoints {folder} hold neither best/ nor last/ "
            f"(moved or deleted? pass the checkpoint folder instead)"
        )
    return CheckpointRef(found, run_id=run["run_id"], mlflow_uri=uri)


def resolve_checkpoint(run_or_path: str | Path, mlflow_uri: str | None = None) -> Path:
    """The checkpoint folder ``run_or_path`` names.

    Accepted: a checkpoint folder (has ``meta.json``); a run folder ``runs/<expid>`` or
    its ``checkpoints`` folder (then ``best``, else ``last``); an MLflow run id, looked up
    in ``mlflow_uri`` (else ``MLFLOW_TRACKING_URI``, else ``./mlruns.db``) through its
    ``recemb.checkpoint_dir`` tag. Anything else is a ``RecembError`` saying what to pass.

    Example:
        >>> resolve_checkpoint("runs/deepfm_synthetic_ctr").name   # doctest: +SKIP
        'best'
    """
    return locate_checkpoint(run_or_path, mlflow_uri).path


def model_state(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own ``state_dict`` out of ``assemble_full``'s tensors.

    Keeps the ``model/`` tensors (dropping optimizer state) and strips the training
    wrapper's ``model.`` prefix.

    Example:
        >>> model_state({"model/model.mlp.bias": torch.zeros(1), "dense/0/step": torch.ones(())})
        {'mlp.bias': tensor([0.])}
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in full.items():
        if not key.startswith(_MODEL_PREFIX):
            continue
        name = key[len(_MODEL_PREFIX):]
        if name.startswith(_WRAPPER_PREFIX):
            name = name[len(_WRAPPER_PREFIX):]
        out[name] = tensor
    return out


def _check_keys(path: Path, expected: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
        raise DataError(
            f"{path}: checkpoint tensors do not fit the model its config builds: {', '.join(parts)}; "
            f"was it written by another recemb version or a different model?"
        )
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise DataError(
                f"{path}: tensor '{key}' has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(target.shape)} in the model (feature map changed since training?)"
            )


def load_trained_model(
    checkpoint: str | Path, feature_map: FeatureMap | None = None,
) -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild the trained model of ``checkpoint`` on CPU, unsharded, in eval mode.

    The model is built by ``build_model`` from the config in ``meta.json`` over
    ``feature_map`` (default: the one in the config's ``data_dir``), and every tensor
    comes from the checkpoint; a missing, unexpected or misshapen tensor is a
    ``DataError``. No process group is needed.

    Example:
        >>> model, cfg = load_trained_model("runs/deepfm_synthetic_ctr/checkpoints/best")  # doctest: +SKIP
        >>> with torch.no_grad():                                                          # doctest: +SKIP
        ...     probs = torch.sigmoid(model(batch))
    """
    path = Path(checkpoint)
    meta = read_meta(path)
    if "config" not in meta:
        raise DataError(f"{path}/meta.json: no 'config'; cannot rebuild the model")
    cfg = from_dict(ExperimentConfig, meta["config"], where=f"{path}/meta.json config")
    if feature_map is None:
        feature_map = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    model = build_model(cfg.model, feature_map, cfg.embedding, device=torch.device("cpu"))
    state = model_state(assemble_full(path))
    _check_keys(path, model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, cfg


__all__ = ["CheckpointRef", "load_trained_model", "locate_checkpoint", "model_state", "resolve_checkpoint"]
