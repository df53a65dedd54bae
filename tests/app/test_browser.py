"""End to end in headless Chromium: raters complete a MUSHRA and an ACR study from their links with the page's
one Web Audio transport (switching, keys, loop), link text stays plain text, a reload resumes, a second
browser with the same id is refused, and the experimenter logs in to the console and runs a comparison.

Uses Debian's chromium through Playwright (`playwright install` cannot download browsers here). Skipped
with a reason when chromium is missing, except under CI (env CI set), where that is a failure. Saves the
README's screenshot (docs/screenshot.png) and the rater's MUSHRA page (docs/study-mushra.png). Runs on the
embedded demo model when it is present, else on the tiny random model.
"""
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from app import ADMIN_USER
from lab.comparison import build_lab
from lab.resources import CALIBRATION_PROMPTS, EMBEDDED_DIR, ROOT
from lab.settings import Settings
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
        study_prompts = ("sine tone at A4", "pink noise")
    else:
        config_path, ckpt_path = tiny_audio_files
        model_files = dict(model_config=config_path, ckpt_path=ckpt_path)
        prompts = root / "prompts.txt"
        prompts.write_text("sine tone at a4\n")
        study_prompts = ("sine tone at a4", "white noise")  # words the tiny model's prompt check accepts
    settings = Settings(cache_dir=root / "cache", output_dir=root / "out", calibration_prompts=prompts,
                        calibration_steps=4, max_quantized_models=2, studies_dir=root / "studies")
    lab = build_lab(settings, **model_files)
    studies = build_studies(lab, settings.studies_dir, prompts=study_prompts, steps=8,
                            seconds=1.0)
    with serving(lab, studies) as url:
        yield url, studies


def launch(playwright, width=1280, height=900):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    return browser, browser.new_page(viewport={"width": width, "height": height})


def player_state(page) -> dict:
    return page.evaluate("window.raterPlayer.state()")


def submit_when_accepted(page, header_text: str) -> None:
    """Click Submit until the server takes the page (it refuses one shown for less than its clips' length)."""
    from playwright.sync_api import TimeoutError

    for _ in range(60):
        page.click("#submit")
        try:
            page.wait_for_function("text => document.querySelector('#trial').hidden || "
                                   "document.querySelector('#trial-header').textContent !== text",
                                   arg=header_text, timeout=1000)
            return
        except TimeoutError:
            pass
    raise AssertionError(page.locator("#status").inner_text())


def check_player(page) -> None:
    """The MUSHRA page's one transport: switching keeps the playhead, keys, the loop, one gain open."""
    page.click('button.clip[data-label="1"]')
    page.keyboard.press(" ")
    page.wait_for_timeout(400)
    playing = player_state(page)
    assert playing["playing"] and playing["selected"] == "1" and playing["position"] > 0
    before, after = page.evaluate("""() => {
        const before = window.raterPlayer.state();
        document.body.dispatchEvent(new KeyboardEvent("keydown", {key: "2", bubbles: true}));
        return [before, window.raterPlayer.state()];
    }""")
    assert after["selected"] == "2" and after["playing"]
    assert 0 <= after["position"] - before["position"] < 0.1 or after["position"] < 0.1  # went on (or looped)
    page.wait_for_timeout(200)
    assert player_state(page)["audible"] == ["2"]
    page.keyboard.press("Space")
    paused = player_state(page)
    page.keyboard.press("r")
    page.wait_for_timeout(100)
    switched = player_state(page)
    assert not paused["playing"] and switched["selected"] == "Reference" and switched["audible"] == ["Reference"]
    assert switched["position"] == paused["position"]  # paused, then switched: the same place
    page.locator("#trial .loop-start").fill("500")
    page.locator("#trial .loop-end").fill("800")
    looped = player_state(page)
    start, end = looped["loop"]
    assert abs(start - looped["duration"] * 0.5) < 0.01 and abs(end - looped["duration"] * 0.8) < 0.01
    page.keyboard.press(" ")
    positions = []
    for _ in range(8):
        page.wait_for_timeout(150)
        positions.append(player_state(page)["position"])
    assert all(start - 1e-3 <= position <= end + 1e-3 for position in positions)
    page.keyboard.press(" ")


def rate_study(page, url, study, rater, screenshot=None):
    """Open the study link, pass the first steps, rate every page (MUSHRA's first page with the player's
    checks and the screenshot), return the completion text."""
    from playwright.sync_api import expect

    page.goto(f"{url}?study={study}&rater={rater}")
    expect(page.locator("#start")).to_be_visible(timeout=60_000)
    page.click("#start")
    first = page.locator("#familiarisation, #questionnaire").filter(visible=True)
    expect(first).to_have_count(1, timeout=30_000)
    if page.locator("#questionnaire").is_visible():
        page.click("#questionnaire-skip")
    expect(page.locator('#familiarisation button.clip[data-label="Example 1"]')).to_be_visible(timeout=30_000)
    page.click("#to-trials")
    header, done = page.locator("#trial-header"), page.locator("#done")
    while True:
        expect(page.locator("#trial button.clip, #done-text").filter(visible=True).first).to_be_visible(
            timeout=60_000)
        if done.is_visible():
            return page.locator("#done-text").inner_text()
        page_text = header.inner_text()
        if page.locator("input.score").count():
            fresh = player_state(page)  # a new page starts a new player: nothing kept from the last one
            assert not fresh["playing"] and fresh["position"] == 0 and fresh["loop"] == [0, fresh["duration"]]
            assert fresh["selected"] == "Reference" and sum(fresh["plays"].values()) == 0
            if screenshot:
                check_player(page)
                page.click("#submit")
                expect(page.locator("#status")).not_to_contain_text("Listen to every clip")
                assert header.inner_text() == page_text  # refused: sliders unset, or too early
            sliders = page.locator("input.score")
            for index in range(sliders.count()):
                sliders.nth(index).fill("100" if index == 0 else "60")
            if screenshot:
                page.screenshot(path=str(screenshot))
                box = page.locator("#submit").bounding_box()
                assert box and box["y"] + box["height"] <= page.viewport_size["height"]  # Submit in view
                screenshot = None
        else:
            page.locator("#choice label").nth(1).click()
        submit_when_accepted(page, page_text)


