"""Search spaces for ``recemb tune``: experiment override keys -> distributions, from YAML.

A space file maps ``key.sub`` override keys (the ones ``recemb train`` takes on its command
line) to one distribution each. It is checked before anything starts: unknown distribution
names, bad bounds, and keys or values the experiment config refuses are ``ConfigError``s
naming the key. Ray lives in ``pipelines.tune``, which turns these into Tune's domains;
this module only describes and checks them.

Example (YAML):
    embedding.lr: {loguniform: [1.0e-3, 0.3]}
    train.batch_size: {choice: [256, 1024, 4096]}
    model.params.dropout: {uniform: [0.0, 0.5]}
    embedding.dim: {randint: [4, 16]}          # both ends included
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from recemb.config.experiment import ExperimentConfig
from recemb.config.loader import deep_merge, from_dict, parse_overrides, read_yaml
from recemb.errors import ConfigError

DistributionKind = Literal["uniform", "loguniform", "randint", "choice"]
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "loguniform", "randint", "choice")
# What a trial may not change: where it runs and writes, and what its score means.
FIXED_KEYS = ("dataset_id", "dataset", "data_dir", "expid", "cluster", "train.output_dir", "train.monitor")


@dataclass(frozen=True)
class Distribution:
    """One key's distribution: ``uniform``/``loguniform`` over ``[low, high]`` (floats),
    ``randint`` over ``[low, high]`` (integers, both ends included), or ``choice`` of ``values``.

    Example:
        >>> Distribution("loguniform", (1e-3, 0.3)).edges()
        [0.001, 0.3]
        >>> Distribution("choice", (256, 1024)).sample(random.Random(0)) in (256, 1024)
        True
    """

    kind: DistributionKind
    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if self.kind not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution '{self.kind}' (known: {', '.join(DISTRIBUTIONS)})")
        if self.kind == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty list of values")
            return
        if len(self.values) != 2 or not all(_is_number(v) for v in self.values):
            raise ValueError(f"{self.kind} needs [low, high] (two numbers), got {list(self.values)}")
        low, high = self.values
        if self.kind == "randint" and not all(isinstance(v, int) for v in self.values):
            raise ValueError(f"randint needs two integers, got {list(self.values)}")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"{self.kind} needs finite low < high, got {list(self.values)}")
        if self.kind == "loguniform" and not low > 0:
            raise ValueError(f"loguniform needs low > 0, got {low}")

    def edges(self) -> list[Any]:
        """The values that bound what a trial can get: both ends, or every choice."""
        return list(self.values)

    def sample(self, rng: random.Random) -> Any:
        """One value drawn with ``rng`` (for checks; ``recemb tune`` draws through Ray Tune)."""
        if self.kind == "choice":
            return rng.choice(self.values)
        low, high = self.values
        if self.kind == "randint":
            return rng.randint(low, high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.uniform(low, high)

    def to_dict(self) -> dict[str, list[Any]]:
        """The YAML form, ``{kind: [...]}``."""
        return {self.kind: list(self.values)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SearchSpace:
    """Override key -> ``Distribution``, in the file's order.

    Example:
        >>> space = space_from_dict({"embedding.lr": {"loguniform": [1e-3, 0.3]}})
        >>> space.edge_overrides()
        [{'embedding.lr': 0.001}, {'embedding.lr': 0.3}]
    """

    params: dict[str, Distribution]

    def edge_overrides(self) -> list[dict[str, Any]]:
        """Override sets that check the space against a config: every key alone at each of its
        edges, then every key at once at its first edge and at its last."""
        sets = [{key: value} for key, dist in self.params.items() for value in dist.edges()]
        if len(self.params) > 1:
            sets.append({key: dist.edges()[0] for key, dist in self.params.items()})
            sets.append({key: dist.edges()[-1] for key, dist in self.params.items()})
        return sets

    def to_dict(self) -> dict[str, dict[str, list[Any]]]:
        """The YAML form (what ``load_space`` reads)."""
        return {key: dist.to_dict() for key, dist in self.params.items()}


def space_from_dict(data: Any, where: str = "<space>") -> SearchSpace:
    """A ``SearchSpace`` from plain data; anything malformed is a one-line ``ConfigError`` naming the key."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: a search space maps override keys to distributions, e.g. "
                          "embedding.lr: {loguniform: [1.0e-3, 0.3]}")
    params: dict[str, Distribution] = {}
    for key, spec in data.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: key {key!r} is not a key.sub override key")
        fixed = next((f for f in FIXED_KEYS if key == f or key.startswith(f + ".")), None)
        if fixed:
            raise ConfigError(f"{where}: {key}: '{fixed}' cannot vary between trials (set it in the config or "
                              "as an override of recemb tune)")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: {key}: expected one distribution, e.g. {{loguniform: [1.0e-3, 0.3]}} "
                              f"(known: {', '.join(DISTRIBUTIONS)}), got {spec!r}")
        ((kind, values),) = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: {key}: unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: {key}: {kind} expects a list, got {values!r}")
        try:
            params[key] = Distribution(kind, tuple(values))
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    return SearchSpace(params)


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file (``yaml.safe_load``; ``1e-3`` reads as a float).

    Example:
        >>> load_space("configs/tune/deepfm_small.yaml").params["embedding.lr"].kind   # doctest: +SKIP
        'loguniform'
    """
    return space_from_dict(read_yaml(path), where=str(path))


def format_value(value: Any) -> str:
    """``value`` as the command line's ``key=value`` takes it back (YAML flow style).

    Example:
        >>> format_value(0.01), format_value([32, 16]), format_value("row_wise")
        ('0.01', '[32, 16]', 'row_wise')
    """
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").strip()


def override_words(overrides: dict[str, Any]) -> list[str]:
    """``{"embedding.lr": 0.01}`` -> ``["embedding.lr=0.01"]`` (for a printed command)."""
    return [f"{key}={format_value(value)}" for key, value in overrides.items()]


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any], where: str = "overrides") -> ExperimentConfig:
    """A new config: ``cfg`` with ``overrides`` (dotted key -> value) checked like the command line's.

    Example:
        >>> trial = apply_overrides(cfg, {"embedding.lr": 0.05})        # doctest: +SKIP
    """
    nested = parse_overrides([f"{key}=" for key in overrides], where=where)  # checks the keys' shape
    for key, value in overrides.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return from_dict(ExperimentConfig, deep_merge(cfg.to_dict(), nested), where=where)


def check_space(space: SearchSpace, cfg: ExperimentConfig, where: str = "<space>",
                check: Callable[[ExperimentConfig], None] | None = None) -> None:
    """Refuse a space some of whose values ``cfg`` cannot take, before anything starts.

    Each of ``space.edge_overrides()`` is applied to ``cfg`` (unknown keys, wrong types, values
    out of range) and, when given, passed to ``check`` (e.g. the preflight of ``recemb train``:
    model params, budgets). The error is one line naming the key(s) and value(s).
    """
    for overrides in space.edge_overrides():
        words = " ".join(override_words(overrides))
        try:
            trial = apply_overrides(cfg, overrides, where=f"{where}: {words}")
            if check is not None:
                check(trial)
        except ConfigError as exc:
            text = str(exc)
            prefix = f"{where}: {words}"
            message = text if text.startswith(prefix) else f"{prefix}: {text}"
            raise ConfigError(" ".join(message.split())) from None


__all__ = ["DISTRIBUTIONS", "Distribution", "SearchSpace", "apply_overrides", "check_space", "format_value",
           "load_space", "override_words", "space_from_dict"]
