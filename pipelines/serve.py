"""``recemb serve``: an export bundle behind an HTTP endpoint on Ray Serve.

One Serve application with one deployment, ``BundleServer``: each replica opens the bundle
once (``Bundle.open`` checks every file) and answers JSON over HTTP:
``GET /healthz`` (the bundle's id, format and features), ``POST /score``
(``{"rows": [{column: raw value}, ...]}`` -> probabilities and unknown-value counts) and
``POST /lookup`` (``{"feature": f, "values": [...]}`` -> embedding vectors). Concurrent
``/score`` requests are batched (``@serve.batch``, at most ``MAX_BATCH_ROWS`` rows per
batch, ``BATCH_WAIT_S`` wait): one encode of raw values, lookup and forward per batch. A
malformed request is refused (400, a one-line reason) before it joins a batch, or, when only
the bundle can tell (a dense value that is not a number), alone within its batch: it never
fails its neighbours' requests, and the replica keeps serving.
Replicas take fractional CPUs (``CPUS_PER_REPLICA``): on 2 cores Serve's controller and proxy
and the replicas must fit together. Locally Ray starts quiet on 127.0.0.1
(``pipelines.ray_runtime.init_ray``); on a cluster (``--address``/``RAY_ADDRESS``) replicas
spread over its nodes, and the bundle folder must be readable at the same path on each.

Example:
    $ recemb serve --bundle bundles/deepfm --port 8000 --replicas 2
    $ curl -s localhost:8000/score -d '{"rows": [{"I1": "3", "C1": "68fd1e64"}]}'
    {"probabilities":[0.231],"unknown":{}}

    >>> endpoint = run_serve("bundles/deepfm", port=0, blocking=False)   # doctest: +SKIP
    >>> endpoint.url                                                       # doctest: +SKIP
    'http://127.0.0.1:41237'
    >>> endpoint.shutdown()                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from pipelines.ray_runtime import init_ray, is_local
from recemb.errors import ConfigError, RecembError

APP_NAME = "recemb"
DEPLOYMENT_NAME = "BundleServer"
MAX_ROWS = 4096  # rows (or lookup values) per request; more is a 400 that says to split it
MAX_BATCH_ROWS = 4096  # rows per batched forward, summed over its requests (>= MAX_ROWS: a request fits)
BATCH_WAIT_S = 0.005  # how long a batch waits for more requests after its first
MAX_ONGOING_REQUESTS = 64  # per replica; >= the requests a full batch can hold, so batches can fill
CPUS_PER_REPLICA = 0.25
READY_TIMEOUT_S = 120.0
ROUTES = "GET /healthz, POST /score, POST /lookup"


class RequestError(RecembError):
    """A request the endpoint cannot use; it is answered with HTTP 400 and this message."""


# ----------------------------------------------------------------------------- request checks


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else ``RequestError``."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body should be a JSON object, got {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_value(value: Any, kind: str, where: str) -> Any:
    """``value`` of a column of ``kind`` (dense, sparse, multihot) as the bundle takes it, else ``RequestError``.

    Sparse values are strings (integers are taken as their text, as in the logs), dense values
    numbers or numeric strings, multi-hot values a list of tokens or one separator-joined string;
    null is a missing value everywhere.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        pass
    elif kind == "dense" and isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{where}: {value!r} is not a finite number")
        return value
    elif kind != "dense" and isinstance(value, int):
        return str(value)
    elif kind == "multihot" and isinstance(value, list):
        for j, token in enumerate(value):
            if isinstance(token, bool) or not isinstance(token, (str, int)):
                raise RequestError(f"{where}[{j}]: a token should be a string or integer, got {_json_type(token)}")
        return [str(t) for t in value]
    expected = {"dense": "a number, numeric string or null", "multihot": "a list of tokens, a string or null"}
    raise RequestError(f"{where}: expected {expected.get(kind, 'a string, integer or null')}, "
                       f"got {_json_type(value)}")


