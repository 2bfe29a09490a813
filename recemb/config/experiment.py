"""Experiment configs: model, embedding, train and cluster blocks over a dataset.

An experiment YAML names a ``dataset_id`` (resolved to ``configs/datasets/<id>.yaml``)
and may name a ``base`` YAML it overrides; command-line ``key.sub=value`` overrides
come last. Variant- and model-specific settings live in ``params`` mappings that
are checked against the variant's or model's own dataclass when it is built.

Example:
    >>> cfg = load_experiment("configs/experiments/deepfm_synthetic_ctr.yaml",
    ...                       ["train.epochs=2"])                    # doctest: +SKIP
    >>> cfg.expid                                                    # doctest: +SKIP
    'deepfm_synthetic_ctr'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recemb.config.loader import deep_merge, from_dict, parse_overrides, read_yaml, to_dict
from recemb.data.schema import DatasetConfig, dataset_from_dict, name_problem
from recemb.errors import ConfigError

ShardingType = Literal["auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
SparseOptimizer = Literal["exact_rowwise_adagrad", "exact_adagrad", "exact_sgd", "adam"]
log = logging.getLogger("recemb.config")


@dataclass
class EmbeddingGroup:
    """A per-feature-group override of the embedding block (e.g. huge id fields).

    A group of the top-level ``kind`` (or none) inherits the top-level ``budget``
    and ``params``; a byte budget is then shared among the inheriting blocks in
    proportion to their full bytes. A group of another kind inherits neither.
    """

    features: list[str]
    kind: str | None = None
    dim: int | None = None
    budget: float | None = None
    sharding: ShardingType | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmbeddingConfig:
    """Which embedding variant the sparse features use, and how it is trained.

    ``budget`` is a fraction of the full tables' bytes (<= 1) or absolute bytes
    (> 1); ``params`` are the variant's own settings; ``groups`` override all of
    this for named features. ``seed`` seeds every hash of the id transforms (and
    so fixes which ids share physical rows), independently of ``train.seed``.
    ``initial_accumulator`` starts every Adagrad accumulator (row-wise or per element)
    at that value instead of 0 (TF's ``initial_accumulator_value``): a row's first
    steps are then smaller than ``lr`` until its squared gradients outweigh it, which
    damps ids seen only a few times. ``l2`` adds ``l2/2 * mean over samples of sum_f |e_f|^2`` (each layer's pooled
    output vectors) to the training loss; for single-id features of plain tables that
    pulls each row to zero in proportion to how often the batch reads it (multi-hot
    bags and composed variants are penalised on the pooled or composed vector). It
    works the same for every variant, optimizer and device. ``weight_decay`` is the
    tables' optimizer's own decay (FBGEMM's fused row-wise Adagrad: ``l2`` adds
    ``weight_decay * w`` to each touched row's gradient, ``decoupled`` shrinks the row
    after the update); FBGEMM's CPU kernel ignores it, so on CPU it is refused for
    fused tables in favour of ``l2``. ``hash`` is the bucket hash of the hashing variants
    (``hashed``, ``unified``, ``qr``, ``robe``, ``hybrid``, ``mde``): ``mulshift``
    (multiply-add-shift, the default: four passes over the ids) or ``splitmix64`` (what runs
    saved before ``mulshift`` existed were trained with; their checkpoints keep it). ``dhe``
    always uses ``splitmix64``: it reads 24 uniform bits from each of several hashes of an id.
    """

    kind: str = "full"
    dim: int = 16
    budget: float | None = None
    sharding: ShardingType = "auto"
    optimizer: SparseOptimizer = "exact_rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    initial_accumulator: float = 0.0
    l2: float = 0.0
    weight_decay: float = 0.0
    weight_decay_mode: Literal["l2", "decoupled"] = "l2"
    init_std: float | None = 1e-3
    params: dict[str, Any] = field(default_factory=dict)
    groups: list[EmbeddingGroup] = field(default_factory=list)
    seed: int = 0
    hash: Literal["splitmix64", "mulshift"] = "mulshift"

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError("embedding dim must be >= 1")
        if self.budget is not None and self.budget <= 0:
            raise ValueError("embedding budget must be > 0")
        # Written as "not (ok)" so that NaN, which fails every comparison, is refused too.
        if not (self.lr > 0 and self.eps > 0):
            raise ValueError(f"embedding lr and eps must be > 0, got lr={self.lr}, eps={self.eps}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"embedding init_std must be > 0 (or null for torchrec's default), got {self.init_std}")
        if not (self.weight_decay >= 0 and self.l2 >= 0 and self.initial_accumulator >= 0):
            raise ValueError("embedding weight_decay, l2 and initial_accumulator must be >= 0")
        for i, group in enumerate(self.groups):
            if group.dim is not None and group.dim < 1:
                raise ValueError(f"groups[{i}].dim must be >= 1, got {group.dim}")
            if group.budget is not None and not group.budget > 0:
                raise ValueError(f"groups[{i}].budget must be > 0, got {group.budget}")
            if not group.features:
                raise ValueError(f"groups[{i}] names no features")


@dataclass
class ModelConfig:
    """The interaction architecture by name (``lr``, ``fm``, ``deepfm``, ``dcnv2``,
    ``dlrm``, ``wdl``) and its own ``params`` (checked against the model's dataclass)."""

    name: str = "deepfm"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class LrSchedule:
    """How the learning rates change during a run; applies to the dense optimizer (``train.dense_lr``)
    and to the embedding tables' optimizers (``embedding.lr``: FBGEMM's fused ones too) alike.

    - ``none``: constant learning rates.
    - ``linear``: after ``s`` of the run's ``T`` optimizer steps, each rate is
      ``lr * (1 - (1 - final_fraction) * s / T)`` (``T``: epochs x steps per epoch, capped by
      ``train.max_steps``), so it reaches ``final_fraction * lr`` when the run ends.
    - ``plateau`` (the default): at the ``patience``-th validation evaluation in a row that has
      not improved the monitored score (``train.monitor``), every rate is multiplied by
      ``factor``, but not below ``min_lr`` (a rate that starts below ``min_lr`` stays where
      it is); the count then starts again. ``patience`` counts evaluations as
      ``train.patience`` does: with the defaults (``patience: 1`` here, ``train.patience: 2``)
      the first evaluation that does not improve divides the rates by 10 and a second one in
      a row stops the run (FuxiCTR's and the BARS benchmark's recipe).

    Settings of the other kinds are ignored.

    Example (YAML):
        train:
          lr_schedule: {kind: plateau, factor: 0.1, patience: 1, min_lr: 1.0e-6}
    """

    kind: Literal["none", "linear", "plateau"] = "plateau"
    final_fraction: float = 0.0
    factor: float = 0.1
    patience: int = 1
    min_lr: float = 1e-6

    def __post_init__(self) -> None:
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ValueError(f"final_fraction must be in [0, 1], got {self.final_fraction}")
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"factor must be in (0, 1) (each drop multiplies the rates by it), got {self.factor}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 (evaluations without improvement before a drop), "
                             f"got {self.patience}")
        if not self.min_lr >= 0.0:
            raise ValueError(f"min_lr must be >= 0, got {self.min_lr}")


@dataclass
class TrainConfig:
    """Training loop settings. ``monitor`` weights validation metrics for early stopping
    (``{auc: 1, logloss: -1}`` means higher AUC and lower logloss are better); which metrics
    it may name is the model's own list (``recemb.models.registry.monitorable_metrics``: CTR
    models auc, logloss, ne, calibration; APE auc, ap, precision_at_k, recall_at_k, nce_loss),
    checked when the experiment is loaded;
    ``device: auto`` trains on CUDA when a GPU is visible (nccl), else on CPU (gloo);
    ``lr_schedule`` changes the dense and embedding learning rates during the run (``LrSchedule``).
    ``counts`` says how a data set's ``count`` column trains: ``weight`` (each row once per
    epoch, its loss weighted by its count) or ``sample`` (rows drawn with probability
    ``count / total``, unit weights: ``recemb.data.resample``; for aggregated event logs);
    ``epoch_rows`` is how many rows a sampled epoch draws (0: the train split's rows).

    The defaults train until validation stops improving, without tuning: up to ``epochs``
    epochs, evaluated after each; ``patience`` is how many evaluations in a row may fail to
    improve the monitored score: the ``patience``-th such evaluation stops the run (0: never
    stop early); the best evaluation's checkpoint is restored for the test metrics; the
    ``plateau`` schedule divides every learning rate (dense and tables) by 10 at the first
    evaluation that does not improve. ``batch_size: 0`` (the default) picks the batch from the
    train rows (``recemb.train.loop.auto_batch_size``): the largest power of two, from 64 up to
    4,096, that still gives every epoch ``AUTO_BATCH_STEPS`` (100) optimizer steps, so small
    data gets many steps an epoch (50k rows: batch 256) and large data today's 4,096; the run
    prints the batch it chose and saves it in its ``config.yaml``."""

    epochs: int = 20
    batch_size: int = 0
    eval_batch_size: int = 16384
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    clip_grad_norm: float = 0.0
    eval_every_steps: int = 0
    monitor: dict[str, float] = field(default_factory=lambda: {"auc": 1.0})
    patience: int = 2
    max_steps: int = 0
    shuffle_rows: int = 1 << 18
    seed: int = 0
    output_dir: str = "runs"
    progress: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lr_schedule: LrSchedule = field(default_factory=LrSchedule)
    counts: Literal["weight", "sample"] = "weight"
    epoch_rows: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs and eval_batch_size must be >= 1")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 1, or 0 to pick it from the train rows, got {self.batch_size}")
        if not self.dense_lr > 0:
            raise ValueError(f"dense_lr must be > 0, got {self.dense_lr}")
        if not (self.dense_weight_decay >= 0 and self.clip_grad_norm >= 0):
            raise ValueError("dense_weight_decay and clip_grad_norm must be >= 0")
        counts = {"eval_every_steps": self.eval_every_steps, "patience": self.patience,
                  "max_steps": self.max_steps, "shuffle_rows": self.shuffle_rows, "epoch_rows": self.epoch_rows}
        negative = {k: v for k, v in counts.items() if v < 0}
        if negative:
            raise ValueError(f"these must be >= 0: {negative}")
        if not self.monitor:
            raise ValueError("monitor names metrics to weight (e.g. {auc: 1}); got nothing")
        if not self.output_dir.strip():
            raise ValueError("output_dir must name a folder")


