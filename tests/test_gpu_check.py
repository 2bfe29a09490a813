"""``tools/gpu_check.py`` proven on CPU, so that a lent GPU's few minutes are not spent on its bugs.

The tool's CPU mode runs its torch steps in this process at the tiny size (one rank, one
thread): the sharded DeepFM equals the unsharded one, the fused-optimizer step trains and
moves exactly the rows seen, the train pipeline gives the plain loop's losses with its
sharded modules pipelined, and the table has one line per row. The skip reasons that keep
a GPU run from failing on a missing piece, and the guard that turns a step's error into a
failed row, are checked without running anything heavy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from recemb.errors import ConfigError

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name: str) -> Any:
    """Import ``tools/<name>.py`` as module ``name`` (tools/ is no package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")

CPU_FACTS = {"torch": "2.13.0+cpu", "cuda": None, "gpus": 0, "gpu_names": [], "nccl": False,
             "fbgemm_dists": {"fbgemm-gpu": "1.8.0+cpustub", "fbgemm-gpu-cpu": "1.8.0"},
             "fbgemm_variant": "cpu", "fbgemm_version": "1.8.0", "torchrec": "1.8.0",
             "mlflow-skinny": "3.17.2", "pyarrow": "26.0.1"}


# torchrec's own deprecations inside its planner and DMP (see recemb.train.quiet)
@pytest.mark.filterwarnings("ignore:HeuristicalStorageReservation:FutureWarning",
                            "ignore:`broadcast_buffers` is deprecated:FutureWarning")
def test_cpu_mode_steps_pass_and_print_one_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads, silenced = torch.get_num_threads(), logging.root.manager.disable
    try:
        code = gpu_check.main(["--device", "cpu", "--size", "tiny", "--ranks", "1", "--threads", "1",
                               "--in-process", "--steps", "env", "shard", "adam", "pipeline",
                               "--work", str(tmp_path / "work"), "--json", str(tmp_path / "rows.json")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["step"] for r in rows] == ["env", "shard auto", "adam (cpu: row-wise adagrad)", "pipeline"]
    assert [(r["status"], r["why"]) for r in rows] == [("ok", "")] * 4, out
    assert code == 0
    assert [r["device"] for r in rows] == ["cpu", "cpu x1 gloo", "cpu x1 gloo", "cpu x1 gloo"]
    assert all(r["seconds"] > 0 for r in rows)
    assert not dist.is_initialized()  # every step leaves its process group
    assert logging.root.manager.disable == silenced  # in-process steps leave the caller's logging alone

    env, shard, adam, pipe = (r["data"] for r in rows)
    assert env["torchrec"] and env["gpus"] == 0 and env["fbgemm_variant"]
    assert max(shard["forward"], shard["grad"], shard["rows"]) <= 1e-5
    assert adam["losses"][-1] < adam["losses"][0]
    assert adam["moved_seen"] == adam["seen"] > 0 and adam["moved_unseen"] == 0
    assert pipe["loss_diff"] <= 1e-5 and pipe["pipelined"] >= 1 and pipe["plain_per_s"] > 0

    table = out.strip().splitlines()[-6:]
    assert [cell.strip() for cell in table[0].split("|")[1:-1]] == ["step", "device", "s", "status", "figure"]
    assert set(table[1]) <= {"|", "-"}
    assert [line.split("|")[1].strip() for line in table[2:]] == [r["step"] for r in rows]
    assert all(line.count("|") == 6 for line in table)


def test_skip_reasons_name_what_is_missing() -> None:
    skip = gpu_check.skip_reason
    assert [skip(s, "cpu", CPU_FACTS) for s in gpu_check.STEPS[1:]] == [""] * 5
    assert skip("shard", "cuda", CPU_FACTS) == "torch sees no CUDA device"
    cpu_build_on_gpu = {**CPU_FACTS, "gpus": 1, "nccl": True, "fbgemm_cuda": False,
                        "fbgemm_cuda_error": "NotImplementedError: Could not run ... 'CUDA' backend"}
    assert "cpu build has no CUDA kernels" in skip("adam", "cuda", cpu_build_on_gpu)
    assert "fbgemm-gpu==1.8.0" in skip("adam", "cuda", cpu_build_on_gpu)
    assert skip("shard", "cuda", {**cpu_build_on_gpu, "fbgemm_cuda": True}) == ""
    # This workplace's device machine: CUDA torch, nothing of torchrec's stack.
    device_machine = {"torch": "2.11.0+cu130", "cuda": "13.0", "gpus": 1, "gpu_names": ["NVIDIA H200"],
                      "nccl": True, "fbgemm_dists": {}, "fbgemm_error": "ModuleNotFoundError: No module named "
                      "'fbgemm_gpu'", "torchrec_error": "ModuleNotFoundError: No module named 'torchrec'"}
    assert all("fbgemm_gpu does not load" in skip(s, "cuda", device_machine) for s in gpu_check.STEPS[1:])
    no_torchrec = {**CPU_FACTS, "torchrec": None, "torchrec_error": "ModuleNotFoundError: torchrec"}
    assert "torchrec is not installed" in skip("pipeline", "cpu", no_torchrec)
    assert "mlflow" in skip("cli", "cpu", {**CPU_FACTS, "mlflow-skinny": None})
    assert skip("env", "cpu", {"torch_error": "ImportError: x"}).startswith("torch does not import")


@pytest.mark.parametrize(("device", "gpus", "expected"), [
    ("auto", 0, ("cpu", 2, "cpu")), ("auto", 1, ("cuda", 1, "gpu")), ("auto", 2, ("cuda", 2, "gpu")),
    ("auto", 8, ("cuda", 2, "gpu")), ("cuda", 0, ("cuda", 1, "gpu")), ("cpu", 2, ("cpu", 2, "cpu")),
])
def test_device_ranks_and_size_follow_the_gpus(device: str, gpus: int, expected: tuple[str, int, str]) -> None:
    args = gpu_check.argparse.Namespace(device=device, ranks=0, size="auto", work="w", threads=0)
    opts = gpu_check.resolve_options(args, {"gpus": gpus})
    assert (opts.device, opts.ranks, opts.size) == expected
    assert opts.backend == ("nccl" if expected[0] == "cuda" else "gloo")


def test_a_failing_step_is_a_failed_row_and_the_table_still_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(opts: Any) -> list[Any]:
        raise ConfigError("embedding.optimizer=adam: FBGEMM's fused Adam runs on GPU only")

    monkeypatch.setitem(gpu_check.STEP_FNS, "adam", broken)
    opts = gpu_check.Options(device="cpu", size="tiny", ranks=1, work=Path("w"))
    (row,) = gpu_check.run_guarded("adam", opts)
    assert (row.step, row.status) == ("adam", "failed")
    assert row.why == "ConfigError: embedding.optimizer=adam: FBGEMM's fused Adam runs on GPU only"
    table = gpu_check.format_table([row, gpu_check.Row("bench full", "cuda", "skipped", why="torch sees no CUDA device")])
    assert table.splitlines()[2].startswith("| adam       | cpu    | ")
    assert "skipped: torch sees no CUDA device" in table.splitlines()[3]


def test_bench_train_refuses_cuda_without_a_gpu() -> None:
    bench_train = _load("bench_train")
    assert bench_train.resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_train.resolve_device("cuda")
    assert bench_train.resolve_device("auto") == torch.device("cpu")


def test_batch_has_what_the_train_pipeline_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrec's pipelines call ``batch.to(device=..., non_blocking=True)`` and ``record_stream``
    (its ``Pipelineable``); the CUDA loaders hand over ``pin_memory()`` copies. Pinning needs a
    CUDA build of torch: on a CPU build a recording copy stands in for ``Tensor.pin_memory``
    (``Batch.pin_memory`` once called a KJT method that does not exist, ``pin``)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    from torchrec.streamable import Pipelineable

    from recemb.data.batch import Batch

    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.arange(5),
                                                 lengths=torch.tensor([1, 2, 0, 2]))
    batch = Batch(dense=torch.randn(2, 3), sparse=sparse, labels=torch.tensor([0.0, 1.0]),
                  weights=torch.tensor([1.0, 3.0]))
    assert isinstance(batch, Pipelineable)
    pinned: list[int] = []
    if not torch.cuda.is_available():
        def recording_pin(self: torch.Tensor) -> torch.Tensor:
            pinned.append(self.numel())
            return self.clone()

        monkeypatch.setattr(torch.Tensor, "pin_memory", recording_pin)
    copy = batch.pin_memory()
    if torch.cuda.is_available():
        assert copy.dense.is_pinned() and copy.sparse.values().is_pinned() and copy.labels.is_pinned()
    else:  # labels 2, weights 2, lengths 4, values 5, dense 6 (and offsets 5 when the KJT holds them)
        assert sorted(pinned) in ([2, 2, 4, 5, 6], [2, 2, 4, 5, 5, 6])
    assert copy.sparse.keys() == ["a", "b"] and copy.sparse.values().tolist() == [0, 1, 2, 3, 4]
    assert copy.sparse.lengths().tolist() == [1, 2, 0, 2] and copy.weights is not None
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    moved = copy.to(device=device, non_blocking=True)  # the keyword form torchrec uses
    assert moved.dense.device.type == moved.sparse.values().device.type == device.type
    assert torch.equal(moved.labels.cpu(), batch.labels) and moved.batch_size == 2
    if torch.cuda.is_available():
        moved.record_stream(torch.cuda.current_stream())
