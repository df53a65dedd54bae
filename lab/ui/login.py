"""Login throttling for the experimenter console: a password guessed by brute force gets slower, then refused.

Gradio's login route (`POST <mount>/login`, a form with `username` and `password`) answers 200 on success and 400
("Incorrect credentials.") on failure, as often and as fast as it is asked. `throttle_login` puts an ASGI
middleware in front of that one path: per client address, each failure in a row delays the next attempt (0.5 s,
doubling up to 30 s; a success resets it), each failure is one warning line in the log (address and counts, never
what was typed), and past `max_failures` failures in `window_s` the client gets 429 with a Retry-After until the
oldest failure leaves the window. An attempt counts against the limit from the moment it is let through
(pending until Gradio answers), so parallel requests cannot have more than `max_failures` passwords checked per
window. Every other request passes through untouched (no buffering of Gradio's streams). Clients with no
failure left in the window are forgotten, and at most MAX_CLIENTS are kept (the quietest go first).

The address is the one uvicorn reports: `ptq-lab` trusts no X-Forwarded-For unless told which proxy sends it
(`--forwarded-allow-ips`), so a client cannot name itself.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.ui.addresses import client_network

log = logging.getLogger(__name__)
LOGIN_FAILED = 400  # Gradio's answer to wrong credentials
LOGIN_PASSED = 200  # and to the right ones (other answers, e.g. a redirect for "login//", checked nothing)
MAX_CLIENTS = 10_000


@dataclass
class _Client:
    in_a_row: int = 0  # failures since the last success
    failures: deque[float] = field(default_factory=deque)  # times of failures inside the window
    pending: int = 0  # attempts let through whose answer has not come back yet


class LoginThrottle:
    """The ASGI middleware `throttle_login` installs (see the module docstring)."""

    def __init__(self, app, *, login_path: str, first_delay_s: float = 0.5, max_delay_s: float = 30.0,
                 max_failures: int = 10, window_s: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.login_path = login_path.rstrip("/")
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.max_failures, self.window_s = max_failures, window_s
        self.clock = clock
        self._clients: dict[str, _Client] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.login_path:
            return await self.app(scope, receive, send)
        address = client_network(scope["client"][0] if scope.get("client") else None)
        client = self._client(address)
        if retry_after := self._retry_after(client):
            return await _too_many(send, retry_after)
        status = []

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        client.pending += 1  # no await since the check above: parallel attempts see this one
        try:
            if client.in_a_row:
                await asyncio.sleep(min(self.first_delay_s * 2 ** (client.in_a_row - 1), self.max_delay_s))
            await self.app(scope, receive, send_noting_status)
        finally:
            client.pending -= 1
        if status and status[0] == LOGIN_FAILED:
            client.in_a_row += 1
            client.failures.append(self.clock())
            log.warning("console login failed from %s: %d in a row, %d in the last %.0f min", address,
                        client.in_a_row, len(client.failures), self.window_s / 60)
        elif status and status[0] == LOGIN_PASSED:  # only a checked password resets: a redirect checked nothing
            self._clients.pop(address, None)

    def _client(self, address: str) -> _Client:
        """The address's record; past MAX_CLIENTS, records with nothing in the window go first, then the oldest."""
        if address not in self._clients and len(self._clients) >= MAX_CLIENTS:
            now = self.clock()
            for other, client in list(self._clients.items()):
                if not client.pending and not any(t > now - self.window_s for t in client.failures):
                    del self._clients[other]
            while len(self._clients) >= MAX_CLIENTS:
                del self._clients[next(iter(self._clients))]
        return self._clients.setdefault(address, _Client())

    def _retry_after(self, client: _Client) -> int:
        """Seconds until `client` may try again (0: now), the window's old failures forgotten; attempts still
        waiting for their answer count as failures."""
        now = self.clock()
        while client.failures and client.failures[0] <= now - self.window_s:
            client.failures.popleft()
        if len(client.failures) + client.pending < self.max_failures:
            return 0
        if not client.failures:
            return max(1, math.ceil(self.first_delay_s))  # the limit is all pending: ask again once they answer
        return max(1, math.ceil(client.failures[0] + self.window_s - now))


async def _too_many(send, retry_after: int) -> None:
    body = json.dumps({"detail": f"Too many failed logins from your address: try again in {retry_after} s."}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry_after).encode())]})
    await send({"type": "http.response.body", "body": body})


def throttle_login(app, login_path: str = "/admin/login", **options) -> None:
    """Throttle failed logins at `login_path` of the FastAPI/Starlette `app` (before it starts serving);
    `options`: LoginThrottle's delays, failure limit and window."""
    app.add_middleware(LoginThrottle, login_path=login_path, **options)
