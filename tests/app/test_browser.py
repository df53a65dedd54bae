"""End to end in headless Chromium: raters complete a MUSHRA and an ACR study from their links, and the
experimenter logs in to the console and runs a comparison.

Uses Debian's chromium through Playwright (`playwright install` cannot download browsers here). Skipped
with a reason when chromium is missing, except under CI (env CI set), where that is a failure. Saves the
README's screenshot (docs/screenshot.png) and the rater's MUSHRA page (docs/study-mushra.png). Runs on the
embedded demo model when it is present, else on the tiny random model.
"""
import os
import re
import shutil
from pathlib import Path

import pytest

from app import ADMIN_USER
from lab.comparison import build_lab
from lab.resources import CALIBRATION_PROMPTS, EMBEDDED_DIR, ROOT
from lab.settings import Settings
from lab.ui.rater import MAX_CLIPS
from tests.app.conftest import PASSWORD, build_studies, serving

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--autoplay-policy=no-user-gesture-required"]
SCREENSHOT = ROOT / "docs" / "screenshot.png"
MUSHRA_SCREENSHOT = ROOT / "docs" / "study-mushra.png"


def require_browser():
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"chromium not found ({CHROMIUM}); `make chromium` installs Debian's package"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright (python) is not installed"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_served(tmp_path_factory, tiny_audio_files):
    require_browser()
    root = tmp_path_factory.mktemp("browser")
    if (EMBEDDED_DIR / "model_config.json").exists():
        model_files = {}  # the embedded demo model: meaningful screenshots
        prompts = CALIBRATION_PROMPTS
    else:
        config_path, ckpt_path = tiny_audio_files
        model_files = dict(model_config=config_path, ckpt_path=ckpt_path)
        prompts = root / "prompts.txt"
        prompts.write_text("sine tone at a4\n")
    settings = Settings(cache_dir=root / "cache", output_dir=root / "out", calibration_prompts=prompts,
                        calibration_steps=4, max_quantized_models=2, studies_dir=root / "studies")
    lab = build_lab(settings, **model_files)
    studies = build_studies(lab, settings.studies_dir, prompts=("sine tone at A4", "pink noise"), steps=8,
                            seconds=1.0)
    with serving(lab, studies) as url:
        yield url, studies


def launch(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    return browser, browser.new_page(viewport={"width": 1280, "height": 900})


def play(page, selector):
    page.locator(f"{selector} button.play-pause-button").click()
    page.wait_for_timeout(300)


def rate_study(page, url, study, rater, screenshot=None):
    """Open the study link, pass the familiarisation page, rate every page, return the completion text."""
    from playwright.sync_api import expect

    page.goto(f"{url}?study={study}&rater={rater}")
    expect(page.locator("#welcome")).to_contain_text("pages", timeout=60_000)
    page.click("#start")
    page.click("#to-trials")
    header, done = page.locator("#trial-header"), page.locator("#done")
    previous = None
    while True:
        shown = page.locator("#trial-header, #done").filter(has_text=re.compile("Page|Thank you"))
        if previous:
            shown = shown.filter(has_not_text=previous)
        expect(shown.first).to_be_visible(timeout=60_000)
        if done.filter(has_text="Thank you").count():
            return done.inner_text()
        previous = page_text = header.inner_text()
        if page.locator("#reference").is_visible():
            play(page, "#reference")
        for index in range(MAX_CLIPS):
            if page.locator(f"#clip-{index}").is_visible():
                play(page, f"#clip-{index}")
        # the server counts plays: submit once it has every one, as a rater would see in the played note
        expect(page.locator("#played")).to_contain_text("Every clip played", timeout=30_000)
        if page.locator("#choice").is_visible():
            page.locator("#choice label").nth(1).click()
        if screenshot and page.locator("#reference").is_visible():
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot), full_page=True)
            screenshot = None
        page.click("#submit")
        assert page_text


def test_raters_complete_a_mushra_and_an_acr_study_in_the_browser(browser_served):
    from playwright.sync_api import sync_playwright

    url, studies = browser_served
    with sync_playwright() as playwright:
        browser, page = launch(playwright)
        for study in ("test-mushra", "test-acr"):
            thanks = rate_study(page, url, study, f"browser-{study}",
                                screenshot=MUSHRA_SCREENSHOT if study == "test-mushra" else None)
            assert "completion code" in thanks
        browser.close()
    for study, per_page in (("test-mushra", 4), ("test-acr", 1)):
        manifest, store = studies.get(study)
        rows = [row for row in store.read() if row["rater_id"] == f"browser-{study}"]
        assert len(rows) == len(manifest.items) * per_page
        assert all(int(row["play_count"]) >= 1 for row in rows)
    assert MUSHRA_SCREENSHOT.stat().st_size > 30_000


def test_the_console_asks_for_the_password_then_compares(browser_served):
    from playwright.sync_api import expect, sync_playwright

    url, _ = browser_served
    with sync_playwright() as playwright:
        browser, page = launch(playwright)
        page.goto(url + "admin/")
        page.get_by_label("username").fill(ADMIN_USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#generate")).to_be_visible(timeout=60_000)
        # Compare: a fixed seed and a calibration-free recipe (fast first call)
        page.locator("#seed textarea, #seed input").first.fill("3")
        page.get_by_label("Method").click()
        page.get_by_role("option", name="dynamic", exact=True).click()
        page.click("#generate")
        expect(page.locator("#summary")).to_contain_text("Quantized", timeout=120_000)
        expect(page.locator("#q-audio button.play-pause-button")).to_be_visible()
        page.wait_for_timeout(1500)  # let the plots draw
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
    assert SCREENSHOT.stat().st_size > 50_000
