"""Regularising embedding tables: ``embedding.l2`` works; ``embedding.weight_decay`` is refused on CPU.

``embedding.weight_decay`` used to be handed to FBGEMM without a ``weight_decay_mode``, so
it did nothing anywhere; with the mode set it reaches the kernel's arguments, but FBGEMM's
CPU row-wise Adagrad kernel still leaves the rows as without it (pinned below, so a future
FBGEMM that honours it shows up here). ``embedding.l2`` is a loss term on the looked-up
embeddings and is checked against the update written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recemb.config.experiment import EmbeddingConfig
from recemb.data.batch import Batch
from recemb.data.schema import FeatureInfo, FeatureMap
from recemb.embeddings.registry import build_embedding_layer
from recemb.embeddings.sharding import (
    check_initial_accumulator,
    check_weight_decay,
    load_full_state,
    local_pieces,
    shard_model,
)
from recemb.errors import ConfigError
from recemb.train.loop import TrainModel

ROWS, DIM, LR, L2 = 12, 4, 0.05, 0.3
IDS = [3, 7, 3, 0]


class _Toy(nn.Module):
    """logit = sum of the pooled embedding (enough to give every row a data gradient)."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.embedding(batch.sparse).values().sum(dim=1)


LABELS = [1.0, 0.0, 0.0, 1.0]


def _trained_rows(weights: torch.Tensor, l2: float, cfg: EmbeddingConfig | None = None) -> torch.Tensor:
    """The table after one fused step (exact SGD unless ``cfg``) of ``TrainModel(_Toy, embedding_l2=l2)``."""
    cfg = cfg or EmbeddingConfig(dim=DIM, lr=LR, optimizer="exact_sgd", init_std=None, sharding="table_wise", l2=l2)
    fm = FeatureMap(dataset_id="toy", label="label",
                    features=[FeatureInfo(name="f", kind="sparse", source="f", num_embeddings=ROWS)])
    model = TrainModel(_Toy(build_embedding_layer(fm, cfg, device=torch.device("meta"))), embedding_l2=l2)
    dmp = shard_model(model, cfg, torch.device("cpu"), batch_size=len(IDS)).model
    (key,) = [k for k in dmp.state_dict() if k.endswith(".weight")]
    load_full_state(dmp, {key: weights})
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor(IDS),
                                              lengths=torch.ones(len(IDS), dtype=torch.int64))
    batch = Batch(dense=torch.zeros(len(IDS), 0), sparse=kjt, labels=torch.tensor(LABELS))
    loss, (data_loss, _, _) = dmp(batch)
    rows = weights[IDS]
    expected_penalty = 0.5 * l2 * float((rows * rows).sum()) / len(IDS)
    assert float(loss.detach() - data_loss) == pytest.approx(expected_penalty, rel=1e-5)
    loss.backward()
    out = torch.zeros(ROWS, DIM)
    for (r0, c0), piece in local_pieces(dmp.state_dict()[key]):
        out[r0 : r0 + piece.shape[0], c0 : c0 + piece.shape[1]] = piece
    return out


def test_embedding_l2_pulls_each_row_by_its_batch_frequency(no_process_group: None) -> None:
    torch.manual_seed(0)
    weights = torch.randn(ROWS, DIM)
    plain = _trained_rows(weights, 0.0)
    import torch.distributed as dist

    dist.destroy_process_group()
    decayed = _trained_rows(weights, L2)
    # d(penalty)/d(row) = l2 * count(row) / B * row; SGD moves it by -lr times that.
    count = torch.bincount(torch.tensor(IDS), minlength=ROWS).float()[:, None]
    torch.testing.assert_close(decayed - plain, -LR * L2 * count / len(IDS) * weights, atol=1e-6, rtol=1e-5)
    assert (decayed - plain).abs().max() > 1e-3  # well above the tolerance: the check has teeth


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise"])
def test_initial_accumulator_starts_rowwise_adagrad(no_process_group: None, sharding: str) -> None:
    """One fused row-wise Adagrad step from accumulator ``a``: ``w -= lr * g / (sqrt(a + mean(g^2)) + eps)``."""
    torch.manual_seed(0)
    weights = 0.1 * torch.randn(ROWS, DIM)
    start, eps = 1e-3, 1e-8
    cfg = EmbeddingConfig(dim=DIM, lr=LR, eps=eps, init_std=None, sharding=sharding, initial_accumulator=start)
    got = _trained_rows(weights, 0.0, cfg)
    # logit = sum of the row, so every column of a row gets sum over its reads of (sigmoid - y) / B.
    residual = torch.sigmoid(weights[IDS].sum(dim=1)) - torch.tensor(LABELS)
    expected = weights.clone()
    for row in set(IDS):
        g = float(sum(residual[i] for i, r in enumerate(IDS) if r == row)) / len(IDS)
        # Every column has gradient g, so mean(g^2) is g^2 in each column shard's own accumulator too.
        expected[row] -= LR * g / ((start + g * g) ** 0.5 + eps)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    import torch.distributed as dist

    dist.destroy_process_group()
    plain = _trained_rows(weights, 0.0, EmbeddingConfig(dim=DIM, lr=LR, eps=eps, init_std=None, sharding=sharding))
    assert (plain - got).abs().max() > 1e-3  # from 0 the first step is a full lr: the start mattered


