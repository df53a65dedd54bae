"""End to end in headless Chromium: generate, play both blind clips, rate, submit, find the rows in the CSV.

Uses Debian's chromium through Playwright (`playwright install` cannot download browsers here). Skipped
with a reason when chromium is missing, except under CI (env CI set), where that is a failure. Saves the
README screenshot, docs/screenshot.png. Runs on the embedded demo model when it is present, else on a
tiny random model.
"""
import os
import shutil
import socket
from pathlib import Path

import pytest

import app
from lab.models import EMBEDDED_DIR
from lab.ratings import read_ratings
from lab.settings import REPO_ROOT, Settings
from tests.tiny_audio import write_tiny_audio_model

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--autoplay-policy=no-user-gesture-required"]
SCREENSHOT = REPO_ROOT / "docs" / "screenshot.png"


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
def served(tmp_path_factory):
    require_browser()
    root = tmp_path_factory.mktemp("browser")
    if (EMBEDDED_DIR / "model_config.json").exists():
        model_files = {}  # the embedded demo model: a meaningful screenshot
        prompts = REPO_ROOT / "assets" / "calibration_prompts.txt"
    else:
        config_path, ckpt_path = write_tiny_audio_model(root / "model")
        model_files = dict(model_config=config_path, ckpt_path=ckpt_path)
        prompts = root / "prompts.txt"
        prompts.write_text("sine tone at a4\n")
    settings = Settings(model=None, model_config=None, ckpt_path=None, ratings_csv=root / "ratings.csv",
                        ratings_dataset=None, ratings_push_minutes=5, cache_dir=root / "cache",
                        output_dir=root / "out", calibration_prompts=prompts, calibration_steps=4,
                        max_quantized_models=1, concurrency_limit=1)
    lab = app.build_lab(settings, **model_files)
    demo = app.build_demo(lab)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.queue().launch(prevent_thread_lock=True, server_port=port, quiet=True, show_error=True)
    yield f"http://127.0.0.1:{port}/", lab
    demo.close()


def test_generate_listen_rate_and_submit(served):
    from playwright.sync_api import expect, sync_playwright

    url, lab = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)

        # Compare: generate the pair with a fixed seed and a calibration-free recipe (fast first call)
        page.locator("#seed textarea, #seed input").first.fill("3")
        page.get_by_label("Method").click()
        page.get_by_role("option", name="dynamic", exact=True).click()
        page.click("#generate")
        expect(page.locator("#summary")).to_contain_text("Quantized", timeout=120_000)
        expect(page.locator("#q-audio button.play-pause-button")).to_be_visible()
        page.wait_for_timeout(1500)  # let the plots draw
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # Listen & rate: a blind pair, submit stays disabled until both clips were played
        page.get_by_role("tab", name="Listen & rate").click()
        page.click("#new-pair")
        expect(page.locator("#trial-prompt")).to_contain_text("Prompt", timeout=120_000)
        submit = page.locator("#submit")
        expect(submit).to_be_disabled()
        for player in ("#audio-a", "#audio-b"):
            page.locator(f"{player} button.play-pause-button").click()
            page.wait_for_timeout(500)
        expect(submit).to_be_enabled(timeout=10_000)
        page.locator("#score-a").get_by_text("4 - Good").click()
        page.locator("#score-b").get_by_text("2 - Poor").click()
        rater = page.locator("#rater-id textarea, #rater-id input").first
        rater.fill("browser-test")
        submit.click()
        expect(page.locator("#rate-status")).to_contain_text("Saved 2 ratings", timeout=30_000)
        browser.close()

    rows = read_ratings(lab.store.path)
    assert len(rows) == 2
    assert {(r["clip_label"], r["score"]) for r in rows} == {("A", "4"), ("B", "2")}
    assert {r["system"] for r in rows} == {"full precision", "quantized"}
    assert all(r["rater_id"] == "browser-test" and r["method"] in ("dynamic", "none") for r in rows)
    assert SCREENSHOT.stat().st_size > 50_000
