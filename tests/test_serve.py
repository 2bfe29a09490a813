"""Tests for ``recemb serve`` (``pipelines.serve``): a real HTTP endpoint on Ray Serve.

One small DeepFM is trained once per module and exported; the endpoint serves its bundle
with one replica on a free port of 127.0.0.1 inside the session's local Ray (``ray_local``)
and is hit with ``urllib.request``, 8 client threads at most and under 100 requests in all.
Scores must equal ``Bundle.score`` on the same raw rows, malformed requests get a 400 with
their reason while the replica keeps serving, and shutting down stops Serve only (the
session's Ray stays usable). The request checks also run alone, without Ray.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import experiment_config
from dist_utils import in_process_run

from pipelines.serve import (
    MAX_ROWS,
    RequestError,
    ServeEndpoint,
    check_port,
    parse_json,
    parse_lookup_request,
    parse_score_request,
    run_serve,
    unknown_per_row,
)
from pipelines.train import run_train
from recemb.errors import ConfigError, DataError
from recemb.export import export_bundle
from recemb.serving.bundle import Bundle

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = dict.fromkeys(DENSE, "dense") | dict.fromkeys(SPARSE, "sparse")


def raw_rows(tsv: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the synthetic Criteo TSV as the endpoint takes them (empty = not sent)."""
    out = []
    with tsv.open(encoding="utf-8") as f:
        for line, _ in zip(f, range(n), strict=False):
            fields = line.rstrip("\n").split("\t")[1:]
            out.append({c: v for c, v in zip(DENSE + SPARSE, fields, strict=True) if v != ""})
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle_dir(prepared_ctr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepFM trained for an epoch in this process, exported as an fp32 bundle."""
    root = tmp_path_factory.mktemp("serve")
    cfg = experiment_config("deepfm", prepared_ctr, root / "runs")
    with in_process_run():
        result = run_train(cfg, workers=0, mlflow_uri=f"sqlite:///{root / 'mlruns.db'}")
    return Path(export_bundle(result.output_dir, root / "bundle", dtype="fp32"))


@pytest.fixture(scope="module")
def rows(prepared_ctr: Path) -> list[dict[str, Any]]:
    """Raw rows of the log, with unknown values planted in a few of them."""
    out = raw_rows(prepared_ctr.parent / "ctr.tsv", 300)
    for i in range(0, len(out), 7):
        out[i]["C3"] = f"never-seen-{i}"
    return out


@pytest.fixture(scope="module")
def endpoint(ray_local: Any, bundle_dir: Path) -> Iterator[ServeEndpoint]:
    """The bundle served on a free port of 127.0.0.1 (one replica); Serve is shut down after the module,
    even when a test failed."""
    served = run_serve(bundle_dir, port=0, replicas=1, blocking=False)
    try:
        yield served
    finally:
        served.shutdown()


def call(url: str, body: bytes | dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """``(status, JSON answer)`` of a GET (no body) or POST to ``url``."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def expected(bundle: Bundle, rows: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, int]]:
    """``Bundle.score`` of ``rows`` and the unknown values it counted, per feature (nonzero only)."""
    before = dict(bundle.unknown_counts)
    probs = bundle.score(rows)
    return probs, {f: n - before[f] for f, n in bundle.unknown_counts.items() if n > before[f]}


# ----------------------------------------------------------------------------- request checks (no Ray)


def test_score_request_checks() -> None:
    assert parse_score_request({"rows": [{"I1": 3, "C1": 12, "C2": "ab", "I2": None}]}, COLUMNS) == [
        {"I1": 3, "C1": "12", "C2": "ab", "I2": None}]  # sparse integers are taken as their text
    assert parse_score_request({"rows": []}, COLUMNS) == []
    bad = [
        ({}, 'missing field "rows"'),
        ({"rows": [], "extra": 1}, "unknown field 'extra'"),
        ({"rows": {"I1": 1}}, '"rows" should be an array of objects, got object'),
        ({"rows": [[1, 2]]}, "rows[0] should be an object"),
        ({"rows": [{"I1": 1}, {"X9": 1}]}, "rows[1]: unknown column 'X9' (the bundle reads: I1, I2"),
        ({"rows": [{"C1": {"a": 1}}]}, "rows[0]['C1']: expected a string, integer or null, got object"),
        ({"rows": [{"C1": 1.5}]}, "rows[0]['C1']: expected a string, integer or null, got number"),
        ({"rows": [{"I1": True}]}, "rows[0]['I1']: expected a number, numeric string or null, got boolean"),
        ({"rows": [{"I1": [1]}]}, "rows[0]['I1']: expected a number, numeric string or null, got array"),
        ({"rows": [{}] * (MAX_ROWS + 1)}, f"{MAX_ROWS + 1} rows exceed the limit of {MAX_ROWS} per request"),
    ]
    for body, message in bad:
        with pytest.raises(RequestError) as info:
            parse_score_request(body, COLUMNS)
        assert message in str(info.value), (body, str(info.value))
        assert "\n" not in str(info.value)
    with pytest.raises(RequestError, match="not a finite number"):
        parse_score_request({"rows": [{"I1": float("inf")}]}, COLUMNS)


def test_lookup_and_json_checks() -> None:
    features = {"C1": "sparse", "T": "multihot"}
    assert parse_lookup_request({"feature": "C1", "values": ["a", 7, None]}, features) == ("C1", ["a", "7", None])
    assert parse_lookup_request({"feature": "T", "values": [["a", 1], "b|c"]}, features) == (
        "T", [["a", "1"], "b|c"])
    bad = [
        ({"values": []}, 'missing field "feature"'),
        ({"feature": "C1"}, 'missing field "values"'),
        ({"feature": "C9", "values": []}, "unknown feature 'C9' (the bundle looks up: C1, T)"),
        ({"feature": "C1", "values": "a"}, '"values" should be an array, got string'),
        ({"feature": "C1", "values": [["a"]]}, "values[0]: expected a string, integer or null, got array"),
        ({"feature": "T", "values": [[{"a": 1}]]}, "values[0][0]: a token should be a string or integer"),
        ({"feature": "C1", "values": [1] * 3}, "3 values exceed the limit of 2 per request"),
    ]
    for body, message in bad:
        with pytest.raises(RequestError) as info:
            parse_lookup_request(body, features, max_rows=2)
        assert message in str(info.value), (body, str(info.value))
    with pytest.raises(RequestError, match="the body is not JSON"):
        parse_json(b"{rows: 1")
    with pytest.raises(RequestError, match="should be a JSON object, got array"):
        parse_json(b"[1, 2]")


def test_unknown_per_row() -> None:
    vocab = {"kind": "vocab", "oov_id": 1}
    ids, ones = np.array([1, 5, 1, 1]), np.ones(4, np.int64)
    present = np.array([True, True, False, True])  # row 2 missing: the OOV id, but not unknown
    assert unknown_per_row(vocab, ids, ones, present).tolist() == [1, 0, 0, 1]
    # multi-hot: tokens per row 2, 0, 3
    tokens, lengths = np.array([1, 4, 1, 1, 7]), np.array([2, 0, 3])
    assert unknown_per_row(vocab, tokens, lengths, np.ones(3, bool)).tolist() == [1, 0, 2]
    assert unknown_per_row({"kind": "hash"}, ids, ones, present).tolist() == [0, 0, 0, 0]


def test_refused_before_serve_starts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such bundle folder"):
        run_serve(tmp_path / "missing", port=0, blocking=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}.*pass a free --port"):
            check_port("127.0.0.1", port)


def test_bad_settings_refused(bundle_dir: Path) -> None:
    for kwargs, message in [({"replicas": 0}, "--replicas should be an integer >= 1"),
                            ({"port": 70000}, "--port should be in 0..65535"),
                            ({"max_rows": 10**6}, "max_rows should be in 1..")]:
        with pytest.raises(ConfigError, match=message):
            run_serve(bundle_dir, blocking=False, **kwargs)


# ----------------------------------------------------------------------------- the endpoint over HTTP


def test_health(endpoint: ServeEndpoint, bundle_dir: Path) -> None:
    status, health = call(f"{endpoint.url}/healthz")
    assert status == 200 and health["status"] == "ok"
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert health["bundle"]["format_version"] == manifest["format_version"]
    assert health["bundle"]["features"] == manifest["features"] == SPARSE
    assert health["bundle"]["columns"] == DENSE + SPARSE
    assert health["bundle"]["id"] == (bundle_dir / "manifest.json.sha256").read_text().split()[0][:16]
    assert health["bundle"]["scoring"] is True
    assert endpoint.url.startswith("http://127.0.0.1:")


def test_scores_equal_bundle_score_under_concurrency(endpoint: ServeEndpoint, bundle_dir: Path,
                                                     rows: list[dict[str, Any]]) -> None:
    bundle = Bundle.open(bundle_dir)
    # 40 requests of 1..13 rows over 8 client threads: batches mix requests of different sizes.
    requests, start = [], 0
    for i in range(40):
        n = 1 + (i * 5) % 13
        requests.append(rows[start:start + n])
        start = (start + n) % (len(rows) - 13)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda r: call(f"{endpoint.url}/score", {"rows": r}), requests))
    planted = 0
    for sent, (status, answer) in zip(requests, answers, strict=True):
        assert status == 200, answer
        probs, unknown = expected(bundle, sent)
        assert len(answer["probabilities"]) == len(sent)
        np.testing.assert_allclose(answer["probabilities"], probs, rtol=0, atol=1e-6)
        assert answer["unknown"] == unknown
        planted += answer["unknown"].get("C3", 0)
    assert planted > 0  # the planted unseen values were counted
    _, health = call(f"{endpoint.url}/healthz")
    stats = health["stats"]
    assert stats["score_requests"] >= len(requests) and 1 <= stats["batches"] <= stats["score_requests"]


