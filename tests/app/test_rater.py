"""The listening test at / through gradio_client and plain HTTP, as a rater (or a curious one) would use it:
a study from its link to the completion code, must-play and one rating per page enforced by the server,
nothing that names a condition, and no file but the stimuli served."""
import concurrent.futures
import json
import re
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import quant
from lab.study import COLUMNS
from lab.study.definition import ANCHOR, HIDDEN_REFERENCE
from lab.ui.rater import MAX_CLIPS
from tests.app.conftest import SEED

SLIDERS_AT = [50] * MAX_CLIPS
FORBIDDEN = [HIDDEN_REFERENCE, ANCHOR, "dynamic", "lowpass", "full precision", "w8a8", "w4a8",
             str(SEED)] + list(quant.PRESETS)


def rater(url, study, rater_id, download_files=True) -> tuple[Client, tuple]:
    c = Client(url, verbose=False, download_files=download_files)
    opened = c.predict(f"test-{study}", rater_id, api_name="/open_study")
    return c, opened


def trial_clips(outputs) -> list[dict]:
    """The clip players' updates in a /trials or /submit response (value set = shown)."""
    return [o for o in outputs if isinstance(o, dict) and str(o.get("label", "")).startswith("Clip ")
            and isinstance(o.get("value"), (str, dict))]


def play_all(c: Client, outputs, reference: bool = False) -> str:
    """Play every clip of the page (and the reference); return the played note the last play showed."""
    notes = [c.predict(api_name=f"/play_{index + 1}") for index in range(len(trial_clips(outputs)))]
    if reference:
        notes.append(c.predict(api_name="/play_reference"))
    return notes[-1]


def ratings(studies, study) -> list[dict]:
    manifest, store = studies.get(f"test-{study}")
    return store.read()


def test_an_acr_rater_goes_from_the_link_to_the_completion_code(served):
    url, _, studies = served
    c, (rater_id, welcome) = rater(url, "acr", "acr-rater-1")
    assert rater_id == "acr-rater-1" and "2 pages" in welcome
    c.predict(api_name="/start")
    outputs = c.predict(api_name="/trials")
    assert "Page 1 of 2" in outputs[0]
    with pytest.raises(AppError, match="Listen to every clip"):
        c.predict(4, "", *SLIDERS_AT, api_name="/submit")
    play_all(c, outputs)
    with pytest.raises(AppError, match="Choose a rating"):
        c.predict(None, "", *SLIDERS_AT, api_name="/submit")
    with pytest.raises(AppError):
        c.predict(9, "", *SLIDERS_AT, api_name="/submit")  # out of the 1-5 scale
    assert [r for r in ratings(studies, "acr") if r["rater_id"] == "acr-rater-1"] == []  # nothing written
    outputs = c.predict(4, "fine", *SLIDERS_AT, api_name="/submit")
    assert "Page 2 of 2" in outputs[0]
    play_all(c, outputs)
    outputs = c.predict(2, "", *SLIDERS_AT, api_name="/submit")
    thanks = outputs[-2]
    assert "completion code" in thanks
    rows = [r for r in ratings(studies, "acr") if r["rater_id"] == "acr-rater-1"]
    assert len(rows) == 2 and sorted(r["score"] for r in rows) == ["2", "4"]
    assert all(r["play_count"] == "1" for r in rows)


def test_a_reload_resumes_and_a_page_is_rated_once(served):
    url, _, studies = served
    c, _ = rater(url, "acr", "acr-rater-2")
    c.predict(api_name="/start")
    outputs = c.predict(api_name="/trials")
    play_all(c, outputs)
    outputs = c.predict(5, "", *SLIDERS_AT, api_name="/submit")
    again, (_, welcome) = rater(url, "acr", "acr-rater-2")  # a reload: a new session, the same rater
    assert "rated 1 of 2" in welcome
    again.predict(api_name="/start")
    page_two = again.predict(api_name="/trials")
    assert "Page 2 of 2" in page_two[0]
    play_all(c, outputs)  # the first tab is on page 2 as well
    play_all(again, page_two)
    again.predict(3, "", *SLIDERS_AT, api_name="/submit")
    with pytest.raises(AppError, match="already rated"):  # the same page from the other tab
        c.predict(5, "", *SLIDERS_AT, api_name="/submit")
    assert sorted(r["score"] for r in ratings(studies, "acr") if r["rater_id"] == "acr-rater-2") == ["3", "5"]


