"""``recemb search``: OptEmbed end to end (supernet -> evolutionary dim search -> compact retrain).

Stage ``supernet`` trains the experiment's ``optembed`` layer (learned row thresholds,
random per-field prefix dims) and saves the tables' initial weights; ``search``
freezes it, keeps the rows above their field's threshold and searches one dim per
field by validation AUC; ``retrain`` trains the ``pruned`` variant (kept rows only,
searched widths) from the initial weights of those rows or from scratch. Everything
lands in ``<train.output_dir>/<expid>/search/``; the ``stage`` file names the last
finished stage, so running again resumes where it stopped. One MLflow run tracks all.

Any ``embedding.dim`` works (with a ``dim_step`` that divides it): tables of widths FBGEMM
cannot run are held padded in every stage, as training holds them (``pad_for_fbgemm``);
the search reads the tables at their plan widths and counts the compact tables' bytes padded.

Example:
    $ recemb search --config configs/experiments/optembed_synthetic_ctr.yaml search.generations=5
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from recemb.config.experiment import ExperimentConfig, load_experiment
from recemb.config.loader import from_dict
from recemb.data.batch import Batch, ParquetSource
from recemb.data.schema import FeatureMap
from recemb.embeddings.base import TableEmbeddingLayer, fbgemm_width, pad_for_fbgemm
from recemb.embeddings.optembed import OptEmbedMask, optembed_masks, row_keep_mask
from recemb.embeddings.pruned import FeaturePruning, PrunedLayer, PruningPlan, remap_from_mask, save_pruning
from recemb.embeddings.sharding import copy_full_into, ensure_process_group, local_pieces, shard_model
from recemb.errors import ConfigError, RecembError
from recemb.io import atomic_path, write_json_atomic, write_text_atomic
from recemb.models.registry import build_model, check_model_config, embedding_layers, model_needs
from recemb.search.evolution import EvolutionSettings, Generation, evolve
from recemb.tracking import TAG_EMBEDDING_BYTES, TAG_FULL_BYTES, Tracker
from recemb.train.checkpoint import assemble_full
from recemb.train.loop import TrainModel, TrainResult, evaluate, resolve_device, seed_everything, train
from recemb.train.preflight import check_run
from recemb.train.quiet import quiet_known_warnings

STAGES = ("supernet", "search", "retrain")
STAGE_FILE = "stage"
INITIAL_TABLES = "initial_tables.safetensors"
COMPACT_INITIAL = "pruned_initial.safetensors"


def search_dir(cfg: ExperimentConfig) -> Path:
    """``<train.output_dir>/<expid>/search``: where every stage writes."""
    return Path(cfg.train.output_dir) / cfg.expid / "search"


def stages_done(root: Path) -> int:
    """How many stages finished (0-3), from the ``stage`` marker."""
    path = root / STAGE_FILE
    if not path.is_file():
        return 0
    name = path.read_text(encoding="utf-8").strip()
    if name not in STAGES:
        raise RecembError(f"{path}: unknown stage '{name}' (expected one of {', '.join(STAGES)})")
    return STAGES.index(name) + 1


def _stage_config(cfg: ExperimentConfig, name: str, epochs: int, max_steps: int) -> ExperimentConfig:
    """A copy of ``cfg`` training in ``<search>/<name>`` with the stage's epochs/steps."""
    out = from_dict(ExperimentConfig, cfg.to_dict(), where=f"search stage {name}")
    out.train.output_dir = str(search_dir(cfg))
    out.expid = name
    if epochs:
        out.train.epochs = epochs
    if max_steps:
        out.train.max_steps = max_steps
    return out


def _supernet_tables(model: nn.Module) -> dict[str, tuple[str, OptEmbedMask]]:
    """feature -> (physical table name, its mask) of every OptEmbed layer in ``model``."""
    out: dict[str, tuple[str, OptEmbedMask]] = {}
    for m in model.modules():
        if isinstance(m, TableEmbeddingLayer) and isinstance(m.combiner, OptEmbedMask):
            for t in m.tables:
                out[t.feature_names[0]] = (t.name, m.combiner)
    return out


def _table_keys(model: nn.Module, tables: list[str]) -> dict[str, str]:
    """table name -> its weight's key in ``model.state_dict()``."""
    keys = {}
    for key in model.state_dict():
        for t in tables:
            if key.endswith(f"embedding_bags.{t}.weight"):
                keys[t] = key
    missing = [t for t in tables if t not in keys]
    if missing:
        raise RecembError(f"table '{missing[0]}' not found in the model's state")
    return keys