def parse_score_request(data: Mapping[str, Any], columns: Mapping[str, str],
                        max_rows: int = MAX_ROWS) -> list[dict[str, Any]]:
    """The rows of a ``/score`` body ``{"rows": [{column: raw value}, ...]}``, checked.

    ``columns`` maps each raw column the bundle reads to its kind; a column not sent is missing.
    """
    if "rows" not in data:
        raise RequestError('missing field "rows": send {"rows": [{column: raw value, ...}, ...]}')
    extra = sorted(set(data) - {"rows"})
    if extra:
        raise RequestError(f"unknown field {extra[0]!r}: a /score body holds only \"rows\"")
    rows = data["rows"]
    if not isinstance(rows, list):
        raise RequestError(f'"rows" should be an array of objects, got {_json_type(rows)}')
    if len(rows) > max_rows:
        raise RequestError(f"{len(rows)} rows exceed the limit of {max_rows} per request; split the request")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RequestError(f"rows[{i}] should be an object {{column: raw value}}, got {_json_type(row)}")
        checked = {}
        for key, value in row.items():
            kind = columns.get(key)
            if kind is None:
                raise RequestError(f"rows[{i}]: unknown column {key!r} (the bundle reads: {', '.join(columns)})")
            checked[key] = check_value(value, kind, f"rows[{i}][{key!r}]")
        out.append(checked)
    return out


def parse_lookup_request(data: Mapping[str, Any], features: Mapping[str, str],
                         max_rows: int = MAX_ROWS) -> tuple[str, list[Any]]:
    """``(feature, values)`` of a ``/lookup`` body ``{"feature": f, "values": [...]}``, checked.

    ``features`` maps each feature the bundle can look up to its kind.
    """
    for name in ("feature", "values"):
        if name not in data:
            raise RequestError(f'missing field "{name}": send {{"feature": name, "values": [raw value, ...]}}')
    extra = sorted(set(data) - {"feature", "values"})
    if extra:
        raise RequestError(f"unknown field {extra[0]!r}: a /lookup body holds only \"feature\" and \"values\"")
    feature, values = data["feature"], data["values"]
    if not isinstance(feature, str) or feature not in features:
        raise RequestError(f"unknown feature {feature!r} (the bundle looks up: {', '.join(features)})")
    if not isinstance(values, list):
        raise RequestError(f'"values" should be an array, got {_json_type(values)}')
    if len(values) > max_rows:
        raise RequestError(f"{len(values)} values exceed the limit of {max_rows} per request; split the request")
    kind = features[feature]
    return feature, [check_value(v, kind, f"values[{i}]") for i, v in enumerate(values)]


# ----------------------------------------------------------------------------- the deployment


def _rows_in(items: list[list[Any]]) -> int:
    """Rows in a batch of requests (``@serve.batch`` counts rows, not requests)."""
    return sum(len(rows) for rows in items)


def _concat(items: list[Any]) -> Any:
    """One ``Encoded`` holding the rows of ``items`` (``Encoded`` each) in order."""
    from recemb.serving.bundle import Encoded

    if len(items) == 1:
        return items[0]
    ids = {f: (np.concatenate([e.ids[f][0] for e in items]), np.concatenate([e.ids[f][1] for e in items]))
           for f in items[0].ids}
    return Encoded(sum(e.n for e in items), ids, np.concatenate([e.dense for e in items]))


def unknown_per_row(rule: Mapping[str, Any], ids: np.ndarray, lengths: np.ndarray,
                    present: np.ndarray) -> np.ndarray:
    """Per row, how many of its values took the OOV id of a ``vocab`` rule (0 for other rules).

    The count ``Bundle.ids`` adds to ``unknown_counts``, split by row: single values count when
    present (a missing value takes the OOV id too, but is not unknown); multi-hot rows count
    their tokens that took it.
    """
    if rule.get("kind") != "vocab":
        return np.zeros(len(lengths), np.int64)
    oov = ids == int(rule["oov_id"])
    if len(ids) == len(lengths) and bool((lengths == 1).all()):
        return (oov & present).astype(np.int64)
    return np.bincount(np.repeat(np.arange(len(lengths)), lengths), weights=oov, minlength=len(lengths)
                       ).astype(np.int64)


def _batch(func: Any) -> Any:
    from ray import serve

    return serve.batch(max_batch_size=MAX_BATCH_ROWS, batch_wait_timeout_s=BATCH_WAIT_S,
                       batch_size_fn=_rows_in)(func)


