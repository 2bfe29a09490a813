"""Build a metadata-only ``fbgemm-gpu`` wheel that depends on ``fbgemm-gpu-cpu``.

torchrec declares ``fbgemm-gpu`` (the ~500 MB CUDA package) as a requirement, but on
a CPU machine the matching build is ``fbgemm-gpu-cpu`` (same import name). This stub
satisfies the requirement so that ``pip check`` stays clean without pulling CUDA.

Example:
    python tools/make_fbgemm_stub.py --out .wheels
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import zipfile
from pathlib import Path

NAME = "fbgemm_gpu"
VERSION = "1.8.0+cpustub"
REAL = "fbgemm-gpu-cpu==1.8.0"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build(out: Path) -> Path:
    """Write the stub wheel into ``out`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    dist = f"{NAME}-{VERSION}.dist-info"
    files = {
        f"{dist}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: fbgemm-gpu\nVersion: {VERSION}\n"
            "Summary: CPU stand-in: depends on fbgemm-gpu-cpu (same import name).\n"
            f"Requires-Dist: {REAL}\n"
        ).encode(),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: recemb\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [_record_line(p, d) for p, d in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    target = out / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".wheels"))
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
