"""Streaming pyarrow readers for raw logs: Criteo TSV, Avazu CSV, generic CSV/Parquet, events.

Every reader yields ``RawBlock``s of bounded size with the exact 1-based physical line
of each row, plus the rows the parser could not use (wrong field count, invalid UTF-8,
blank lines), so preparation can quarantine them instead of dropping or crashing.
Gzip, bz2 and zstd files are recognised by their first bytes and decompressed as they
are read (line numbers count lines of the decompressed text); a file that cannot be read
is a one-line ``DataError`` naming it.

Example:
    >>> from recemb.data.schema import load_dataset_config
    >>> cfg = load_dataset_config("configs/datasets/criteo.yaml")  # doctest: +SKIP
    >>> for block in iter_blocks(cfg, resolve_paths(cfg)[0]): ...  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recemb.data import libfm
from recemb.data.schema import SPLIT_NAMES, DatasetConfig
from recemb.errors import ConfigError, DataError

LIBFM_FORMATS = ("libfm", "libffm")
CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
AVAZU_DERIVED = ("hour_of_day", "weekday")
_CHUNK_BYTES = 4 << 20
_MAX_BLOCK_BYTES = 256 << 20  # read blocks grow up to this for long rows (or block_bytes, if larger)
# (codec, magic bytes): bz2 also needs its level digit and block magic, so a text file
# that happens to start with "BZh" is not taken for one.
_MAGIC = (("gzip", re.compile(rb"\x1f\x8b\x08")), ("zstd", re.compile(rb"\x28\xb5\x2f\xfd")),
          ("bz2", re.compile(rb"BZh[1-9](\x31\x41\x59\x26\x53\x59|\x17\x72\x45\x38\x50\x90)")))


@dataclass(frozen=True)
class SourceFile:
    """One input file and its position in the dataset's file list (used for row seeds)."""

    path: Path
    index: int
    split: int | None = None  # 0 train, 1 valid, 2 test: given by split.files; None = by the split rule


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
    if cfg.format in LIBFM_FORMATS:  # one field per line (no tab or comma splits it): parsed by recemb.data.libfm
        return _Layout("\x1f", False, False)
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
    files = cfg.split.files
    patterns: list[tuple[str, int | None]] = [(p, None) for p in cfg.paths] if files is None else \
        [(p, code) for code, name in enumerate(SPLIT_NAMES) for p in files.get(name) or []]
    out: list[Path] = []
    splits: list[int | None] = []
    for pattern, code in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern))
            if not matches:
                raise DataError(f"{pattern}: no file matches (dataset '{cfg.dataset_id}')")
        else:
            matches = [Path(pattern)]
        out.extend(matches)
        splits.extend([code] * len(matches))
    if not out:
        raise DataError(f"dataset '{cfg.dataset_id}' lists no input paths")
    seen: dict[Path, int | None] = {}
    for path, code in zip(out, splits, strict=True):
        if path.resolve() in seen and files is not None:
            raise DataError(f"{path}: listed under split.files twice ({SPLIT_NAMES[seen[path.resolve()] or 0]} "
                            f"and {SPLIT_NAMES[code or 0]}); a file belongs to one split")
        seen[path.resolve()] = code
    for path in out:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise DataError(f"{path}: file not found (dataset '{cfg.dataset_id}')") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror or exc} (dataset '{cfg.dataset_id}')") from None
        if stat.S_ISDIR(mode):
            raise DataError(f"{path}: is a folder, not a file; list its files or a glob such as "
                            f"{path}/*.csv in paths (dataset '{cfg.dataset_id}')")
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: not a regular file (a pipe or device cannot be read twice); "
                            f"copy it to a file (dataset '{cfg.dataset_id}')")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (dataset '{cfg.dataset_id}')")
        open_input(path).close()  # unreadable (permissions) fails here, before any output
    return [SourceFile(p, i, code) for i, (p, code) in enumerate(zip(out, splits, strict=True))]


