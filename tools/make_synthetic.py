"""Write a synthetic Criteo-like CTR file or a categorical event dataset from the command line.

A thin wrapper over ``recemb.data.synthetic`` (the project CLI's ``recemb synth`` calls the
same functions); prints the report: rows, seconds, oracle AUC or anomaly rate.

    python tools/make_synthetic.py ctr --rows 1000000 --out data/synth/train.tsv
    python tools/make_synthetic.py events --out data/synth/events
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from recemb.data.synthetic import (
    CtrSynthConfig,
    EventSynthConfig,
    SynthReport,
    generate_ctr,
    generate_events,
)
from recemb.errors import RecembError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    ctr_defaults, ev_defaults = CtrSynthConfig(), EventSynthConfig()

    ctr = sub.add_parser("ctr", help="Criteo-like CTR rows with a planted click model")
    ctr.add_argument("--rows", type=int, default=ctr_defaults.rows)
    ctr.add_argument("--out", required=True, help="output file (.tsv or .parquet)")
    ctr.add_argument(
        "--format", choices=("tsv", "parquet"), default=None, help="default: from the --out suffix, else tsv"
    )
    ctr.add_argument("--seed", type=int, default=ctr_defaults.seed)
    ctr.add_argument(
        "--vocab-scale",
        type=float,
        default=ctr_defaults.vocab_scale,
        help="multiply every vocabulary size (e.g. 0.01 for a small run)",
    )

    events = sub.add_parser("events", help="categorical events with planted groups and anomalies")
    events.add_argument("--out", required=True, help="output folder (train.csv, test.csv, synth.json)")
    events.add_argument("--train-events", type=int, default=ev_defaults.train_events)
    events.add_argument("--test-events", type=int, default=ev_defaults.test_events)
    events.add_argument("--anomaly-rate", type=float, default=ev_defaults.anomaly_rate)
    events.add_argument("--seed", type=int, default=ev_defaults.seed)
    return parser


def _print_report(report: SynthReport) -> None:
    print(f"{report.kind}: {report.rows} rows in {report.seconds:.2f} s")
    if report.oracle_auc is not None:
        print(
            f"label rate {report.label_rate:.4f}, oracle AUC {report.oracle_auc:.4f}, "
            f"oracle logloss {report.oracle_logloss:.4f}"
        )
    if report.anomaly_rate is not None:
        print(f"test anomaly rate {report.anomaly_rate:.4f}; {json.dumps(report.details)}")
    for path in report.files:
        print(f"  wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, generate, print the report; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.kind == "ctr":
            fmt = args.format or ("parquet" if args.out.endswith(".parquet") else "tsv")
            cfg = CtrSynthConfig(rows=args.rows, seed=args.seed, vocab_scale=args.vocab_scale)
            report = generate_ctr(cfg, args.out, fmt=fmt)
        else:
            cfg_ev = EventSynthConfig(
                train_events=args.train_events,
                test_events=args.test_events,
                anomaly_rate=args.anomaly_rate,
                seed=args.seed,
            )
            report = generate_events(cfg_ev, args.out)
    except RecembError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
