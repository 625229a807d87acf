"""Open built pages in headless Chromium at a desktop and a phone width, list every code block and
table wider than its box, and save a screenshot of each page at each width.

    bash dev.sh docs && python docs/check_layout.py            # needs Debian's chromium
    python docs/check_layout.py --pages quickstart guides/lightning --widths 1280,390

Exits 1 if anything overflows. Screenshots: docs/_build/layout/<page>-<width>.png.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# Appended to a copy of each page: after load, the overflowing blocks as JSON in a <pre>.
PROBE = """<script>window.addEventListener("load", () => {
  const bad = [];
  for (const el of document.querySelectorAll("article pre, article table")) {
    const box = el.tagName === "PRE" ? el : (el.closest(".table-wrapper") || el.parentElement);
    if (el.scrollWidth > box.clientWidth + 1) {
      bad.push(`${el.tagName} ${el.scrollWidth} px in ${box.clientWidth} px: ` +
               el.innerText.slice(0, 60).replace(/\\n/g, " | "));
    }
  }
  const report = document.createElement("pre");
  report.id = "layout-report";
  report.textContent = JSON.stringify(bad);
  document.body.appendChild(report);
});</script>"""
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(profile: Path, width: int, height: int, *args: str) -> str:
    cmd = [*CHROMIUM, f"--user-data-dir={profile}", f"--window-size={width},{height}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path, default=DOCS / "_build" / "html")
    parser.add_argument("--pages", nargs="+", default=["index", "quickstart", "guides/lightning"])
    parser.add_argument("--widths", default="1280,390")
    parser.add_argument("--out", type=Path, default=DOCS / "_build" / "layout")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    overflowing = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy, profile = Path(tmp) / "html", Path(tmp) / "profile"
        shutil.copytree(args.html, copy)
        for page in args.pages:
            probed = copy / f"{page}.html"
            probed.write_text(probed.read_text().replace("</body>", PROBE + "</body>"))
            for width in map(int, args.widths.split(",")):
                dom = chromium(profile, width, 900, "--virtual-time-budget=3000", "--dump-dom", probed.as_uri())
                found = re.search(r'<pre id="layout-report">(.*?)</pre>', dom, re.S)
                bad = json.loads(html.unescape(found.group(1))) if found else ["the page did not load"]
                shot = args.out / f"{page.replace('/', '_')}-{width}.png"
                chromium(profile, width, 2400, f"--screenshot={shot}", (args.html / f"{page}.html").as_uri())
                print(f"{page} at {width} px: {len(bad)} overflowing ({shot.name})")
                for item in bad:
                    print(f"    {item}")
                overflowing += len(bad)
    return 1 if overflowing else 0


if __name__ == "__main__":
    sys.exit(main())
