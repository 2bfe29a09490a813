"""Open an A/B report in headless Chromium: screenshot it and check that every figure rendered.

Two Chromium runs, no network (``--no-proxy-server``, a file URL):

1. ``--dump-dom`` on a temporary copy of the page with one added script that writes each
   image's ``naturalWidth``/``naturalHeight``, its shown size and ``complete`` into attributes
   after load, and the page's scroll width; every ``<img>`` must have decoded to a non-zero
   size (a broken base64 image reads 0 x 0), the page must not be wider than the window (no
   sideways scrolling) and every figure must show at ``MIN_SCALE`` of its size or more (a
   chart squeezed to fit is unreadable);
2. ``--screenshot`` of the page itself (PNG), at the same window size, which must not be
   blank: some share of its pixels must differ from the background.

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
from dataclasses import dataclass
from pathlib import Path

_PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) {
    img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight);
    img.setAttribute('data-shown', img.width + 'x' + img.height);
    img.setAttribute('data-complete', String(img.complete));
  }
  document.body.setAttribute('data-scroll', document.documentElement.scrollWidth + 'x' + window.innerWidth);
  document.body.setAttribute('data-probed', 'yes');
});
</script>"""
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--hide-scrollbars",
          "--virtual-time-budget=10000"]
WINDOW = (1300, 5000)  # a laptop-wide window, tall enough for the whole report
MIN_SCALE = 0.8


@dataclass
class Rendered:
    """What Chromium made of the page: per image (id, natural w, h, shown w), and scroll vs window width."""

    images: list[tuple[str, int, int, int]]
    scroll_width: int
    window_width: int


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium found: apt-get update && apt-get install -y chromium")


def rendered(html: Path) -> Rendered:
    """Every image's decoded and shown size, and the page's width, as Chromium laid them out."""
    page = html.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page, encoding="utf-8")
        dom = subprocess.run([chromium(), *_FLAGS, f"--window-size={WINDOW[0]},{WINDOW[1]}", "--dump-dom",
                              probe.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    if 'data-probed="yes"' not in dom:
        sys.exit("the probe script did not run: the page did not finish loading")
    images = []
    for tag in re.findall(r"<img\b[^>]*>", dom):
        ident = re.search(r'id="([^"]*)"', tag)
        size = re.search(r'data-natural="(\d+)x(\d+)"', tag)
        shown = re.search(r'data-shown="(\d+)x(\d+)"', tag)
        w, h = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
        images.append((ident.group(1) if ident else "?", w, h, int(shown.group(1)) if shown else 0))
    scroll = re.search(r'data-scroll="(\d+)x(\d+)"', dom)
    sw, ww = (int(scroll.group(1)), int(scroll.group(2))) if scroll else (0, 0)
    return Rendered(images, sw, ww)


def screenshot(html: Path, png: Path, width: int = WINDOW[0], height: int = WINDOW[1]) -> float:
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
    page = rendered(html)
    expected = len(re.findall(r"<img\b", html.read_text(encoding="utf-8")))
    for ident, w, h, shown in page.images:
        print(f"[check_report] {ident}: {w} x {h} px, shown {shown} px wide ({shown / max(w, 1):.0%})")
    print(f"[check_report] page {page.scroll_width} px wide in a {page.window_width} px window")
    broken = [i for i, w, h, _ in page.images if w == 0 or h == 0]
    squeezed = [i for i, w, _, shown in page.images if w and shown < MIN_SCALE * w]
    png = (args.screenshot or html.with_suffix(".png")).resolve()
    inked = screenshot(html, png)
    print(f"[check_report] screenshot {png}: {inked:.1%} of pixels not background")
    if len(page.images) != expected or broken or not page.images:
        sys.exit(f"[check_report] FAILED: {len(page.images)} of {expected} images seen, not rendered: {broken}")
    if page.scroll_width > page.window_width:
        sys.exit(f"[check_report] FAILED: the page is {page.scroll_width} px wide, wider than the window "
                 f"({page.window_width} px)")
    if squeezed:
        sys.exit(f"[check_report] FAILED: figures shown below {MIN_SCALE:.0%} of their size: {squeezed}")
    if inked < 0.02:
        sys.exit("[check_report] FAILED: the screenshot is blank")
    print(f"[check_report] OK: {len(page.images)} figures rendered, none wider than the page")

if __name__ == "__main__":
    main()