def test_raters_complete_a_mushra_and_an_acr_study_in_the_browser(browser_served):
    from playwright.sync_api import sync_playwright

    url, studies = browser_served
    with sync_playwright() as playwright:
        browser, page = launch(playwright, 1366, 900)
        for study in ("test-mushra", "test-acr"):
            thanks = rate_study(page, url, study, f"browser-{study}",
                                screenshot=MUSHRA_SCREENSHOT if study == "test-mushra" else None)
            assert "completion code" in thanks
        browser.close()
    for study, per_page in (("test-mushra", 4), ("test-acr", 1)):
        manifest, store = studies.get(study)
        rows = [row for row in store.read() if row["rater_id"] == f"browser-{study}"]
        assert len(rows) == len(manifest.items) * per_page
        assert all(float(row["stream_count"]) >= 1 for row in rows)
    assert MUSHRA_SCREENSHOT.stat().st_size > 30_000


def test_link_text_is_plain_a_reload_resumes_and_a_second_browser_is_refused(browser_served):
    from playwright.sync_api import expect, sync_playwright

    url, _ = browser_served
    rater = "[x](https://e.vil)![i](https://e.vil/i.png)<img src=x>"
    link = f"{url}?study=test-acr&rater={quote(rater)}"
    with sync_playwright() as playwright:
        browser, page = launch(playwright)
        page.goto(url)
        expect(page.locator("#welcome-text")).to_contain_text("study link you were given", timeout=60_000)
        assert "/admin" in page.locator("#welcome").inner_text() and "test-" not in page.content()
        page.goto(link)
        expect(page.locator("#participant")).to_have_text(rater, timeout=60_000)
        assert page.locator("#welcome a, #welcome img").count() == 0
        page.click("#start")
        page.click("#questionnaire-skip")
        expect(page.locator('#familiarisation button.clip[data-label="Example 1"]')).to_be_visible(timeout=30_000)
        page.click("#to-trials")
        expect(page.locator("#trial-header")).to_have_text("Page 1 of 2", timeout=30_000)
        page.locator("#choice label").nth(0).click()
        submit_when_accepted(page, "Page 1 of 2")
        page.reload()  # the stored token: the same rater, where they stopped
        expect(page.locator("#welcome-text")).to_contain_text("rated 1 of 2", timeout=30_000)
        page.click("#start")
        expect(page.locator("#trial-header")).to_have_text("Page 2 of 2", timeout=30_000)
        other = browser.new_context().new_page()  # another browser: no stored token
        other.goto(link)
        expect(other.locator("#welcome-text")).to_contain_text("already started", timeout=30_000)
        browser.close()


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


def silent_wav(seconds: float = 0.5, rate: int = 16_000) -> bytes:
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(bytes(2 * int(seconds * rate)))
    return out.getvalue()


def test_a_page_whose_audio_did_not_come_from_the_server_cannot_be_submitted(browser_served):
    """What counts is what the server sent: with the clips answered from elsewhere (the player still plays),
    Submit is refused; once the server has streamed them, the page is taken."""
    from playwright.sync_api import expect, sync_playwright

    url, studies = browser_served
    with sync_playwright() as playwright:
        browser, page = launch(playwright)
        page.route("**/audio/**", lambda route: route.fulfill(status=200, content_type="audio/wav",
                                                              body=silent_wav()))
        page.goto(f"{url}?study=test-acr&rater=browser-elsewhere")
        expect(page.locator("#start")).to_be_visible(timeout=60_000)
        page.click("#start")
        page.click("#questionnaire-skip")
        page.click("#to-trials")
        expect(page.locator("#trial-header")).to_have_text("Page 1 of 2", timeout=30_000)
        page.locator("#choice label").nth(1).click()
        page.wait_for_timeout(1500)  # longer than the page's clips: only the missing transfer can refuse it
        page.click("#submit")
        expect(page.locator("#status")).to_contain_text("not played yet", timeout=30_000)
        page.unroute("**/audio/**")
        page.reload()
        page.click("#start")
        page.click("#to-trials")
        expect(page.locator("#trial-header")).to_have_text("Page 1 of 2", timeout=30_000)
        page.locator("#choice label").nth(1).click()
        submit_when_accepted(page, "Page 1 of 2")
        browser.close()
    _, store = studies.get("test-acr")
    rows = [row for row in store.read() if row["rater_id"] == "browser-elsewhere"]
    assert len(rows) == 1 and float(rows[0]["stream_count"]) >= 1
