"""Checkpoint integrity: every file's size and sha256 are recorded when written and
verified before anything is loaded; a damaged ``meta.json`` or safetensors file is a
one-line ``DataError`` naming the file and the field, never a traceback or a silent load.

The checkpoints here hold a small plain torch model (one rank, no process group): the
files are the same as a sharded run's, and each test takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from recemb import integrity
from recemb.errors import DataError
from recemb.integrity import FileDigest, file_sha256, verify_files
from recemb.train import checkpoint as ckpt
from recemb.train.checkpoint import (
    FORMAT_VERSION,
    TrainState,
    assemble_full,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
    write_meta,
)

RANK0 = "rank-0.safetensors"


def small_state(seed: int = 0) -> TrainState:
    """A two-layer model and its Adam after one step (so the optimizer has state to save)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return TrainState(model=model, dense_optimizer=opt)


def snapshot(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.tensors().items()}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A good checkpoint of ``small_state()``."""
    return save_checkpoint(tmp_path / "ck", small_state(), step=3, epoch=1, config={"x": 1}, extra={"n": 2})


def rewrite_meta(folder: Path, change: Callable[[dict[str, Any]], None] | str) -> None:
    """Replace meta.json (raw text, or a change made to the parsed meta in place) and re-sign
    it as a buggy writer would: the sidecar matches, so what is tested is the content check."""
    if isinstance(change, str):
        text = change
    else:
        meta = json.loads((folder / "meta.json").read_text())
        change(meta)
        text = json.dumps(meta)
    (folder / "meta.json").write_text(text)
    (folder / "meta.json.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  meta.json\n")


def as_format_1(folder: Path) -> None:
    """What recemb wrote before checksums: no ``files``, no sidecar, format_version 1."""
    meta = json.loads((folder / "meta.json").read_text())
    del meta["files"]
    meta["format_version"] = 1
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "meta.json.sha256").unlink()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- what is written


def test_save_records_size_and_sha256_of_every_file(folder: Path) -> None:
    meta = read_meta(folder)
    part = (folder / RANK0).read_bytes()
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["files"] == {RANK0: {"size": len(part), "sha256": hashlib.sha256(part).hexdigest()}}
    meta_sha = hashlib.sha256((folder / "meta.json").read_bytes()).hexdigest()
    assert (folder / "meta.json.sha256").read_text() == f"{meta_sha}  meta.json\n"  # `sha256sum -c` format
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "meta.json.sha256", RANK0]
    assert not folder.with_name("ck.tmp").exists()


def test_file_sha256_streams_files_larger_than_a_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 41 + b"tail"
    path = tmp_path / "blob"
    path.write_bytes(data)
    monkeypatch.setattr(integrity, "_CHUNK", 1000)  # many chunks, the last one short
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert FileDigest.of(path) == FileDigest(len(data), hashlib.sha256(data).hexdigest())


def test_verify_files_names_the_first_file_that_differs(tmp_path: Path) -> None:
    """The reusable check (the export step calls it too): missing, truncated, changed."""
    (tmp_path / "a.bin").write_bytes(b"alpha")
    (tmp_path / "b.bin").write_bytes(b"beta")
    expected = {name: FileDigest.of(tmp_path / name) for name in ("a.bin", "b.bin")}
    verify_files(tmp_path, expected)
    (tmp_path / "b.bin").write_bytes(b"bet4")
    with pytest.raises(DataError, match=r"b\.bin: checksum mismatch .*redo it") as excinfo:
        verify_files(tmp_path, expected, hint="redo it")
    one_line_error(excinfo)
    (tmp_path / "a.bin").write_bytes(b"alph")
    with pytest.raises(DataError, match=r"a\.bin: size mismatch \(4 bytes, 5 when written"):
        verify_files(tmp_path, expected)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(DataError, match=r"a\.bin: missing"):
        verify_files(tmp_path, expected)


# ----------------------------------------------------------------------------- damaged rank files


def test_a_flipped_byte_is_refused_before_anything_is_loaded(folder: Path) -> None:
    """Safetensors has no checksum: a flipped bit in a tensor used to load and train on."""
    size = (folder / RANK0).stat().st_size
    flip_byte(folder / RANK0, size - 3)  # inside the last tensor's data: still a valid file
    state = small_state(seed=1)
    before = snapshot(state)
    with pytest.raises(DataError, match=rf"{RANK0}: checksum mismatch \(the file was changed or corrupted") as excinfo:
        load_checkpoint(folder, state)
    one_line_error(excinfo)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(state).items())  # nothing was copied in
    with pytest.raises(DataError, match=rf"{RANK0}: checksum mismatch"):
        assemble_full(folder)
    # read_meta only stats the rank files; a driver that hands the folder on checks it all first.
    assert read_meta(folder)["step"] == 3
    with pytest.raises(DataError, match=rf"{RANK0}: checksum mismatch"):
        verify_checkpoint(folder)


@pytest.mark.parametrize("keep", [0, 5, 100])
def test_a_truncated_rank_file_is_refused(folder: Path, keep: int) -> None:
    part = folder / RANK0
    data = part.read_bytes()
    part.write_bytes(data[:keep])
    with pytest.raises(DataError, match=rf"{RANK0}: size mismatch \({keep} bytes, {len(data):,} when written"):
        load_checkpoint(folder, small_state())
    with pytest.raises(DataError, match=rf"{RANK0}: size mismatch"):
        read_meta(folder)  # a stat per file: cheap enough for every read of meta.json


def test_a_missing_rank_file_is_refused(folder: Path) -> None:
    (folder / RANK0).unlink()
    with pytest.raises(DataError, match=rf"{RANK0}: missing"):
        assemble_full(folder)
    with pytest.raises(DataError, match=rf"{RANK0}: missing"):
        read_meta(folder)


# Damage that slips past the digests (a format-1 checkpoint has none, or a writer bug):
# parsing must still end in a DataError naming the file, not a traceback.
def _truncate_header(part: Path) -> None:
    part.write_bytes(part.read_bytes()[:20])


def _huge_header(part: Path) -> None:
    data = part.read_bytes()
    part.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])


def _garbage_header(part: Path) -> None:
    data = bytearray(part.read_bytes())
    data[8:20] = b"#" * 12
    part.write_bytes(bytes(data))


def _no_shapes(part: Path) -> None:
    save_file({"model/0.weight@0,0": torch.zeros(4, 3)}, str(part))


def _bad_shapes(part: Path) -> None:
    save_file({"model/0.weight@0,0": torch.zeros(4, 3)}, str(part), metadata={"shapes": "{not json"})


def _unlisted_tensor(part: Path) -> None:
    save_file({"model/0.weight@0,0": torch.zeros(4, 3)}, str(part), metadata={"shapes": "{}"})


def _piece_too_big(part: Path) -> None:
    save_file({"model/0.weight@2,0": torch.zeros(4, 3)}, str(part),
              metadata={"shapes": json.dumps({"model/0.weight": [4, 3]})})


def _bad_offsets(part: Path) -> None:
    save_file({"model/0.weight@a,b": torch.zeros(4, 3)}, str(part),
              metadata={"shapes": json.dumps({"model/0.weight": [4, 3]})})


@pytest.mark.parametrize(("damage", "message"), [
    (_truncate_header, r"not a readable safetensors file"),
    (_huge_header, r"not a readable safetensors file"),
    (_garbage_header, r"not a readable safetensors file"),
    (_no_shapes, r"metadata field 'shapes' is missing"),
    (_bad_shapes, r"metadata field 'shapes' is not valid JSON"),
    (_unlisted_tensor, r"tensor 'model/0\.weight@0,0' has no entry in metadata field 'shapes'"),
    (_piece_too_big, r"tensor 'model/0\.weight@2,0' of shape \[4, 3\] does not fit 'model/0\.weight' of shape \[4, 3\]"),
    (_bad_offsets, r"tensor 'model/0\.weight@a,b' of shape \[4, 3\] does not fit"),
])
def test_an_unparsable_rank_file_is_a_data_error(folder: Path, damage: Callable[[Path], None], message: str) -> None:
    as_format_1(folder)
    damage(folder / RANK0)
    with pytest.raises(DataError, match=rf"{RANK0}: {message}") as excinfo:
        assemble_full(folder)
    one_line_error(excinfo)


def test_a_format_1_checkpoint_loads_with_a_warning(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints written before checksums stay usable: refusing them would strand every old run."""
    want = snapshot(small_state())
    as_format_1(folder)
    state = small_state(seed=1)
    with caplog.at_level(logging.WARNING, logger="recemb.train"):
        meta = load_checkpoint(folder, state)
    assert meta["format_version"] == 1 and meta["step"] == 3
    assert all(torch.equal(v, want[k]) for k, v in snapshot(state).items())
    assert "format 1 checkpoint (written before checksums)" in caplog.text


