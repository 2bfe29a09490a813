"""Streaming pyarrow readers for raw logs: Criteo TSV, Avazu CSV, generic CSV/Parquet, events.

Every reader yields ``RawBlock``s of bounded size with the exact 1-based physical line
of each row, plus the rows the parser could not use (wrong field count, invalid UTF-8,
blank lines), so preparation can quarantine them instead of dropping or crashing.

Example:
    >>> from recemb.data.schema import load_dataset_config
    >>> cfg = load_dataset_config("configs/datasets/criteo.yaml")  # doctest: +SKIP
    >>> for block in iter_blocks(cfg, resolve_paths(cfg)[0]): ...  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import glob
import io
import mmap
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recemb.data.schema import DatasetConfig
from recemb.errors import ConfigError, DataError

CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
AVAZU_DERIVED = ("hour_of_day", "weekday")
_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class SourceFile:
    """One input file and its position in the dataset's file list (used for row seeds)."""

    path: Path
    index: int


@dataclass
class RawBlock:
    """A block of raw rows: ``table`` (only the needed columns), their lines, and rejects.

    ``bad_rows``/``bad_reasons`` are rows of ``table`` the reader already knows are bad
    (invalid UTF-8, blank line, unparseable Avazu hour); ``invalid`` are rows that are not
    in ``table`` at all (wrong field count), as ``(line, reason)``.
    """

    file: str
    table: pa.Table
    lines: np.ndarray
    bad_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    bad_reasons: list[str] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Layout:
    delimiter: str
    header: bool
    quoting: bool


def _layout(cfg: DatasetConfig) -> _Layout:
    if cfg.format == "criteo":
        return _Layout("\t", False, False)
    if cfg.format == "avazu":
        return _Layout(",", True, False)
    return _Layout(cfg.delimiter, cfg.header, True)


def resolve_paths(cfg: DatasetConfig) -> list[SourceFile]:
    """Expand ``cfg.paths`` (files or globs) in order; missing or empty files are errors.

    Example:
        >>> [s.path.name for s in resolve_paths(cfg)]  # doctest: +SKIP
        ['criteo-10k.txt']
    """
    out: list[Path] = []
    for pattern in cfg.paths:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern))
            if not matches:
                raise DataError(f"{pattern}: no file matches (dataset '{cfg.dataset_id}')")
            out.extend(matches)
        else:
            out.append(Path(pattern))
    if not out:
        raise DataError(f"dataset '{cfg.dataset_id}' lists no input paths")
    for path in out:
        if not path.is_file():
            raise DataError(f"{path}: file not found (dataset '{cfg.dataset_id}')")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (dataset '{cfg.dataset_id}')")
    return [SourceFile(p, i) for i, p in enumerate(out)]


def _read_header(path: Path, layout: _Layout) -> list[str]:
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        text = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: the header line is not valid UTF-8") from None
    if not text:
        raise DataError(f"{path}: the header line is empty")
    row = next(csv.reader([text], delimiter=layout.delimiter))
    return [c.strip() for c in row]