@dataclass
class ClusterConfig:
    """Where training runs: ``workers`` 0 = in this process, N >= 1 = N Ray Train
    workers (Ray at ``address``, empty = started locally); the MLflow store."""

    workers: int = 0
    cpus_per_worker: float = 0.5
    address: str = ""
    storage_path: str = ""
    mlflow_uri: str = ""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    max_failures: int = 1

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (train in this process) or a number of Ray workers, "
                             f"got {self.workers}")
        if not 0 < self.cpus_per_worker <= 1024:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= 0, or -1 for unlimited restarts, got {self.max_failures}")


@dataclass
class SearchConfig:
    """``recemb search`` (OptEmbed): supernet, evolutionary dim search, retraining on compact tables.

    ``*_epochs``/``*_max_steps`` override ``train.epochs``/``train.max_steps`` per stage (0 = keep);
    ``valid_rows`` caps the validation rows scoring each candidate (0 = all; rounded up to
    whole ``train.eval_batch_size`` batches); ``bytes_penalty``
    subtracts that times the candidate's bytes/full bytes from its AUC (0 = AUC only, as in the
    paper); ``retrain_init``: ``initial`` (the supernet's initial weights of the kept rows and
    dims, lottery-ticket style) or ``scratch``.
    """

    supernet_epochs: int = 0
    supernet_max_steps: int = 0
    retrain_epochs: int = 0
    retrain_max_steps: int = 0
    population: int = 20
    generations: int = 10
    parents: int = 5
    mutation_prob: float = 0.1
    crossover_share: float = 0.5
    valid_rows: int = 100_000
    bytes_penalty: float = 0.0
    seed: int = 0
    retrain_init: Literal["initial", "scratch"] = "initial"

    def __post_init__(self) -> None:
        counts = {k: getattr(self, k) for k in ("supernet_epochs", "supernet_max_steps", "retrain_epochs",
                                               "retrain_max_steps", "valid_rows")}
        if any(v < 0 for v in counts.values()):
            raise ValueError(f"search: epochs, max_steps and valid_rows must be >= 0, got {counts}")
        if self.population < 2 or self.generations < 1 or self.parents < 1:
            raise ValueError("search: population must be >= 2, generations >= 1 and parents >= 1 "
                             "(parents are capped at population - 1)")
        if not (0 <= self.mutation_prob <= 1 and 0 <= self.crossover_share <= 1 and self.bytes_penalty >= 0):
            raise ValueError("search: mutation_prob and crossover_share must be in [0, 1], bytes_penalty >= 0")


