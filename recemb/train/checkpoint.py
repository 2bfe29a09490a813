"""Sharding-aware checkpoints in safetensors + JSON (no pickle anywhere), checksummed.

Each rank writes the pieces it holds (model shards, fused-optimizer state,
dense-optimizer state) to ``rank-<r>.safetensors``, each tensor named with its
global offsets, and the global shapes of what it holds in the file's metadata (a
table sharded table-wise lives on one rank only) and its own RNG states; ``meta.json``
keeps step, epoch, rank 0's RNG, the resolved config and the size and sha256 of every rank file, and
``meta.json.sha256`` (``sha256sum -c`` reads it) guards ``meta.json`` itself.
Loading verifies every file first, then assembles full tensors from every rank's
file and copies each rank's slices in, so a checkpoint written at one world size
loads at another. ``check_resume`` decides which config changes a resumed run may make.

Example:
    >>> save_checkpoint(path, state, step=100, epoch=0, config=cfg.to_dict())   # doctest: +SKIP
    >>> meta = load_checkpoint(path, state)                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from recemb.embeddings.sharding import copy_full_into, local_pieces
from recemb.errors import ConfigError, DataError
from recemb.integrity import FileDigest, is_int, read_signed, short_repr, verify_files, write_sidecar
from recemb.io import write_json_atomic

# 2: meta.json lists every rank file's size and sha256 ("files") and meta.json.sha256
# guards meta.json. 1 (no digests) still loads, with a warning that nothing can be
# verified: refusing would strand every run written before, and its files still parse.
FORMAT_VERSION = 2
META = "meta.json"
META_DIGEST = "meta.json.sha256"
_SEP = "@"
_RNG = "rng/"  # rank files hold rng/<torch|cuda>/rank-<r>: that rank's generator state (format 2)
_DAMAGED = "restore the folder from a good copy or resume from another checkpoint (e.g. best/ or an epoch's last/)"

log = logging.getLogger("recemb.train")


@dataclass
class TrainState:
    """What a checkpoint holds: the model and optimizers' tensors, by name.

    ``tensors()`` flattens them into one ``name -> tensor`` mapping (values may
    be ShardedTensors); the optimizers' non-tensor settings go to JSON. ``widths``: model
    state keys of tables held padded for FBGEMM (``recemb.embeddings.base.pad_for_fbgemm``)
    and their plan widths: their weights and per-column optimizer state are saved that
    wide, so a checkpoint looks the same whether or not training padded its tables.
    """

    model: torch.nn.Module
    dense_optimizer: torch.optim.Optimizer
    fused_optimizer: Any | None = None
    table_optimizer: torch.optim.Optimizer | None = None
    aux_optimizer: torch.optim.Optimizer | None = None
    widths: dict[str, int] = field(default_factory=dict)

    def width_of(self, key: str, value: Any) -> int | None:
        """The plan width of checkpoint tensor ``key`` when it is a padded table's weight or per-column
        optimizer state (``model/<k>``, ``fused/<k>/...``), else None."""
        if not self.widths or value.dim() != 2:
            return None
        kind, _, rest = key.partition("/")
        state_key = rest if kind == "model" else rest.split("/", 1)[0] if kind == "fused" else ""
        width = self.widths.get(state_key)
        return width if width is not None and value.shape[1] > width else None

    def plain_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The unfused optimizers by checkpoint prefix (dense, data-parallel tables, aux groups)."""
        out = {"dense": self.dense_optimizer}
        if self.table_optimizer is not None:
            out["table"] = self.table_optimizer
        if self.aux_optimizer is not None:
            out["aux"] = self.aux_optimizer
        return out

    def tensors(self) -> dict[str, Any]:
        """All checkpointed tensors, keyed ``model/...``, ``fused/...``, ``dense/...``."""
        out: dict[str, Any] = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        if self.fused_optimizer is not None:
            for param, states in self.fused_optimizer.state_dict()["state"].items():
                for name, value in states.items():
                    if isinstance(value, torch.Tensor):
                        out[f"fused/{param}/{name}"] = value
        for prefix, optimizer in self.plain_optimizers().items():
            for idx, states in optimizer.state_dict()["state"].items():
                for name, value in states.items():
                    if isinstance(value, torch.Tensor):
                        out[f"{prefix}/{idx}/{name}"] = value
        return out


def _rank() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_file(rank: int) -> str:
    return f"rank-{rank}.safetensors"


