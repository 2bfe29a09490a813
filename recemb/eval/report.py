"""The A/B report: one self-contained HTML page, a Markdown summary and a JSON of every figure's numbers.

The HTML needs no network: every figure (ROC and calibration curves per arm, deltas with
their intervals, the id-frequency slices, AUC against embedding bytes) is a matplotlib PNG
embedded as base64, and the styles are inline. The Markdown is for terminals and PR
comments; the JSON holds the ``ABResult`` and, under ``figures``, the data each figure plots.
Every file is written atomically.

Example:
    >>> files = write_report(result, "ab-out")        # doctest: +SKIP
    >>> files.html.name, sorted(files.figures)         # doctest: +SKIP
    ('report.html', ['auc_vs_bytes', 'calibration', 'deltas', 'frequency', 'roc'])
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are rendered to PNG bytes
import matplotlib.pyplot as plt

from recemb.eval.ab import CLASSES, ABResult
from recemb.io import write_json_atomic, write_text_atomic

FIGURE_DPI = 100
HTML_FILE, MARKDOWN_FILE, JSON_FILE = "report.html", "report.md", "report.json"


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    json: Path
    figures: dict[str, dict[str, Any]]  # figure name -> the numbers it plots


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------- figures


def _roc(result: ABResult) -> tuple[str, dict[str, Any]]:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, c in result.curves.items():
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"{name} (AUC {result.arm(name).metrics['auc']:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(fontsize=8)
    return _png(fig), {n: c["roc"] for n, c in result.curves.items()}


def _calibration(result: ABResult) -> tuple[str, dict[str, Any]]:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    top = 0.0
    for name, c in result.curves.items():
        cal = c.get("calibration")
        if cal:
            ax.plot(cal["predicted"], cal["observed"], marker="o", ms=3, label=name)
            top = max(top, *cal["predicted"], *cal["observed"])
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="mean predicted probability (deciles)", ylabel="observed rate", title="Calibration")
    ax.legend(fontsize=8)
    return _png(fig), {n: c.get("calibration") for n, c in result.curves.items()}


def _deltas(result: ABResult) -> tuple[str, dict[str, Any]]:
    metrics = list(dict.fromkeys(v.metric for v in result.verdicts))
    treatments = list(dict.fromkeys(v.treatment for v in result.verdicts))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 1.2 + 0.5 * len(treatments)),
                             squeeze=False, sharey=True)
    colour = {"better": "tab:green", "worse": "tab:red", "indistinguishable": "tab:grey"}
    data: dict[str, Any] = {}
    for ax, m in zip(axes[0], metrics, strict=True):
        rows = [v for v in result.verdicts if v.metric == m]
        for i, v in enumerate(rows):
            ax.errorbar([v.delta], [i], xerr=[[v.delta - v.low], [v.high - v.delta]], fmt="o", capsize=3,
                        color=colour[v.verdict])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [v.treatment for v in rows])
        ax.tick_params(axis="y", labelleft=ax is axes[0][0])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(f"Δ {m}", fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        data[m] = [{"treatment": v.treatment, "delta": v.delta, "low": v.low, "high": v.high, "verdict": v.verdict}
                   for v in rows]
    fig.suptitle(f"Treatment - {result.control}, {result.level:.0%} intervals (green better, red worse)", fontsize=10,
                 y=1.02)
    return _png(fig), data


def _frequency(result: ABResult) -> tuple[str, dict[str, Any]]:
    rows = [s for s in result.slices if s.slice.startswith("freq:")]
    features = list(dict.fromkeys(s.slice[5:] for s in rows))
    names = [a.name for a in result.arms]
    data: dict[str, Any] = {f: {} for f in features}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(features) * len(CLASSES) / 2), 4))
    width = 0.8 / max(len(names), 1)
    labels, x = [], 0
    for f in features:
        for cls in CLASSES:
            s = next((r for r in rows if r.slice == f"freq:{f}" and r.value == cls), None)
            if s is None:
                continue
            for i, n in enumerate(names):
                ax.bar(x + i * width, s.metrics[n]["auc"], width, color=f"C{i}", label=n if x == 0 else None)
            data[f][cls] = {"rows": s.rows, "auc": {n: s.metrics[n]["auc"] for n in names},
                            "delta_auc": {t: d.get("auc") for t, d in s.deltas.items()}}
            labels.append((x + 0.4 - width / 2, f"{f}\n{cls}"))
            x += 1
    if labels:
        ax.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
        lows = [s.metrics[n]["auc"] for s in rows for n in names if s.metrics[n]["auc"] == s.metrics[n]["auc"]]
        if lows:
            ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.02))
        ax.legend(fontsize=8)
    ax.set(ylabel="AUC", title="AUC by id frequency (head / torso / tail ids by training counts)")
    return _png(fig), data


def _auc_vs_bytes(result: ABResult) -> tuple[str, dict[str, Any]]:
    fig, ax = plt.subplots(figsize=(5, 4))
    data = {}
    for i, a in enumerate(result.arms):
        b = max(a.embedding_bytes, 1)
        ax.scatter([b], [a.metrics["auc"]], color=f"C{i}", s=40)
        ax.annotate(a.name, (b, a.metrics["auc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        data[a.name] = {"embedding_bytes": a.embedding_bytes, "auc": a.metrics["auc"]}
    ax.set_xscale("log")
    ax.set(xlabel="embedding bytes (log)", ylabel="AUC", title="AUC vs embedding bytes")
    return _png(fig), data


def render_figures(result: ABResult) -> dict[str, tuple[str, dict[str, Any]]]:
    """Figure name -> (base64 PNG, the numbers it plots)."""
    out = {"roc": _roc(result), "deltas": _deltas(result), "frequency": _frequency(result),
           "auc_vs_bytes": _auc_vs_bytes(result)}
    if result.task == "ctr":
        out["calibration"] = _calibration(result)
    return out


# ----------------------------------------------------------------------------- text


def _arm_rows(result: ABResult) -> tuple[list[str], list[list[str]]]:
    keys = ["auc", "logloss", "ne", "calibration"] if result.task == "ctr" else ["auc", "ap"]
    if result.group:
        keys.append("gauc")
    head = ["arm", "kind", *keys, "embedding bytes", "rows/s", "p50 ms", "p99 ms"]
    body = []
    for a in result.arms:
        sp = a.speed
        body.append([a.name + (" (control)" if a.name == result.control else ""), a.kind,
                     *(_fmt(a.metrics.get(k)) for k in keys), _human_bytes(a.embedding_bytes),
                     f"{sp.rows_per_s:,.0f}" if sp else "n/a", _fmt(sp.p50_ms, 2) if sp else "n/a",
                     _fmt(sp.p99_ms, 2) if sp else "n/a"])
    return head, body


def _tail_rows(result: ABResult) -> tuple[list[str], list[list[str]]]:
    treatments = [a.name for a in result.arms if a.name != result.control]
    head = ["feature", "class", "rows", f"AUC {result.control}",
            *(f"Δ AUC {t} ({result.level:.0%} CI)" for t in treatments)]
    body = []
    for s in result.slices:
        if not s.slice.startswith("freq:"):
            continue
        cells = [s.slice[5:], s.value, str(s.rows), _fmt(s.metrics[result.control]["auc"])]
        for t in treatments:
            d = s.deltas.get(t, {}).get("auc")
            cells.append(f"{d[0]:+.4f} ({d[1]:+.4f}..{d[2]:+.4f})" if d else "n/a")
        body.append(cells)
    return head, body


def markdown(result: ABResult) -> str:
    """The summary for terminals and PR comments."""
    def table(head: list[str], body: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body)]

    lines = [f"# A/B: {', '.join(a.name for a in result.arms if a.name != result.control)} vs {result.control}", "",
             f"{result.rows:,} rows, every arm on the same rows; {result.resamples} paired bootstrap resamples "
             f"({result.bootstrap_seconds:.1f} s), DeLong for AUC, Holm across treatments and metrics, "
             f"level {result.level:.0%}.", "", "## Verdicts", ""]
    lines += [f"- {v.text}" for v in result.verdicts]
    lines += ["", "## Arms", "", *table(*_arm_rows(result)), "", "## Id-frequency slices (AUC)", ""]
    lines += table(*_tail_rows(result))
    others = [s for s in result.slices if not s.slice.startswith("freq:")]
    if others:
        names = [a.name for a in result.arms]
        lines += ["", "## Slices", "", *table(["column", "value", "rows", *(f"AUC {n}" for n in names)],
                                              [[s.slice, s.value, str(s.rows),
                                                *(_fmt(s.metrics[n]["auc"]) for n in names)] for s in others])]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], body: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table>"


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}
li.better{color:#1a7f37}li.worse{color:#c62828}li.indistinguishable{color:#555}figure{margin:1em 0}"""