def test_a_mushra_page_needs_every_clip_and_the_reference_played(served):
    url, _, studies = served
    c, _ = rater(url, "mushra", "mushra-rater-1")
    c.predict(api_name="/start")
    outputs = c.predict(api_name="/trials")
    clips = trial_clips(outputs)
    assert len(clips) == 4  # hidden reference, anchor, two conditions
    assert play_all(c, outputs) == "Played 4 of 5 clips: play each one before you rate."
    with pytest.raises(AppError, match="Reference"):
        c.predict(None, "", *SLIDERS_AT, api_name="/submit")
    assert "Every clip played" in c.predict(api_name="/play_reference")
    scores = [100, 20, 70, 60] + [0] * (MAX_CLIPS - 4)
    c.predict(None, "", *scores, api_name="/submit")
    rows = [r for r in ratings(studies, "mushra") if r["rater_id"] == "mushra-rater-1"]
    assert len(rows) == 4 and {r["condition"] for r in rows} == {HIDDEN_REFERENCE, ANCHOR, "w8a8-dynamic",
                                                                 "w4a8-dynamic"}


def test_unknown_study_links_say_so_and_reveal_nothing(served):
    url, _, studies = served
    for study_id in ("no-such-study", "../../etc", "TEST-ACR", ""):
        with pytest.raises(AppError, match="not valid") as error:
            Client(url, verbose=False).predict(study_id, "r", api_name="/open_study")
        assert "test-" not in str(error.value)


def test_nothing_a_rater_receives_names_a_condition_or_the_seed(served):
    url, _, studies = served
    seen = [httpx.get(url + "config").text, httpx.get(url).text]
    for study in ("acr", "mushra", "ab"):
        c, opened = rater(url, study, f"curious-{study}", download_files=False)
        seen += [json.dumps(opened), json.dumps(c.predict(api_name="/start"))]
        outputs = c.predict(api_name="/trials")
        seen.append(json.dumps(outputs))
        play_all(c, outputs, reference=study == "mushra")
        choice = 1 if study != "mushra" else None
        seen.append(json.dumps(c.predict(choice, "", *SLIDERS_AT, api_name="/submit")))
        seen.append(json.dumps(c.view_api(return_format="dict", print_info=False)))
    text = "\n".join(seen).lower()
    leaks = [word for word in FORBIDDEN if word.lower() in text]
    assert leaks == []
    names = set(re.findall(r"/([^/\"'=]+)\.wav", text)) - {"audio_sample"}  # view_api's example value
    assert names and all(re.fullmatch(r"[0-9a-f]{24}", name) for name in names)


def test_only_stimuli_are_served(served):
    url, _, studies = served
    manifest, store = studies.get("test-acr")
    store.path.touch()
    probes = [Path(__file__).resolve().parents[2] / "app.py", Path("/etc/passwd"), store.path,
              manifest.study_dir / "secret", manifest.study_dir / "manifest.json", manifest.study_dir / "raters.json",
              manifest.stimuli_dir / ".." / "secret", manifest.stimuli_dir]
    for prefix in ("gradio_api/file=", "admin/gradio_api/file=", "file="):
        for path in probes:
            response = httpx.get(f"{url}{prefix}{path}")
            assert response.status_code != 200, (prefix, path, response.status_code)


def test_the_files_of_a_page_carry_no_order_in_their_headers(served):
    url, *_ = served
    c = Client(url, verbose=False, download_files=False)  # the server's own file URLs, not local copies
    c.predict("test-mushra", "header-rater", api_name="/open_study")
    c.predict(api_name="/start")
    outputs = c.predict(api_name="/trials")
    files = [o["value"] for o in outputs if isinstance(o, dict) and isinstance(o.get("value"), dict)]
    assert len(files) == 5  # the open reference and four clips
    headers = set()
    for file in files:
        response = httpx.head(file["url"])
        assert response.status_code == 200
        headers.add((response.headers["etag"], response.headers["last-modified"], response.headers["content-length"]))
    assert len(headers) == 1  # same mtime and size: nothing tells which file was written first


def test_fifty_concurrent_raters_each_finish_a_page(served):
    url, _, studies = served

    def finish(i):
        c, _ = rater(url, "one-page", f"crowd-{i}")
        c.predict(api_name="/start")
        outputs = c.predict(api_name="/trials")
        play_all(c, outputs)
        return c.predict(1 + i % 5, "", *SLIDERS_AT, api_name="/submit")[-2]

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        thanks = list(pool.map(finish, range(50)))
    assert all("completion code" in text for text in thanks)
    rows = ratings(studies, "one-page")
    assert len(rows) == 50 and all(len(r) == len(COLUMNS) and None not in r.values() for r in rows)
    assert sorted(r["rater_id"] for r in rows) == sorted(f"crowd-{i}" for i in range(50))
    counts = {}
    for row in rows:
        counts[row["condition"]] = counts.get(row["condition"], 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1  # the Latin square balances conditions


@pytest.mark.browser
def test_the_bare_address_points_to_the_study_link_and_the_console(served):
    from playwright.sync_api import sync_playwright

    from tests.app.test_browser import CHROMIUM, CHROMIUM_ARGS, require_browser

    require_browser()
    url, *_ = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#welcome >> text=study link you were given", timeout=60_000)
        text = page.locator("#welcome").inner_text()
        browser.close()
    assert "/admin" in text and "test-" not in text  # no study is named
