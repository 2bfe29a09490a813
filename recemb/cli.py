"""``recemb <verb>``: the command line, dispatching to ``pipelines``.

Errors a user can cause (``RecembError``) print as one line and exit 2; anything
else is a bug and keeps its traceback.

Example:
    $ recemb synth ctr --rows 100000 --out data/synthetic/ctr.tsv
    $ recemb prepare --config configs/datasets/synthetic_ctr.yaml --overwrite
    $ recemb search --config configs/experiments/optembed_synthetic_ctr.yaml
    $ recemb tune --config configs/experiments/deepfm_synthetic_ctr.yaml --space configs/tune/deepfm_small.yaml \
        --trials 16 --workers 2 train.epochs=8
    $ recemb config show --config configs/experiments/deepfm_synthetic_ctr.yaml train.epochs=2
    $ recemb export --run runs/deepfm_synthetic_ctr --out bundles/deepfm --dtype int8
    $ recemb score --bundle bundles/deepfm --data data/synthetic/ctr.tsv --out scores.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

import recemb
from recemb.errors import RecembError


def _cmd_version(args: argparse.Namespace) -> None:
    print(f"recemb {recemb.__version__}")


def _cmd_synth(args: argparse.Namespace) -> None:
    from recemb.data.synthetic import CtrSynthConfig, EventSynthConfig, generate_ctr, generate_events

    if args.kind == "ctr":
        cfg = CtrSynthConfig(rows=args.rows, seed=args.seed, vocab_scale=args.vocab_scale)
        fmt = args.format or ("parquet" if str(args.out).endswith(".parquet") else "tsv")
        report = generate_ctr(cfg, args.out, fmt=fmt)
    else:
        report = generate_events(EventSynthConfig(seed=args.seed), args.out)
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "details"}, indent=2))


def _cmd_prepare(args: argparse.Namespace) -> None:
    from pipelines.prepare import run_prepare

    report = run_prepare(
        args.config, overrides=args.overrides, output=args.output, overwrite=args.overwrite,
        max_reject_fraction=args.max_reject_fraction, workers=args.workers, address=args.address or "",
    )
    print(json.dumps(report.to_dict(), indent=2, default=str))


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.train import run_train

    result = run_train(args.config, overrides=args.overrides, resume=args.resume, workers=args.workers,
                       address=args.address, mlflow_uri=args.mlflow_uri)
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "history"}, indent=2))


def _cmd_search(args: argparse.Namespace) -> None:
    from pipelines.search import run_search

    summary = run_search(args.config, overrides=args.overrides, mlflow_uri=args.mlflow_uri)
    print(json.dumps({k: v for k, v in summary.items() if k != "search"} | {
        "search": {k: v for k, v in summary["search"].items() if k != "history"}}, indent=2))


def _cmd_tune(args: argparse.Namespace) -> None:
    from pipelines.tune import format_trials, run_tune

    result = run_tune(args.config, args.space, trials=args.trials, overrides=args.overrides, workers=args.workers,
                      out=args.out, mlflow_uri=args.mlflow_uri, address=args.address, seed=args.seed,
                      grace_period=args.grace_period, overwrite=args.overwrite)
    print(format_trials(result))
    print(f"[tune] {len(result.trials)} trials in {result.seconds:.1f} s; parent MLflow run {result.parent_run_id}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluate import run_evaluate

    result = run_evaluate(args.run, split=args.split, mlflow_uri=args.mlflow_uri, predictions=args.predictions,
                          workers=args.workers, batch_size=args.batch_size, address=args.address)
    print(json.dumps(result, indent=2, default=str))


def _cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export import run_export

    summary = run_export(args.run, args.out, dtype=args.dtype, features=args.features, mlflow_uri=args.mlflow_uri,
                         overwrite=args.overwrite, materialize=args.materialize)
    print(json.dumps(summary, indent=2, default=str))


def _cmd_score(args: argparse.Namespace) -> None:
    from pipelines.score import run_score

    result = run_score(args.bundle, args.data, args.out, batch_rows=args.batch_size, run=args.run,
                       mlflow_uri=args.mlflow_uri)
    print(json.dumps(result, indent=2, default=str))


def _cmd_runs_list(args: argparse.Namespace) -> None:
    from recemb.tracking import format_runs_table, list_runs, resolve_tracking_uri

    print(format_runs_table(list_runs(resolve_tracking_uri(args.mlflow_uri), max_results=args.limit)))


def _cmd_config_show(args: argparse.Namespace) -> None:
    from recemb.config.experiment import load_experiment
    from recemb.data.schema import FeatureMap
    from recemb.train.preflight import check_run

    cfg = load_experiment(args.config, args.overrides)
    # The whole config is checked here as train would check it (the groups' features and the
    # budget of every block too, once the data is prepared), so `config show` passing means
    # `train` will not refuse it.
    fm_path = Path(cfg.data_dir) / "feature_map.json"
    check_run(cfg, FeatureMap.load(fm_path) if fm_path.is_file() else None)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _cmd_demo(args: argparse.Namespace) -> None:
    from pipelines.demo import run_demo

    run_demo(workdir=Path(args.workdir), rows=args.rows, seed=args.seed, workers=args.workers,
             address=args.address or "", mlflow_uri=args.mlflow_uri)


def _cmd_serve(args: argparse.Namespace) -> None:
    from pipelines.serve import run_serve

    run_serve(args.bundle, port=args.port, replicas=args.replicas, host=args.host, address=args.address or "")


def _cmd_ab(args: argparse.Namespace) -> None:
    from pipelines.ab import run_ab

    run_ab(args.control, args.treatments, args.data, level=args.level, slices=args.slices, group=args.group,
           out=args.out, split=args.split, mlflow_uri=args.mlflow_uri, resamples=args.resamples,
           frequency_features=args.freq_features, workers=args.workers, address=args.address)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="recemb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("synth", help="generate synthetic data (the embedded default)")
    p.add_argument("kind", choices=["ctr", "events"])
    p.add_argument("--out", required=True, type=Path, help="file (ctr) or folder (events)")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-scale", type=float, default=1.0)
    p.add_argument("--format", choices=["tsv", "parquet"])
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="raw files -> Parquet shards + feature_map.json")
    p.add_argument("--config", required=True, type=Path, help="dataset YAML (configs/datasets/...)")
    p.add_argument("--output", type=Path, help="output folder (default: the YAML's `output`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-reject-fraction", type=float, help="fail when more rows than this are rejected")
    p.add_argument("--workers", type=int, default=0, help="0 = in this process; N = N Ray tasks over input files")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the dataset YAML")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train an experiment (single process; sharded tables)")
    p.add_argument("--config", required=True, type=Path, help="experiment YAML (configs/experiments/...)")
    p.add_argument("--resume", type=Path, help="checkpoint folder, or a run folder (its last checkpoint)")
    p.add_argument("--workers", type=int, help="0 = in this process; N = N Ray Train workers")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns.db)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=2")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("search", help="OptEmbed: supernet, dim search, retrain on pruned tables (resumable)")
    p.add_argument("--config", required=True, type=Path, help="experiment YAML with embedding.kind=optembed")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns.db)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. search.generations=5")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("tune", help="hyperparameter search on Ray Tune (ASHA stops bad trials early); "
                                    "each trial an MLflow child run")
    p.add_argument("--config", required=True, type=Path, help="experiment YAML (configs/experiments/...)")
    p.add_argument("--space", required=True, type=Path,
                   help="search space YAML: override key -> distribution (configs/tune/...)")
    p.add_argument("--trials", type=int, default=8, help="trials to run (default: 8)")
    p.add_argument("--workers", type=int, default=2,
                   help="trials at a time, cluster.cpus_per_worker CPUs each (default: 2)")
    p.add_argument("--out", type=Path, help="results folder (default: tune-out/<expid>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier search in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the trials' draws (default: 0)")
    p.add_argument("--grace-period", type=int, default=1,
                   help="evaluations every trial gets before ASHA may stop it (default: 1)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns.db)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of every trial, e.g. train.epochs=8")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("evaluate", help="score a split with a trained model on Ray Data; metrics (+ predictions)")
    p.add_argument("--run", required=True,
                   help="checkpoint folder, run folder (runs/<expid>: best, else last) or MLflow run id")
    p.add_argument("--split", default="test", help="split of the run's prepared data (default: test)")
    p.add_argument("--predictions", type=Path, help="write shard, row, label, logit, prob to this Parquet file")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns.db)")
    p.add_argument("--workers", type=int, default=2, help="scoring actors (default: 2)")
    p.add_argument("--batch-size", type=int, default=16384, help="rows per scoring batch")
    p.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="a trained run -> serving bundle (safetensors + manifest, checksummed)")
    p.add_argument("--run", required=True,
                   help="checkpoint folder, run folder (runs/<expid>: best, else last) or MLflow run id")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                   help="storage of the physical tables (int8/int4: row-wise, fp16 scale and bias per row)")
    p.add_argument("--features", nargs="+", help="export only the tables these features read (lookups only)")
    p.add_argument("--materialize", type=Path, metavar="FILE",
                   help='TT/DHE: precompute the rows of these raw values, a JSON file {"C1": ["68fd1e64", ...]}')
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns.db)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("score", help="score raw logs (or a prepared split folder) with an export bundle or a run; "
                                     "anomaly models add the entity pair behind each score")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", type=Path, help="bundle folder (recemb export)")
    which.add_argument("--run", help="run id, run folder or checkpoint folder (scored through a temporary "
                                     "fp32 bundle)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI to look a --run id up in")
    p.add_argument("--data", required=True, type=Path,
                   help="raw file in the format the model's data was prepared from, or a prepared split folder")
    p.add_argument("--out", required=True, type=Path, help="Parquet file for the scores")
    p.add_argument("--batch-size", type=int, default=65_536, help="rows per scoring batch")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("serve", help="serve an export bundle over HTTP on Ray Serve: /healthz, /score, /lookup")
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (recemb export)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free port, printed at start)")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas, each holding the bundle")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("ab", help="compare a control with treatments offline on the same rows (paired statistics, "
                                  "HTML report)")
    p.add_argument("--control", required=True, help="run id, run folder, checkpoint folder or export bundle folder")
    p.add_argument("--treatment", action="append", required=True, dest="treatments",
                   help="as --control; repeat for more")
    p.add_argument("--data", required=True, type=Path,
                   help="prepared data folder, or a raw file in the dataset's format (--split then does not apply)")
    p.add_argument("--split", default="test", help="split of --data (default: test)")
    p.add_argument("--slice", action="append", default=[], dest="slices", metavar="COLUMN",
                   help="slice by this column; repeatable")
    p.add_argument("--freq-feature", action="append", default=None, dest="freq_features", metavar="FEATURE",
                   help="head/torso/tail slices of these features only (default: every vocabulary feature)")
    p.add_argument("--group", default=None, metavar="COLUMN", help="group AUC by this column (e.g. a user id)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default: 0.95)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    p.add_argument("--out", type=Path, default=Path("ab-out"), help="report folder (default: ab-out)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns.db)")
    p.add_argument("--workers", type=int, default=2, help="scoring actors for run arms (default: 2)")
    p.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_ab)

    p = sub.add_parser("runs", help="tracked runs (MLflow)")
    rsub = p.add_subparsers(dest="runs_verb", required=True)
    rl = rsub.add_parser("list", help="recent runs: id, name, variant, bytes, best validation AUC, test AUC")
    rl.add_argument("--mlflow-uri")
    rl.add_argument("--limit", type=int, default=20)
    rl.set_defaults(func=_cmd_runs_list)

    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_verb", required=True)
    show = csub.add_parser("show", help="print the fully resolved experiment config")
    show.add_argument("--config", required=True, type=Path)
    show.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    show.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("demo", help="the main job on synthetic data, end to end")
    p.add_argument("--workdir", default="demo-out")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (0 = in this process)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: <workdir>/mlruns.db)")
    p.set_defaults(func=_cmd_demo)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key=value`` overrides may come before, between or after options.

    argparse takes one run of positionals, so the ``key=value`` words it leaves over (e.g.
    after ``--resume R``) are appended to the verb's overrides in their order; anything
    else left over is the usual "unrecognized arguments" error (exit 2).

    Example:
        >>> parse_args(["train", "--config", "x.yaml", "a=1", "--resume", "r", "b=2"]).overrides
        ['a=1', 'b=2']
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        stray = [w for w in rest if w.startswith("-") or "=" not in w]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
        args.overrides = [*(args.overrides or []), *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recemb`` console script."""
    from recemb.heap import keep_freed_heap

    keep_freed_heap()  # big per-step tensors reuse freed heap instead of faulting fresh pages in
    args = parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except RecembError as exc:
        print(f"recemb: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
