"""The A/B report: one self-contained HTML page, a Markdown summary and a JSON of every figure's numbers.

The HTML needs no network: every figure (ROC curves per arm, calibration (CTR) or
precision-recall (anomaly) curves, deltas with their intervals, the id-frequency slices,
AUC against embedding bytes) is a matplotlib PNG embedded as base64, at most
``MAX_FIGURE_INCHES`` wide so the page never scrolls sideways (the frequency chart grows
down, one row per feature), and the styles are inline. The Markdown is for terminals and
PR comments; the JSON holds the ``ABResult`` and, under ``figures``, the data each figure
plots. Every file is written atomically.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are rendered to PNG bytes
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from recemb.eval.ab import CLASSES, ABResult, SliceDelta
from recemb.io import write_json_atomic, write_text_atomic

FIGURE_DPI = 100
MAX_FIGURE_INCHES = 10.5  # at FIGURE_DPI: fits the page's 1200 px column with its margins
MAX_CHART_FEATURES = 40  # the frequency chart shows at most this many features (the table has all)
HTML_FILE, MARKDOWN_FILE, JSON_FILE = "report.html", "report.md", "report.json"
_VERDICT_COLOUR = {"better": "tab:green", "worse": "tab:red", "indistinguishable": "tab:grey"}


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


def _precision_recall(result: ABResult) -> tuple[str, dict[str, Any]]:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, c in result.curves.items():
        pr = c.get("pr")
        if pr:
            ax.plot(pr["recall"], pr["precision"], label=f"{name} (AP {result.arm(name).metrics['ap']:.4f})")
    ax.set(xlabel="recall (anomalies found)", ylabel="precision", title="Precision-recall, anomaly as positive",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return _png(fig), {n: c.get("pr") for n, c in result.curves.items()}


def _deltas(result: ABResult) -> tuple[str, dict[str, Any]]:
    metrics = list(dict.fromkeys(v.metric for v in result.verdicts))
    treatments = list(dict.fromkeys(v.treatment for v in result.verdicts))
    width = min(3.2, (MAX_FIGURE_INCHES - 1.5) / max(len(metrics), 1))
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.5 + width * len(metrics), 1.2 + 0.5 * len(treatments)),
                             squeeze=False, sharey=True)
    colour = _VERDICT_COLOUR
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
    """Δ AUC against control by id frequency: one panel per class (head, torso, tail), one row per feature,
    a point and interval per treatment (filled: different in the slices' Holm family). The width is fixed;
    many features make it taller, past ``MAX_CHART_FEATURES`` it keeps those with the largest losses."""
    rows = [s for s in result.slices if s.slice.startswith("freq:")]
    features = list(dict.fromkeys(s.slice[5:] for s in rows))
    treatments = [a.name for a in result.arms if a.name != result.control]
    colour = {a.name: f"C{i}" for i, a in enumerate(result.arms)}
    at = {(s.slice[5:], s.value): s for s in rows}
    data: dict[str, Any] = {f: {} for f in features}
    for (f, cls), s in at.items():
        data[f][cls] = {"rows": s.rows, "auc": {n: s.metrics[n]["auc"] for n in s.metrics},
                        "delta_auc": {t: asdict(d["auc"]) if "auc" in d else None for t, d in s.deltas.items()}}

    def worst(f: str) -> float:
        found = [d["auc"].delta for cls in CLASSES if (f, cls) in at for d in at[(f, cls)].deltas.values()
                 if "auc" in d]
        return min(found, default=0.0)

    shown = sorted(features, key=worst)[:MAX_CHART_FEATURES] if len(features) > MAX_CHART_FEATURES else features
    shown = [f for f in features if f in shown]  # keep the feature map's order
    height = 1.6 + 0.22 * max(len(shown), 1) * max(1.0, len(treatments) / 2)
    fig, axes = plt.subplots(1, len(CLASSES), figsize=(MAX_FIGURE_INCHES, height), sharey=True, squeeze=False,
                             layout="constrained")
    step = 0.7 / max(len(treatments), 1)
    for ax, cls in zip(axes[0], CLASSES, strict=True):
        for k, t in enumerate(treatments):
            for i, f in enumerate(shown):
                s = at.get((f, cls))
                d = s.deltas.get(t, {}).get("auc") if s is not None else None
                if d is None or d.delta != d.delta:
                    continue
                y = i + (k - (len(treatments) - 1) / 2) * step
                filled = d.verdict != "indistinguishable"
                ax.errorbar([d.delta], [y], xerr=[[d.delta - d.low], [d.high - d.delta]], fmt="o", ms=4, capsize=2,
                            lw=1, color=colour[t], mfc=colour[t] if filled else "white",
                            label=t if (cls == CLASSES[0] and i == 0) else None)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{cls} ids", fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_xlabel("Δ AUC vs control", fontsize=8)
        ax.grid(axis="x", lw=0.3, alpha=0.5)
    axes[0][0].set_yticks(range(len(shown)), shown, fontsize=7)
    axes[0][0].set_ylim(len(shown) - 0.5, -0.5)  # first feature on top
    if treatments:
        fig.legend(fontsize=8, loc="outside lower center", ncol=min(len(treatments), 5), frameon=False)
    note = "" if len(shown) == len(features) else f"; {len(shown)} of {len(features)} features, largest losses"
    fig.suptitle(f"AUC by id frequency (training counts): treatment - {result.control}, {result.level:.0%} "
                 f"intervals; filled: differs after Holm over slices{note}", fontsize=9)
    return _png(fig), data


def _auc_vs_bytes(result: ABResult) -> tuple[str, dict[str, Any]]:
    fig, ax = plt.subplots(figsize=(5, 4))
    data = {}
    for i, a in enumerate(result.arms):
        b = max(a.embedding_bytes, 1)
        ax.scatter([b], [a.metrics["auc"]], color=f"C{i}", s=40)
        ax.annotate(a.name, (b, a.metrics["auc"]), textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -11),
                    fontsize=8)  # alternate above and below: arms of similar bytes and AUC
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
    else:
        out["pr"] = _precision_recall(result)
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


def _delta_cell(d: SliceDelta | None) -> str:
    if d is None:
        return "n/a"
    mark = {"better": " better", "worse": " worse"}.get(d.verdict, "")
    return f"{d.delta:+.4f} ({d.low:+.4f}..{d.high:+.4f}){mark}"


def _tail_rows(result: ABResult) -> tuple[list[str], list[list[str]]]:
    treatments = [a.name for a in result.arms if a.name != result.control]
    head = ["feature", "class", "rows", f"AUC {result.control}",
            *(f"Δ AUC {t} ({result.level:.0%} CI)" for t in treatments)]
    body = []
    for s in result.slices:
        if not s.slice.startswith("freq:"):
            continue
        cells = [s.slice[5:], s.value, str(s.rows), _fmt(s.metrics[result.control]["auc"])]
        cells += [_delta_cell(s.deltas.get(t, {}).get("auc")) for t in treatments]
        body.append(cells)
    return head, body


def _column_rows(result: ABResult) -> tuple[list[str], list[list[str]]]:
    treatments = [a.name for a in result.arms if a.name != result.control]
    head = ["column", "value", "rows", f"AUC {result.control}", *(f"Δ AUC {t}" for t in treatments)]
    body = [[s.slice, s.value, str(s.rows), _fmt(s.metrics[result.control]["auc"]),
             *(_delta_cell(s.deltas.get(t, {}).get("auc")) for t in treatments)]
            for s in result.slices if not s.slice.startswith("freq:")]
    return head, body


def _method(result: ABResult) -> str:
    what = ("AUC, log loss, NE, calibration" if result.task == "ctr"
            else "ROC AUC and average precision with the anomaly as positive")
    return (f"{result.rows:,} rows, every arm on the same rows; {what}; {result.resamples} paired bootstrap "
            f"resamples ({result.bootstrap_seconds:.1f} s), DeLong for AUC, Holm across treatments and metrics, "
            f"level {result.level:.0%}.")


def _slice_note(result: ABResult) -> str:
    """How slice deltas are corrected, and what they found."""
    if not result.slice_tests:
        return "No slice deltas."
    found = [(s, t, m, d) for s in result.slices for t, per in s.deltas.items() for m, d in per.items()
             if d.verdict != "indistinguishable"]
    worse = sum(d.verdict == "worse" for *_, d in found)
    return (f"Slice deltas form a second Holm family of their own ({result.slice_tests} tests: every slice x "
            f"treatment x metric), apart from the headline verdicts above; their intervals are unadjusted "
            f"{result.level:.0%} intervals (DeLong for AUC, paired normal for log loss), a verdict is given only "
            f"when the Holm-adjusted p is below {1 - result.level:.2g}. Found: {len(found) - worse} better, "
            f"{worse} worse.")


def _slice_findings(result: ABResult, limit: int = 20) -> list[str]:
    found = sorted(((s, t, m, d) for s in result.slices for t, per in s.deltas.items() for m, d in per.items()
                    if d.verdict != "indistinguishable"), key=lambda x: x[3].p_holm)
    lines = [f"{t} vs {result.control} on {s.slice} = {s.value} ({s.rows:,} rows): {m} {d.verdict}, "
             f"by {d.delta:+.4g} (CI {d.low:+.4g}..{d.high:+.4g}; Holm p={d.p_holm:.2g})"
             for s, t, m, d in found[:limit]]
    if len(found) > limit:
        lines.append(f"... and {len(found) - limit} more (report.json)")
    return lines


def _data_note(result: ABResult) -> str:
    d = result.data
    if d is None:
        return ""
    if d.kind == "prepared":
        text = f"Data: split '{d.split}' of the prepared {d.path} ({d.rows:,} rows)."
    else:
        text = (f"Data: the raw file {d.path}, encoded through the control's feature map as preparation would: "
                f"{d.rows_in:,} rows read, {d.rows:,} kept, {d.rows_in - d.rows:,} rejected by the reader")
        if d.rejected:
            text += " (" + "; ".join(f"{why}: {n:,}" for why, n in sorted(d.rejected.items(), key=lambda x: -x[1]))
            text += f"; e.g. {d.examples[0]})" if d.examples else ")"
        text += "."
        if d.unseen:
            top = sorted(d.unseen.items(), key=lambda x: -x[1])[:5]
            text += " Values unseen in training (OOV id): " + ", ".join(f"{f} {v:.1%}" for f, v in top) + "."
    if d.dropped:
        text += f" {d.dropped:,} unlabelled rows (label 0) left out."
    return text


def markdown(result: ABResult) -> str:
    """The summary for terminals and PR comments."""
    def table(head: list[str], body: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body)]

    lines = [f"# A/B: {', '.join(a.name for a in result.arms if a.name != result.control)} vs {result.control}", "",
             _method(result), ""]
    if result.data is not None:
        lines += [_data_note(result), ""]
    lines += ["## Verdicts", ""]
    lines += [f"- {v.text}" for v in result.verdicts]
    lines += ["", "## Arms", "", *table(*_arm_rows(result)), "", "## Slice deltas", "", _slice_note(result)]
    findings = _slice_findings(result)
    if findings:
        lines += ["", *(f"- {f}" for f in findings)]
    lines += ["", "## Id-frequency slices (AUC)", "", *table(*_tail_rows(result))]
    if any(not s.slice.startswith("freq:") for s in result.slices):
        lines += ["", "## Slices", "", *table(*_column_rows(result))]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], body: list[list[str]]) -> str:
    """A table in a box that scrolls sideways on its own when it is wider than the page."""
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f'<div class="wide"><table><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table></div>'


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;height:auto;margin:0.5em 0}
div.wide{max-width:100%;overflow-x:auto}
li.better{color:#1a7f37}li.worse{color:#c62828}li.indistinguishable{color:#555}figure{margin:1em 0}"""
_CAPTIONS = {"roc": "ROC curves per arm", "calibration": "Calibration per arm (deciles of predicted probability)",
             "pr": "Precision-recall per arm (anomaly as positive)",
             "deltas": "Deltas against control with intervals (headline Holm family)",
             "frequency": "Δ AUC by id frequency per feature (filled: differs in the slices' Holm family)",
             "auc_vs_bytes": "AUC against embedding bytes"}


def to_html(result: ABResult, figures: dict[str, tuple[str, dict[str, Any]]]) -> str:
    """The self-contained page (figures as ``data:image/png;base64`` images, inline styles)."""
    title = html.escape(f"A/B vs {result.control}")
    verdicts = "".join(f'<li class="{v.verdict}">{html.escape(v.text)}</li>' for v in result.verdicts)
    figs = "".join(f'<figure><img id="fig-{name}" alt="{html.escape(_CAPTIONS[name])}" '
                   f'src="data:image/png;base64,{png}"><figcaption>{html.escape(_CAPTIONS[name])}</figcaption></figure>'
                   for name, (png, _) in figures.items())
    findings = "".join(f"<li>{html.escape(f)}</li>" for f in _slice_findings(result))
    data = f"<p>{html.escape(_data_note(result))}</p>" if result.data is not None else ""
    columns = (f"<h2>Slices by column</h2>{_html_table(*_column_rows(result))}"
               if any(not s.slice.startswith("freq:") for s in result.slices) else "")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{_CSS}</style></head>"
            f"<body><h1>{title}</h1><p>{html.escape(_method(result))}</p>{data}"
            f"<h2>Verdicts</h2><ul>{verdicts}</ul><h2>Arms</h2>{_html_table(*_arm_rows(result))}"
            f"<h2>Slice deltas</h2><p id=\"slice-holm\">{html.escape(_slice_note(result))}</p>"
            f"{f'<ul>{findings}</ul>' if findings else ''}"
            f"<h2>Figures</h2>{figs}<h2>Id-frequency slices</h2>{_html_table(*_tail_rows(result))}{columns}"
            "</body></html>\n")


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
