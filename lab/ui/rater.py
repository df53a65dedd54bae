"""The rater's side of a study: a plain HTML/JS page (lab/ui/static) over a small JSON API under /api/study/.

Everything that decides what a rater hears stays on the server. A rater registers once per study through
`Studies.register` and gets a signed token, which the page keeps in local storage and sends with every call
(header `X-Rater-Token`); without it nothing answers, so a link's `?rater=` alone cannot act as someone else.
The page receives prompts, blind labels and per-rater audio URLs only (lab.study.serving); the server
records when it showed each page and which clips were written to the rater's connection in full, and the
ratings store refuses a page before every clip has streamed and its listening time has passed. A study with a
headphone check shows no page before the check's result is stored.

Registration is the one call without a token, so it is the one a hostile web page could make from a
visitor's browser: it takes only `Content-Type: application/json` (a form or text body, which a page of
another site may send without asking, gets 415) and refuses requests another site started (an `Origin`
other than this server's host, or `Sec-Fetch-Site: cross-site`: 403). Every body under /api/study/ is
bounded (MAX_BODY_BYTES, 413).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lab.study import Trial, headphones
from lab.study.blinding import rater_rng
from lab.study.definition import HIDDEN_REFERENCE
from lab.study.headphones import score_headphone_check
from lab.study.manifest import Manifest, StudyError
from lab.study.raters import QUESTIONNAIRE, RaterRefused, Registration, rater_record, record_questionnaire
from lab.study.registry import Studies
from lab.study.serving import AudioServer, Clip, StudyUnavailable
from lab.ui.addresses import client_network

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
TOKEN_HEADER = "X-Rater-Token"
PLATFORM_KEYS = ("rater", "PROLIFIC_PID", "STUDY_ID", "SESSION_ID")
MAX_PLATFORM_CHARS = 200
FAMILIARISATION = "familiarisation"
MAX_EXAMPLES = 8  # clips on the familiarisation page
TYPE_NAMES = {"acr": "Rate each clip", "ab": "Compare two clips", "mushra": "Rate clips against a reference"}
NO_TOKEN = "Open the study link you were given to start (this browser has not joined the study)."
PAGE_SECURITY = {"Content-Security-Policy": "default-src 'self'; img-src 'self'; media-src 'self' blob:; "
                                            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                 "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
AUDIO_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
MAX_BODY_BYTES = 64 * 1024  # a page's ratings and comment are a few kB
API_PREFIX = "/api/study/"
NO_HEADPHONE_CHECK = "This study has no headphone check."
TAKE_HEADPHONE_CHECK = "Take the headphone check first: it comes before the rating pages."
JSON_BODY = Body(None)  # any JSON: the handlers check its shape and answer in words, not a validation dump
RATER_TOKEN = Header(None, alias=TOKEN_HEADER)


class ApiError(Exception):
    """A refused request: HTTP status and a message for the rater."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def answered(handler):
    """Turn ApiError, a study that cannot be served and a rater's mistake (ValueError) into JSON errors."""
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except ApiError as err:
            return JSONResponse({"error": err.message}, status_code=err.status)
        except StudyUnavailable as err:
            return JSONResponse({"error": str(err)}, status_code=503)
        except RaterRefused as err:
            return JSONResponse({"error": str(err)}, status_code=403)
        except StudyError as err:
            return JSONResponse({"error": str(err)}, status_code=404)
        except ValueError as err:  # the store's and the questionnaire's words for the rater
            log.info("rater request refused: %s", err)
            return JSONResponse({"error": str(err)}, status_code=400)
    return wrapper


def scale_view(trial: Trial) -> dict:
    """The scale as the page draws it: its range, its labelled points and, for MUSHRA, the bands between them
    (80-100 Excellent, 60-80 Good, ...), so labels read as ranges, not points."""
    scale = trial.scale
    labels = sorted(scale.labels)
    bands = [] if scale.integer else [
        (labels[i - 1][0] if i else scale.minimum, value, words) for i, (value, words) in enumerate(labels)]
    return {"minimum": scale.minimum, "maximum": scale.maximum, "integer": scale.integer,
            "labels": [list(label) for label in labels], "bands": [list(band) for band in bands],
            "question": scale.question}