def test_lookup_equals_bundle_lookup(endpoint: ServeEndpoint, bundle_dir: Path, rows: list[dict[str, Any]]) -> None:
    bundle = Bundle.open(bundle_dir)
    values = [r.get("C5") for r in rows[:20]] + ["never-seen", None]
    status, answer = call(f"{endpoint.url}/lookup", {"feature": "C5", "values": values})
    assert status == 200, answer
    assert np.array_equal(np.asarray(answer["vectors"], np.float32), bundle.lookup("C5", values))
    assert answer["unknown"] >= 1 and answer["feature"] == "C5"


def test_malformed_requests_get_400_and_serving_goes_on(endpoint: ServeEndpoint, bundle_dir: Path,
                                                        rows: list[dict[str, Any]]) -> None:
    url = endpoint.url
    bad = [
        ("/score", b"this is not json", "the body is not JSON"),
        ("/score", {"records": []}, 'missing field "rows"'),
        ("/score", {"rows": [{"NOPE": "1"}]}, "unknown column 'NOPE'"),
        ("/score", {"rows": [{"C1": [1, 2]}]}, "rows[0]['C1']: expected a string, integer or null, got array"),
        ("/score", {"rows": [{"I1": "abc"}]}, "not a finite number"),  # refused by the bundle's own parsing
        ("/score", {"rows": [{}] * (MAX_ROWS + 1)}, "exceed the limit"),
        ("/lookup", {"feature": "I1", "values": ["1"]}, "unknown feature 'I1'"),
        ("/lookup", {"feature": "C1", "values": [{"x": 1}]}, "values[0]: expected a string"),
    ]
    for path, body, message in bad:
        status, answer = call(f"{url}{path}", body)
        assert status == 400, (path, body, answer)
        assert message in answer["error"] and "\n" not in answer["error"], answer
    assert call(f"{url}/nowhere", {"rows": []})[0] == 404
    assert call(f"{url}/score")[0] == 405  # GET on a POST route
    # A bad request in flight next to good ones fails alone.
    with ThreadPoolExecutor(max_workers=4) as pool:
        mixed = list(pool.map(lambda b: call(f"{url}/score", b),
                              [{"rows": rows[:3]}, {"rows": [{"I2": "x"}]}, {"rows": rows[3:5]}, {"rows": [7]}]))
    assert [s for s, _ in mixed] == [200, 400, 200, 400]
    status, answer = call(f"{url}/score", {"rows": rows[:4]})
    assert status == 200
    np.testing.assert_allclose(answer["probabilities"], Bundle.open(bundle_dir).score(rows[:4]), rtol=0, atol=1e-6)


def test_shutdown_stops_serve_and_leaves_ray_usable(endpoint: ServeEndpoint, ray_local: Any) -> None:
    # Last in the module: the endpoint is gone afterwards (the fixture's own shutdown is then a no-op).
    from ray import serve

    endpoint.shutdown()
    assert not serve.status().applications
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{endpoint.url}/healthz", timeout=5)
    assert ray_local.is_initialized()
    assert ray_local.get(ray_local.remote(lambda: 41).remote()) + 1 == 42