@dataclass
class ExperimentConfig:
    """A whole experiment: dataset, model, embedding, train, cluster (and ``search`` for OptEmbed)."""

    dataset_id: str
    dataset: DatasetConfig | None = None
    data_dir: str = ""
    expid: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        if not self.expid:
            suffix = "" if self.embedding.kind == "full" else f"_{self.embedding.kind}"
            self.expid = f"{self.model.name}_{self.dataset_id}{suffix}"
        # expid names the run folder runs/<expid> (and dataset_id a config file and an MLflow
        # experiment): a name with a separator or a leading dot could write outside runs/.
        for key, value in (("expid", self.expid), ("dataset_id", self.dataset_id)):
            problem = name_problem(value)
            if problem:
                raise ValueError(f"{key} {problem} (it becomes a folder or file name)")
        if not self.data_dir and self.dataset is not None:
            self.data_dir = self.dataset.output
        # Each model family reports its own metrics: monitor may weight only the model's.
        from recemb.models.registry import check_monitor

        check_monitor(self.model.name, self.train.monitor)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the resolved config saved next to every output)."""
        return to_dict(self)


def _configs_root(path: Path) -> Path:
    """The ``configs/`` folder an experiment file lives under (for dataset lookup)."""
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent
    return Path("configs").resolve()


def _read_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' expects a path string")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    return deep_merge(_read_with_base(base_path, (*seen, path.resolve())), data)


# Embedding settings that mean something for some sparse optimizers only: name -> those optimizers.
OPTIMIZER_ONLY_SETTINGS: dict[str, tuple[str, ...]] = {
    "initial_accumulator": ("exact_rowwise_adagrad", "exact_adagrad"),
}


def drop_inherited_settings(data: dict[str, Any], own: dict[str, Any], where: str) -> list[str]:
    """Reset embedding settings that ``data`` inherited from a ``base`` file and that mean nothing
    for its ``embedding.optimizer`` (``OPTIMIZER_ONLY_SETTINGS``); returns a note for each.

    ``own`` is what the experiment file itself and the command line set: a setting given there
    is kept, so that ``check_initial_accumulator`` refuses it (asked for explicitly, an Adagrad
    accumulator for SGD is a mistake worth a message); one inherited from ``base.yaml``'s Adagrad
    defaults is not the user's choice, and is set back to its dataclass default here.

    Example:
        >>> data = {"embedding": {"optimizer": "exact_sgd", "initial_accumulator": 1e-6}}
        >>> drop_inherited_settings(data, {"embedding": {"optimizer": "exact_sgd"}}, "exp.yaml")
        ['exp.yaml: embedding.initial_accumulator=1e-06 (inherited) means nothing for embedding.optimizer=exact_sgd: ignored']
        >>> data["embedding"]
        {'optimizer': 'exact_sgd'}
    """
    emb, own_emb = data.get("embedding"), own.get("embedding")
    if not isinstance(emb, dict):
        return []
    own_emb = own_emb if isinstance(own_emb, dict) else {}
    optimizer = emb.get("optimizer", EmbeddingConfig.optimizer)
    notes = []
    for key, optimizers in OPTIMIZER_ONLY_SETTINGS.items():
        value = emb.get(key)
        if key in own_emb or optimizer in optimizers:
            continue
        if value is not None and value != getattr(EmbeddingConfig, key):
            notes.append(f"{where}: embedding.{key}={value} (inherited) means nothing for "
                         f"embedding.optimizer={optimizer}: ignored")
            del emb[key]
    return notes


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML with its ``base`` chain, dataset block and overrides.

    The dataset block comes from ``configs/datasets/<dataset_id>.yaml`` unless the
    experiment has an inline ``dataset`` mapping; the experiment's ``dataset`` keys
    override the file's. A setting inherited from a ``base`` file that means nothing for
    the chosen optimizer is dropped with a logged note (``drop_inherited_settings``).
    """
    path = Path(path)
    data = _read_with_base(path)
    own = {k: v for k, v in read_yaml(path).items() if k != "base"}
    if overrides:
        given = parse_overrides(overrides)
        data, own = deep_merge(data, given), deep_merge(own, given)
    where = str(path)
    for note in drop_inherited_settings(data, own, where):
        log.warning("[config] %s", note)
    dataset_id = data.get("dataset_id")
    if not isinstance(dataset_id, str):
        raise ConfigError(f"{where}: missing 'dataset_id' (a name under configs/datasets/)")
    problem = name_problem(dataset_id)
    if problem:  # before it is joined to configs/datasets/
        raise ConfigError(f"{where}: dataset_id {problem} (it names configs/datasets/<dataset_id>.yaml)")
    ds_file = _configs_root(path) / "datasets" / f"{dataset_id}.yaml"
    ds_data: dict[str, Any] = read_yaml(ds_file) if ds_file.is_file() else {}
    inline = data.pop("dataset", None) or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"{where}: 'dataset' expects a mapping")
    ds_data = deep_merge(ds_data, inline)
    if ds_data:
        ds_data.setdefault("dataset_id", dataset_id)
        data["dataset"] = dataset_from_dict(ds_data, where=str(ds_file) if ds_file.is_file() else where)
    elif not data.get("data_dir"):
        raise ConfigError(f"{where}: no dataset file {ds_file} and no 'data_dir' given")
    return from_dict(ExperimentConfig, data, where=where)