# ----------------------------------------------------------------------------- damaged meta.json


def test_a_changed_meta_json_is_refused(folder: Path) -> None:
    """Still valid JSON with every field: only its recorded sha256 tells (step 3 -> 9 here)."""
    meta_path = folder / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"step": 3', '"step": 9'))
    with pytest.raises(DataError, match=r"ck/meta\.json: checksum mismatch \(the file was changed") as excinfo:
        read_meta(folder)
    one_line_error(excinfo)


def test_write_meta_re_signs_an_edited_meta(folder: Path) -> None:
    """How a tool (or test) edits meta.json on purpose: the checksum follows the edit."""
    meta = read_meta(folder)
    meta["extra"]["note"] = "edited"
    write_meta(folder, meta)
    assert read_meta(folder)["extra"] == {"n": 2, "note": "edited"}


def test_meta_json_sidecar_missing_or_damaged_is_refused(folder: Path) -> None:
    sidecar = folder / "meta.json.sha256"
    sidecar.write_text("not a digest\n")
    with pytest.raises(DataError, match=r"meta\.json\.sha256: should hold '<sha256>  meta\.json'"):
        read_meta(folder)
    sidecar.unlink()
    with pytest.raises(DataError, match=r"ck/meta\.json\.sha256: missing \(format 2 checkpoints carry it\)"):
        read_meta(folder)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        del meta[key]

    return change


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda meta: meta.__setitem__(key, value)