def compression_of(path: Path) -> str | None:
    """The codec of a gzip, bz2 or zstd file, from its first bytes; ``None`` for plain text.

    Example:
        >>> compression_of(Path("day_0.tsv.gz"))  # doctest: +SKIP
        'gzip'
    """
    try:
        with open(path, "rb") as f:
            head = f.read(10)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return next((codec for codec, magic in _MAGIC if magic.match(head)), None)


def open_input(path: Path) -> Any:
    """A readable binary stream of ``path``, decompressed when it is gzip, bz2 or zstd.

    A file that cannot be opened is a ``DataError`` naming it.
    """
    codec = compression_of(path)
    try:
        if codec is None:
            return open(path, "rb", buffering=0)
        return pa.CompressedInputStream(pa.OSFile(str(path), "rb"), codec)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def _read_error(path: Path, exc: BaseException) -> DataError:
    what = "decompress" if compression_of(path) else "read"
    return DataError(f"{path}: cannot {what}: {getattr(exc, 'strerror', None) or exc} "
                     "(truncated or damaged file?)")


def _read_header(path: Path, layout: _Layout) -> list[str]:
    f = open_input(path)
    try:
        head = f.read(1 << 20)
    except (OSError, pa.ArrowException) as exc:
        raise _read_error(path, exc) from None
    finally:
        f.close()
    first = head.split(b"\n", 1)[0]
    try:
        text = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: the header line is not valid UTF-8") from None
    if not text:
        raise DataError(f"{path}: the header line is empty")
    row = next(csv.reader([text], delimiter=layout.delimiter))
    return [c.strip() for c in row]


def _check_unique(path: Path, names: list[str], where: str) -> list[str]:
    dupes = [n for n in names if names.count(n) > 1]
    if dupes:
        raise DataError(f"{path}: column '{dupes[0]}' appears {names.count(dupes[0])} times in the {where}; "
                        "columns are matched by name, so rename the copies")
    return names


def _libfm_names(cfg: DatasetConfig, src: SourceFile) -> list[str]:
    """Label and field names of a libFM/libFFM file: ``column_names``, else ``label, f0, f1, ...``."""
    if cfg.index_fields:
        return [cfg.label or "label", *cfg.index_fields]
    if cfg.column_names:
        return list(cfg.column_names)
    return libfm.default_names(libfm.sniff_fields(src.path, cfg.format, open_input), cfg.label or "label")


def file_columns(cfg: DatasetConfig, src: SourceFile) -> list[str]:
    """Column names of ``src`` as read (header, ``column_names`` or Criteo's fixed names;
    for libFM/libFFM the label, each field and each field's ``_value``)."""
    if cfg.format in LIBFM_FORMATS:
        return libfm.columns_of(_libfm_names(cfg, src))
    if cfg.format == "parquet":
        return _check_unique(src.path, list(_parquet_schema(src.path).names), "Parquet schema")
    layout = _layout(cfg)
    if layout.header:
        return _check_unique(src.path, _read_header(src.path, layout), "header")
    if cfg.column_names:
        return list(cfg.column_names)
    if cfg.format == "criteo":
        return list(CRITEO_COLUMNS)
    raise ConfigError(f"dataset '{cfg.dataset_id}': header is false, so column_names must be given")


def _parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None


def _scalar_type(t: pa.DataType) -> bool:
    return not pa.types.is_nested(t) and not (pa.types.is_dictionary(t) and pa.types.is_nested(t.value_type))


def _check_parquet_types(cfg: DatasetConfig, src: SourceFile) -> None:
    """A nested (struct, map, list) column where a value is expected is a one-line ``ConfigError``."""
    schema = _parquet_schema(src.path)
    uses = [(f"feature '{s.name}' ({s.kind})", s.source, s.kind == "multihot") for s in cfg.features]
    uses += [(what, col, False) for what, col in (("label", cfg.label), ("count_column", cfg.count_column),
                                                  ("split.time_column", cfg.split.time_column),
                                                  ("split.column", cfg.split.column)) if col]
    for what, col, listy in uses:
        if col not in schema.names:
            continue  # an optional column this file lacks (checked by check_columns)
        t = schema.field(col).type
        if _scalar_type(t):
            continue
        if listy and (pa.types.is_list(t) or pa.types.is_large_list(t)) and _scalar_type(t.value_type):
            continue
        hint = " (a list column can be a multihot feature)" if pa.types.is_list(t) or pa.types.is_large_list(t) else ""
        need = "a list of values or a separated string" if listy else "a number, string or boolean"
        raise ConfigError(f"dataset '{cfg.dataset_id}': {what} reads column '{col}' of {src.path}, which is "
                          f"{t}; it needs {need}{hint}")