def file_columns(cfg: DatasetConfig, src: SourceFile) -> list[str]:
    """Column names of ``src`` as read (header, ``column_names`` or Criteo's fixed names)."""
    if cfg.format == "parquet":
        try:
            return list(pq.read_schema(src.path).names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{src.path}: not a readable Parquet file: {exc}") from None
    layout = _layout(cfg)
    if layout.header:
        return _read_header(src.path, layout)
    if cfg.column_names:
        return list(cfg.column_names)
    if cfg.format == "criteo":
        return list(CRITEO_COLUMNS)
    raise ConfigError(f"dataset '{cfg.dataset_id}': header is false, so column_names must be given")


def available_columns(cfg: DatasetConfig, src: SourceFile) -> list[str]:
    """Columns a feature may name: the file's columns plus derived ones (Avazu hour parts)."""
    cols = file_columns(cfg, src)
    if cfg.format == "avazu" and "hour" in cols:
        cols = cols + [c for c in AVAZU_DERIVED if c not in cols]
    return cols


def required_columns(cfg: DatasetConfig) -> list[str]:
    """Input columns the config reads: features, label, count and time columns, in order."""
    cols = [f.source for f in cfg.features]
    for extra in (cfg.label, cfg.count_column, cfg.split.time_column):
        if extra:
            cols.append(extra)
    return list(dict.fromkeys(cols))


def check_columns(cfg: DatasetConfig, src: SourceFile) -> list[str]:
    """Raise a one-line ``ConfigError`` when the config names a column ``src`` lacks."""
    have = available_columns(cfg, src)
    known = set(have)
    for spec in cfg.features:
        if spec.source not in known:
            raise ConfigError(
                f"dataset '{cfg.dataset_id}': feature '{spec.name}' reads column '{spec.source}', "
                f"which {src.path} does not have (columns: {', '.join(have)})"
            )
    for what, col in (("label", cfg.label), ("count_column", cfg.count_column),
                      ("split.time_column", cfg.split.time_column)):
        if col and col not in known:
            raise ConfigError(
                f"dataset '{cfg.dataset_id}': {what} '{col}' is not a column of {src.path} "
                f"(columns: {', '.join(have)})"
            )
    return have


class _CheckedStream(io.RawIOBase):
    """A file read in chunks whose invalid UTF-8 bytes are replaced by '?' (same length).

    The lines that held invalid bytes are recorded by physical line number, with the
    index of the field they were in. Pure-ASCII chunks pass through untouched; only a
    chunk with non-ASCII bytes is aligned to a newline and decoded.
    """

    def __init__(self, path: Path, delimiter: str, chunk_bytes: int = _CHUNK_BYTES, max_ahead: int = 4) -> None:
        super().__init__()
        self._f = open(path, "rb", buffering=0)
        self._chunk_bytes = chunk_bytes
        # Back-pressure: pyarrow's background reader would otherwise queue up to 32 blocks.
        self._cond = threading.Condition()
        self._max_ahead = max_ahead
        self._handed = 0
        self._consumed = 0
        self._delim = delimiter.encode()
        self._pending = b""
        self._out = b""
        self._eof = False
        self._offset = 0  # file offset of the next byte handed out
        self._counted = (0, 1)  # (offset, line number at that offset)
        self.bad_utf8: dict[int, int] = {}

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()
        super().close()

    def block_consumed(self) -> None:
        """Called by the consumer after each batch; lets the reader read one chunk further."""
        with self._cond:
            self._consumed += 1
            self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if not self._out and not self._eof:
            with self._cond:
                self._cond.wait_for(lambda: self._handed - self._consumed < self._max_ahead, timeout=0.25)
            self._handed += 1
        while not self._out and not self._eof:
            self._fill()
        if size < 0 or size >= len(self._out):
            out, self._out = self._out, b""
        else:
            out, self._out = self._out[:size], self._out[size:]
        return out

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _fill(self) -> None:
        data = self._f.read(self._chunk_bytes)
        if not data:
            self._eof = True
            chunk, self._pending = self._pending, b""
        elif not self._pending and data.isascii():
            chunk = data
        else:
            data = self._pending + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                self._pending = data
                return
            chunk, self._pending = data[:cut], data[cut:]
        if chunk and not chunk.isascii():
            chunk = self._fix_utf8(chunk)
        self._out = chunk
        self._offset += len(chunk)

    def _line_at(self, offset: int) -> int:
        pos, line = self._counted
        while pos < offset:
            piece = os.pread(self._f.fileno(), min(16 << 20, offset - pos), pos)
            if not piece:
                break
            line += piece.count(b"\n")
            pos += len(piece)
        self._counted = (pos, line)
        return line

    def _fix_utf8(self, chunk: bytes) -> bytes:
        first_line = self._line_at(self._offset)
        buf = bytearray(chunk)
        start = 0
        while True:
            try:
                buf[start:].decode("utf-8")
                return bytes(buf)
            except UnicodeDecodeError as exc:
                s, t = start + exc.start, start + exc.end
                line_start = buf.rfind(b"\n", 0, s) + 1
                line = first_line + buf.count(b"\n", 0, s)
                self.bad_utf8.setdefault(line, buf.count(self._delim, line_start, s))
                buf[s:t] = b"?" * (t - s)
                start = t


class _LineLocator:
    """Finds the physical line of each row the CSV parser rejected, by its text, in order."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        self._line = 1

    def close(self) -> None:
        self._mm.close()
        self._file.close()

    def _count_newlines(self, a: int, b: int) -> int:
        total = 0
        for lo in range(a, b, 16 << 20):
            total += self._mm[lo : min(b, lo + (16 << 20))].count(b"\n")
        return total

    def locate(self, text: str) -> int:
        raw = text.encode("utf-8")
        # '?' may stand for an invalid byte the checked stream replaced.
        parts = [re.escape(p) for p in raw.split(b"?")]
        pattern = re.compile(rb"(?m)^" + rb"[\s\S]".join(parts) + rb"(?=\r?\n|\Z)")
        match = pattern.search(self._mm, self._pos)
        if match is None:
            return -1
        line = self._line + self._count_newlines(self._pos, match.start())
        self._line = line + self._count_newlines(match.start(), match.end())
        self._pos = match.end()
        page = (self._pos // mmap.PAGESIZE) * mmap.PAGESIZE
        if page and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, 0, page)  # keep RSS bounded on huge files
        return line


def _avazu_derive(table: pa.Table, lines: np.ndarray) -> tuple[pa.Table, np.ndarray, list[str]]:
    hour = table.column("hour").combine_chunks()
    if not pa.types.is_string(hour.type):
        hour = hour.cast(pa.string())
    ts = pc.strptime(hour, format="%y%m%d%H", unit="s", error_is_null=True)
    bad = np.flatnonzero(np.asarray(pc.and_(hour.is_valid(), ts.is_null())))
    table = table.append_column("hour_of_day", pc.hour(ts).cast(pa.string()))
    table = table.append_column("weekday", pc.day_of_week(ts).cast(pa.string()))
    return table, bad, ["unparseable 'hour' (expected YYMMDDHH)"] * len(bad)


def _merge_bad(block: RawBlock, rows: np.ndarray, reasons: list[str]) -> None:
    if len(rows):
        block.bad_rows = np.concatenate([block.bad_rows, rows.astype(np.int64)])
        block.bad_reasons = block.bad_reasons + reasons


def _iter_csv(cfg: DatasetConfig, src: SourceFile, columns: list[str]) -> Iterator[RawBlock]:
    layout = _layout(cfg)
    names = file_columns(cfg, src)
    stream = _CheckedStream(src.path, layout.delimiter, chunk_bytes=cfg.block_bytes)
    locator = _LineLocator(src.path)
    reported: list[tuple[int, int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        reported.append((row.expected_columns, row.actual_columns, row.text))
        return "skip"

    base = 1 if layout.header else 0
    read_cols = [c for c in columns if c in names]
    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(block_size=cfg.block_bytes, column_names=names, skip_rows=base),
        parse_options=pacsv.ParseOptions(
            delimiter=layout.delimiter,
            quote_char='"' if layout.quoting else False,
            invalid_row_handler=on_invalid,
            ignore_empty_lines=False,
        ),
        convert_options=pacsv.ConvertOptions(
            include_columns=read_cols,
            column_types={c: pa.string() for c in read_cols},
            check_utf8=False,
            strings_can_be_null=True,
            null_values=[""],
        ),
    )
    located = 0
    shift = np.zeros(0, np.int64)  # valid rows before each invalid line
    valid_seen = 0
    try:
        for batch in reader:
            invalid: list[tuple[int, str]] = []
            new_shift = []
            while located < len(reported):
                expected, actual, text = reported[located]
                line = locator.locate(text)
                invalid.append((line, f"wrong number of fields: expected {expected}, got {actual}"))
                new_shift.append(line - base - 1 - (len(shift) + len(new_shift)))
                located += 1
            if new_shift:
                shift = np.concatenate([shift, np.asarray(new_shift, np.int64)])
            n = batch.num_rows
            idx = np.arange(valid_seen, valid_seen + n, dtype=np.int64)
            lines = base + 1 + idx + np.searchsorted(shift, idx, side="right")
            valid_seen += n
            stream.block_consumed()
            block = RawBlock(str(src.path), pa.Table.from_batches([batch]), lines, invalid=invalid)
            if stream.bad_utf8:
                rows = np.flatnonzero(np.isin(lines, np.fromiter(stream.bad_utf8, np.int64)))
                reasons = []
                for r in rows:
                    fi = stream.bad_utf8[int(lines[r])]
                    reasons.append(f"invalid UTF-8 in '{names[fi]}'" if fi < len(names) else "invalid UTF-8")
                _merge_bad(block, rows, reasons)
            if cfg.format == "avazu" and "hour" in block.table.column_names:
                block.table, rows, reasons = _avazu_derive(block.table, lines)
                _merge_bad(block, rows, reasons)
            yield block
        if located < len(reported):
            invalid = []
            for expected, actual, text in reported[located:]:
                invalid.append((locator.locate(text), f"wrong number of fields: expected {expected}, got {actual}"))
            yield RawBlock(str(src.path), pa.table({c: pa.array([], pa.string()) for c in columns}),
                           np.zeros(0, np.int64), invalid=invalid)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{src.path}: cannot parse as {cfg.format}: {exc}") from None
    finally:
        stream.close()
        locator.close()


def _iter_parquet(cfg: DatasetConfig, src: SourceFile, columns: list[str]) -> Iterator[RawBlock]:
    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{src.path}: not a readable Parquet file: {exc}") from None
    meta = pf.metadata
    row_bytes = max(1, meta.serialized_size // max(1, meta.num_rows))
    if meta.num_row_groups:
        total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        row_bytes = max(1, total // max(1, meta.num_rows))
    batch_rows = int(min(1 << 20, max(1024, cfg.block_bytes // row_bytes)))
    start = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        n = batch.num_rows
        lines = np.arange(start + 1, start + n + 1, dtype=np.int64)
        start += n
        yield RawBlock(str(src.path), pa.Table.from_batches([batch]), lines)


def iter_blocks(cfg: DatasetConfig, src: SourceFile, columns: list[str] | None = None) -> Iterator[RawBlock]:
    """Stream ``src`` in blocks of about ``cfg.block_bytes``, reading only ``columns``.

    CSV-like formats come back as string columns (empty field = null); Parquet keeps
    its types. Lines are 1-based physical lines (the header is line 1); for Parquet
    they are 1-based row numbers.

    Example:
        >>> rows = sum(b.table.num_rows for b in iter_blocks(cfg, src))  # doctest: +SKIP
    """
    check_columns(cfg, src)
    wanted = list(columns) if columns is not None else required_columns(cfg)
    derived = [c for c in wanted if cfg.format == "avazu" and c in AVAZU_DERIVED]
    read_cols = [c for c in wanted if c not in derived]
    if derived and "hour" not in read_cols:
        read_cols.append("hour")
    if cfg.format == "parquet":
        yield from _iter_parquet(cfg, src, read_cols)
    else:
        yield from _iter_csv(cfg, src, read_cols)