def save_checkpoint(
    path: str | Path, state: TrainState, step: int, epoch: int, config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` (every rank calls this; atomic rename).

    The ranks share the folder: each writes and hashes its own file, rank 0 puts every
    file's digest into ``meta.json``, hashes that into ``meta.json.sha256`` and renames
    the finished folder into place.
    """
    path = Path(path)
    rank, world = _rank()
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in state.tensors().items():
        shapes[key] = list(value.shape)
        width = state.width_of(key, value)
        if width is not None:
            shapes[key][1] = width
        for offsets, local in local_pieces(value):
            if rank != 0 and not _is_distributed(value):
                continue
            if width is not None:  # the plan's columns only (a column shard may hold none)
                keep = min(local.shape[1], width - offsets[1])
                if keep <= 0:
                    continue
                local = local[:, :keep]
            name = key + _SEP + ",".join(str(o) for o in offsets)
            tensors[name] = local.detach().to("cpu").contiguous().clone()
    # Each rank's own RNG states (dropout draws differ by rank): rank r restores rank r's.
    for kind, rng in _rng_states().items():
        key = f"{_RNG}{kind}/rank-{rank}"
        tensors[key + _SEP + "0"], shapes[key] = rng, list(rng.shape)
    part = tmp / _rank_file(rank)
    save_file(tensors, str(part), metadata={"shapes": json.dumps(shapes)})
    # Every rank hashes its own file (in parallel) and leaves the digest for rank 0.
    write_json_atomic(tmp / f".{part.name}.digest.json", FileDigest.of(part).to_dict())
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        files: dict[str, Any] = {}
        for r in range(world):
            sidecar = tmp / f".{_rank_file(r)}.digest.json"
            files[_rank_file(r)] = json.loads(sidecar.read_text(encoding="utf-8"))
            sidecar.unlink()
        groups = {k: o.state_dict()["param_groups"] for k, o in state.plain_optimizers().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "world_size": world,
            "param_groups": groups,
            "torch_rng": torch.get_rng_state().tolist(),
            "config": fill_model_params(config, saved=False),
            "extra": extra or {},
            "files": files,
        }
        write_meta(tmp, meta)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def write_meta(folder: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` and its ``meta.json.sha256`` (each atomically) into a checkpoint folder.

    ``save_checkpoint`` calls it; so may a tool or test that edits a checkpoint's meta on purpose.
    """
    folder = Path(folder)
    write_json_atomic(folder / META, meta)
    write_sidecar(folder / META, folder / META_DIGEST)


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's generator states: the CPU one, and the current CUDA device's when CUDA is in use."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_states(where: str, states: dict[str, torch.Tensor]) -> None:
    try:
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
    except RuntimeError as e:
        raise DataError(f"{where}: saved RNG state does not fit this torch ({e}); {_DAMAGED}") from None


def _is_distributed(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    return isinstance(value, (ShardedTensor, DTensor))


# ----------------------------------------------------------------------------- integrity


# What loading needs from meta.json, with the type each field must have.
_META_FIELDS: dict[str, tuple[type, str]] = {
    "format_version": (int, "an integer"),
    "step": (int, "an integer >= 0"),
    "epoch": (int, "an integer >= 0"),
    "world_size": (int, "an integer >= 1"),
    "param_groups": (dict, "a mapping"),
    "torch_rng": (list, "a list of bytes"),
    "config": (dict, "a mapping"),
    "extra": (dict, "a mapping"),
}
_warned_unverified: set[Path] = set()


def _field(meta: dict[str, Any], name: str, where: Path) -> Any:
    kind, what = _META_FIELDS.get(name, (dict, "a mapping"))
    if name not in meta:
        raise DataError(f"{where}: field '{name}' is missing; {_DAMAGED}")
    value = meta[name]
    ok = is_int(value) if kind is int else isinstance(value, kind)
    if ok and kind is int:
        ok = value >= (1 if name == "world_size" else 0)
    if not ok:
        raise DataError(f"{where}: field '{name}' should be {what}, got {short_repr(value)}; {_DAMAGED}")
    return value


def _read_meta_bytes(folder: Path) -> tuple[bytes, bool]:
    """``meta.json``'s bytes, checked against ``meta.json.sha256`` when that exists (then True)."""
    return read_signed(folder / META, folder / META_DIGEST, _DAMAGED, required=False)


# Model params whose default changed after runs had been saved without them: (model, param) -> the
# value those runs were trained with. DeepFM, WDL and FM took their first-order term from separate
# tables until ``first_order: embedding`` became the default.
LEGACY_MODEL_PARAMS: dict[tuple[str, str], Any] = {(m, "first_order"): "table" for m in ("deepfm", "wdl", "fm")}
# Embedding keys likewise: the hashing variants bucketed ids with splitmix64 until ``embedding.hash``
# (default ``mulshift``) existed; a saved config without it rebuilds its plans with splitmix64.
LEGACY_EMBEDDING_KEYS: dict[str, Any] = {"hash": "splitmix64"}


def fill_model_params(config: dict[str, Any], saved: bool) -> dict[str, Any]:
    """``config`` with every ``LEGACY_MODEL_PARAMS`` param its model lacks, and every
    ``LEGACY_EMBEDDING_KEYS`` key its embedding block lacks, written out.

    A checkpoint's config (``saved``) without the param predates its default's change, so it gets
    the value that run was trained with; a config being saved or compared (``saved=False``) gets
    today's default, so a checkpoint always records what its model was built with and a default
    that changes later cannot rebuild it differently. Other configs come back unchanged.

    Example:
        >>> fill_model_params({"model": {"name": "deepfm", "params": {}}}, saved=True)["model"]
        {'name': 'deepfm', 'params': {'first_order': 'table'}}
        >>> fill_model_params({"model": {"name": "dcnv2"}}, saved=True)
        {'model': {'name': 'dcnv2'}}
        >>> fill_model_params({"model": {"name": "dcnv2"}, "embedding": {"kind": "hashed"}}, saved=True)["embedding"]
        {'kind': 'hashed', 'hash': 'splitmix64'}
    """
    embedding = config.get("embedding")
    if isinstance(embedding, dict) and any(k not in embedding for k in LEGACY_EMBEDDING_KEYS):
        if saved:
            filled = dict(LEGACY_EMBEDDING_KEYS)
        else:
            from recemb.config.experiment import EmbeddingConfig

            filled = {k: getattr(EmbeddingConfig(), k) for k in LEGACY_EMBEDDING_KEYS}
        config = {**config, "embedding": {**embedding, **{k: v for k, v in filled.items() if k not in embedding}}}
    model = config.get("model")
    if not isinstance(model, dict):
        return config
    name = model.get("name", "deepfm")
    params = dict(model.get("params") or {})
    missing = [key for (m, key) in LEGACY_MODEL_PARAMS if m == name and key not in params]
    if not missing:
        return config
    if not saved:
        from recemb.models.registry import model_entry

        defaults = model_entry(name).params()
    for key in missing:
        params[key] = LEGACY_MODEL_PARAMS[(name, key)] if saved else getattr(defaults, key)
    return {**config, "model": {**model, "params": params}}


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (step, epoch, config, files, ...), verified.

    ``meta.json`` must match ``meta.json.sha256``, parse, and hold every field loading
    uses with its type; each failure is a one-line ``DataError`` naming the file and
    the field; the rank files must be there with their recorded sizes (their sha256 is
    checked where they are read, or by ``verify_checkpoint``). Format 1 (written before
    checksums) is read with a warning.
    """
    folder = Path(path)
    meta_path = folder / META
    if not meta_path.is_file():
        raise DataError(f"{folder}: not a checkpoint (no {META})")
    raw, verified = _read_meta_bytes(folder)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON ({e}); {_DAMAGED}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: should be a JSON object, got {type(meta).__name__}; {_DAMAGED}")
    version = _field(meta, "format_version", meta_path)
    if version > FORMAT_VERSION:
        raise DataError(f"{meta_path}: checkpoint format {version} is newer than this recemb reads "
                        f"({FORMAT_VERSION}); upgrade recemb")
    for name in _META_FIELDS:
        _field(meta, name, meta_path)
    if not all(is_int(b) and 0 <= b < 256 for b in meta["torch_rng"]):
        raise DataError(f"{meta_path}: field 'torch_rng' should be a list of bytes (0-255); {_DAMAGED}")
    if version >= 2:
        if not verified:
            raise DataError(f"{folder / META_DIGEST}: missing (format {version} checkpoints carry it); {_DAMAGED}")
        verify_files(folder, _rank_digests(meta, meta_path), hint=_DAMAGED, hashes=False)
    elif folder.resolve() not in _warned_unverified:
        _warned_unverified.add(folder.resolve())
        log.warning("%s: format 1 checkpoint (written before checksums): its files cannot be verified", folder)
    meta["config"] = fill_model_params(meta["config"], saved=True)
    return meta


def _rank_digests(meta: dict[str, Any], meta_path: Path) -> dict[str, FileDigest]:
    """The recorded digest of every rank file (format 2); exactly one per rank."""
    files = _field(meta, "files", meta_path)
    names = [_rank_file(r) for r in range(meta["world_size"])]
    if sorted(files) != sorted(names):
        raise DataError(f"{meta_path}: field 'files' lists {sorted(files)}, but world_size "
                        f"{meta['world_size']} means {names}; {_DAMAGED}")
    return {name: FileDigest.from_dict(files[name], where=f"{meta_path}: field 'files.{name}'") for name in names}


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """``read_meta``, and every rank file's sha256 checked: for a driver that hands the
    folder to workers (evaluation's scoring actors) and wants a damaged one refused first."""
    meta = read_meta(path)
    if meta["format_version"] >= 2:
        verify_files(path, _rank_digests(meta, Path(path) / META), hint=_DAMAGED)
    return meta


# ----------------------------------------------------------------------------- loading


def _read_part(part: Path) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """One rank file's ``shapes`` metadata and its pieces by name; damage is a ``DataError``."""
    try:
        with safe_open(str(part), framework="pt") as fh:
            metadata = fh.metadata() or {}
            pieces = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{part}: not a readable safetensors file ({reason}); {_DAMAGED}") from None
    if "shapes" not in metadata:
        raise DataError(f"{part}: metadata field 'shapes' is missing; {_DAMAGED}")
    try:
        shapes = json.loads(metadata["shapes"])
    except json.JSONDecodeError as e:
        raise DataError(f"{part}: metadata field 'shapes' is not valid JSON ({e}); {_DAMAGED}") from None
    if not isinstance(shapes, dict) or not all(
        isinstance(v, list) and all(is_int(d) and d >= 0 for d in v) for v in shapes.values()
    ):
        raise DataError(f"{part}: metadata field 'shapes' should map tensor names to lists of sizes; {_DAMAGED}")
    return shapes, pieces


def _place(part: Path, name: str, tensor: torch.Tensor, shapes: dict[str, list[int]]) -> tuple[str, tuple[slice, ...]]:
    """The key and index of piece ``name`` in its full tensor (``()``: a scalar); a misfit is a ``DataError``."""
    key, sep, offs = name.rpartition(_SEP)
    if not sep or key not in shapes:
        raise DataError(f"{part}: tensor '{name}' has no entry in metadata field 'shapes'; {_DAMAGED}")
    shape = shapes[key]
    try:
        offsets = [int(o) for o in offs.split(",")] if shape else []
    except ValueError:
        offsets = []
    fits = len(offsets) == len(shape) == tensor.dim() and all(
        0 <= o and o + s <= n for o, s, n in zip(offsets, tensor.shape, shape, strict=True)
    )
    if not fits:
        raise DataError(f"{part}: tensor '{name}' of shape {list(tensor.shape)} does not fit '{key}' of shape "
                        f"{shape}; {_DAMAGED}")
    return key, tuple(slice(o, o + s) for o, s in zip(offsets, tensor.shape, strict=True))


def assemble_full(path: str | Path) -> dict[str, torch.Tensor]:
    """Full tensors of a checkpoint, put together from every rank's pieces.

    Every rank file is checked against the size and sha256 in ``meta.json`` before any
    is read (format 2), and a file that does not parse is a ``DataError`` naming it.
    """
    return _assemble(Path(path), read_meta(path))[0]


def _assemble(path: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``assemble_full``'s tensors, and the saved RNG states apart (``<kind>/rank-<r>``)."""
    if meta["format_version"] >= 2:
        verify_files(path, _rank_digests(meta, path / META), hint=_DAMAGED)
    full: dict[str, torch.Tensor] = {}
    rng: dict[str, torch.Tensor] = {}
    for r in range(meta["world_size"]):
        part = path / _rank_file(r)
        if not part.is_file():
            raise DataError(f"{part}: missing (checkpoint written by {meta['world_size']} ranks)")
        shapes, pieces = _read_part(part)
        for name, tensor in pieces.items():
            key, index = _place(part, name, tensor, shapes)
            if key.startswith(_RNG):
                rng[key.removeprefix(_RNG)] = tensor
            elif not index:
                full[key] = tensor.clone()
            else:
                if key not in full:
                    full[key] = torch.zeros(shapes[key], dtype=tensor.dtype)
                full[key][index] = tensor
    return full, rng


def load_checkpoint(path: str | Path, state: TrainState) -> dict[str, Any]:
    """Restore ``state`` from the checkpoint at ``path``; returns its meta.

    Every file is verified and every tensor's presence and shape checked before
    ``state`` is touched. The unfused optimizers get their state through
    ``load_state_dict`` (built from the saved tensors and param groups); model and
    fused state are copied in place.
    """
    meta = read_meta(path)
    full, rng = _assemble(Path(path), meta)
    targets = state.tensors()
    missing = [k for k in targets if k not in full]
    if missing:
        raise DataError(f"{path}: checkpoint lacks '{missing[0]}' (model or optimizer changed?)")
    widths = {key: state.width_of(key, target) for key, target in targets.items()}
    for key, target in targets.items():
        shape = list(target.shape)
        if widths[key] is not None:
            shape[1] = widths[key]
        if list(full[key].shape) != shape:
            raise DataError(f"{path}: tensor '{key}' has shape {list(full[key].shape)} in the checkpoint but "
                            f"{shape} in the model (model or feature map changed?)")
    groups = meta["param_groups"]
    absent = [prefix for prefix in state.plain_optimizers() if not isinstance(groups.get(prefix), list)]
    if absent:
        raise DataError(f"{path}/{META}: field 'param_groups' has no list for optimizer '{absent[0]}' "
                        f"(model or optimizer changed?)")
    copy_full_into({k: v for k, v in targets.items() if widths[k] is None}, full)
    _copy_padded({k: v for k, v in targets.items() if widths[k] is not None}, full)
    for prefix, optimizer in state.plain_optimizers().items():
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in full.items():
            if key.startswith(prefix + "/"):
                _, idx, name = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = tensor
        try:
            optimizer.load_state_dict({"state": opt_state, "param_groups": groups[prefix]})
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: the '{prefix}' optimizer's saved state does not fit ({e}); "
                            f"model or optimizer changed?") from None
    # This rank's own states when the checkpoint has them (format 2, this rank existed), else rank 0's.
    rank = _rank()[0]
    mine = {kind: rng[f"{kind}/rank-{rank}"] for kind in ("torch", "cuda") if f"{kind}/rank-{rank}" in rng}
    if "torch" not in mine:
        mine = {"torch": torch.tensor(meta["torch_rng"], dtype=torch.uint8)}
    _set_rng_states(str(path), mine)
    return meta


def _copy_padded(targets: dict[str, Any], full: dict[str, torch.Tensor]) -> None:
    """Copy plan-wide tensors into the first columns of padded targets' local pieces (the padding
    columns, which no lookup reads, keep what they hold)."""
    with torch.no_grad():
        for key, target in targets.items():
            source = full[key]
            for (row, col), local in local_pieces(target):
                keep = min(local.shape[1], source.shape[1] - col)
                if keep > 0:
                    local[:, :keep].copy_(source[row:row + local.shape[0], col:col + keep])


# ----------------------------------------------------------------------------- resuming

# What a resumed run may change from the config saved in its checkpoint, as dotted
# prefixes of ``ExperimentConfig.to_dict()`` keys ("cluster" covers cluster.workers, ...).
# Everything not listed is refused, so a new config key is unsafe until listed here:
#   model.*, embedding.*           the architecture, the tables, their optimizer and hash seeds
#   dataset_id, dataset.*, data_dir  the data (data_dir compared as a resolved path)
#   train.seed, train.shuffle_rows   each epoch's row order
#   train.dense_optimizer, dense_lr, dense_weight_decay
#                                  the kind changes the state's meaning; lr and decay would be
#                                  silently overwritten by the checkpoint's param groups
#   train.clip_grad_norm           the update rule
#   train.monitor                  the saved best score was computed with the old weights
#   train.lr_schedule.kind, final_fraction  the rate of every step (a linear schedule also refuses,
#                                  in the loop, epochs/max_steps/batch/ranks that change its total steps)
RESUME_SAFE_KEYS: frozenset[str] = frozenset({
    "expid",                  # names the output folder only
    "train.epochs",           # how long, not how: more epochs go on, fewer stop sooner
    "train.max_steps",
    "train.patience",
    "train.eval_every_steps",  # when validation runs; training sees the same batches
    "train.eval_batch_size",   # metrics are exact sums over the whole split at any size
    "train.output_dir",
    "train.progress",
    "train.device",            # the same state and batches on another device
    "train.lr_schedule.patience",  # plateau: when the next drop comes, not what was done
    "train.lr_schedule.factor",    # plateau: the size of later drops (the multiplier so far is saved)
    "train.lr_schedule.min_lr",    # plateau: the floor of the rates from here on
    "cluster",                 # where ranks run; a changed world size is checked on its own
    "search",                  # read by `recemb search`, which passes its choices in train.*/embedding.*
})
# Safe only at an epoch's end: the global batch (train.batch_size x ranks) fixes the
# epoch's row order (recemb.data.batch.ParquetBatches), so a position mid-epoch means
# other rows under another global batch. A changed world size follows the same rule.
RESUME_AT_EPOCH_END_KEYS: frozenset[str] = frozenset({"train.batch_size"})
_PATH_KEYS = frozenset({"data_dir"})


class _Unset:
    """Stands for a key one of two configs lacks (shown as ``(unset)``)."""

    def __repr__(self) -> str:
        return "(unset)"


_UNSET = _Unset()


def _listed(key: str, table: frozenset[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in table)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: ``{key: (saved, current)}``, sorted; ``(unset)`` where absent.

    Example:
        >>> config_changes({"train": {"seed": 0, "epochs": 1}}, {"train": {"seed": 1, "epochs": 1}})
        {'train.seed': (0, 1)}
    """
    old, new = _flatten(saved), _flatten(current)
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if key in _PATH_KEYS and isinstance(a, str) and isinstance(b, str) and a and b:
            same = Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        else:
            same = a == b
        if not same:
            out[key] = (a, b)
    return out


def _resolved(saved: dict[str, Any], where: str) -> dict[str, Any]:
    """The saved config as this recemb reads it: keys added since it was written get their defaults."""
    from recemb.config.experiment import ExperimentConfig
    from recemb.config.loader import from_dict

    try:
        return from_dict(ExperimentConfig, saved, where=where).to_dict()
    except (ConfigError, TypeError, ValueError):
        return saved  # compared as written: what no longer parses shows up as a change


def rows_in_epoch(meta: dict[str, Any]) -> int:
    """Rows of the checkpoint's epoch already trained, over all ranks (0 at an epoch's end).

    Format-1 checkpoints counted batches; those convert with their saved batch size and world size.
    """
    extra = meta["extra"]
    if "rows_in_epoch" in extra:
        return int(extra["rows_in_epoch"])
    batches = int(extra.get("batches_in_epoch", 0))
    if not batches:
        return 0
    batch_size = meta["config"].get("train", {}).get("batch_size", 0)
    return batches * int(batch_size) * int(meta["world_size"])


def check_resume(path: str | Path, meta: dict[str, Any], current: dict[str, Any], world_size: int) -> None:
    """Refuse to resume the checkpoint ``meta`` under config ``current`` where the run would go on wrong.

    Keys outside ``RESUME_SAFE_KEYS`` must equal the saved config's; mid-epoch, so must the
    global batch (``RESUME_AT_EPOCH_END_KEYS`` and the world size). Raises one ``ConfigError``
    listing every offending key with its saved and current value.
    """
    saved = _resolved(meta["config"], where=f"{path}/{META} config")
    current = fill_model_params(current, saved=False)
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items()
               if not _listed(k, RESUME_SAFE_KEYS) and not _listed(k, RESUME_AT_EPOCH_END_KEYS)}
    if refused:
        listed = "; ".join(f"{k}: {short_repr(a)} -> {short_repr(b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"{path}: cannot resume with a changed config ({listed}): these change the model, the data, its order "
            f"or the optimizer; set them back to the checkpoint's values (its {META} 'config'), or start a new run "
            f"(another expid or train.output_dir)"
        )
    rows = rows_in_epoch(meta)
    old_batch = saved.get("train", {}).get("batch_size")
    new_batch = current.get("train", {}).get("batch_size")
    old_world = meta["world_size"]
    if rows and (not is_int(old_batch) or old_batch * old_world != new_batch * world_size):
        raise ConfigError(
            f"{path}: stopped {rows:,} rows into epoch {meta['epoch']}, and resuming mid-epoch needs the same "
            f"global batch (train.batch_size x ranks sets the epoch's row order): train.batch_size: "
            f"{short_repr(old_batch)} -> {new_batch}; ranks: {old_world} -> {world_size}; resume with "
            f"train.batch_size={old_batch} on {old_world} rank(s), or from a checkpoint at an epoch's end"
        )
