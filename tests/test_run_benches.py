"""``make bench``'s report (tools/run_benches.py): a summary table first, each benchmark's
command, status and output, its figures linked, and ``--publish`` copying the report with
its PNG figures into a folder (links rewritten) so the committed copy does not point into
the ignored ``bench-out/``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import run_benches


def test_report_and_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plots = tmp_path / "bench-out" / "compression" / "synthetic"
    plots.mkdir(parents=True)

    def fake_run(name: str, args: list[str], timeout: int) -> tuple[int, float, str]:
        if name == "ab":
            return 2, 1.0, "Traceback: boom"
        (plots / "auc_vs_bytes.png").write_bytes(b"\x89PNG fake")
        (plots / "report.html").write_text("<html></html>")
        return 0, 3.0, "| run | ratio |\n|---|---|\n| full | 1.00 |"

    monkeypatch.setattr(run_benches, "run", fake_run)
    monkeypatch.setattr(run_benches, "OUT", tmp_path / "bench-out")
    monkeypatch.setattr(run_benches, "REPO", tmp_path)
    out, docs = tmp_path / "bench-out" / "REPORT.md", tmp_path / "docs"
    monkeypatch.setattr(sys, "argv", ["run_benches.py", "--only", "compression", "ab", "--out", str(out),
                                      "--publish", str(docs)])
    assert run_benches.main() == 1  # one benchmark failed: reported, the other still ran

    text = out.read_text()
    assert "| [compression](#compression) | ok | 3 |" in text and "| [ab](#ab) | FAILED (exit 2) | 1 |" in text
    assert "; failed: ab." in text and "Traceback: boom" in text and "| full | 1.00 |" in text
    assert "](compression/synthetic/auc_vs_bytes.png)" in text

    published = (docs / "REPORT.md").read_text()
    copied = docs / "report-files" / "compression-synthetic-auc_vs_bytes.png"
    assert copied.read_bytes() == b"\x89PNG fake"
    assert "](report-files/compression-synthetic-auc_vs_bytes.png)" in published
    assert "report.html" not in published and "bench-out" not in published
