"""Console login throttling (lab.ui.login) on a real server: Gradio's own login route behind `throttle_login`, a
brute force from one address slowed then refused (in parallel too), the right password still working for another
address; and which client address uvicorn reports, as `ptq-lab` runs it, with and without a trusted proxy."""
import concurrent.futures
import contextlib
import subprocess
import sys
import threading
import time

import gradio as gr
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

import app
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
    """POST the login form as the browser does, from `client` (the test server trusts X-Forwarded-For from
    127.0.0.1, as `ptq-lab --forwarded-allow-ips 127.0.0.1` behind a proxy on the same host does)."""
    return httpx.post(url + "admin/login", data={"username": "admin", "password": password},
                      headers={"X-Forwarded-For": client}, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, its log file): uvicorn serving `console_app` in a process of its own, as `ptq-lab` serves the
    console."""
    port, log = free_port(), tmp_path_factory.mktemp("login") / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "tests.app.test_login:console_app",
                                   "--port", str(port), "--log-level", "warning",
                                   "--forwarded-allow-ips", "127.0.0.1"], cwd=ROOT, stderr=log_file)
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


def test_parallel_guesses_get_no_more_checks_than_the_limit(served):
    url, _ = served
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda k: login(url, f"parallel-{k}", "10.0.0.88").status_code, range(40)))
    assert statuses.count(400) == MAX_FAILURES and statuses.count(429) == 40 - MAX_FAILURES


def test_a_redirect_from_the_login_route_does_not_reset_the_count(served):
    """Gradio answers `login//` with a redirect, checking no password: only a right password forgets failures."""
    url, _ = served
    statuses = []
    for k in range(MAX_FAILURES + 1):
        statuses.append(login(url, f"slash-{k}", "10.0.0.99").status_code)
        httpx.post(url + "admin/login//", data={"username": "admin", "password": "x"},
                   headers={"X-Forwarded-For": "10.0.0.99"}, timeout=30)
    assert 429 in statuses and statuses.count(400) <= MAX_FAILURES


def test_ipv6_clients_count_by_their_network():
    from lab.ui.addresses import client_network

    assert client_network("2001:db8:1:2::5") == client_network("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_network("2001:db8:1:3::5") != client_network("2001:db8:1:2::5")
    assert client_network("::ffff:10.0.0.7") == client_network("10.0.0.7") == "10.0.0.7"
    assert client_network("") == "unknown" and client_network("testclient") == "testclient"


def reported_address(argv: list[str]) -> str:
    """The client address a request claiming X-Forwarded-For 203.0.113.5 gets, under uvicorn configured as
    `ptq-lab` with `argv` configures it."""
    async def echo(scope, receive, send):
        if scope["type"] != "http":
            return
        body = scope["client"][0].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(echo, **{**app.uvicorn_options(app.parse_args(argv)), "port": port}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the test server stopped"
            time.sleep(0.02)
        return httpx.get(f"http://127.0.0.1:{port}/", headers={"X-Forwarded-For": "203.0.113.5"}).text
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_forwarded_address_counts_only_from_a_named_proxy(monkeypatch):
    monkeypatch.delenv("LAB_FORWARDED_ALLOW_IPS", raising=False)
    assert reported_address([]) == "127.0.0.1"  # a program on the same host cannot choose its address
    assert reported_address(["--forwarded-allow-ips", "10.9.9.9"]) == "127.0.0.1"  # not that proxy
    assert reported_address(["--forwarded-allow-ips", "127.0.0.1"]) == "203.0.113.5"
    monkeypatch.setenv("LAB_FORWARDED_ALLOW_IPS", "127.0.0.1")
    assert app.parse_args([]).forwarded_allow_ips == "127.0.0.1"


def test_the_throttle_forgets_quiet_addresses(monkeypatch):
    """Many addresses, one failure each: the table keeps at most MAX_CLIENTS, the ones with failures in the window."""
    import asyncio

    from lab.ui import login as login_module

    monkeypatch.setattr(login_module, "MAX_CLIENTS", 3)
    now = [0.0]

    async def wrong_password(scope, receive, send):
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop(message):
        return None

    throttle = login_module.LoginThrottle(wrong_password, login_path="/admin/login", first_delay_s=0,
                                          window_s=60, clock=lambda: now[0])

    async def attempts():
        for index in range(10):
            now[0] = index * 30.0  # two failures per window
            scope = {"type": "http", "method": "POST", "path": "/admin/login", "client": (f"10.3.0.{index}", 1)}
            await throttle(scope, None, noop)

    asyncio.run(attempts())
    assert list(throttle._clients) == ["10.3.0.8", "10.3.0.9"]
