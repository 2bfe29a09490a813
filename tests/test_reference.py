"""The README's CLI and config references are what the code says (``recemb.reference``)."""

from __future__ import annotations

from pathlib import Path

from recemb.reference import MARKERS, render, rewrite

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_references_match_the_code() -> None:
    text = README.read_text(encoding="utf-8")
    for kind in MARKERS:
        assert render(kind) in text, (f"README.md's {kind} reference is out of date: run "
                                      "python -m recemb.reference --write README.md")
    assert rewrite(text) == text


def test_references_cover_every_verb_and_new_keys() -> None:
    cli = render("cli")
    for verb in ("prepare", "train", "evaluate", "export", "score", "serve", "ab", "demo"):
        assert f"**`recemb {verb}`**" in cli
    config = render("config")
    for key in ("`train.lr_schedule.kind`", "`train.counts`", "`split.files`", "`split.column`", "`index_fields`"):
        assert key in config
