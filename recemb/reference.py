"""The README's CLI and config references, generated from the code so they cannot drift.

``cli_reference()`` walks ``recemb.cli.build_parser()`` (every verb, nested verbs, each
option with its help and default); ``config_reference()`` walks the config dataclasses
(experiment and dataset: every key with its type, default and the class docstring's
summary). ``python -m recemb.reference --write README.md`` rewrites the blocks between
``<!-- cli-reference:start -->``/``end`` and ``<!-- config-reference:start -->``/``end``;
``tests/test_reference.py`` fails when the README's blocks differ from what the code says.

Example:
    >>> "recemb train" in cli_reference()
    True
    >>> "`train.counts`" in config_reference()
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

MARKERS = {"cli": ("<!-- cli-reference:start -->", "<!-- cli-reference:end -->"),
           "config": ("<!-- config-reference:start -->", "<!-- config-reference:end -->")}


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, sub, helps.get(name, "")))
    return out


def _option(action: argparse.Action) -> str | None:
    if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
        return None
    names = ", ".join(action.option_strings) or action.dest
    if action.option_strings and action.nargs != 0:
        names += f" {action.metavar or action.dest.upper()}"
    text = (action.help or "").replace("%(default)s", str(action.default))
    extra = []
    if action.choices is not None and not isinstance(action.choices, dict):
        extra.append("one of " + ", ".join(str(c) for c in action.choices))
    if action.required:
        extra.append("required")
    elif action.option_strings and not isinstance(action, argparse._StoreTrueAction) and \
            action.default is not None and action.default is not argparse.SUPPRESS and action.default != []:
        extra.append(f"default {action.default}")
    body = " ".join(part for part in (text, f"({'; '.join(extra)})" if extra else "") if part)
    return f"  - `{names}`" + (f": {body}" if body else "")


def cli_reference() -> str:
    """Markdown: one entry per verb (and nested verb) with its options."""
    from recemb.cli import build_parser

    lines: list[str] = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for name, sub, help_text in _subparsers(parser):
            verb = f"{prefix} {name}"
            lines.append(f"- **`{verb}`**: {help_text}")
            for action in sub._actions:
                line = _option(action)
                if line:
                    lines.append(line)
            walk(sub, verb)

    walk(build_parser(), "recemb")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    return re.sub(r"typing\.|recemb\.[a-z_.]+\.", "", text).replace("NoneType", "None")


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def _default(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "(see below)" if dataclasses.is_dataclass(value) else repr(value)
    return "required"


def _walk_config(cls: type, prefix: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    lines.append(f"- **`{prefix or cls.__name__}`** ({cls.__name__}): {_summary(cls)}")
    nested = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        lines.append(f"  - `{key}`: {_type_name(tp)} = {_default(f)}")
        if dataclasses.is_dataclass(tp):
            nested.append((tp, key))
    for tp, key in nested:
        _walk_config(tp, key, lines)


def config_reference() -> str:
    """Markdown: every key of the experiment and dataset configs, with type and default."""
    from recemb.config.experiment import ExperimentConfig
    from recemb.data.schema import DatasetConfig, FeatureSpec

    lines = ["Experiment configs (`configs/experiments/*.yaml`, `base:` merges another file first):", ""]
    _walk_config(ExperimentConfig, "", lines)
    lines += ["", "Dataset configs (`configs/datasets/*.yaml`):", ""]
    _walk_config(DatasetConfig, "", lines)
    lines += ["", "Each entry of a dataset's `features`:", ""]
    _walk_config(FeatureSpec, "features[]", lines)
    return "\n".join(lines)


def render(kind: str) -> str:
    """The block for ``kind`` (``cli`` or ``config``) with its markers."""
    start, end = MARKERS[kind]
    body = cli_reference() if kind == "cli" else config_reference()
    return f"{start}\n{body}\n{end}"


def rewrite(text: str) -> str:
    """``text`` with each marked block replaced by what the code says now."""
    for kind, (start, end) in MARKERS.items():
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"no {start} ... {end} block")
        text = pattern.sub(lambda _m, k=kind: render(k), text)  # type: ignore[misc]
    return text


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or args[0] != "--write":
        print("usage: python -m recemb.reference --write README.md", file=sys.stderr)
        return 2
    path = Path(args[1])
    path.write_text(rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