def _full_tables(model: nn.Module, tables: list[str]) -> dict[str, torch.Tensor]:
    """Full copies of the named tables at their plan widths (one process: every shard is local).

    A table held padded for FBGEMM is cut back: its padding columns hold their initial values
    (no lookup reads them, so no gradient moves them) and must not count in a row's norm."""
    state = model.state_dict()
    widths = {t.name: t.embedding_dim for m in model.modules() if isinstance(m, TableEmbeddingLayer | PrunedLayer)
              for t in m.tables}
    out = {}
    for t, key in _table_keys(model, tables).items():
        value = state[key]
        full = torch.zeros(tuple(value.shape), dtype=torch.float32)
        for offsets, local in local_pieces(value):
            index = tuple(slice(o, o + s) for o, s in zip(offsets, local.shape, strict=True))
            full[index] = local.detach().float().cpu()
        width = widths.get(t, full.shape[1])
        out[t] = full if width == full.shape[1] else full[:, :width].contiguous()
    return out


def _copy_into_padded(targets: dict[str, Any], full: dict[str, torch.Tensor]) -> None:
    """``copy_full_into``, where a table held padded for FBGEMM (wider than its plan-wide source:
    checkpoints and saved initial weights keep the plan's widths) gets the source in its first
    columns and zeros in the padding, which no lookup reads."""
    wide = {}
    for key, target in targets.items():
        source = full.get(key)
        if (source is not None and isinstance(target, torch.Tensor) and source.dim() == 2
                and len(target.shape) == 2 and target.shape[1] > source.shape[1]):
            wide[key] = F.pad(source, (0, target.shape[1] - source.shape[1]))
    copy_full_into(targets, {**full, **wide})


def _single_process() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RecembError("recemb search runs in one process (cluster.workers=0)")


def _check(cfg: ExperimentConfig) -> None:
    if cfg.embedding.kind != "optembed" or cfg.embedding.groups:
        raise ConfigError("recemb search needs embedding.kind=optembed for every feature (no embedding.groups); "
                          "see configs/experiments/optembed_synthetic_ctr.yaml")
    if cfg.cluster.workers > 0:
        raise ConfigError("recemb search runs in this process: set cluster.workers=0")
    if not model_needs(cfg.model.name).embedding:
        raise ConfigError(f"model.name={cfg.model.name} has no embedding layer to search (use fm, deepfm, dcnv2, ...)")
    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    check_model_config(cfg.model, cfg.embedding, fm)
    check_run(cfg, fm)  # what the supernet's training would refuse (a dim_step that does not divide the dim)


# ----------------------------------------------------------------------------- stage 1


def _run_supernet(cfg: ExperimentConfig, root: Path, tracker: Tracker) -> dict[str, Any]:
    s = cfg.search
    scfg = _stage_config(cfg, "supernet", s.supernet_epochs, s.supernet_max_steps)
    init_path = root / INITIAL_TABLES

    def save_initial(model: nn.Module, step: int) -> None:
        _single_process()
        if step == 0:
            tables = _supernet_tables(model)
            weights = _full_tables(model, [t for t, _ in tables.values()])
            with atomic_path(init_path) as tmp:
                save_file({f: weights[t].contiguous() for f, (t, _) in tables.items()}, str(tmp))

    last = root / "supernet" / "checkpoints" / "last"
    resume = last if (last / "meta.json").is_file() else None
    result = train(scfg, resume=resume, on_metrics=tracker.metrics_hook("supernet_valid"), on_start=save_initial)
    tracker.log_metrics(result.steps, result.test, split="supernet_test")
    out = {"best_valid": result.best_valid, "test": result.test, "steps": result.steps,
           "embedding_bytes": result.embedding_bytes, "full_bytes": result.full_bytes}
    write_json_atomic(root / "supernet.json", out)
    return out


# ----------------------------------------------------------------------------- stage 2


def _load_trained(cfg: ExperimentConfig, checkpoint: Path, device: torch.device) -> nn.Module:
    """``cfg``'s model, sharded in this process, with the weights of ``checkpoint``."""
    seed_everything(cfg.train.seed)
    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    model = TrainModel(build_model(cfg.model, fm, cfg.embedding, device=torch.device("meta")))
    pad_for_fbgemm(model)  # as training held it
    pg = ensure_process_group("nccl" if device.type == "cuda" else "gloo")
    _single_process()
    dmp = shard_model(model, cfg.embedding, device, pg, batch_size=cfg.train.batch_size).model
    full = assemble_full(checkpoint)
    _copy_into_padded({f"model/{k}": v for k, v in dmp.state_dict().items()}, full)
    return dmp


