"""File integrity: sizes and sha256 recorded when files are written, checked before they are read.

Checkpoints and export bundles record a ``FileDigest`` of every file they hold and call
``verify_files`` before loading anything, so a flipped byte, a truncated or missing file
is a one-line ``DataError`` naming the file instead of silently wrong numbers.
Hashing streams the file (constant memory). numpy/torch-free.

Example:
    >>> _ = Path("/tmp/recemb-integrity-example").write_bytes(b"abc")
    >>> verify_files("/tmp", {"recemb-integrity-example": FileDigest.of("/tmp/recemb-integrity-example")})
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recemb.errors import DataError

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # a sha256 as recorded: 64 lowercase hex digits
_CHUNK = 1 << 20  # hash in 1 MiB reads: files of any size in constant memory


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON fields: ``true`` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def short_repr(value: Any, limit: int = 60) -> str:
    """A short one-line repr for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



@dataclass(frozen=True)
class FileDigest:
    """A file's size in bytes and sha256 (hex digits), as recorded when it was written.

    Example:
        >>> FileDigest.from_dict({"size": 3, "sha256": "ab" * 32}, where="x").size
        3
    """

    size: int
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> FileDigest:
        """Size and sha256 of the file at ``path`` as it is now."""
        return cls(Path(path).stat().st_size, file_sha256(path))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FileDigest:
        """Parse ``{"size": int, "sha256": hex}``; ``where`` names it in errors."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: should be {{size, sha256}}, got {short_repr(data)}")
        size, sha256 = data.get("size"), data.get("sha256")
        if not is_int(size) or size < 0:
            raise DataError(f"{where}.size: should be a byte count, got {short_repr(size)}")
        if not isinstance(sha256, str) or not SHA256_HEX.match(sha256):
            raise DataError(f"{where}.sha256: should be 64 lowercase hex digits, got {short_repr(sha256)}")
        return cls(size, sha256)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"size": self.size, "sha256": self.sha256}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB reads (constant memory for any size).

    Example:
        >>> _ = Path("/tmp/recemb-sha-example").write_bytes(b"abc")
        >>> file_sha256("/tmp/recemb-sha-example")[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(
    folder: str | Path, expected: Mapping[str, FileDigest], hint: str = "restore it from a good copy", hashes: bool = True,
) -> None:
    """Check every ``folder/<name>`` of ``expected`` has its recorded size and sha256.

    Sizes first (a ``stat`` each: a missing or truncated file is named before anything
    is read), then, unless ``hashes`` is False, the hashes. The first file that differs
    is a one-line ``DataError`` naming it, ending with ``hint`` (what the user can do).

    Example:
        >>> verify_files(folder, {"rank-0.safetensors": FileDigest(1024, "ab" * 32)})  # doctest: +SKIP
    """
    folder = Path(folder)
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing (it was written with this folder; copied only in part?); {hint}")
        size = path.stat().st_size
        if size != want.size:
            raise DataError(f"{path}: size mismatch ({size:,} bytes, {want.size:,} when written: truncated or "
                            f"changed after it was written); {hint}")
    if not hashes:
        return
    for name, want in expected.items():
        if file_sha256(folder / name) != want.sha256:
            raise DataError(f"{folder / name}: checksum mismatch (the file was changed or corrupted after it was "
                            f"written); {hint}")


def write_sidecar(path: str | Path, sidecar: str | Path) -> None:
    """Write ``sidecar`` (``<sha256>  <name>``, as ``sha256sum`` prints it) guarding the file ``path``."""
    from recemb.io import write_text_atomic

    path = Path(path)
    write_text_atomic(sidecar, f"{file_sha256(path)}  {path.name}\n")


def read_signed(path: str | Path, sidecar: str | Path, hint: str, required: bool = True) -> tuple[bytes, bool]:
    """The bytes of ``path``, checked against the sha256 its ``sidecar`` holds; and whether one did.

    A missing sidecar is an error when ``required`` (else the bytes come back unchecked, False);
    a garbled sidecar or a mismatch is a one-line ``DataError`` naming the file, ending with ``hint``.

    Example:
        >>> _ = Path("/tmp/recemb-signed.json").write_text("{}")
        >>> write_sidecar("/tmp/recemb-signed.json", "/tmp/recemb-signed.json.sha256")
        >>> read_signed("/tmp/recemb-signed.json", "/tmp/recemb-signed.json.sha256", "redo it")
        (b'{}', True)
    """
    path, sidecar = Path(path), Path(sidecar)
    raw = path.read_bytes()
    if not sidecar.is_file():
        if required:
            raise DataError(f"{sidecar}: missing (it guards {path.name}); {hint}")
        return raw, False
    recorded = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not recorded or not SHA256_HEX.match(recorded[0]):
        raise DataError(f"{sidecar}: should hold '<sha256>  {path.name}', got {short_repr(recorded[:2])}; {hint}")
    if hashlib.sha256(raw).hexdigest() != recorded[0]:
        raise DataError(f"{path}: checksum mismatch (the file was changed or corrupted after it was written; "
                        f"{sidecar.name} holds its sha256); {hint}")
    return raw, True