def test_fbgemm_cpu_rowwise_adagrad_ignores_weight_decay() -> None:
    """Why ``weight_decay`` is refused on CPU: the kernel gets it and does nothing with it."""
    moved = []
    for decay, mode in [(0.0, WeightDecayMode.NONE), (L2, WeightDecayMode.L2), (L2, WeightDecayMode.DECOUPLE)]:
        torch.manual_seed(0)
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=LR, weight_decay=decay, weight_decay_mode=mode)
        before = tbe.split_embedding_weights()[0].clone()
        tbe(torch.tensor(IDS), torch.arange(len(IDS) + 1)).sum().backward()
        moved.append(tbe.split_embedding_weights()[0] - before)
    assert moved[0].abs().max() > 0
    torch.testing.assert_close(moved[1], moved[0], atol=0, rtol=0)
    torch.testing.assert_close(moved[2], moved[0], atol=0, rtol=0)


def test_weight_decay_refusals() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"CPU row-wise Adagrad kernel ignores weight decay; use embedding.l2"):
        check_weight_decay(EmbeddingConfig(weight_decay=1e-4), cpu)
    for optimizer in ("exact_adagrad", "exact_sgd"):
        with pytest.raises(ConfigError, match=rf"fused {optimizer} has no weight decay"):
            check_weight_decay(EmbeddingConfig(optimizer=optimizer, weight_decay=1e-4), cpu)
        check_weight_decay(EmbeddingConfig(optimizer=optimizer), cpu)  # zero decay is fine
    check_weight_decay(EmbeddingConfig(weight_decay=1e-4), torch.device("meta"))  # a GPU run would take it
    # Only data_parallel tables: their unfused optimizer applies the decay on any device.
    check_weight_decay(EmbeddingConfig(optimizer="exact_sgd", weight_decay=1e-4), cpu, fused=False)
    check_weight_decay(EmbeddingConfig(weight_decay=1e-4), cpu, fused=False)
    with pytest.raises(ConfigError, match=r"lowprec tables update themselves without weight decay; use embedding.l2"):
        check_weight_decay(EmbeddingConfig(kind="lowprec", weight_decay=1e-4), torch.device("meta"), fused=False)
    for kind in ("dpq", "mgqe", "deeplight", "pep"):  # row tables: their own update, no decay (was ignored)
        with pytest.raises(ConfigError, match=rf"{kind} tables update themselves without weight decay"):
            check_weight_decay(EmbeddingConfig(kind=kind, weight_decay=1e-4), torch.device("meta"), fused=False)


def test_embedding_l2_and_initial_accumulator_are_validated() -> None:
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="l2 and initial_accumulator must be >= 0"):
            EmbeddingConfig(l2=bad)
        with pytest.raises(ValueError, match="l2 and initial_accumulator must be >= 0"):
            EmbeddingConfig(initial_accumulator=bad)
    with pytest.raises(ConfigError, match="initial_accumulator=0.1 needs an Adagrad optimizer"):
        check_initial_accumulator(EmbeddingConfig(optimizer="exact_sgd", initial_accumulator=0.1))
    check_initial_accumulator(EmbeddingConfig(optimizer="exact_sgd"))