def _capped_valid(cfg: ExperimentConfig, rows: int) -> list[Batch]:
    """The first ``rows`` validation rows (all when 0), in memory: every candidate sees the same rows."""
    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    source = ParquetSource(fm, Path(cfg.data_dir), shuffle_rows=0, seed=cfg.train.seed)
    size = cfg.train.eval_batch_size if not rows else min(rows, cfg.train.eval_batch_size)
    it = iter(source.batches("valid", size, 0))
    if not rows:
        return list(it)
    return list(itertools.islice(it, math.ceil(rows / size)))


def _run_search(cfg: ExperimentConfig, root: Path, tracker: Tracker) -> dict[str, Any]:
    s = cfg.search
    device = resolve_device(cfg.train.device)
    scfg = _stage_config(cfg, "supernet", s.supernet_epochs, s.supernet_max_steps)
    ckpts = root / "supernet" / "checkpoints"
    ckpt = ckpts / "best" if (ckpts / "best" / "meta.json").is_file() else ckpts / "last"
    dmp = _load_trained(scfg, ckpt, device)
    tables = _supernet_tables(dmp)
    (mask,) = optembed_masks(dmp)
    features = list(mask.features)
    thresholds = mask.threshold_of()
    weights = _full_tables(dmp, [tables[f][0] for f in features])
    keep = {f: row_keep_mask(weights[tables[f][0]], thresholds[f]).numpy() for f in features}
    kept = {f: int(keep[f].sum()) for f in features}
    full_bytes = sum(keep[f].shape[0] * mask.dim * 4 for f in features)
    valid = _capped_valid(cfg, s.valid_rows)

    def fitness(cand: tuple[int, ...]) -> float:
        mask.set_eval_dims(dict(zip(features, cand, strict=True)))
        auc = evaluate(dmp, valid, device)["auc"]
        size = sum(kept[f] * fbgemm_width(d) * 4 for f, d in zip(features, cand, strict=True))  # as trained
        return auc - s.bytes_penalty * size / full_bytes

    def on_generation(g: Generation) -> None:
        print(f"[search] generation={g.index} best={g.best:.5f} mean={g.mean:.5f}", flush=True)
        tracker.log_metrics(g.index, {"search_best_fitness": g.best, "search_mean_fitness": g.mean})

    settings = EvolutionSettings(population=s.population, generations=s.generations, parents=s.parents,
                                 mutation_prob=s.mutation_prob, crossover_share=s.crossover_share, seed=s.seed)
    result = evolve([mask.candidates] * len(features), fitness, settings, on_generation)
    mask.set_eval_dims(None)
    dims = dict(zip(features, result.best, strict=True))
    plan = PruningPlan(full_dim=mask.dim, features={f: FeaturePruning(remap_from_mask(keep[f]), dims[f])
                                                    for f in features},
                       extra={"thresholds": thresholds})
    save_pruning(root / "pruned", plan)
    if (root / INITIAL_TABLES).is_file():
        initial = load_file(str(root / INITIAL_TABLES))
        compact = {f: initial[f][torch.from_numpy(keep[f])][:, : dims[f]].contiguous()
                   for f in features if kept[f]}
        with atomic_path(root / COMPACT_INITIAL) as tmp:
            save_file(compact, str(tmp))
    rows = sum(k.shape[0] for k in keep.values())
    padding = sum(kept[f] * (fbgemm_width(dims[f]) - dims[f]) * 4 for f in features)
    out = {
        "dims": dims, "kept_rows": kept, "kept_rows_total": sum(kept.values()), "rows_total": rows,
        "thresholds": thresholds, "best_fitness": result.fitness, "evaluated": result.evaluated,
        "history": [g.to_dict() for g in result.history], "valid_rows": sum(b.batch_size for b in valid),
        "table_bytes": sum(kept[f] * fbgemm_width(dims[f]) * 4 for f in features), "full_table_bytes": full_bytes,
        **({"table_padding_bytes": padding} if padding else {}),  # of table_bytes: widths not divisible by 4
    }
    write_json_atomic(root / "search.json", out)
    tracker.log_metrics(len(result.history), {"search_kept_rows": out["kept_rows_total"],
                                              "search_kept_row_share": out["kept_rows_total"] / max(rows, 1)})
    return out


# ----------------------------------------------------------------------------- stage 3


def _retrain_config(cfg: ExperimentConfig, root: Path) -> ExperimentConfig:
    s = cfg.search
    rcfg = _stage_config(cfg, "retrain", s.retrain_epochs, s.retrain_max_steps)
    rcfg.embedding.kind = "pruned"
    rcfg.embedding.params = {"path": str(root / "pruned"),
                             "pruned_vector": cfg.embedding.params.get("pruned_vector", "zero")}
    return rcfg