class RaterApi:
    """The handlers behind the rater's page, over the studies of one app."""

    def __init__(self, studies: Studies):
        self.studies = studies
        self.audio = AudioServer()
        self._shown: dict[tuple[str, str, str], float] = {}  # (study, rater, trial) -> when first shown
        self._lock = threading.Lock()

    def study(self, study_id: str):
        manifest, store = self.studies.get(study_id)  # StudyError: the same words for every unknown id
        self.audio.check_available(manifest)
        return manifest, store

    def rater(self, study_id: str, token: str | None) -> Registration:
        if not token:
            raise ApiError(401, NO_TOKEN)
        return self.studies.resume(study_id, token)  # RaterRefused: forged, unknown or expired

    def require_headphone_result(self, manifest: Manifest, registration: Registration) -> None:
        """409 until the rater's headphone check is scored, in a study that has one."""
        if manifest.definition.headphone_check and \
                rater_record(manifest.study_dir, registration.rater_id).get("headphone_check") is None:
            raise ApiError(409, TAKE_HEADPHONE_CHECK)

    def with_headphone_check(self, study_id: str) -> Manifest:
        manifest, _ = self.study(study_id)
        if not manifest.definition.headphone_check:
            raise ApiError(404, NO_HEADPHONE_CHECK)
        return manifest

    def register(self, study_id: str, body: Any, client: str) -> dict:
        self.study(study_id)
        given = body.get("platform", {}) if isinstance(body, Mapping) else {}
        platform = {key: " ".join(str(given[key]).split())[:MAX_PLATFORM_CHARS] for key in PLATFORM_KEYS
                    if isinstance(given, Mapping) and isinstance(given.get(key), (str, int)) and str(given[key]).strip()}
        registration = self.studies.register(study_id, platform=platform, client=client)
        return {"token": registration.token, "participant": registration.platform_id or registration.rater_id}

    def state(self, study_id: str, registration: Registration) -> dict:
        """What the welcome page says, and which of the optional steps this rater still has before the trials."""
        manifest, store = self.study(study_id)
        definition = manifest.definition
        progress = store.progress(registration.rater_id)
        record = rater_record(manifest.study_dir, registration.rater_id)
        return {"title": definition.title, "task": TYPE_NAMES[definition.test_type], "test_type": definition.test_type,
                "instructions": definition.instructions or "Listen carefully, with headphones.",
                "participant": registration.platform_id or registration.rater_id,
                "done": len(progress.done), "total": progress.total,
                "headphone_check": bool(definition.headphone_check and record.get("headphone_check") is None),
                "questionnaire": ({field: list(choices) for field, choices in QUESTIONNAIRE.items()}
                                  if definition.questionnaire and record.get("questionnaire") is None else None)}

    def clip_view(self, manifest: Manifest, clip: Clip) -> dict:
        token = self.audio.issue(manifest, clip)
        return {"label": clip.label, "url": f"api/study/{manifest.study_id}/audio/{token}"}

    def familiarisation(self, study_id: str, registration: Registration) -> dict:
        """Every stimulus of the first item but the hidden reference, in an order only the server can derive."""
        manifest, _ = self.study(study_id)
        self.require_headphone_result(manifest, registration)
        stimuli = [s for s in manifest.items[0].stimuli if s.condition != HIDDEN_REFERENCE]
        rater_rng(manifest.secret(), FAMILIARISATION, registration.rater_id).shuffle(stimuli)
        clips = [Clip(manifest.study_id, registration.rater_id, FAMILIARISATION, f"Example {index}", s.condition,
                      file=s.file) for index, s in enumerate(stimuli[:MAX_EXAMPLES], start=1)]
        return {"clips": [self.clip_view(manifest, clip) for clip in clips]}

    def page(self, study_id: str, registration: Registration) -> dict:
        """The first unrated page (recording when it was first shown), or the completion code."""
        manifest, store = self.study(study_id)
        self.require_headphone_result(manifest, registration)
        rater_id = registration.rater_id
        remaining = store.progress(rater_id).remaining
        if not remaining:
            completion = self.studies.completion(manifest.study_id, rater_id)
            return {"stage": "done", "code": completion.code, "redirect_url": completion.redirect_url,
                    "message": f"You have rated every page. Your completion code is {completion.code}."}
        trial = remaining[0]
        with self._lock:
            self._shown.setdefault((manifest.study_id, rater_id, trial.trial_id), self.studies.clock())
        clips = [self.clip_view(manifest, Clip(manifest.study_id, rater_id, trial.trial_id, s.label, s.condition,
                                               file=s.file)) for s in trial.stimuli]
        return {"stage": "trial", "trial_id": trial.trial_id, "number": trial.index + 1, "total": trial.total,
                "test_type": trial.test_type, "prompt": trial.prompt, "instructions": trial.instructions,
                "clips": clips, "rated": [s.label for s in trial.rated], "scale": scale_view(trial),
                "listening_seconds": round(store.listening_seconds(trial), 3)}

    def submit(self, study_id: str, registration: Registration, token: str, body: Any) -> dict:
        manifest, store = self.study(study_id)
        self.require_headphone_result(manifest, registration)
        body = body if isinstance(body, Mapping) else {}
        rater_id = registration.rater_id
        trial_id = str(body.get("trial_id") or "")
        shown = self._shown.get((manifest.study_id, rater_id, trial_id))  # only the rater's own pages were shown
        if shown is None:
            raise ApiError(409, "This page is not the one on your screen: reload the page to continue.")
        plays = body.get("plays") if isinstance(body.get("plays"), Mapping) else {}
        submission = store.submit(trial_id, rater_id, body.get("scores"), dict(plays), presented_at=shown,
                                  session_id=hashlib.sha256(token.encode()).hexdigest()[:12],
                                  comment=str(body.get("comment") or ""),
                                  streamed=self.audio.streamed(manifest.study_id, rater_id, trial_id))
        return {"message": submission.message or ""}

    def headphones(self, study_id: str, registration: Registration) -> dict:
        manifest = self.with_headphone_check(study_id)
        rater_id = registration.rater_id
        trials = []
        for index in range(headphones.TRIALS):  # the sounds are made when fetched (deterministic, not kept)
            intervals = [self.clip_view(manifest, Clip(
                manifest.study_id, rater_id, f"headphones-{index}", str(number), "headphone-check",
                generate=functools.partial(headphones.headphone_interval, manifest, rater_id, index, number - 1)))
                for number in range(1, headphones.INTERVALS + 1)]
            trials.append({"index": index, "question": headphones.QUESTION, "intervals": intervals})
        return {"trials": trials}

    def answer_headphones(self, study_id: str, registration: Registration, body: Any) -> dict:
        manifest = self.with_headphone_check(study_id)
        answers = body.get("answers") if isinstance(body, Mapping) else None
        if not isinstance(answers, list):
            raise ApiError(400, "Answer every question of the headphone check.")
        result = score_headphone_check(manifest, registration.rater_id, answers)
        return {"passed": result.passed}

    def questionnaire(self, study_id: str, registration: Registration, body: Any) -> dict:
        manifest, _ = self.study(study_id)
        answers = body.get("answers") if isinstance(body, Mapping) else None
        if not isinstance(answers, Mapping):
            raise ApiError(400, "Send the questionnaire's answers, or skip it.")
        record_questionnaire(manifest.study_dir, registration.rater_id,
                             {str(key): str(value) for key, value in answers.items()})
        return {}

    def audio_response(self, study_id: str, registration: Registration, token: str):
        """One clip, streamed; the same headers for every clip of a study (no ETag, no Last-Modified)."""
        manifest, _ = self.study(study_id)
        clip = self.audio.clip(manifest.study_id, registration.rater_id, token)
        if clip is None:
            raise ApiError(404, "Not found.")
        body = self.audio.body(manifest, clip)
        return StreamingResponse(self.audio.stream(manifest, clip, body), media_type="audio/wav",
                                 headers={**AUDIO_HEADERS, "Content-Length": str(len(body))})