def available_columns(cfg: DatasetConfig, src: SourceFile) -> list[str]:
    """Columns a feature may name: the file's columns plus derived ones (Avazu hour parts)."""
    cols = file_columns(cfg, src)
    if cfg.format == "avazu" and "hour" in cols:
        cols = cols + [c for c in AVAZU_DERIVED if c not in cols]
    return cols


def required_columns(cfg: DatasetConfig) -> list[str]:
    """Input columns the config reads: features, label, count, time and split columns, in order."""
    cols = [f.source for f in cfg.features]
    for extra in (cfg.label, cfg.count_column, cfg.split.time_column, cfg.split.column):
        if extra:
            cols.append(extra)
    return list(dict.fromkeys(cols))


def optional_columns(cfg: DatasetConfig) -> set[str]:
    """Columns a file may lack: for events, the label (its rows are unlabelled, label 0) and the
    count (each row occurs once), so an unlabelled training log and a labelled test file
    without counts prepare together."""
    if cfg.format != "events":
        return set()
    return {c for c in (cfg.label, cfg.count_column) if c}


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
    optional = optional_columns(cfg)
    for what, col in (("label", cfg.label), ("count_column", cfg.count_column),
                      ("split.time_column", cfg.split.time_column), ("split.column", cfg.split.column)):
        if col and col not in known and col not in optional:
            raise ConfigError(
                f"dataset '{cfg.dataset_id}': {what} '{col}' is not a column of {src.path} "
                f"(columns: {', '.join(have)})"
            )
    if cfg.format == "parquet":
        _check_parquet_types(cfg, src)
    return have


class _CheckedStream(io.RawIOBase):
    """A file read in chunks whose invalid UTF-8 bytes are replaced by '?' (same length).

    The lines that held invalid bytes are recorded by physical line number, with the
    index of the field they were in. Pure-ASCII chunks pass through untouched; only a
    chunk with non-ASCII bytes is aligned to a newline and decoded. A compressed file is
    read decompressed; its lines are counted as chunks pass, since it cannot be re-read
    at an offset.
    """

    def __init__(self, path: Path, delimiter: str, chunk_bytes: int = _CHUNK_BYTES, max_ahead: int = 4) -> None:
        super().__init__()
        self._compressed = compression_of(path) is not None
        self._f = open_input(path)
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
        self.read_failed: BaseException | None = None  # what reading raised (pyarrow re-wraps it)

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
        try:
            while not self._out and not self._eof:
                self._fill()
        except (OSError, pa.ArrowException, DataError) as exc:
            self.read_failed = exc
            raise
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
        if self._compressed:
            self._counted = (self._offset, self._counted[1] + chunk.count(b"\n"))

    def _line_at(self, offset: int) -> int:
        pos, line = self._counted
        if self._compressed:  # counted in _fill up to the chunk being handed out
            return line
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
    """Finds the physical line of each row the CSV parser rejected, by its text, in order.

    Reads the (decompressed) file forward once through a window that always starts at a
    line start, so memory stays bounded on huge files and compressed input works the same.
    """

    _READ = 16 << 20

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pos = 0  # file offset where the next search starts (after the last match)
        self._line = 1  # line number at _pos
        self._open(0)

    def _open(self, start: int) -> None:
        self._f = open_input(self._path)
        left = start
        while left:
            got = len(self._f.read(min(left, self._READ)))
            if not got:
                break
            left -= got
        self._base = start  # file offset of _buf[0], a line start
        self._buf = b""
        self._eof = False

    def close(self) -> None:
        self._f.close()

    def locate(self, text: str) -> int:
        raw = text.encode("utf-8")
        # '?' may stand for an invalid byte the checked stream replaced. Candidates are found by
        # the row's first bytes (a regex of a 10 MB row would be slow), then compared in full.
        pieces, offset = [], 0
        for part in raw.split(b"?"):
            pieces.append((offset, part))
            offset += len(part) + 1
        head = raw[:256]
        pattern = re.compile(rb"(?m)^" + rb"[\s\S]".join(re.escape(p) for p in head.split(b"?")))
        saved = (self._base, self._pos, self._line)
        while True:
            rel = self._pos - self._base
            match = pattern.search(self._buf, rel)
            while match is not None:
                start, end = match.start(), match.start() + len(raw)
                if end + 2 > len(self._buf) and not self._eof:
                    break  # the candidate (or what follows it) is not all read yet
                if self._row_at(pieces, start, end):
                    line = self._line + self._buf.count(b"\n", rel, start)
                    self._line = line + self._buf.count(b"\n", start, end)
                    self._pos = self._base + end
                    return line
                match = pattern.search(self._buf, start + 1)
            if match is None and self._eof:  # not found: rewind, so the rows after it are still found
                self._f.close()
                self._open(saved[0])
                self._pos, self._line = saved[1], saved[2]
                return -1
            # Whole lines before the last len(raw) + 2 bytes hold no match start: drop them.
            cut = self._buf.rfind(b"\n", rel, max(rel, len(self._buf) - len(raw) - 2)) + 1
            if cut:
                self._line += self._buf.count(b"\n", rel, cut)
                self._buf, self._base, self._pos = self._buf[cut:], self._base + cut, self._base + cut
            chunk = self._f.read(self._READ)
            if chunk:
                self._buf += chunk
            else:
                self._eof = True

    def _row_at(self, pieces: list[tuple[int, bytes]], start: int, end: int) -> bool:
        """The row's text (``?`` = any byte) is at ``start`` and a line ends at ``end``."""
        buf = self._buf
        if not all(buf.startswith(part, start + off) for off, part in pieces):
            return False
        return end == len(buf) or buf.startswith(b"\n", end) or buf.startswith(b"\r\n", end)


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