def to_html(result: ABResult, figures: dict[str, tuple[str, dict[str, Any]]]) -> str:
    """The self-contained page (figures as ``data:image/png;base64`` images, inline styles)."""
    title = html.escape(f"A/B vs {result.control}")
    verdicts = "".join(f'<li class="{v.verdict}">{html.escape(v.text)}</li>' for v in result.verdicts)
    captions = {"roc": "ROC curves per arm", "calibration": "Calibration per arm (deciles of predicted probability)",
                "deltas": "Deltas against control with intervals", "frequency": "AUC by id frequency",
                "auc_vs_bytes": "AUC against embedding bytes"}
    figs = "".join(f'<figure><img id="fig-{name}" alt="{html.escape(captions[name])}" '
                   f'src="data:image/png;base64,{png}"><figcaption>{html.escape(captions[name])}</figcaption></figure>'
                   for name, (png, _) in figures.items())
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{_CSS}</style></head>"
            f"<body><h1>{title}</h1><p>{result.rows:,} rows scored by every arm; {result.resamples} paired bootstrap "
            f"resamples; DeLong for AUC; Holm across treatments and metrics; level {result.level:.0%}.</p>"
            f"<h2>Verdicts</h2><ul>{verdicts}</ul><h2>Arms</h2>{_html_table(*_arm_rows(result))}"
            f"<h2>Figures</h2>{figs}<h2>Id-frequency slices</h2>{_html_table(*_tail_rows(result))}</body></html>\n")


def write_report(result: ABResult, out: str | Path) -> ReportFiles:
    """Write ``report.html``, ``report.md`` and ``report.json`` into ``out`` (atomically)."""
    out = Path(out)
    figures = render_figures(result)
    files = ReportFiles(out / HTML_FILE, out / MARKDOWN_FILE, out / JSON_FILE, {k: v[1] for k, v in figures.items()})
    write_text_atomic(files.html, to_html(result, figures))
    write_text_atomic(files.markdown, markdown(result))
    data = result.to_dict()
    data["figures"] = json.loads(json.dumps(files.figures, default=float).replace("NaN", "null"))
    write_json_atomic(files.json, data)
    return files


__all__ = ["ReportFiles", "markdown", "render_figures", "to_html", "write_report"]
