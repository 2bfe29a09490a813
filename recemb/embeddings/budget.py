"""Memory budgets: from ``embedding.budget`` to a byte target, and the solvers variants share.

A budget is a fraction of the full tables' bytes (``0 < budget <= 1``) or an
absolute number of bytes (``budget > 1``). Each compressed variant turns the
target into its own sizes (rows, chunks, ranks, widths) with a solver that is a
plain function of integers, so it is tested without building a model. The
achieved bytes are always computed from what was built and reported next to
the target; a variant that cannot meet a budget raises ``BudgetError`` saying
what the smallest feasible budget is. Solvers pay for tables as training holds
them: a width FBGEMM cannot run (10) is held padded (12), so they count rows at
``padded_row_bytes`` while the full-table baseline stays at the real width.

Example:
    >>> target = budget_bytes(0.01, full=1_000_000)
    >>> cap_rows([10, 1000, 50000], budget_rows=target // (16 * 4))
    73
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from recemb.embeddings.base import BYTES_PER_FLOAT, fbgemm_width
from recemb.errors import ConfigError

# The relative gap between achieved and target bytes the solvers aim under.
TOLERANCE = 0.02
# Byte budgets below this are surely a mistyped fraction (e.g. 1.5): one fp32 row of width 16 is 64 bytes.
MIN_BYTE_BUDGET = 64


class BudgetError(ConfigError):
    """A budget the variant cannot meet (too small, or not a valid number)."""


def budget_bytes(budget: float, full: int) -> int:
    """Target bytes: ``budget * full`` for a fraction in (0, 1], else ``budget`` bytes."""
    check_budget(budget)
    return int(budget * full) if budget <= 1 else int(budget)


def check_budget(budget: float) -> None:
    """Raise ``BudgetError`` for a budget that is neither a fraction in (0, 1] nor a plausible byte count."""
    if not budget > 0 or math.isinf(budget):
        raise BudgetError(f"embedding.budget must be a fraction in (0, 1] or a byte count > 1, got {budget}")
    if 1 < budget < MIN_BYTE_BUDGET:
        raise BudgetError(
            f"embedding.budget={budget}: values above 1 are byte counts, and {budget} bytes holds nothing; "
            f"write a fraction in (0, 1] or at least {MIN_BYTE_BUDGET} bytes"
        )


def full_bytes(rows: Sequence[int], dims: Sequence[int]) -> int:
    """fp32 bytes of one table per feature with ``rows[i]`` rows of width ``dims[i]``."""
    return sum(r * d for r, d in zip(rows, dims, strict=True)) * BYTES_PER_FLOAT


def padded_row_bytes(dim: int) -> int:
    """Bytes of one fp32 row of a ``dim``-wide table as training holds it (``fbgemm_width(dim)`` columns).

    A solver that sizes rows with this keeps a padded layer within its budget (``dim: 10``: 48 bytes
    a row, not 40); at widths divisible by 4 it is ``dim * 4``, so nothing changes there.

    Example:
        >>> padded_row_bytes(16), padded_row_bytes(10)
        (64, 48)
    """
    return fbgemm_width(dim) * BYTES_PER_FLOAT


def largest_at_most(cost: Callable[[int], int], target: int, lo: int, hi: int) -> int | None:
    """The largest ``x`` in ``[lo, hi]`` with ``cost(x) <= target``, for a non-decreasing ``cost``.

    ``None`` when even ``cost(lo)`` exceeds ``target``.

    Example:
        >>> largest_at_most(lambda x: 3 * x, target=10, lo=1, hi=100)
        3
    """
    if cost(lo) > target:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cap_rows(vocab: Sequence[int], budget_rows: int) -> int:
    """The row cap ``R`` with ``sum(min(v, R)) <= budget_rows``, as large as possible.

    Each feature gets ``min(v, R)`` rows: small vocabularies stay collision-free
    and large ones share ``R`` rows (water-filling). Raises ``BudgetError`` when
    not even one row per feature fits.

    Example:
        >>> cap_rows([5, 100, 1000], budget_rows=205)
        100
    """
    top = max(vocab)
    if sum(vocab) <= budget_rows:
        return top
    cap = largest_at_most(lambda r: sum(min(v, r) for v in vocab), budget_rows, 1, top)
    if cap is None:
        raise BudgetError(
            f"budget of {budget_rows} rows is below one row per feature ({len(vocab)} features)"
        )
    return cap


def water_fill(vocab: Sequence[int], budget_rows: int) -> list[int]:
    """Rows per feature: ``min(v, R)`` with ``R = cap_rows(...)``, plus the rows left over.

    A single cap moves the total in steps of the number of capped features; the
    remainder goes one row each to the largest capped features, so the total is
    exactly ``budget_rows`` whenever the vocabularies do not all fit.

    Example:
        >>> water_fill([5, 100, 1000], budget_rows=206)
        [5, 100, 101]
    """
    cap = cap_rows(vocab, budget_rows)
    rows = [min(v, cap) for v in vocab]
    left = budget_rows - sum(rows)
    for i in sorted(range(len(vocab)), key=lambda i: -vocab[i]):
        if left <= 0:
            break
        if vocab[i] > rows[i]:
            rows[i] += 1
            left -= 1
    return rows


def check_achieved(kind: str, achieved: int, target: int, tolerance: float = TOLERANCE) -> None:
    """Raise ``BudgetError`` when ``achieved`` bytes exceed ``target`` by more than ``tolerance``."""
    if achieved > target * (1 + tolerance):
        raise BudgetError(
            f"embedding.kind={kind}: the smallest layout takes {achieved:,} bytes, over the budget of "
            f"{target:,} bytes by more than {tolerance:.0%}; raise embedding.budget"
        )
