"""The whole server (console at /admin, listening test at /) on a free local port, run by uvicorn as `ptq-lab`
runs it (app.uvicorn_options), over a tiny model and a few small built studies (built once for the package's
tests), and a rater that drives the page's JSON API."""
import argparse
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

import app
from lab.comparison import build_lab
from lab.settings import Settings
from lab.study import StudyDefinition
from lab.study.registry import Studies
from lab.study.serving import SERVED_LOG

PASSWORD = "test-password"
SEED = 918273  # unusual on purpose: no rater-visible response may contain it
STUDIES = {  # the headphone check and questionnaire where they are tested (ab), not where they are not the point
    "acr": dict(test_type="acr", conditions=("w8a8-dynamic", "w4a8-dynamic"), headphone_check=False),
    "mushra": dict(test_type="mushra", conditions=("w8a8-dynamic", "w4a8-dynamic"), headphone_check=False,
                   questionnaire=False),
    "ab": dict(test_type="ab", conditions=("w8a8-dynamic",), completion_url="https://example.org/done?x=1"),
    "one-page": dict(test_type="acr", conditions=("w8a8-dynamic",), trials_per_rater=1, headphone_check=False,
                     questionnaire=False),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(lab, studies, password=PASSWORD):
    """Run app.build_server under uvicorn in a thread; yields the base URL (ending in /)."""
    port = free_port()
    options = app.uvicorn_options(argparse.Namespace(host="127.0.0.1", port=port, forwarded_allow_ips=None))
    server = uvicorn.Server(uvicorn.Config(app.build_server(lab, studies, admin_password=password), **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def build_studies(lab, root, prompts=("white noise", "sine tone at a4"), steps=4, seconds=0.5) -> Studies:
    studies = Studies(root, registrations_per_client=1000, unfinished_per_client=None)  # all from 127.0.0.1
    for name, spec in STUDIES.items():
        definition = StudyDefinition(study_id=f"test-{name}", title=f"Test {name}", prompts=prompts, seeds=(SEED,),
                                     steps=steps, seconds=seconds, **spec)
        studies.build(definition, lab.loaded, lab.quantized, progress=False)
    return studies


@pytest.fixture(scope="package")
def served(tiny_audio_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "prompts.txt").write_text("sine tone at a4\nwhite noise\n")
    settings = Settings(cache_dir=root / "cache", output_dir=root / "out", calibration_prompts=root / "prompts.txt",
                        calibration_steps=4, max_quantized_models=2, studies_dir=root / "studies")
    config_path, ckpt_path = tiny_audio_files
    lab = build_lab(settings, model_config=config_path, ckpt_path=ckpt_path)
    studies = build_studies(lab, settings.studies_dir)
    with serving(lab, studies) as url:
        yield url, lab, studies


class Rater:
    """One rater of one study through the JSON API, as the page drives it: register, fetch, rate."""

    def __init__(self, url: str, study_id: str, token: str | None = None, **platform):
        self.http = httpx.Client(base_url=url, timeout=60)
        self.study_id = study_id
        self.token = token
        if token is None:
            self.token = self.post("register", {"platform": platform})["token"]

    def request(self, method: str, path: str, body=None, token: str | None = None) -> httpx.Response:
        headers = {"X-Rater-Token": token or self.token} if (token or self.token) else {}
        return self.http.request(method, f"api/study/{self.study_id}/{path}", json=body, headers=headers)

    def get(self, path: str) -> dict:
        response = self.request("GET", path)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body) -> dict:
        response = self.request("POST", path, body)
        assert response.status_code == 200, response.text
        return response.json()

    def fetch(self, clip: dict) -> bytes:
        """Download one clip whole, as the page does (the server counts it as streamed)."""
        response = self.http.get(clip["url"], headers={"X-Rater-Token": self.token})
        assert response.status_code == 200, response.text
        return response.content

    def listen(self, page: dict) -> dict[str, bytes]:
        """Fetch every clip of a page and wait out its listening time (counted from when the page was shown)."""
        shown = time.monotonic()
        clips = {clip["label"]: self.fetch(clip) for clip in page["clips"]}
        time.sleep(max(0.0, page["listening_seconds"] - (time.monotonic() - shown)) + 0.05)
        return clips

    def submit(self, page: dict, scores, plays=None, comment="") -> httpx.Response:
        plays = {clip["label"]: 1 for clip in page["clips"]} if plays is None else plays
        return self.request("POST", "submit", {"trial_id": page["trial_id"], "scores": scores, "plays": plays,
                                               "comment": comment})

    def skip_preliminaries(self) -> dict:
        """Answer the headphone check (whatever the answers) and skip the questionnaire; return the state."""
        state = self.get("state")
        if state["headphone_check"]:
            self.post("headphones", {"answers": [1] * len(self.get("headphones")["trials"])})
        if state["questionnaire"]:
            self.post("questionnaire", {"answers": {}})
        return state


def page_scores(page: dict, choice=3, slider=50):
    """Valid answers to a page: MUSHRA every slider at `slider` but the first at 100 (BS.1534 asks for one)."""
    if page["test_type"] != "mushra":
        return choice
    return {label: 100 if index == 0 else slider for index, label in enumerate(page["rated"])}


def finish_study(url: str, study_id: str, rater_id: str, choice=3, slider=50) -> str:
    """A rater through the JSON API from the link to the completion page; returns its message."""
    rater = Rater(url, study_id, rater=rater_id)
    rater.skip_preliminaries()
    while (page := rater.get("page"))["stage"] == "trial":
        rater.listen(page)
        for _ in range(40):  # the server counts a clip once its response has ended, a moment after the client has it
            response = rater.submit(page, page_scores(page, choice, slider))
            if response.status_code != 400 or "Listen to every clip" not in response.text:
                break
            time.sleep(0.25)
        assert response.status_code == 200, response.text
    return page["message"]


def wait_streamed(study_dir, rater_id: str, page: dict, labels=None, timeout: float = 30.0) -> None:
    """Wait until the served log has a complete transfer of each of `labels` (default: every clip of `page`)
    to `rater_id`: the server logs and counts a clip when its response ends, just after the client has it."""
    labels = {clip["label"] for clip in page["clips"]} if labels is None else set(labels)
    log = Path(study_dir) / SERVED_LOG
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        done = {e["label"] for e in entries if e["rater"] == rater_id and e["page"] == page["trial_id"]
                and e["complete"]}
        if labels <= done:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not log {sorted(labels)} as sent to {rater_id}")
