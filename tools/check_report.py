"""Open an A/B report in headless Chromium: screenshot it and check that every figure rendered.

Two Chromium runs, no network (``--no-proxy-server``, a file URL):

1. ``--dump-dom`` on a temporary copy of the page with one added script that writes each
   image's ``naturalWidth``/``naturalHeight`` and ``complete`` into attributes after load; every
   ``<img>`` must have decoded to a non-zero size (a broken base64 image reads 0 x 0);
2. ``--screenshot`` of the page itself (PNG), which must not be blank: some share of its
   pixels must differ from the background.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); tests check the HTML without it.

Usage::

    python tools/check_report.py ab-out/report.html --screenshot ab-out/report.png
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) {
    img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight);
    img.setAttribute('data-complete', String(img.complete));
  }
  document.body.setAttribute('data-probed', 'yes');
});
</script>"""
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--hide-scrollbars",
          "--virtual-time-budget=10000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium found: apt-get update && apt-get install -y chromium")


def rendered_images(html: Path) -> list[tuple[str, int, int]]:
    """(id, naturalWidth, naturalHeight) of every image as Chromium decoded it."""
    page = html.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page, encoding="utf-8")
        dom = subprocess.run([chromium(), *_FLAGS, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    if 'data-probed="yes"' not in dom:
        sys.exit("the probe script did not run: the page did not finish loading")
    out = []
    for tag in re.findall(r"<img\b[^>]*>", dom):
        ident = re.search(r'id="([^"]*)"', tag)
        size = re.search(r'data-natural="(\d+)x(\d+)"', tag)
        w, h = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
        out.append((ident.group(1) if ident else "?", w, h))
    return out


def screenshot(html: Path, png: Path, width: int = 1300, height: int = 5000) -> float:
    """Write a screenshot; return the share of pixels that are not the background (white)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium(), *_FLAGS, f"--window-size={width},{height}", f"--screenshot={png}", html.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(png)[..., :3]
    return float(np.mean(np.any(pixels < 0.98, axis=-1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path)
    p.add_argument("--screenshot", type=Path, default=None, help="PNG path (default: beside the HTML)")
    args = p.parse_args()
    html = args.html.resolve()
    images = rendered_images(html)
    expected = len(re.findall(r"<img\b", html.read_text(encoding="utf-8")))
    for ident, w, h in images:
        print(f"[check_report] {ident}: {w} x {h} px")
    broken = [i for i, w, h in images if w == 0 or h == 0]
    png = (args.screenshot or html.with_suffix(".png")).resolve()
    inked = screenshot(html, png)
    print(f"[check_report] screenshot {png}: {inked:.1%} of pixels not background")
    if len(images) != expected or broken or not images:
        sys.exit(f"[check_report] FAILED: {len(images)} of {expected} images seen, not rendered: {broken}")
    if inked < 0.02:
        sys.exit("[check_report] FAILED: the screenshot is blank")
    print(f"[check_report] OK: {len(images)} figures rendered")


if __name__ == "__main__":
    main()
