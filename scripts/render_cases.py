"""Render diagnosed cases as the CLI prints them and as the notebook view shows them (HTML screenshot).

    python scripts/render_cases.py [--thumbnails=STEM,...] OUT_DIR IMAGE [IMAGE ...]   # OUT_DIR/<stem>.txt and <stem>.png

Only the images named by ``--thumbnails`` keep their thumbnail in the screenshot (licensed data must not be copied).

The screenshot uses the system Chromium through Playwright (as the review-page test does).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    from agent import Agent

    keep_thumbnail = None
    if argv and argv[0].startswith("--thumbnails="):
        keep_thumbnail = set(argv.pop(0).split("=", 1)[1].split(","))
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    agent = Agent()
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 940, "height": 900})
        for image in argv[1:]:
            d = agent.diagnose(image)
            stem = Path(image).stem
            if keep_thumbnail is not None and stem not in keep_thumbnail:
                d.thumbnail = None  # the data sets' licences do not allow shipping copies of their images
            (out / f"{stem}.txt").write_text(f"$ dermgraph diagnose {Path(image).name}\n{d.summary()}\n")
            page.set_content(f"<html><body>{d._repr_html_()}</body></html>")
            page.screenshot(path=str(out / f"{stem}.png"), full_page=True)
            print(f"{stem}: {d.verdict} {d.label}")
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1:])
