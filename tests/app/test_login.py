"""Console login throttling (lab.ui.login) on a real server: Gradio's own login route behind `throttle_login`, a
brute force from one address slowed then refused, the right password still working for another address."""
import contextlib
import subprocess
import sys
import time

import gradio as gr
import httpx
import pytest
from fastapi import FastAPI

from lab.resources import ROOT
from lab.ui.login import throttle_login
from tests.app.conftest import free_port

PASSWORD = "right-password"
MAX_FAILURES = 5


def console_app():
    """A console-like Gradio app at /admin behind a login, throttled with short delays (uvicorn's app factory)."""
    server = FastAPI()
    with gr.Blocks() as blocks:
        gr.Markdown("console")
    gr.mount_gradio_app(server, blocks, path="/admin", auth=("admin", PASSWORD))
    throttle_login(server, "/admin/login", first_delay_s=0.01, max_delay_s=0.04, max_failures=MAX_FAILURES)
    return server


def login(url: str, password: str, client: str) -> httpx.Response:
    """POST the login form as the browser does, from `client` (uvicorn trusts X-Forwarded-For from 127.0.0.1)."""
    return httpx.post(url + "admin/login", data={"username": "admin", "password": password},
                      headers={"X-Forwarded-For": client}, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, its log file): uvicorn serving `console_app` in a process of its own, as `ptq-lab` serves the
    console."""
    port, log = free_port(), tmp_path_factory.mktemp("login") / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "tests.app.test_login:console_app",
                                   "--port", str(port), "--log-level", "warning"], cwd=ROOT, stderr=log_file)
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/admin/", timeout=1)
                break
            assert server.poll() is None, "the test server stopped"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_brute_force_is_refused_and_logged_without_the_password(served):
    url, log = served
    answers = [login(url, f"guess-{i}", "10.0.0.66") for i in range(20)]
    statuses = [answer.status_code for answer in answers]
    assert statuses == [400] * MAX_FAILURES + [429] * (20 - MAX_FAILURES)
    assert int(answers[-1].headers["retry-after"]) > 0 and "try again in" in answers[-1].json()["detail"]
    assert login(url, PASSWORD, "10.0.0.66").status_code == 429  # even the right password waits its turn
    failures = [line for line in log.read_text().splitlines() if "console login failed" in line]
    assert len(failures) == MAX_FAILURES and "10.0.0.66" in failures[-1] and f"{MAX_FAILURES} in a row" in failures[-1]
    assert "guess-" not in log.read_text()


def test_another_address_still_logs_in_and_a_success_forgets_earlier_failures(served):
    url, _ = served
    assert login(url, "wrong", "10.0.0.77").status_code == 400
    answer = login(url, PASSWORD, "10.0.0.77")
    assert answer.status_code == 200 and answer.json() == {"success": True}
    assert all(login(url, "wrong", "10.0.0.77").status_code == 400 for _ in range(MAX_FAILURES))
    assert login(url, "wrong", "10.0.0.77").status_code == 429