@pytest.mark.parametrize(("change", "message"), [
    ("{\"step\": 3,", r"not valid JSON \(Expecting property name"),
    ("[1, 2]", r"should be a JSON object, got list"),
    (_drop("step"), r"field 'step' is missing"),
    (_drop("config"), r"field 'config' is missing"),
    (_drop("files"), r"field 'files' is missing"),
    (_set("step", "3"), r"field 'step' should be an integer >= 0, got '3'"),
    (_set("epoch", -1), r"field 'epoch' should be an integer >= 0, got -1"),
    (_set("world_size", 0), r"field 'world_size' should be an integer >= 1, got 0"),
    (_set("world_size", True), r"field 'world_size' should be an integer >= 1, got True"),
    (_set("format_version", "2"), r"field 'format_version' should be an integer"),
    (_set("config", []), r"field 'config' should be a mapping, got \[\]"),
    (_set("extra", None), r"field 'extra' should be a mapping, got None"),
    (_set("param_groups", 1), r"field 'param_groups' should be a mapping"),
    (_set("torch_rng", [1, 300]), r"field 'torch_rng' should be a list of bytes"),
    (_set("world_size", 2), r"field 'files' lists \['rank-0\.safetensors'\], but world_size 2 means"),
    (_set("files", {RANK0: {"size": 10}}), r"field 'files\.rank-0\.safetensors'\.sha256: should be 64 lowercase hex"),
    (_set("files", {RANK0: {"size": -1, "sha256": "0" * 64}}), r"field 'files\.rank-0\.safetensors'\.size: should be a"),
    (_set("files", {RANK0: "abc"}), r"field 'files\.rank-0\.safetensors': should be \{size, sha256\}"),
])
def test_a_bad_meta_json_is_a_one_line_error_naming_it_and_the_field(
    folder: Path, change: Callable[[dict[str, Any]], None] | str, message: str
) -> None:
    rewrite_meta(folder, change)
    with pytest.raises(DataError, match=rf"^{folder}/meta\.json: {message}") as excinfo:
        load_checkpoint(folder, small_state())
    one_line_error(excinfo)


def test_a_newer_format_names_meta_json(folder: Path) -> None:
    rewrite_meta(folder, _set("format_version", FORMAT_VERSION + 1))
    with pytest.raises(DataError, match=rf"^{folder}/meta\.json: checkpoint format 3 is newer than this recemb"):
        read_meta(folder)


def test_no_meta_json_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a checkpoint \(no meta\.json\)"):
        read_meta(tmp_path)


def test_a_checkpoint_of_another_model_names_the_tensor(folder: Path) -> None:
    state = small_state()
    state.model[2] = torch.nn.Linear(4, 2)  # the last layer's output grew
    with pytest.raises(DataError, match=r"tensor 'model/2\.weight' has shape \[1, 4\] in the checkpoint but \[2, 4\]"):
        load_checkpoint(folder, state)


def test_docstring_examples() -> None:
    import doctest

    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    results = [doctest.testmod(module, optionflags=flags) for module in (ckpt, integrity)]
    assert all(r.failed == 0 for r in results) and sum(r.attempted for r in results) >= 3, results