class _BlockTooSmall(Exception):
    """A row is longer than the read block (pyarrow's "straddling object")."""


def _iter_csv(cfg: DatasetConfig, src: SourceFile, columns: list[str]) -> Iterator[RawBlock]:
    """``_csv_pass`` with a read block that grows (x4, up to a cap) when a row does not fit.

    A retry re-reads the file from the start and skips the rows already yielded, so the
    caller sees each row once, with the same lines, whatever the block size.
    """
    block = cfg.block_bytes
    cap = max(cfg.block_bytes, _MAX_BLOCK_BYTES)
    done = [0, 0]  # valid rows, invalid rows already yielded
    while True:
        try:
            yield from _csv_pass(cfg, src, columns, block, done)
            return
        except _BlockTooSmall:
            if block >= cap:
                raise DataError(
                    f"{src.path}: a row is longer than the read block of {block} bytes; raise block_bytes "
                    f"in the config of dataset '{cfg.dataset_id}' above the longest row (or fix an unclosed "
                    "quote, which makes the rest of the file one field)"
                ) from None
            block = min(cap, block * 4)


def _newlines_per_row(table: pa.Table) -> np.ndarray:
    """Newlines inside each row's (quoted) fields: the extra physical lines the row spans."""
    extra = np.zeros(table.num_rows, np.int64)
    for col in table.columns:
        counts = pc.count_substring(col, "\n")
        if counts.null_count:
            counts = pc.fill_null(counts, 0)
        extra += np.asarray(counts.combine_chunks() if isinstance(counts, pa.ChunkedArray) else counts)
    return extra