def refuse_foreign_request(request: Request) -> None:
    """ApiError unless the request is JSON and was started by a page of this server (see the module docstring)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "Send the registration as JSON (Content-Type: application/json).")
    origin = request.headers.get("origin")
    if request.headers.get("sec-fetch-site") == "cross-site" or (
            origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()):
        raise ApiError(403, "Open the study from its own link: registration from another site is refused.")


class BodyLimit:
    """ASGI middleware: a request body under /api/study/ over `max_bytes` gets 413 before any handler reads it
    (by its Content-Length, or while a chunked body is read)."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):  # every method: a GET may carry one
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        response = JSONResponse({"error": f"The request is too large (at most {self.max_bytes // 1024} kB)."},
                                status_code=413)
        await response(scope, receive, send)


def build_rater_router(studies: Studies) -> APIRouter:
    """The page at / and its API; every call but registration needs the rater's token."""
    api = RaterApi(studies)
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page_html():
        return FileResponse(STATIC_DIR / "rater.html", headers=PAGE_SECURITY)

    @router.post("/api/study/{study_id}/register")
    @answered
    def register(study_id: str, request: Request, body: Any = JSON_BODY):
        refuse_foreign_request(request)
        return api.register(study_id, body, client_network(request.client.host if request.client else None))

    def with_rater(name: str, method: str, call):
        @answered
        def endpoint(study_id: str, token: str | None = RATER_TOKEN, body: Any = JSON_BODY):
            return call(study_id, api.rater(study_id, token), token, body)
        router.add_api_route(f"/api/study/{{study_id}}/{name}", endpoint, methods=[method])

    with_rater("state", "GET", lambda study, reg, token, body: api.state(study, reg))
    with_rater("familiarisation", "GET", lambda study, reg, token, body: api.familiarisation(study, reg))
    with_rater("page", "GET", lambda study, reg, token, body: api.page(study, reg))
    with_rater("submit", "POST", api.submit)
    with_rater("headphones", "GET", lambda study, reg, token, body: api.headphones(study, reg))
    with_rater("headphones", "POST", lambda study, reg, token, body: api.answer_headphones(study, reg, body))
    with_rater("questionnaire", "POST", lambda study, reg, token, body: api.questionnaire(study, reg, body))

    @router.get("/api/study/{study_id}/audio/{clip_token}")
    @answered
    def audio(study_id: str, clip_token: str, token: str | None = RATER_TOKEN):
        return api.audio_response(study_id, api.rater(study_id, token), clip_token)

    return router


def mount_rater(server: FastAPI, studies: Studies) -> None:
    """The rater's page, its static files and its API on `server` (at the root)."""
    server.include_router(build_rater_router(studies))
    server.add_middleware(BodyLimit)
    server.mount("/rater-static", StaticFiles(directory=STATIC_DIR), name="rater-static")

    @server.exception_handler(RequestValidationError)
    async def not_json(request: Request, err: RequestValidationError):
        """A body that is not JSON: one sentence, not a validation dump."""
        return JSONResponse({"error": "Send the request body as JSON."}, status_code=400)
