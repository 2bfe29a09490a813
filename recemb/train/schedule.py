"""Learning-rate schedules (``train.lr_schedule``) over every optimizer of a run.

One multiplier drives the dense optimizer, the unfused table optimizer (``data_parallel``
tables), FBGEMM's fused table optimizers inside DistributedModelParallel, and tables that
update themselves (``lowprec``), each from its own starting rate. The schedule's state
(plateau multiplier, best score, evaluations without improvement, the run's total steps)
goes into the checkpoint, so a resumed run continues the same sequence of rates.

Example:
    >>> from recemb.config.experiment import LrSchedule
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> schedule = LrScheduler(LrSchedule(kind="linear", final_fraction=0.5), total_steps=10,
    ...                        rates=optimizer_rates("dense", opt))
    >>> schedule.apply(step=4)
    >>> round(opt.param_groups[0]["lr"], 6)
    0.08
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recemb.config.experiment import LrSchedule
from recemb.errors import ConfigError, DataError


@dataclass
class ScheduledRate:
    """One learning rate the schedule sets: which optimizer it belongs to (``dense`` or
    ``embedding``), the rate it starts from, and how to set it."""

    name: str
    base: float
    set: Callable[[float], None]
    current: float = math.nan


def _group_setter(optimizer: Any, index: int) -> Callable[[float], None]:
    # By index, not by the group dict: ``load_state_dict`` (resuming) replaces the dicts.
    def set_lr(value: float) -> None:
        list(optimizer.param_groups)[index]["lr"] = value

    return set_lr


def optimizer_rates(name: str, optimizer: Any) -> list[ScheduledRate]:
    """The rates of every param group of a torch optimizer (or torchrec ``KeyedOptimizer``)."""
    return [ScheduledRate(name, float(g["lr"]), _group_setter(optimizer, i))
            for i, g in enumerate(optimizer.param_groups)]


def push_fused_rates(fused_optimizer: Any) -> None:
    """Hand the fused optimizers' param-group rates to their FBGEMM kernels.

    torchrec's fused embedding optimizers copy ``param_groups[0]["lr"]`` into the kernel
    (``set_learning_rate``) in ``step()`` and ``zero_grad()``; the update itself runs in the
    backward pass, so ``zero_grad()`` called before the forward pass changes nothing else.
    """
    fused_optimizer.zero_grad()


def _attr_setter(module: nn.Module) -> Callable[[float], None]:
    def set_lr(value: float) -> None:
        module.lr = value  # type: ignore[assignment]

    return set_lr


def self_updating_rates(model: nn.Module) -> list[ScheduledRate]:
    """Tables that run their own row update (``apply_update``) with a float ``lr`` (``lowprec``)."""
    return [ScheduledRate("embedding", float(m.lr), _attr_setter(m)) for m in model.modules()
            if callable(getattr(m, "apply_update", None)) and isinstance(getattr(m, "lr", None), float)]


def run_rates(
    model: nn.Module, dense: torch.optim.Optimizer, table: torch.optim.Optimizer | None, fused: Any | None,
) -> tuple[list[ScheduledRate], Callable[[], None]]:
    """Every learning rate of a run's optimizers (auxiliary groups such as OptEmbed's thresholds
    keep theirs), and what to call after setting them (pushes the fused rates into FBGEMM)."""
    rates = optimizer_rates("dense", dense)
    if table is not None:
        rates += optimizer_rates("embedding", table)
    fused_groups = list(fused.param_groups) if fused is not None else []
    if fused_groups:
        rates += optimizer_rates("embedding", fused)
    rates += self_updating_rates(model)
    return rates, (lambda: push_fused_rates(fused)) if fused_groups else (lambda: None)


class LrScheduler:
    """Sets ``rates`` from an ``LrSchedule`` before each step and after each evaluation.

    ``apply(step)`` sets every rate for the step after ``step`` completed steps;
    ``observe(score)`` takes a validation score (higher is better) for ``plateau``.
    """

    def __init__(self, cfg: LrSchedule, total_steps: int, rates: list[ScheduledRate],
                 after_set: Callable[[], None] | None = None) -> None:
        if cfg.kind == "linear" and total_steps < 1:
            raise ConfigError("train.lr_schedule.kind=linear needs the run's total steps, and it has none")
        self.cfg = cfg
        self.total_steps = total_steps
        self.rates = rates
        self.after_set = after_set or (lambda: None)
        self.scale = 1.0  # plateau: product of the drops so far
        self.best = -math.inf
        self.bad = 0

    @property
    def active(self) -> bool:
        """Whether rates ever change (``kind != none``)."""
        return self.cfg.kind != "none"

    def multiplier(self, step: int) -> float:
        """The factor on every starting rate after ``step`` completed steps (before ``min_lr``)."""
        if self.cfg.kind == "linear":
            done = min(step, self.total_steps) / self.total_steps
            return 1.0 - (1.0 - self.cfg.final_fraction) * done
        if self.cfg.kind == "plateau":
            return self.scale
        return 1.0

    def apply(self, step: int) -> None:
        """Set every rate for the next step (a no-op for ``none``, which keeps the configured rates)."""
        if not self.active:
            return
        m = self.multiplier(step)
        for rate in self.rates:
            value = rate.base * m
            if self.cfg.kind == "plateau":
                value = max(value, min(rate.base, self.cfg.min_lr))
            rate.set(value)  # every step: loading a checkpoint may have overwritten a param group's rate
            rate.current = value
        self.after_set()

    def observe(self, score: float) -> bool:
        """Take a validation score; returns whether the rates dropped (``plateau`` only)."""
        if self.cfg.kind != "plateau":
            return False
        if score > self.best:
            self.best, self.bad = score, 0
            return False
        self.bad += 1
        if self.bad < self.cfg.patience:
            return False
        self.scale *= self.cfg.factor
        self.bad = 0
        return True

    def current(self) -> dict[str, float]:
        """The rate each optimizer runs at now, by name (``lr_dense``, ``lr_embedding``)."""
        out: dict[str, float] = {}
        for rate in self.rates:
            value = rate.current if not math.isnan(rate.current) else rate.base
            out.setdefault(f"lr_{rate.name}", value)
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain JSON data)."""
        return {"kind": self.cfg.kind, "total_steps": self.total_steps, "scale": self.scale,
                "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint") -> None:
        """Continue from a checkpoint's ``state_dict()``; a linear schedule must span the same steps.

        A ``linear`` run resumed with other ``train.epochs``, ``train.max_steps``, batch size or
        ranks would change the rate of every step left, so that is a ``ConfigError``.
        """
        try:
            scale, best, bad = float(state["scale"]), float(state["best"]), int(state["bad"])
            total = int(state.get("total_steps", 0))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: field 'extra.lr_schedule' is not a schedule state: {state!r}") from None
        if self.cfg.kind == "linear" and total and total != self.total_steps:
            raise ConfigError(
                f"{where}: train.lr_schedule.kind=linear decays over the run's total steps, {total:,} when it "
                f"started and {self.total_steps:,} now (train.epochs, train.max_steps, train.batch_size or the "
                "number of ranks changed): set them back to resume, or start a new run"
            )
        self.scale, self.best, self.bad = scale, best, bad


__all__ = ["LrScheduler", "ScheduledRate", "optimizer_rates", "push_fused_rates", "run_rates",
           "self_updating_rates"]
