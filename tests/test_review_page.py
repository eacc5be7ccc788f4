"""The review page in a real headless Chromium (system package) driven by Playwright: upload a case, see
it in the worklist, change a finding, continue, see the updated diagnosis and the review step in the trace.
Saves the screenshots the README shows when DERMGRAPH_SCREENSHOTS names a folder."""

import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")

from tests.serve_helpers import TOKEN, ServerThread, make_app, png_bytes  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


def chromium() -> str:
    for name in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(name).exists():
            return name
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or pytest.skip("system Chromium not installed (apt-get install -y chromium)")


@pytest.mark.slow
def test_review_in_the_browser(tmp_path):
    lesion = tmp_path / "lesion.png"
    lesion.write_bytes(png_bytes(colour=(150, 90, 70), size=(256, 192)))
    shots = Path(os.environ["DERMGRAPH_SCREENSHOTS"]) if os.environ.get("DERMGRAPH_SCREENSHOTS") else tmp_path
    with ServerThread(make_app(tmp_path)) as srv, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(srv.url + "/")
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("#status:has-text('Token accepted')")

        page.set_input_files("#file", str(lesion))
        page.fill("#question", "Is this melanoma?")
        page.fill("#age", "61")
        page.click("#submit")
        page.wait_for_selector("#worklist tbody tr")
        rows = page.locator("#worklist tbody tr")
        assert rows.count() == 1 and "melanoma" in rows.first.inner_text() and "accept" in rows.first.inner_text()
        page.screenshot(path=str(shots / "review-worklist.png"))

        rows.first.click()
        page.wait_for_selector("#case:not([hidden])")
        page.wait_for_function("document.querySelector('#case-image').naturalWidth > 0")
        assert page.inner_text("#case-modality").startswith("dermoscopy")
        assert "ACCEPT" in page.inner_text("#case-verdict")
        veil = page.locator("select[data-criterion='blue_whitish_veil']")
        assert veil.input_value() == "present"
        assert page.locator("#findings tbody tr").count() == 7 and "0.98" in page.inner_text("#findings")
        assert page.locator("#differential .bar").count() >= 2 and "kb:melanoma#checklist" in page.inner_text("#evidence")
        assert "atypical pigment network" in page.inner_text("#evidence")
        page.screenshot(path=str(shots / "review-case.png"), full_page=True)

        before = page.inner_text("#case-verdict")
        veil.select_option("absent")
        page.select_option("select[data-criterion='pigment_network']", "typical")
        page.fill("#reviewer", "dr-browser")
        page.fill("#note", "no veil on close inspection")
        page.click("#continue")
        page.wait_for_selector("#status:has-text('sign-off')")
        verdict = page.inner_text("#case-verdict")
        # The corrected findings no longer support melanoma: its probability drops (the doubles' other experts still favour it).
        p = lambda text: float(re.search(r"p=([0-9.]+)", text).group(1))  # noqa: E731
        assert p(verdict) < p(before)
        trace = page.inner_text("#trace")
        assert "review" in trace and "dr-browser" in trace and "blue_whitish_veil: present -> absent" in trace
        assert page.locator("#trace li.review").count() == 1
        assert page.locator("select[data-criterion='blue_whitish_veil']").input_value() == "absent"

        page.select_option("#override", "nv")
        page.click("#override-btn")
        page.wait_for_selector("#status:has-text('case complete')")
        assert "reviewer's diagnosis: nv" in page.inner_text("#case-verdict")
        assert page.locator("#trace li.review").count() == 2
        assert page.locator("#worklist tbody tr").count() == 0
        browser.close()
