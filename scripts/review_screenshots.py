"""Screenshots of the review page with the real default models (docs/review-worklist.png, docs/review-case.png).

Serves the API in-process on a free 127.0.0.1 port with a throw-away data folder, uploads the given
images (default: the bundled example), opens the first case in headless system Chromium and saves
two small PNGs.

    python scripts/review_screenshots.py --hide-images examples/lesion.jpg ../shared/data/isic2018_val/images/ISIC_0034554.jpg
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="*", type=Path, default=[ROOT / "examples" / "lesion.jpg"])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--hide-images", action="store_true", help="replace the case image by a placeholder (licensed data sets must not be copied into docs/)")
    args = ap.parse_args()

    import uvicorn
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from agent import Agent
    from serve.app import Settings, create_app

    data = Path(tempfile.mkdtemp(prefix="dermgraph-shots-"))
    token = secrets.token_hex(8)
    agent = Agent(overrides=[f"review.checkpointer={data / 'cases.sqlite'}"])
    app = create_app(agent, Settings(data_dir=data, tokens=[token]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}/"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(url)
            page.fill("#token", token)
            page.click("#token-form button")
            for i, img in enumerate(args.images):
                page.set_input_files("#file", str(img))
                page.fill("#age", str(55 + i))
                page.click("#submit")
                page.wait_for_selector(f"#worklist tbody tr:nth-child({i + 1})", timeout=600_000)
            page.screenshot(path=str(args.out / "review-worklist.png"), clip={"x": 0, "y": 0, "width": 1200, "height": 560})
            rows = page.locator("#worklist tbody tr")
            derm = rows.filter(has_text="dermoscopy")
            (derm.first if derm.count() else rows.first).click()
            page.wait_for_function("document.querySelector('#case-image').naturalWidth > 0")
            if args.hide_images:
                placeholder = "data:image/svg+xml," + "%3Csvg xmlns='http://www.w3.org/2000/svg' width='224' height='224'%3E%3Crect width='224' height='224' fill='%23ccc'/%3E%3Ctext x='112' y='116' font-size='14' text-anchor='middle'%3Eimage not shown%3C/text%3E%3C/svg%3E"
                page.evaluate("src => { document.querySelector('#case-image').src = src; }", placeholder)
            page.screenshot(path=str(args.out / "review-case.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
    for name in ("review-worklist.png", "review-case.png"):
        path = args.out / name
        im = Image.open(path)
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=128)  # small files for the README
        im.save(path, optimize=True)
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
