"""The listening test's JSON API through a served app, as a rater (or a rater with a script) would use it: a
study from its link to the completion code, and the attacks a script tries: labelling clips from public
values, comparing URLs or bytes across raters and within a page, acting as another rater, submitting without
listening, leaving sliders untouched; plus what a changed file on disk and a bad link do."""
import concurrent.futures
import hashlib
import json
import logging
import random
import re

import httpx
import pytest

import quant
from lab.study import COLUMNS, trials_for
from lab.study.blinding import rater_rng, wav_chunks
from lab.study.definition import ANCHOR, HIDDEN_REFERENCE, StudyDefinition
from lab.study.serving import SERVED_LOG
from lab.ui.rater import FAMILIARISATION
from tests.app.conftest import SEED, Rater, finish_study, page_scores, wait_streamed

FORBIDDEN = [HIDDEN_REFERENCE, ANCHOR, "dynamic", "lowpass", "full precision", "w8a8", "w4a8", "condition",
             str(SEED)] + list(quant.PRESETS)


def ratings(studies, study_id, rater_id) -> list[dict]:
    _, store = studies.get(study_id)
    return [row for row in store.read() if row["rater_id"] == rater_id]


def pcm(wav: bytes):
    import numpy as np

    chunk, start, size = next(c for c in wav_chunks(wav) if c[0] == b"data")
    return np.frombuffer(wav, dtype="<i2", count=size // 2, offset=start).astype(int)


def conditions_by_label(studies, study_id, rater_id, trial_id) -> dict[str, str]:
    """What the server knows and the rater must not: label -> condition of one page."""
    manifest, _ = studies.get(study_id)
    trial = next(t for t in trials_for(manifest, rater_id) if t.trial_id == trial_id)
    return {s.label: s.condition for s in trial.stimuli}


def test_an_acr_rater_goes_from_the_link_to_the_completion_code(served):
    url, _, studies = served
    rater = Rater(url, "test-acr", rater="acr-rater-1")
    state = rater.get("state")
    assert state["title"] == "Test acr" and state["participant"] == "acr-rater-1" and state["total"] == 2
    assert state["headphone_check"] is False and set(state["questionnaire"]) >= {"device", "hearing"}
    bad = rater.request("POST", "questionnaire", {"answers": {"device": "a trumpet"}})
    assert bad.status_code == 400 and "Choose one of the offered answers" in bad.json()["error"]
    rater.post("questionnaire", {"answers": {"device": "headphones"}})
    assert rater.get("state")["questionnaire"] is None
    assert len(rater.get("familiarisation")["clips"]) == 3  # reference and two conditions
    page = rater.get("page")
    assert (page["number"], page["total"], page["test_type"]) == (1, 2, "acr")
    assert [label for label, _ in page["scale"]["labels"]] == [1, 2, 3, 4, 5]
    refused = rater.submit(page, 4)
    assert refused.status_code == 400 and "Listen to every clip" in refused.json()["error"]
    rater.listen(page)
    for scores, words in ((None, "Choose one rating"), (9, "from 1 to 5"), ("4", "Choose one rating")):
        refused = rater.submit(page, scores)
        assert refused.status_code == 400 and words in refused.json()["error"], refused.text
    assert ratings(studies, "test-acr", "acr-rater-1") == []  # nothing written
    assert rater.submit(page, 4, comment="fine").status_code == 200
    page = rater.get("page")
    assert page["number"] == 2
    rater.listen(page)
    assert rater.submit(page, 2).status_code == 200
    done = rater.get("page")
    assert done["stage"] == "done" and done["code"] in done["message"] and "completion code" in done["message"]
    rows = ratings(studies, "test-acr", "acr-rater-1")
    assert len(rows) == 2 and sorted(r["score"] for r in rows) == ["2", "4"]
    assert all(float(r["stream_count"]) == 1 and float(r["play_count"]) == 1 for r in rows)


def test_a_reload_resumes_and_a_page_is_rated_once(served):
    url, _, studies = served
    first = Rater(url, "test-acr", rater="acr-rater-2")
    page = first.get("page")
    first.listen(page)
    assert first.submit(page, 5).status_code == 200
    again = Rater(url, "test-acr", token=first.token)  # a reload: the page's stored token
    assert again.get("state")["done"] == 1
    page_two = again.get("page")
    assert page_two["number"] == 2 and page_two == first.get("page")
    again.listen(page_two)
    assert again.submit(page_two, 3).status_code == 200
    refused = first.submit(page_two, 5)  # the same page from another tab
    assert refused.status_code == 400 and "already rated" in refused.json()["error"]
    assert sorted(r["score"] for r in ratings(studies, "test-acr", "acr-rater-2")) == ["3", "5"]


def test_the_link_alone_cannot_act_as_a_rater(served):
    url, *_ = served
    victim = Rater(url, "test-acr", rater="victim-7")
    victim.get("state")
    attacker = httpx.Client(base_url=url, timeout=30)
    assert attacker.get("api/study/test-acr/page").status_code == 401
    forged = victim.token.split(".")[0] + "." + "0" * 32
    for token in (forged, "victim-7", victim.token + "x"):
        response = attacker.get("api/study/test-acr/page", headers={"X-Rater-Token": token})
        assert response.status_code == 403 and "not valid" in response.json()["error"]
    again = attacker.post("api/study/test-acr/register", json={"platform": {"rater": "victim-7"}})
    assert again.status_code == 403 and "already started" in again.json()["error"]
    other_study = attacker.get("api/study/test-mushra/page", headers={"X-Rater-Token": victim.token})
    assert other_study.status_code == 403  # a token is for one study
    anonymous = Rater(url, "test-acr")  # no id in the link: a random one
    assert anonymous.get("state")["participant"].startswith("anon-")


def test_the_familiarisation_order_comes_from_the_secret_not_from_public_values(served):
    url, _, studies = served
    manifest, _ = studies.get("test-mushra")
    stimuli = [s for s in manifest.items[0].stimuli if s.condition != HIDDEN_REFERENCE]
    public_matches = 0
    for index in range(6):
        rater_id = f"familiar-{index}"
        rater = Rater(url, "test-mushra", rater=rater_id)
        examples = rater.get("familiarisation")["clips"]
        served_pcm = [pcm(rater.fetch(clip)) for clip in examples]
        heard = []  # which stimulus each example is: its samples within the dither's 1 LSB of the file's
        for samples in served_pcm:
            heard.append(next(s.condition for s in stimuli
                              if abs(pcm(manifest.path(s).read_bytes()) - samples).max() <= 1))
        secret_order = list(stimuli)
        rater_rng(manifest.secret(), FAMILIARISATION, rater_id).shuffle(secret_order)
        assert heard == [s.condition for s in secret_order]
        public_order = list(stimuli)
        random.Random(f"test-mushra/{rater_id}").shuffle(public_order)
        public_matches += heard == [s.condition for s in public_order]
        page_urls = {clip["url"] for clip in rater.get("page")["clips"]}
        assert page_urls.isdisjoint(clip["url"] for clip in examples)  # the rating page's URLs are new ones
    assert public_matches < 6


def test_urls_and_bytes_are_per_rater_and_another_raters_url_is_not_found(served):
    url, _, studies = served
    raters = [Rater(url, "test-one-page", rater=f"url-rater-{index}") for index in range(4)]
    urls, digests = [], []
    for rater in raters:
        for clip in rater.get("page")["clips"] + rater.get("familiarisation")["clips"]:
            urls.append(clip["url"])
            digests.append(hashlib.sha256(rater.fetch(clip)).hexdigest())
    assert len(set(urls)) == len(urls) and len(set(digests)) == len(digests)  # nothing repeats: no frequencies
    assert not any(re.search(r"[0-9a-f]{24}\.wav", u) for u in urls)  # no stimulus file name
    theirs = raters[0].get("page")["clips"][0]["url"]
    stolen = raters[1].http.get(theirs, headers={"X-Rater-Token": raters[1].token})
    random_token = raters[1].http.get(theirs[:-32] + "0" * 32, headers={"X-Rater-Token": raters[1].token})
    assert stolen.status_code == random_token.status_code == 404 and stolen.text == random_token.text
    assert raters[1].http.get(theirs).status_code == 401  # and no token, no audio


def test_no_two_files_of_a_mushra_page_are_identical_yet_each_is_its_stimulus(served):
    url, _, studies = served
    manifest, _ = studies.get("test-mushra")
    rater = Rater(url, "test-mushra", rater="bytes-rater")
    page = rater.get("page")
    assert len(page["clips"]) == 5 and page["clips"][0]["label"] == "Reference"
    responses = {clip["label"]: rater.http.get(clip["url"], headers={"X-Rater-Token": rater.token})
                 for clip in page["clips"]}
    bodies = {label: response.content for label, response in responses.items()}
    wait_streamed(manifest.study_dir, "bytes-rater", page)
    assert len({hashlib.sha256(body).digest() for body in bodies.values()}) == 5
    conditions = conditions_by_label(studies, "test-mushra", "bytes-rater", page["trial_id"])
    hidden = next(label for label, condition in conditions.items() if condition == HIDDEN_REFERENCE)
    difference = pcm(bodies["Reference"]) - pcm(bodies[hidden])
    assert difference.any() and abs(difference).max() <= 2  # the samples differ, by the dither only
    headers = {(r.headers["content-type"], r.headers["content-length"], r.headers["cache-control"])
               for r in responses.values()}
    assert headers == {("audio/wav", str(len(bodies["Reference"])), "no-store")}
    assert not any("etag" in r.headers or "last-modified" in r.headers for r in responses.values())
    log = [json.loads(line) for line in (manifest.study_dir / SERVED_LOG).read_text().splitlines()]
    mine = {(entry["label"], entry["sha256"]) for entry in log
            if entry["rater"] == "bytes-rater" and entry["page"] == page["trial_id"] and entry["complete"]}
    assert mine == {(label, hashlib.sha256(body).hexdigest()) for label, body in bodies.items()}
    assert {entry["condition"] for entry in log if entry["rater"] == "bytes-rater"} >= {HIDDEN_REFERENCE, ANCHOR}


def test_a_mushra_page_is_refused_until_heard_whole_and_every_slider_moved(served):
    url, _, studies = served
    manifest, _ = studies.get("test-mushra")
    rater = Rater(url, "test-mushra", rater="mushra-rater-1")
    page = rater.get("page")
    scores = page_scores(page)
    claimed = rater.submit(page, scores, plays={clip["label"]: 5 for clip in page["clips"]})
    assert claimed.status_code == 400 and "Listen to every clip" in claimed.json()["error"]  # the page's word
    for clip in page["clips"][:-1]:
        rater.fetch(clip)
    wait_streamed(manifest.study_dir, "mushra-rater-1", page, [clip["label"] for clip in page["clips"][:-1]])
    missing = rater.submit(page, scores)
    assert missing.status_code == 400 and page["clips"][-1]["label"] in missing.json()["error"]
    rater.fetch(page["clips"][-1])
    wait_streamed(manifest.study_dir, "mushra-rater-1", page)
    early = rater.submit(page, scores)  # every clip fetched, but the page is younger than its clips
    assert early.status_code == 400 and "take" in early.json()["error"]
    rater.listen(page)
    untouched = rater.submit(page, {**scores, page["rated"][1]: None})
    assert untouched.status_code == 400 and "Move every slider" in untouched.json()["error"]
    text = rater.submit(page, {label: "50" for label in page["rated"]})
    assert text.status_code == 400 and "numbers" in text.json()["error"]
    garbled = rater.http.post("api/study/test-mushra/submit", content=b"scores=50",
                              headers={"X-Rater-Token": rater.token, "Content-Type": "application/json"})
    assert garbled.status_code == 400 and garbled.json() == {"error": "Send the request body as JSON."}
    assert ratings(studies, "test-mushra", "mushra-rater-1") == []
    assert rater.submit(page, scores).status_code == 200
    rows = ratings(studies, "test-mushra", "mushra-rater-1")
    assert {r["condition"] for r in rows} == {HIDDEN_REFERENCE, ANCHOR, "w8a8-dynamic", "w4a8-dynamic"}


def test_the_headphone_check_and_the_platform_link(served):
    url, _, studies = served
    rater = Rater(url, "test-ab", rater="ab-rater-1", PROLIFIC_PID="60ab00000000000000000001", STUDY_ID="s1")
    state = rater.get("state")
    assert state["participant"] == "60ab00000000000000000001" and state["headphone_check"] is True
    check = rater.get("headphones")
    assert len(check["trials"]) == 6 and all(len(trial["intervals"]) == 3 for trial in check["trials"])
    assert "answer" not in json.dumps(check).replace("Answer 1, 2 or 3", "")  # the answers stay on the server
    wrong = rater.request("POST", "headphones", {"answers": [1, 2]})
    assert wrong.status_code == 400 and "headphone check" in wrong.json()["error"]
    assert isinstance(rater.post("headphones", {"answers": [2] * 6})["passed"], bool)
    assert rater.request("POST", "headphones", {"answers": [2] * 6}).status_code == 400  # taken once
    assert rater.get("state")["headphone_check"] is False
    rater.post("questionnaire", {"answers": {}})
    twice = rater.request("POST", "questionnaire", {"answers": {"device": "loudspeakers"}})
    assert twice.status_code == 400 and "already answered" in twice.json()["error"]
    while (page := rater.get("page"))["stage"] == "trial":
        assert [clip["label"] for clip in page["clips"]] == ["A", "B"] and page["scale"]["minimum"] == -3
        rater.listen(page)
        assert rater.submit(page, 1).status_code == 200
    assert page["redirect_url"] == f"https://example.org/done?x=1&cc={page['code']}"


def test_a_stimulus_changed_on_disk_is_never_served_until_rebuilt(served, caplog):
    url, lab, studies = served
    definition = StudyDefinition(study_id="test-damaged", title="Damaged", test_type="acr", prompts=("white noise",),
                                 seeds=(SEED,), steps=4, seconds=0.5, conditions=("w8a8-dynamic",),
                                 headphone_check=False, questionnaire=False)
    manifest = studies.build(definition, lab.loaded, lab.quantized, progress=False)
    rater = Rater(url, "test-damaged", rater="damage-rater")
    page = rater.get("page")
    before = rater.fetch(page["clips"][0])
    shown_file = pcm(before)
    for item in manifest.items:
        for stimulus in item.stimuli:
            path = manifest.path(stimulus)
            path.write_bytes(path.read_bytes()[:100])  # truncated while the app runs
    assert rater.fetch(page["clips"][0]) == before  # served from the bytes checked against the manifest
    assert len(shown_file) > 100
    caplog.set_level(logging.ERROR, logger="lab.study.serving")
    examples = rater.get("familiarisation")["clips"]
    statuses = [rater.http.get(clip["url"], headers={"X-Rater-Token": rater.token}).status_code
                for clip in examples]
    assert 503 in statuses  # the file not read before: refused, and the study with it
    assert rater.request("GET", "page").status_code == 503
    assert any("test-damaged" in record.getMessage() and ".wav" in record.getMessage() for record in caplog.records)
    studies.build(definition, lab.loaded, lab.quantized, progress=False)  # the same build regenerates the files
    page = rater.get("page")
    assert [len(rater.fetch(clip)) for clip in page["clips"]] == [len(before)]


def test_unknown_study_links_say_so_and_reveal_nothing(served):
    url, *_ = served
    for study_id in ("no-such-study", "TEST-ACR", "x" * 80, "test-acr.bak", "..%2F..%2Fetc"):
        response = httpx.post(f"{url}api/study/{study_id}/register", json={"platform": {"rater": "r"}})
        assert response.status_code == 404 and "test-" not in response.text
        if "%" not in study_id:  # a path the router does not match gets its plain 404
            assert "not valid" in response.json()["error"]


def test_nothing_a_rater_receives_names_a_condition_the_seed_or_a_secret(served):
    url, _, studies = served
    seen = [httpx.get(url).text, httpx.get(url + "rater-static/rater.js").text]
    for study in ("test-acr", "test-mushra", "test-ab"):
        rater = Rater(url, study, rater=f"curious-{study}")
        seen.append(json.dumps(rater.skip_preliminaries()))
        seen.append(json.dumps(rater.get("familiarisation")))
        page = rater.get("page")
        seen.append(json.dumps(page))
        rater.listen(page)
        seen.append(rater.submit(page, page_scores(page)).text)
    text = "\n".join(seen).lower()
    assert [word for word in FORBIDDEN if word.lower() in text] == []
    secrets = [(studies.get(study)[0].study_dir / "secret").read_text().strip() for study in ("test-acr", "test-ab")]
    assert not any(secret.lower() in text for secret in secrets)
    config = httpx.get(url + "config")
    assert config.status_code == 404  # no Gradio app (and no Gradio secret) at the rater's address


def test_only_stimuli_are_served(served):
    url, _, studies = served
    manifest, store = studies.get("test-acr")
    store.path.touch()
    probes = ["rater-static/../app.py", "rater-static/%2e%2e/rater.py", "rater-static/..%2F..%2F..%2Fapp.py",
              f"api/study/test-acr/audio/{manifest.items[0].stimuli[0].file}", "api/study/test-acr/audio/..%2Fsecret"]
    probes += [f"{prefix}{path}" for prefix in ("admin/gradio_api/file=", "gradio_api/file=", "file=")
               for path in (store.path, manifest.study_dir / "secret", manifest.path(manifest.items[0].stimuli[0]))]
    for probe in probes:
        response = httpx.get(url + probe)
        assert response.status_code in (401, 403, 404, 405), (probe, response.status_code)
    assert httpx.get(url + "rater-static/rater.css").status_code == 200


def test_fifty_concurrent_raters_each_finish_a_page(served):
    url, _, studies = served
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        thanks = list(pool.map(lambda i: finish_study(url, "test-one-page", f"crowd-{i}", choice=1 + i % 5),
                               range(50)))
    assert all("completion code" in text for text in thanks)
    _, store = studies.get("test-one-page")
    rows = [row for row in store.read() if row["rater_id"].startswith("crowd-")]
    assert len(rows) == 50 and all(len(r) == len(COLUMNS) and None not in r.values() for r in rows)
    counts = {}
    for row in rows:
        counts[row["condition"]] = counts.get(row["condition"], 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1  # the Latin square balances conditions


def test_wav_chunks_reads_what_wav_bytes_writes():
    import numpy as np

    from lab.study.blinding import presented_copy, wav_bytes

    audio = np.linspace(-0.5, 0.5, 200, dtype=np.float32).reshape(2, 100)
    wav = wav_bytes(audio, 16000, b"\0" * 64)
    assert [chunk for chunk, _, _ in wav_chunks(wav)] == [b"fmt ", b"JUNK", b"data"]
    copy = presented_copy(wav, b"s" * 64, "rater", "page", "1")
    assert len(copy) == len(wav) and copy != wav and abs(pcm(copy) - pcm(wav)).max() <= 1
    assert copy == presented_copy(wav, b"s" * 64, "rater", "page", "1")  # the same rater gets the same bytes
    with pytest.raises(ValueError, match="runs past"):
        wav_chunks(wav[:-10])


def test_no_page_before_the_headphone_check_and_no_check_where_the_study_has_none(served):
    url, _, studies = served
    rater = Rater(url, "test-ab", rater="hurried")
    for method, path, body in (("GET", "page", None), ("GET", "familiarisation", None),
                               ("POST", "submit", {"trial_id": "x", "scores": 1})):
        refused = rater.request(method, path, body)
        assert refused.status_code == 409 and "Take the headphone check first" in refused.json()["error"], path
    rater.post("headphones", {"answers": [1] * 6})  # passed or failed, it is taken: the analysis decides
    page = rater.get("page")
    assert page["stage"] == "trial"
    no_check = Rater(url, "test-acr", rater="no-check")
    for method in ("GET", "POST"):
        response = no_check.request(method, "headphones", {"answers": [1] * 6})
        assert response.status_code == 404 and response.json()["error"] == "This study has no headphone check."
    assert no_check.get("page")["stage"] == "trial"


def test_a_spoofed_forwarded_address_does_not_escape_the_per_address_cap(served):
    url, _, studies = served
    studies.unfinished_per_client = 2
    try:
        answers = [httpx.post(f"{url}api/study/test-mushra/register", json={"platform": {"rater": f"spoof-{k}"}},
                              headers={"X-Forwarded-For": f"10.66.0.{k}"}) for k in range(3)]
    finally:
        studies.unfinished_per_client = None
    assert answers[-1].status_code == 403 and "unfinished places" in answers[-1].json()["error"]


def test_registration_takes_json_from_this_site_only(served):
    url, *_ = served
    register = f"{url}api/study/test-one-page/register"
    for content_type, body in (("text/plain", '{"platform": {}}'), ("application/x-www-form-urlencoded", "platform=x"),
                               ("multipart/form-data; boundary=x", "--x--"), (None, "")):
        headers = {"Content-Type": content_type} if content_type else {}
        refused = httpx.post(register, content=body, headers=headers)
        assert refused.status_code == 415 and "as JSON" in refused.json()["error"], content_type
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = httpx.post(register, json={"platform": {}}, headers=headers)
        assert refused.status_code == 403 and "another site" in refused.json()["error"], headers
        assert "access-control-allow-origin" not in refused.headers
    own = httpx.post(register, json={"platform": {}}, headers={"Origin": url.rstrip("/"), "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200 and own.json()["token"]


def test_request_bodies_are_bounded(served):
    url, *_ = served
    rater = Rater(url, "test-one-page", rater="verbose")
    page = rater.get("page")
    huge = rater.request("POST", "submit", {"trial_id": page["trial_id"], "scores": 3, "comment": "x" * 70_000})
    assert huge.status_code == 413 and "too large" in huge.json()["error"]
    chunked = rater.http.post("api/study/test-one-page/questionnaire", content=iter([b"{" + b" " * 40_000] * 2),
                              headers={"X-Rater-Token": rater.token, "Content-Type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted while read
    sneaked = httpx.request("GET", f"{url}api/study/test-one-page/state", content=b"[" + b"0," * 40_000 + b"0]",
                            headers={"Content-Type": "application/json"})
    assert sneaked.status_code == 413  # a GET's body is bounded too (read before the token is looked at)
    assert rater.request("POST", "submit", {"trial_id": page["trial_id"], "scores": 3, "comment": "fine"}
                         ).status_code == 400  # a normal body is read as before (here: not listened yet)
