"""Atomic file writes: everything on disk that matters goes through here.

A writer creates a temp file in the target's folder and ``os.replace``s it into
place, so a crash never leaves a half-written file under the final name.

Example:
    >>> write_json_atomic("/tmp/x.json", {"a": 1})
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_folder(tmp: str | Path, out: str | Path, overwrite: bool, exists_message: str) -> None:
    """Move the finished folder ``tmp`` to ``out`` (same filesystem), replacing an existing ``out``
    only when ``overwrite``; otherwise ``OutputExistsError(exists_message)``.

    An existing ``out`` is first renamed to ``.<out>.old-<pid>-<hex>`` and removed after the
    swap, so ``out`` is always either the old folder or the new one (never half of each), and
    a process killed in between leaves a temporary its next run can recognise and remove.
    """
    from recemb.errors import OutputExistsError

    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    if not overwrite:
        raise OutputExistsError(exists_message)
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
