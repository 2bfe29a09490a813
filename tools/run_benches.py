"""``make bench``: every ``tools/bench_*.py`` at a size that fits about 20 minutes on 2 cores, one report.

Each benchmark runs in its own process (its baseline side by side inside it, as each one
prints), with the arguments below; its full output, exit status and time go into
``bench-out/REPORT.md``, with every image the benchmarks wrote under ``bench-out/`` or
``docs/benchmarks/`` during the run linked at the end. A benchmark that fails is reported
as failed (its output kept) and the others still run; the exit status is then 1.

The report opens with one table (benchmark, status, seconds, the baseline it runs beside);
each section then gives the command and the benchmark's own tables. ``--publish DIR``
also copies the report and its PNG/SVG figures into ``DIR`` (links rewritten), which is
how ``docs/benchmarks/REPORT.md`` is made: ``bench-out/`` is not committed.

Usage::

    python tools/run_benches.py                  # all, default sizes
    python tools/run_benches.py --only ab anomaly
    python tools/run_benches.py --publish docs/benchmarks
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench-out"

# name -> (arguments, what the baseline side by side is). Sizes chosen for ~20 minutes in all here.
BENCHES: dict[str, tuple[list[str], str]] = {
    "prepare": (["--rows", "200000", "1000000"], "pandas read + encode, pyarrow read-as-dictionary"),
    "train": (["--rows", "200000", "--settings", "4m", "--rounds", "1"], "plain PyTorch + Adam; dense ceiling"),
    "compression": (["--rows", "200000", "--budgets", "0.01", "--steps", "10"], "full tables at the same settings"),
    "scale": (["--rows", "100000"], "one process vs 2 Ray workers"),
    "anomaly": (["--seeds", "1", "--threads", "1"], "frequency baseline, Isolation Forest, plain-PyTorch APE"),
    "serving": (["--rows", "50000", "--requests", "200"], "the trained torch model"),
    "ab": (["--rows", "100000", "300000"], "the same statistics on fewer rows (growth with rows)"),
    "quality": (["--rows", "200000", "--epochs", "1", "--parts", "parity"], "the generator's oracle AUC"),
}


def run(name: str, args: list[str], timeout: int) -> tuple[int, float, str]:
    """Run ``tools/bench_<name>.py args``; exit status, seconds and combined output."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / f"bench_{name}.py"), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        code, output = proc.returncode, proc.stdout + ("\n" + proc.stderr[-4000:] if proc.returncode else "")
    except subprocess.TimeoutExpired as exc:
        code, output = 124, f"timed out after {timeout}s\n{(exc.stdout or b'')[-4000:]!r}"
    return code, time.perf_counter() - t0, output


def images_since(start: float) -> list[Path]:
    """PNG/SVG/HTML files written under bench-out/ or docs/benchmarks/ since ``start``."""
    found = []
    for root in (OUT, REPO / "docs" / "benchmarks"):
        if root.is_dir():
            found += [p for p in root.rglob("*") if p.suffix in (".png", ".svg", ".html") and
                      p.stat().st_mtime >= start]
    return sorted(found)


def publish(report: Path, images: list[Path], folder: Path) -> Path:
    """Copy ``report`` and its PNG/SVG ``images`` into ``folder`` (images under ``report-files/``),
    links rewritten; HTML reports stay where the benchmark wrote them (they embed their figures)."""
    files = folder / "report-files"
    files.mkdir(parents=True, exist_ok=True)
    text = report.read_text(encoding="utf-8")
    for image in images:
        old = os.path.relpath(image, report.parent)
        if image.suffix not in (".png", ".svg"):
            text = text.replace(f"- ![{image.name}]({old})\n", "")
            continue
        name = "-".join(image.relative_to(REPO).parts[-3:])
        shutil.copyfile(image, files / name)
        text = text.replace(f"]({old})", f"](report-files/{name})")
    target = folder / report.name
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per benchmark")
    parser.add_argument("--out", type=Path, default=OUT / "REPORT.md")
    parser.add_argument("--publish", type=Path, help="also copy the report and its figures into this folder")
    args = parser.parse_args()
    start = time.time()
    sections, failed, rows = [], [], []
    for name in args.only or list(BENCHES):
        bench_args, baseline = BENCHES[name]
        command = f"python tools/bench_{name}.py {' '.join(bench_args)}"
        print(f"[bench] {name}: {command} ...", flush=True)
        code, seconds, output = run(name, bench_args, args.timeout)
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        if code:
            failed.append(name)
        print(f"[bench] {name}: {status} in {seconds:.0f}s", flush=True)
        rows.append(f"| [{name}](#{name}) | {status} | {seconds:.0f} | {baseline} |")
        sections.append(f"## {name}\n\n`{command}`: {status}, {seconds:.0f} s. Baseline side by side: "
                        f"{baseline}.\n\n```\n{output.strip()[-12000:]}\n```\n")
    images = images_since(start)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    summary = "\n".join(["| benchmark | status | seconds | baseline side by side |", "|---|---|---|---|", *rows])
    report = [f"# recemb benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
              f"load {load:.2f} at the end, {time.time() - start:.0f} s in all"
              + (f"; failed: {', '.join(failed)}" if failed else "") + ". Made by `make bench` "
              "(`tools/run_benches.py`); each benchmark runs in its own process with its baseline "
              "beside it in that process, so ratios hold under load while absolute times do not.\n",
              summary + "\n", *sections]
    if images:
        report.append("## Figures\n\n" + "\n".join(f"- ![{p.name}]({os.path.relpath(p, args.out.parent)})"
                                                  for p in images) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(report), encoding="utf-8")
    tmp.replace(args.out)
    print(f"[bench] report: {args.out}", flush=True)
    if args.publish:
        print(f"[bench] published: {publish(args.out, images, args.publish)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
