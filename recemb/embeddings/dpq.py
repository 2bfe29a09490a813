"""The ``dpq`` variant: differentiable product quantization (Chen et al., ICML 2020).

Each row is served as a code of ``D`` sub-vector indices into learned codebooks: the
row's ``dim`` splits into ``D`` sub-vectors of ``dim / D``, sub-vector ``d`` is the
``code[d]``-th of ``K`` centroids of codebook ``d`` (one set of codebooks per feature).
Serving stores only the codes (uint8, ``K <= 256``; 4 bits, two a byte, for ``K <= 16``) and
the fp32 codebooks.

Training keeps a full fp32 *query* row per id (a ``RowTableLayer``: updated in backward
by row-wise Adagrad, data parallel) and learns codes and codebooks end to end:

- ``relaxation: vq`` (DPQ-VQ): the code is the nearest centroid; the output is the centroid,
  with the gradient passed straight through to the query, and ``codebook_weight *
  |sg(q) - c|^2 + commitment * |q - sg(c)|^2`` per looked-up id (over the batch size) is added
  to the loss;
- ``relaxation: softmax`` (DPQ-SX): separate key and value codebooks; ``softmax(-|q - key|^2 /
  temperature)`` is the backward relaxation of the one-hot code the forward pass uses.

Codes are state (a ``codes`` buffer): every row's at initialisation, and a row's again after
each update of its query (the nearest centroid of the new query, on every rank alike). The
training forward uses them (scoring a batch's queries against the codebooks once a step, in
the update, not twice), and evaluation reads rows from codes and codebooks only: what it scores
is what the bundle serves. Features whose coded form would not be smaller than a plain table
stay plain torchrec tables (sharded as ``full``).

``embedding.budget`` picks ``D`` (a divisor of ``dim``) and ``K`` (at most ``params.centroids``):
the pair with the most code bits per row, ``D * log2(K)`` (then the most centroids), whose codes
and codebooks fit; the bytes left go to a finer ``D`` for the largest features. Codes take at
least 4 bits a row, so at ``dim`` 16 no budget under 1/128 of the full tables is reachable
(1/64 with ``K > 16``). ``mgqe`` (``recemb.embeddings.mgqe``) is this layer with fewer
centroids (4-bit codes) for rare ids.
numpy twin: ``recemb.serving.variants.dpq``.

Example (YAML):
    embedding: {kind: dpq, dim: 16, budget: 0.1, params: {relaxation: vq}}
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recemb.embeddings.base import BYTES_PER_FLOAT, EmbeddingLayer, GroupedEmbeddingLayer
from recemb.embeddings.budget import BudgetError, budget_bytes, largest_at_most
from recemb.embeddings.full import FullParams, plan_full
from recemb.embeddings.hashing import salted_seed
from recemb.embeddings.lowprec import stack_offsets
from recemb.embeddings.plan import Capabilities, VariantPlan
from recemb.embeddings.registry import VariantSpec, assemble, register_module_assembler, register_variant
from recemb.embeddings.rowwise import RowTableLayer, RowUpdate, resolve_update, row_init_std, row_table_args
from recemb.errors import ConfigError

MAX_CENTROIDS = 256  # codes are uint8
NIBBLE_CENTROIDS = 16  # at most this many centroids: 4-bit codes, two per byte
_ASSIGN_CHUNK = 1 << 16  # rows scored at once when codes are assigned (bounds the [D, n, K] scratch)
Relaxation = Literal["vq", "softmax"]


@dataclass
class DPQParams:
    """DPQ settings.

    ``subspaces`` (D, a divisor of ``dim``) and ``centroids`` (K, 2..256): without a budget the
    layout (D None: ``dim // 4``); with one, D is chosen (unless given) and K is at most
    ``centroids``. ``relaxation``: ``vq`` or ``softmax``; ``temperature`` (softmax);
    ``commitment`` and ``codebook_weight`` (vq's loss terms). ``optimizer`` (``rowwise_adagrad``
    or ``sgd``) and ``lr`` (None: ``embedding.lr``) update the query rows.
    """

    subspaces: int | None = None
    centroids: int = MAX_CENTROIDS
    relaxation: Relaxation = "vq"
    temperature: float = 1.0
    commitment: float = 0.25
    codebook_weight: float = 1.0
    optimizer: str = "rowwise_adagrad"
    lr: float | None = None


@dataclass(frozen=True)
class CodeLayout:
    """A solved layout: ``subspaces`` D per coded feature (the others stay plain tables), ``centroids`` K
    for hot rows and ``cold_centroids`` for cold rows (``K`` too when every row is hot)."""

    subspaces: dict[str, int]
    centroids: int
    cold_centroids: int

    @property
    def coded(self) -> list[str]:
        """The coded features, in group order."""
        return list(self.subspaces)


def code_bytes(rows: int, subspaces: int, centroids: int) -> int:
    """Bytes of the codes of ``rows`` rows: 4 bits a code (packed two a byte) for at most 16 centroids, else 8.

    Example:
        >>> code_bytes(3, 5, 16), code_bytes(3, 5, 64)
        (8, 15)
    """
    n = rows * subspaces
    return (n + 1) // 2 if centroids <= NIBBLE_CENTROIDS else n


def coded_bytes(rows: int, hot: int, dim: int, subspaces: int, centroids: int, cold_centroids: int) -> int:
    """Stored bytes of one coded feature: the codes of its ``hot`` rows and of the rest (``code_bytes``), and
    the fp32 codebooks (``K x dim`` floats whatever ``D``: ``D`` codebooks of ``K`` centroids of ``dim / D``).

    Example:
        >>> coded_bytes(1000, 1000, 16, 4, 256, 256)   # 1000 * 4 + 256 * 16 * 4
        20384
    """
    return code_bytes(hot, subspaces, centroids) + code_bytes(rows - hot, subspaces, cold_centroids) + \
        centroids * dim * BYTES_PER_FLOAT


def layout_bytes(vocab: dict[str, int], hot: dict[str, int], dim: int, subspaces: dict[str, int],
                 centroids: int, cold_centroids: int) -> int:
    """Stored bytes of a layout: coded features (``subspaces``) by ``coded_bytes``, the others plain fp32."""
    return sum(coded_bytes(rows, hot[f], dim, subspaces[f], centroids, cold_centroids) if f in subspaces
               else rows * dim * BYTES_PER_FLOAT for f, rows in vocab.items())


def _uniform(vocab: dict[str, int], hot: dict[str, int], dim: int, d: int, k: int, kc: int) -> dict[str, int]:
    """``d`` for every feature whose coded form is smaller than its plain table."""
    return {f: d for f, rows in vocab.items() if coded_bytes(rows, hot[f], dim, d, k, kc) < rows * dim * BYTES_PER_FLOAT}


def solve_layout(vocab: dict[str, int], hot: dict[str, int], dim: int, target: int | None,
                 subspaces: int | None, centroids: int, cold_centroids: int) -> CodeLayout:
    """The layout of ``target`` bytes; without one, the given (or default ``dim // 4``) D and ``centroids``.

    With a target: for each candidate D (the divisors of ``dim``, or ``subspaces``) the largest K that
    fits with D everywhere; the pair with the most code bits per row, ``D * log2(K)``, wins (ties: the
    larger K). Then the bytes left over go to finer codes: the largest features (most rows first)
    move to the next divisor of ``dim``, repeatedly, while the total fits.

    Example:
        >>> solve_layout({"a": 10_000}, {"a": 10_000}, 16, 64_000, None, 256, 256)
        CodeLayout(subspaces={'a': 4}, centroids=256, cold_centroids=256)
    """
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    if subspaces is not None and subspaces not in divisors:
        raise ConfigError(f"embedding.params.subspaces={subspaces} must divide embedding.dim={dim} ({divisors})")
    if target is None:
        d = subspaces if subspaces is not None else max(d for d in divisors if d <= max(1, dim // 4))
        cold = min(cold_centroids, centroids)
        return CodeLayout(_uniform(vocab, hot, dim, d, centroids, cold), centroids, cold)
    best: tuple[float, int, int] | None = None  # (code bits a row, K, D): the most bits, then the most centroids
    for d in [subspaces] if subspaces is not None else divisors:
        def cost(k: int, d: int = d) -> int:
            kc = min(cold_centroids, k)
            return layout_bytes(vocab, hot, dim, _uniform(vocab, hot, dim, d, k, kc), k, kc)

        k = largest_at_most(cost, target, 2, centroids)
        if k is not None and (best is None or (d * math.log2(k), k) > best[:2]):
            best = (d * math.log2(k), k, d)
    if best is None:
        d = subspaces or 1
        smallest = layout_bytes(vocab, hot, dim, _uniform(vocab, hot, dim, d, 2, 2), 2, 2)
        raise BudgetError(f"embedding.budget: the smallest product-quantized layout (D={d}, K=2) takes "
                          f"{smallest:,} bytes, over the budget of {target:,}; raise embedding.budget")
    _, k, d = best
    kc = min(cold_centroids, k)
    chosen = _uniform(vocab, hot, dim, d, k, kc)
    total = layout_bytes(vocab, hot, dim, chosen, k, kc)
    moved = subspaces is None
    while moved:
        moved = False
        for f in sorted(chosen, key=lambda f: -vocab[f]):
            finer = [x for x in divisors if x > chosen[f]]
            if not finer:
                continue
            extra = coded_bytes(vocab[f], hot[f], dim, finer[0], k, kc) - \
                coded_bytes(vocab[f], hot[f], dim, chosen[f], k, kc)
            if total + extra <= target and coded_bytes(vocab[f], hot[f], dim, finer[0], k, kc) < vocab[f] * dim * BYTES_PER_FLOAT:
                chosen[f], total, moved = finer[0], total + extra, True
    return CodeLayout(chosen, k, kc)


def check_params(p: DPQParams) -> None:
    if not 2 <= p.centroids <= MAX_CENTROIDS:
        raise ConfigError(f"embedding.params.centroids must be in 2..{MAX_CENTROIDS} (uint8 codes), got {p.centroids}")
    if p.relaxation not in ("vq", "softmax"):
        raise ConfigError(f"embedding.params.relaxation must be 'vq' or 'softmax', got '{p.relaxation}'")
    if not p.temperature > 0:
        raise ConfigError(f"embedding.params.temperature must be > 0, got {p.temperature}")
    if p.commitment < 0 or p.codebook_weight < 0:
        raise ConfigError("embedding.params.commitment and codebook_weight must be >= 0")


class ProductQuantizedLayer(RowTableLayer):
    """Query rows (trained, not served) -> codes -> codebook rows; see the module docstring.

    ``subspaces[f]``: feature ``f``'s D. ``hot_rows[f]``: ids ``0..hot_rows[f]-1`` of ``f`` may take any
    of ``centroids``, the others only the first ``cold_centroids`` (MGQE's nested codebooks; DPQ: every
    row hot). Dense parameters: ``codebook [F, K * dim]`` (feature ``f``'s is ``[D_f, K, dim / D_f]``, the
    values served) and, for ``softmax``, ``keys`` of the same shape. Buffers: the query table and
    ``codes [rows, max D]`` (uint8; feature ``f`` uses the first ``D_f`` columns).
    """

    @classmethod
    def from_plan(cls, plan: VariantPlan, device: torch.device | None = None) -> ProductQuantizedLayer:
        p = plan.params
        rows, dim, update = row_table_args(plan)
        return cls(rows, dim, dict(p["subspaces"]), p["centroids"], p["cold_centroids"], dict(p["hot_rows"]),
                   p["relaxation"], p["temperature"], p["commitment"], p["codebook_weight"], update,
                   dict(p["init_std"]), p["init_seed"], device)

    def __init__(self, rows: dict[str, int], dim: int, subspaces: dict[str, int], centroids: int,
                 cold_centroids: int, hot_rows: dict[str, int], relaxation: str, temperature: float,
                 commitment: float, codebook_weight: float, update: RowUpdate, init_std: dict[str, float], seed: int,
                 device: torch.device | None = None) -> None:
        super().__init__(rows, dim, update, init_std, seed, device)
        self.subspaces = {f: int(subspaces[f]) for f in self.features}
        bad = [f for f, d in self.subspaces.items() if dim % d]
        if bad:
            raise ValueError(f"subspaces {self.subspaces[bad[0]]} of '{bad[0]}' must divide dim {dim}")
        self.centroids, self.cold_centroids = centroids, cold_centroids
        self.hot_rows = {f: int(hot_rows[f]) for f in self.features}
        self.relaxation, self.temperature = relaxation, temperature
        self.commitment, self.codebook_weight = commitment, codebook_weight
        shape = (len(self.features), centroids * dim)
        self.codebook = nn.Parameter(torch.empty(shape, device=device))
        self.keys = nn.Parameter(torch.empty(shape, device=device)) if relaxation == "softmax" else None
        width = max(self.subspaces.values())
        self.register_buffer("codes", torch.empty(self.total_rows, width, dtype=torch.uint8, device=device))
        self.register_buffer("hot_end", torch.empty(len(self.features), dtype=torch.int64, device=device),
                             persistent=False)
        self._vq_loss: torch.Tensor | None = None
        self._batch = 1
        self.materialize(device)

    def book(self, i: int, keys: bool = False) -> torch.Tensor:
        """Feature ``i``'s codebooks as ``[D, K, dim / D]`` (the keys with ``keys``, for ``softmax``)."""
        d = self.subspaces[self.features[i]]
        source = self.keys if keys and self.keys is not None else self.codebook
        return source[i].view(d, self.centroids, self.dim // d)

    def reset_parameters(self) -> None:
        """Codebooks ``N(0, init_std[f])`` per feature, from ``seed`` (equal on every rank)."""
        gen = torch.Generator(device=self.codebook.device).manual_seed(salted_seed(self.seed, 2))
        with torch.no_grad():
            for tensor in (self.codebook, self.keys):
                if tensor is None:
                    continue
                for i, f in enumerate(self.features):
                    tensor[i] = torch.randn(tensor.shape[1], generator=gen, device=tensor.device) * self.init_std[f]

    def reset_buffers(self) -> None:
        """Query rows from ``seed`` and their codes (against the codebooks as they are: reset them first)."""
        super().reset_buffers()
        with torch.no_grad():
            self.codes.zero_()
            self.hot_end.copy_(torch.tensor([self.offsets[f] + self.hot_rows[f] for f in self.features]))
            self._assign(torch.arange(self.total_rows, device=self.codes.device))

    def _scores(self, i: int, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[D, n, K]`` for queries ``q [n, dim]`` of feature ``i`` at stacked ``rows``: ``|c|^2 - 2 q.c``
        (``|q - c|^2`` up to a per-row constant; lower is nearer), +inf at the centroids a cold row may not take."""
        book = self.book(i, keys=True)  # [D, K, sub]
        q = q.reshape(q.shape[0], book.shape[0], book.shape[2]).transpose(0, 1)  # [D, n, sub]
        scores = torch.baddbmm((book * book).sum(-1).unsqueeze(1), q, book.transpose(1, 2), alpha=-2.0)
        if self.cold_centroids < self.centroids:
            cold = (rows >= self.hot_end[i]).view(1, -1, 1)
            barred = torch.arange(self.centroids, device=scores.device).view(1, 1, -1) >= self.cold_centroids
            scores = scores.masked_fill(cold & barred, math.inf)
        return scores

    def _assign(self, rows: torch.Tensor) -> None:
        """Store the codes of sorted stacked ``rows``: each sub-vector's nearest allowed centroid."""
        for start in range(0, rows.numel(), _ASSIGN_CHUNK):
            part = rows[start:start + _ASSIGN_CHUNK]
            q = self.weight.index_select(0, part)
            for i, a, b in self.feature_slices(part):
                code = self._scores(i, q[a:b], part[a:b]).argmin(-1).t().to(torch.uint8)
                self.codes[part[a:b], : code.shape[1]] = code

    def _pick(self, i: int, code: torch.Tensor) -> torch.Tensor:
        """``[n, D, dim / D]`` centroids of feature ``i`` at ``code [n, D]`` (one ``index_select``)."""
        book = self.book(i)
        d, k = book.shape[0], book.shape[1]
        index = code + torch.arange(d, device=code.device).unsqueeze(0) * k
        return book.reshape(d * k, -1).index_select(0, index.reshape(-1)).view(code.shape[0], d, -1)

    def served_rows(self, rows: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        """Codebook rows at the stored codes (the query table is not read)."""
        out = torch.empty(rows.numel(), self.dim, device=rows.device)
        codes = self.codes.index_select(0, rows).to(torch.int64)
        for i, a, b in blocks:
            out[a:b] = self._pick(i, codes[a:b, : self.subspaces[self.features[i]]]).reshape(-1, self.dim)
        return out

    def rows_of(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        q = self.query(rows)
        codes = self.codes.index_select(0, rows).to(torch.int64)
        outs, loss = [], self.codebook.new_zeros(())
        for i, a, b in self.feature_slices(rows):
            book = self.book(i)
            d = book.shape[0]
            code = codes[a:b, :d]  # [n, D]
            qf = q[a:b].view(-1, d, self.dim // d)
            if self.keys is None:  # vq: the centroid forward, the query's gradient straight through
                c = self._pick(i, code)  # [n, D, sub]
                outs.append((c + qf - qf.detach()).reshape(-1, self.dim))
                n = counts[a:b].to(qf.dtype)
                loss = loss + self.codebook_weight * ((qf.detach() - c).pow(2).sum((1, 2)) * n).sum() + \
                    self.commitment * ((qf - c.detach()).pow(2).sum((1, 2)) * n).sum()
            else:  # softmax: the one-hot code forward, the softmax's gradient backward
                soft = torch.softmax(-self._scores(i, q[a:b], rows[a:b]) / self.temperature, dim=-1)  # [D, n, K]
                hard = F.one_hot(code.t(), self.centroids).to(soft.dtype)
                outs.append(torch.einsum("dnk,dks->nds", hard + soft - soft.detach(), book).reshape(-1, self.dim))
        if self.keys is None and torch.is_grad_enabled():
            self._vq_loss = loss / self._batch
        return torch.cat(outs)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        self._batch = max(1, kjt.stride())
        return super().forward(kjt)

    def regularization(self) -> torch.Tensor:
        """vq's codebook and commitment terms of the last training forward (0 for softmax / after use)."""
        loss, self._vq_loss = self._vq_loss, None
        return loss if loss is not None else self.codebook.new_zeros(())

    def after_update(self, rows: torch.Tensor) -> None:
        """The updated rows take the codes of their new queries."""
        self._assign(rows)

    def parameter_bytes(self) -> int:
        """What is served: codes (4-bit where at most 16 centroids are allowed) and the fp32 codebooks."""
        return sum(coded_bytes(self.full_rows[f], self.hot_rows[f], self.dim, self.subspaces[f], self.centroids,
                               self.cold_centroids) for f in self.features)


def hot_rows_of(spec: VariantSpec, share: float | None) -> dict[str, int]:
    """Rows per feature that may take every centroid: all (``share`` None), else the top ``share`` of each
    feature's ids by training count. Preparation numbers ids by count (id 0 is the OOV bucket, which
    collects every rare value), so these are ids ``0..n-1``; a feature whose counts are known but not in id
    order is refused. Without counts (a hashed feature, a feature map not read from disk) the prefix is
    taken all the same, and is then no frequency split."""
    out = {}
    for f, rows in spec.vocab.items():
        if share is None:
            out[f] = rows
            continue
        counts = spec.id_counts(f)
        if counts is not None and counts.size > 2 and bool((np.diff(counts[1:]) > 0).any()):
            raise ConfigError(f"embedding.kind=mgqe: the ids of '{f}' are not numbered by training count "
                              "(prepare the data with recemb prepare, whose vocabularies are)")
        out[f] = min(rows, max(1, math.ceil(share * rows)))
    return out


def plan_product_quantized(spec: VariantSpec, kind: str, params: DPQParams, hot_share: float | None,
                           cold_centroids: int) -> VariantPlan | EmbeddingLayer:
    """The plan of ``dpq`` (``hot_share`` None) or ``mgqe``: coded features as a module plan, the rest as
    plain tables (``full``'s layout under ``kind``); both: a grouped layer of the two."""
    check_params(params)
    vocab = spec.vocab
    hot = hot_rows_of(spec, hot_share)
    full = sum(vocab.values()) * spec.dim * BYTES_PER_FLOAT
    target = None if spec.budget is None else budget_bytes(spec.budget, full)
    layout = solve_layout(vocab, hot, spec.dim, target, params.subspaces, params.centroids, cold_centroids)
    achieved = layout_bytes(vocab, hot, spec.dim, layout.subspaces, layout.centroids, layout.cold_centroids)
    budget = {"solver": "product_quantization", "budget": spec.budget, "target_bytes": target,
              "subspaces": layout.subspaces, "centroids": layout.centroids,
              "cold_centroids": layout.cold_centroids, "solved_bytes": achieved}
    parts: dict[str, VariantPlan] = {}
    coded = [f for f in spec.features if f.name in layout.coded]
    if coded:
        sub = dataclasses.replace(spec, features=coded)
        update = resolve_update(params.optimizer, params.lr, spec.extra)
        solved = {
            "subspaces": {f: layout.subspaces[f] for f in sub.names}, "centroids": layout.centroids,
            "cold_centroids": layout.cold_centroids,
            "hot_bits": 4 if layout.centroids <= NIBBLE_CENTROIDS else 8,
            "cold_bits": 4 if layout.cold_centroids <= NIBBLE_CENTROIDS else 8,
            "hot_rows": {f: hot[f] for f in sub.names}, "offsets": stack_offsets(sub.vocab),
            "relaxation": params.relaxation, "temperature": params.temperature, "commitment": params.commitment,
            "codebook_weight": params.codebook_weight, **update.to_dict(),
            "init_std": {f: row_init_std(spec.init_std, n) for f, n in sub.vocab.items()},
            "init_seed": salted_seed(spec.seed, zlib.crc32(f"{kind}:{spec.prefix}".encode())),
        }
        parts[kind] = sub.plan(kind, [], storage="module", multihot=True, params=solved, budget=budget)
    plain = [f for f in spec.features if f.name not in layout.coded]
    if plain:
        sub = dataclasses.replace(spec, features=plain, budget=None, params=FullParams())
        parts["dense"] = dataclasses.replace(plan_full(sub), kind=kind, capabilities=Capabilities(budget=budget))
    if len(parts) == 1:
        return next(iter(parts.values()))
    return GroupedEmbeddingLayer({name: assemble(p, spec.device) for name, p in parts.items()}, spec.names)


@register_variant("dpq", DPQParams)
def plan_dpq(spec: VariantSpec) -> VariantPlan | EmbeddingLayer:
    """Product-quantized rows (every id the same ``K`` centroids); see the module docstring."""
    params: DPQParams = spec.params
    return plan_product_quantized(spec, "dpq", params, hot_share=None, cold_centroids=params.centroids)


@register_module_assembler("dpq")
def assemble_dpq(plan: VariantPlan, device: torch.device | None = None) -> ProductQuantizedLayer:
    """The product-quantized layer of a ``dpq`` module plan."""
    return ProductQuantizedLayer.from_plan(plan, device)


def quantizers(module: nn.Module) -> list[ProductQuantizedLayer]:
    """Every product-quantized layer in ``module`` (tests and reports read their codes)."""
    return [m for m in module.modules() if isinstance(m, ProductQuantizedLayer)]


__all__ = ["CodeLayout", "DPQParams", "ProductQuantizedLayer", "code_bytes", "coded_bytes", "hot_rows_of",
           "layout_bytes", "plan_dpq", "plan_product_quantized", "quantizers", "solve_layout"]