def bundle_id(folder: Path) -> str:
    """A short content id of a bundle: the start of its manifest's recorded sha256."""
    from recemb.export.format import MANIFEST_DIGEST

    return (folder / MANIFEST_DIGEST).read_text(encoding="utf-8").split()[0][:16]


class BundleServer:
    """One replica: the bundle opened once, answering HTTP requests (see the module docstring).

    A ``/score`` request is checked, then joins a batch; a batch is encoded (raw values to ids:
    a fixed cost per call, so one call for the whole batch), looked up and scored in one go. It
    runs on the replica's event loop: handing it to a worker thread was measured slower here
    (the loop and the thread contend for the GIL; fewer requests per batch). If the bundle
    refuses a value (e.g. a dense value that is not a number), each request of that batch is
    encoded alone and only the ones it refuses get their 400.
    """

    def __init__(self, bundle_dir: str, max_rows: int = MAX_ROWS) -> None:
        from recemb.serving.bundle import Bundle

        self.bundle = Bundle.open(bundle_dir)
        self.max_rows = max_rows
        fm = self.bundle.feature_map
        read = set(fm.dense_features) | set(self.bundle.rules)
        self.columns = {info.source: info.kind for info in fm.features if info.name in read}
        self.sources = {f: fm.feature(f).source for f in self.bundle.rules}
        self.lookups = {f: fm.feature(f).kind for f in self.bundle.features}
        self.scoring = bool(self.bundle.manifest.get("complete", False))
        if self.scoring:
            self.bundle.scorer()  # build the dense model now, not during the first request
        # This replica's batching so far (shown by /healthz): requests scored, batches, the largest batch,
        # and seconds spent encoding, looking up and scoring batches (busy time, to compare with wall time).
        self.stats: dict[str, float] = {"score_requests": 0, "batches": 0, "largest_batch_rows": 0, "busy_s": 0.0}
        manifest = self.bundle.manifest
        self.health = {
            "status": "ok",
            "bundle": {
                "id": bundle_id(Path(bundle_dir)),
                "format_version": manifest["format_version"],
                "recemb_version": manifest.get("recemb_version"),
                "dtype": manifest["dtype"],
                "source": manifest.get("source", {}),
                "features": list(self.bundle.features),
                "columns": list(self.columns),
                "scoring": self.scoring,
            },
            "limits": {"max_rows": max_rows, "batch_rows": MAX_BATCH_ROWS, "batch_wait_s": BATCH_WAIT_S},
            "pid": os.getpid(),
        }

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/healthz": "GET", "/score": "POST", "/lookup": "POST"}
        if path not in routes:
            return JSONResponse({"error": f"no route {path}; routes: {ROUTES}"}, status_code=404)
        if method != routes[path]:
            return JSONResponse({"error": f"{path} takes {routes[path]}, not {method}"}, status_code=405,
                                headers={"Allow": routes[path]})
        try:
            if path == "/healthz":
                return JSONResponse(self.health | {"stats": dict(self.stats)})
            data = parse_json(await request.body())
            if path == "/score":
                return JSONResponse(await self.score(data))
            return JSONResponse(self.lookup(data))
        except RecembError as e:  # RequestError, or the bundle's DataError on a value it cannot read
            return JSONResponse({"error": str(e).splitlines()[0]}, status_code=400)

    async def score(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``{"probabilities": [...], "unknown": {feature: count}}`` (features with unknown values only)."""
        if not self.scoring:
            raise RequestError(f"this bundle was exported with --features {' '.join(self.bundle.features)}: "
                               "it serves /lookup only; export without --features to score")
        rows = parse_score_request(data, self.columns, self.max_rows)
        if not rows:
            return {"probabilities": [], "unknown": {}}
        result = await self._score_batch(rows)
        if isinstance(result, RecembError):
            raise result
        self.stats["score_requests"] += 1
        return result

    @_batch
    async def _score_batch(self, items: list[list[dict[str, Any]]]) -> list[dict[str, Any] | RecembError]:
        self.stats["batches"] += 1
        self.stats["largest_batch_rows"] = max(self.stats["largest_batch_rows"], _rows_in(items))
        t0 = time.perf_counter()
        try:
            return self._score_rows(items)  # on the loop: see the class docstring
        finally:
            self.stats["busy_s"] += time.perf_counter() - t0

    def _score_rows(self, items: list[list[dict[str, Any]]]) -> list[dict[str, Any] | RecembError]:
        """Each request's answer (or the error that refuses it) for a batch of checked requests."""
        try:
            encoded = [self.bundle.encode([row for rows in items for row in rows])]
            good = list(range(len(items)))
            out: list[dict[str, Any] | RecembError] = [{} for _ in items]
        except RecembError:
            encoded, good, out = [], [], []
            for i, rows in enumerate(items):
                try:
                    encoded.append(self.bundle.encode(rows))
                    good.append(i)
                    out.append({})
                except RecembError as e:
                    out.append(RequestError(str(e).splitlines()[0]))
        if not good:
            return out
        merged = _concat(encoded)
        probs = self.bundle.scorer().probabilities(self.bundle.logits_of(merged))
        sizes = [len(items[i]) for i in good]
        bounds = np.cumsum([0, *sizes])
        request_of_row = np.repeat(np.arange(len(good)), sizes)
        unknown: list[dict[str, int]] = [{} for _ in good]
        for f, rule in self.bundle.rules.items():
            if rule.get("kind") != "vocab" or f not in merged.ids:
                continue
            source = self.sources[f]
            present = np.array([items[i][j].get(source) is not None for i in good for j in range(len(items[i]))])
            per_row = unknown_per_row(rule, *merged.ids[f], present)
            for k, n in enumerate(np.bincount(request_of_row, weights=per_row, minlength=len(good))):
                if n:
                    unknown[k][f] = int(n)
        for k, i in enumerate(good):
            out[i] = {"probabilities": probs[bounds[k]:bounds[k + 1]].tolist(), "unknown": unknown[k]}
        return out

    def lookup(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``{"feature": f, "vectors": [[...], ...], "unknown": count}`` (not batched: a lookup is a gather)."""
        feature, values = parse_lookup_request(data, self.lookups, self.max_rows)
        ids, lengths = self.bundle.ids(feature, values)
        vectors = self.bundle.lookup_ids(feature, ids, lengths)
        present = np.array([v is not None for v in values], bool)
        unknown = int(unknown_per_row(self.bundle.rules[feature], ids, lengths, present).sum())
        return {"feature": feature, "vectors": vectors.tolist(), "unknown": unknown}


# ----------------------------------------------------------------------------- start and stop


@dataclass
class ServeEndpoint:
    """A running endpoint: where it answers, and how to stop what ``run_serve`` started."""

    url: str
    host: str
    port: int
    replicas: int
    bundle: str
    started_ray: bool
    serve_was_running: bool
    stopped: bool = field(default=False, repr=False)

    def shutdown(self) -> None:
        """Stop what ``run_serve`` started: its local Ray (and so Serve) if it started one, else
        ``serve.shutdown()`` if Serve was started here, else only this application (others on the
        cluster keep running). Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        import ray
        from ray import serve

        if self.started_ray:
            # Ray goes down with Serve's actors in it. Serve's own shutdown first would wait up to 30 s
            # for a controller that a Ctrl-C or SIGTERM to the process group has already killed.
            ray.shutdown()
        elif self.serve_was_running:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()

    def __enter__(self) -> ServeEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> None:
    """``ConfigError`` unless ``host:port`` can be listened on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's server binds it
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pass a free --port "
                              "(or --port 0 to pick one)") from None


def _check_replicas(replicas: int, cpus: float, local: bool) -> None:
    import ray

    have = float(ray.cluster_resources().get("CPU", 0.0))
    if replicas * cpus <= have + 1e-9:
        return
    message = (f"{replicas} replicas x {cpus:g} CPU = {replicas * cpus:g} CPUs, but the cluster has {have:g}; "
               f"use at most {int(have / cpus + 1e-9)} replicas (--replicas)")
    if local:
        raise ConfigError(f"Ray cannot place the replicas (it would wait forever): {message}")
    print(f"[serve] warning: the cluster cannot place every replica now: {message}", flush=True)


def _wait_ready(url: str, timeout_s: float) -> dict[str, Any]:
    """The health answer of ``url``, polled until it answers 200 (``RecembError`` after ``timeout_s``)."""
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.2)
    raise RecembError(f"{url}/healthz did not answer within {timeout_s:g} s ({last}); a Serve instance "
                      "already running in this Ray cluster keeps its own host and port")


def run_serve(bundle_dir: str | Path, port: int = 8000, replicas: int = 1, host: str = "127.0.0.1",
              blocking: bool = True, address: str = "", cpus_per_replica: float = CPUS_PER_REPLICA,
              max_rows: int = MAX_ROWS) -> ServeEndpoint:
    """Serve ``bundle_dir`` over HTTP on ``host:port`` with ``replicas`` replicas (``port=0``: a free port).

    The bundle is opened (and so checked) here first, so a damaged bundle is a one-line error
    before Serve starts. Returns once ``/healthz`` answers (``blocking=False``; stop it with
    ``ServeEndpoint.shutdown``), or with ``blocking=True`` serves until Ctrl-C or SIGTERM and
    shuts down before returning.
    """
    from recemb.serving.bundle import Bundle

    folder = Path(bundle_dir).resolve()
    Bundle.open(folder)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"--replicas should be an integer >= 1, got {replicas!r}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port should be in 0..65535, got {port}")
    if not cpus_per_replica > 0:
        raise ConfigError(f"cpus_per_replica should be > 0, got {cpus_per_replica!r}")
    if not 1 <= max_rows <= MAX_BATCH_ROWS:
        raise ConfigError(f"max_rows should be in 1..{MAX_BATCH_ROWS} (a request must fit in one batch), "
                          f"got {max_rows!r}")
    local = is_local(address)
    started_ray = init_ray(address) == "local"
    try:
        endpoint = _start(folder, host, port, replicas, cpus_per_replica, max_rows, local, started_ray)
    except BaseException:
        if started_ray:
            import ray

            ray.shutdown()
        raise
    if not blocking:
        return endpoint
    _serve_until_stopped(endpoint)
    return endpoint


def _start(folder: Path, host: str, port: int, replicas: int, cpus: float, max_rows: int, local: bool,
           started_ray: bool) -> ServeEndpoint:
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    status = serve.status()
    was_running = bool(status.proxies or status.applications)
    if was_running and APP_NAME in status.applications:
        raise ConfigError(f"a Serve application '{APP_NAME}' is already running on this Ray cluster; "
                          "stop it first (serve shutdown) or serve from another cluster")
    if not was_running:
        if port == 0:
            port = free_port(host)
        if local:
            check_port(host, port)
    _check_replicas(replicas, cpus, local)
    endpoint = ServeEndpoint(f"http://{host}:{port}", host, port, replicas, str(folder), started_ray, was_running)
    try:
        if not was_running:
            serve.start(http_options={"host": host, "port": port},
                        logging_config={"log_level": "WARNING", "enable_access_log": False})
        deployment = serve.deployment(
            BundleServer, name=DEPLOYMENT_NAME, num_replicas=replicas,
            ray_actor_options={"num_cpus": cpus}, max_ongoing_requests=MAX_ONGOING_REQUESTS,
            max_constructor_retry_count=3,  # a replica that cannot open the bundle fails fast
        )
        try:
            serve.run(deployment.bind(str(folder), max_rows), name=APP_NAME, route_prefix="/", blocking=False,
                      logging_config={"log_level": "WARNING", "enable_access_log": False})
        except RuntimeError as e:  # e.g. a cluster node that cannot read the bundle folder
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise RecembError(f"Ray Serve could not start the replicas ({lines[-1] if lines else e}); on a "
                              f"cluster every node must read the bundle at {folder}") from None
        _wait_ready(endpoint.url, READY_TIMEOUT_S)
    except BaseException:
        endpoint.started_ray = False  # the caller stops Ray
        endpoint.shutdown()
        raise
    return endpoint


def _serve_until_stopped(endpoint: ServeEndpoint) -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    print(f"[serve] {endpoint.url} serving {endpoint.bundle} with {endpoint.replicas} replica(s); "
          f"routes: {ROUTES}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        endpoint.shutdown()


__all__ = ["BundleServer", "RequestError", "ServeEndpoint", "check_port", "free_port", "parse_lookup_request",
           "parse_score_request", "run_serve"]