def _csv_pass(cfg: DatasetConfig, src: SourceFile, columns: list[str], block_bytes: int,
              done: list[int]) -> Iterator[RawBlock]:
    layout = _layout(cfg)
    fields = _libfm_names(cfg, src) if cfg.format in LIBFM_FORMATS else None
    names = [libfm.LINE_COLUMN] if fields else file_columns(cfg, src)
    read_cols = names if fields else [c for c in columns if c in names]
    # A quoted field may hold newlines; every column is read so that the lines a row spans
    # are known even when an unread column holds them.
    parse_cols = names if layout.quoting else read_cols
    skip_valid, skip_invalid = done
    stream = _CheckedStream(src.path, layout.delimiter, chunk_bytes=block_bytes)
    locator = _LineLocator(src.path)
    reported: list[tuple[int, int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        reported.append((row.expected_columns, row.actual_columns, row.text))
        return "skip"

    base = 1 if layout.header else 0
    located = 0
    # Each located invalid row: the lines of valid rows before it, and the lines invalid rows took.
    inv_pos = np.zeros(0, np.int64)
    inv_cum = np.zeros(1, np.int64)
    valid_lines = 0

    def locate_reported() -> list[tuple[int, str]]:
        nonlocal located, inv_pos, inv_cum
        invalid: list[tuple[int, str]] = []
        pos, cum = [], [int(inv_cum[-1])]
        while located < len(reported):
            expected, actual, text = reported[located]
            line = locator.locate(text)
            invalid.append((line, f"wrong number of fields: expected {expected}, got {actual}"))
            if line > 0:
                pos.append(line - base - 1 - cum[-1])
                cum.append(cum[-1] + 1 + text.count("\n"))
            located += 1
        if pos:
            inv_pos = np.concatenate([inv_pos, np.asarray(pos, np.int64)])
            inv_cum = np.concatenate([inv_cum, np.asarray(cum[1:], np.int64)])
        return invalid

    def skip_invalid_rows(invalid: list[tuple[int, str]]) -> list[tuple[int, str]]:
        nonlocal skip_invalid
        drop = min(skip_invalid, len(invalid))
        skip_invalid -= drop
        return invalid[drop:]

    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=block_bytes, column_names=names, skip_rows=base),
            parse_options=pacsv.ParseOptions(
                delimiter=layout.delimiter,
                quote_char='"' if layout.quoting else False,
                newlines_in_values=layout.quoting,
                invalid_row_handler=on_invalid,
                ignore_empty_lines=False,
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=parse_cols,
                column_types={c: pa.string() for c in parse_cols},
                check_utf8=False,
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
        # The reader parses ahead in its own thread, so the rows it reported invalid may lie
        # in blocks not yet returned. Each block takes only those before its last row (and the
        # rest wait): which block a bad row rides with, and so the order of rejects.csv, must
        # not depend on how far the parser got (it did: 1 run in 8 of the golden test).
        waiting: list[tuple[int, str]] = []
        for batch in reader:
            waiting += skip_invalid_rows(locate_reported())
            table = pa.Table.from_batches([batch])
            span = 1 + _newlines_per_row(table) if layout.quoting else np.ones(table.num_rows, np.int64)
            if layout.quoting:
                table = table.select(read_cols)
            starts = valid_lines + np.cumsum(span) - span
            valid_lines += int(span.sum())
            lines = base + 1 + starts + inv_cum[np.searchsorted(inv_pos, starts, side="right")]
            if len(lines):
                last = int(lines[-1])
                invalid = [r for r in waiting if r[0] <= last]
                waiting = [r for r in waiting if r[0] > last]
            else:
                invalid = []
            stream.block_consumed()
            if skip_valid:
                drop = min(skip_valid, table.num_rows)
                skip_valid -= drop
                table, lines, span = table.slice(drop), lines[drop:], span[drop:]
            if not table.num_rows and not invalid:
                continue
            block = RawBlock(str(src.path), table, lines, invalid=invalid)
            bad_utf8 = dict(stream.bad_utf8)  # the reader thread adds to it
            if bad_utf8 and len(lines):
                keys = np.sort(np.asarray(list(bad_utf8), np.int64))
                first = np.searchsorted(keys, lines)
                rows = np.flatnonzero(first < np.searchsorted(keys, lines + span))
                reasons = []
                for r in rows.tolist():
                    key = int(keys[first[r]])
                    fi = bad_utf8[key] if key == lines[r] else len(names)  # a later line of the row: field unknown
                    reasons.append(f"invalid UTF-8 in '{names[fi]}'" if fi < len(names) else "invalid UTF-8")
                _merge_bad(block, rows, reasons)
            if fields:
                ranges = [(r[0], r[1]) for r in cfg.index_fields.values()] if cfg.index_fields else None
                parsed, rows, reasons = libfm.parse_lines(block.table.column(libfm.LINE_COLUMN), cfg.format, fields,
                                                          ranges)
                block.table = parsed.select([c for c in columns if c in parsed.column_names])
                _merge_bad(block, rows, reasons)
            if cfg.format == "avazu" and "hour" in block.table.column_names:
                block.table, rows, reasons = _avazu_derive(block.table, block.lines)
                _merge_bad(block, rows, reasons)
            done[0] += block.table.num_rows
            done[1] += len(block.invalid)
            yield block
        invalid = waiting + skip_invalid_rows(locate_reported())
        if invalid:
            done[1] += len(invalid)
            yield RawBlock(str(src.path), pa.table({c: pa.array([], pa.string()) for c in columns}),
                           np.zeros(0, np.int64), invalid=invalid)
    except pa.ArrowInvalid as exc:
        if "straddling object" in str(exc):
            raise _BlockTooSmall() from None
        if stream.read_failed is not None:
            raise _read_error(src.path, stream.read_failed) from None
        raise DataError(f"{src.path}: cannot parse as {cfg.format}: {exc}") from None
    except (OSError, pa.ArrowException) as exc:
        raise _read_error(src.path, exc) from None
    finally:
        stream.close()
        locator.close()


def _parquet_error(pf: pq.ParquetFile, path: Path, group: int, columns: list[str], exc: BaseException) -> DataError:
    """A one-line error naming the row group and, found by reading each alone, the damaged column."""
    bad = ""
    for col in columns:
        try:
            pf.read_row_group(group, columns=[col])
        except (pa.ArrowException, OSError):
            bad = f", column '{col}'"
            break
    return DataError(f"{path}: cannot read row group {group}{bad}: {exc} (damaged or truncated Parquet file? "
                     "rewrite it from its source)")


def _iter_parquet(cfg: DatasetConfig, src: SourceFile, columns: list[str]) -> Iterator[RawBlock]:
    try:
        pf = pq.ParquetFile(src.path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{src.path}: not a readable Parquet file: {exc}") from None
    meta = pf.metadata
    row_bytes = max(1, meta.serialized_size // max(1, meta.num_rows))
    if meta.num_row_groups:
        total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        row_bytes = max(1, total // max(1, meta.num_rows))
    batch_rows = int(min(1 << 20, max(1024, cfg.block_bytes // row_bytes)))
    start = 0
    for group in range(meta.num_row_groups):
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                n = batch.num_rows
                lines = np.arange(start + 1, start + n + 1, dtype=np.int64)
                start += n
                yield RawBlock(str(src.path), pa.Table.from_batches([batch]), lines)
        except (pa.ArrowException, OSError) as exc:
            raise _parquet_error(pf, src.path, group, columns, exc) from None


def iter_blocks(cfg: DatasetConfig, src: SourceFile, columns: list[str] | None = None) -> Iterator[RawBlock]:
    """Stream ``src`` in blocks of about ``cfg.block_bytes``, reading only ``columns``.

    CSV-like formats come back as string columns (empty field = null); Parquet keeps
    its types. Lines are 1-based physical lines (the header is line 1); for Parquet
    they are 1-based row numbers.

    Example:
        >>> rows = sum(b.table.num_rows for b in iter_blocks(cfg, src))  # doctest: +SKIP
    """
    have = set(check_columns(cfg, src))
    optional = optional_columns(cfg)
    wanted = [c for c in (list(columns) if columns is not None else required_columns(cfg))
              if c in have or c not in optional]
    derived = [c for c in wanted if cfg.format == "avazu" and c in AVAZU_DERIVED]
    read_cols = [c for c in wanted if c not in derived]
    if derived and "hour" not in read_cols:
        read_cols.append("hour")
    if cfg.format == "parquet":
        yield from _iter_parquet(cfg, src, read_cols)
    else:
        yield from _iter_csv(cfg, src, read_cols)