def _load_compact_initial(path: Path) -> Callable[[nn.Module, int], None]:
    def on_start(model: nn.Module, step: int) -> None:
        if step:
            return  # resumed: the checkpoint has the weights
        _single_process()
        initial = load_file(str(path))
        layers = [m for m in model.modules() if isinstance(m, PrunedLayer)]
        by_table = {t.name: t.feature_names[0] for layer in layers for t in layer.tables}
        keys = _table_keys(model, list(by_table))
        _copy_into_padded(model.state_dict(), {keys[t]: initial[f] for t, f in by_table.items()})

    return on_start


def _run_retrain(cfg: ExperimentConfig, root: Path, tracker: Tracker) -> dict[str, Any]:
    rcfg = _retrain_config(cfg, root)
    last = root / "retrain" / "checkpoints" / "last"
    resume = last if (last / "meta.json").is_file() else None
    on_start = None
    if cfg.search.retrain_init == "initial":
        if not (root / COMPACT_INITIAL).is_file():
            raise RecembError(f"{root / COMPACT_INITIAL} is missing: search.retrain_init=initial needs the "
                              "supernet's initial weights (rerun the search from scratch, or use scratch)")
        on_start = _load_compact_initial(root / COMPACT_INITIAL)
    result: TrainResult = train(rcfg, resume=resume, on_metrics=tracker.metrics_hook("retrain_valid"),
                                on_start=on_start)
    tracker.log_metrics(result.steps, result.test, split="retrain_test")
    fm = FeatureMap.load(Path(cfg.data_dir) / "feature_map.json")
    model = build_model(rcfg.model, fm, rcfg.embedding, device=torch.device("meta"))
    pad_for_fbgemm(model)  # the bytes as training held them
    main = embedding_layers(model)["embedding"]
    out = {"best_valid": result.best_valid, "test": result.test, "steps": result.steps,
           "embedding_bytes": main.parameter_bytes(), "full_bytes": main.full_bytes(),
           "bytes_ratio": main.parameter_bytes() / main.full_bytes(),
           "all_layers_bytes": result.embedding_bytes, "all_layers_full_bytes": result.full_bytes}
    write_json_atomic(root / "retrain.json", out)
    tracker.set_tags({TAG_EMBEDDING_BYTES: result.embedding_bytes, TAG_FULL_BYTES: result.full_bytes})
    tracker.log_metrics(result.steps, {"retrain_bytes_ratio": out["bytes_ratio"]})
    return out


# ----------------------------------------------------------------------------- the pipeline


def run_search(
    config: str | Path | ExperimentConfig,
    overrides: list[str] | None = None,
    mlflow_uri: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the three OptEmbed stages of ``config``; returns the summary also in ``summary.json``."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    quiet_known_warnings()
    cfg = config if isinstance(config, ExperimentConfig) else load_experiment(config, overrides)
    if mlflow_uri is not None:
        cfg.cluster.mlflow_uri = mlflow_uri
    _check(cfg)
    root = search_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.from_config(cfg, rank=0)
    run_file = root / "mlflow_run.json"
    previous = json.loads(run_file.read_text(encoding="utf-8"))["run_id"] if run_file.is_file() else None
    run_id = tracker.start(cfg, tags={"recemb.pipeline": "search"}, run_id=previous)
    if previous is None:
        write_json_atomic(run_file, {"run_id": run_id, "uri": tracker.uri})
    tracker.log_params_from_config(cfg)
    print(f"[mlflow] run {run_id} ({cfg.expid} search) in {tracker.uri}", flush=True)
    stages: list[tuple[str, Callable[[ExperimentConfig, Path, Tracker], dict[str, Any]]]] = [
        ("supernet", _run_supernet), ("search", _run_search), ("retrain", _run_retrain)]
    try:
        done = stages_done(root)
        for i, (name, fn) in enumerate(stages):
            if i < done:
                print(f"[search] stage {name}: done before, skipped", flush=True)
                continue
            print(f"[search] stage {name}", flush=True)
            fn(cfg, root, tracker)
            write_text_atomic(root / STAGE_FILE, name + "\n")
        summary = {name: json.loads((root / f"{name}.json").read_text(encoding="utf-8")) for name, _ in stages}
        summary["run_id"] = run_id
        write_json_atomic(root / "summary.json", summary)
        for name in ("supernet.json", "search.json", "retrain.json", "summary.json"):
            tracker.log_artifact(root / name, artifact_path="search")
        tracker.log_artifact(root / "pruned" / "pruning.json", artifact_path="search")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return summary

