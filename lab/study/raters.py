"""Who rates a study: registration with a signed token, design slots that survive dropouts, and what is
known about each rater (platform ids, headphone check, questionnaire, when they finished).

Why it works this way:
- a rater id in a link proves nothing, so registration returns a token (the rater id plus its HMAC under the
  study secret) and everything after registration needs it; a platform id (Prolific's PROLIFIC_PID, else
  `rater`) is bound to its first registration, so a second browser cannot take over someone's ratings.
  Platform ids are compared after NFKC normalisation and case folding (`Bob`, `bob` and a fullwidth `Ｂob` are
  one participant) and may not hold control or invisible format characters (`Bob` plus a zero-width space is
  refused); look-alike letters of other scripts (a Cyrillic `о` in `Bob`) are not caught, which is why a study
  with money at stake should take ids the platform issues. `release` lets the experimenter free an id someone
  else took first;
- one client address holds at most `Slots.unfinished_per_client` live unfinished registrations of a study, so
  one machine cannot fill the study's cap (the address is kept as a keyed hash, never in clear);
- the Latin square gives slot k the k-th block of the design, and balance holds over any prefix of slots.
  Crowd raters drop out, so a slot whose rater has not finished `abandon_minutes` after registering is
  released and given to the next arrival (lowest slot first): the raters who finish keep filling a prefix of
  the slots, which keeps every condition within one of the others among them;
- `raters.json` is changed under a thread lock plus an advisory file lock and replaced atomically, so many
  browser tabs (threads) and app workers (processes) get distinct slots and readers never see half a file.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lab.study.blinding import digest
from lab.study.manifest import RATERS_FILE

MAX_RATER_ID_CHARS = 64
LOCK_FILE = ".raters.lock"
PLATFORM_KEYS = ("rater", "PROLIFIC_PID", "STUDY_ID", "SESSION_ID")  # link parameters a platform may send
ID_KEYS = ("PROLIFIC_PID", "rater")  # the first present names the rater
QUESTIONNAIRE: dict[str, tuple[str, ...]] = {
    "device": ("headphones", "earbuds", "loudspeakers", "laptop or phone speakers", "other"),
    "hearing": ("normal", "some difficulty", "hearing loss", "prefer not to say"),
    "experience": ("none", "some (musician, audio hobby)", "professional (audio work, trained listener)"),
}
ALREADY_STARTED = ("You have already started this study: continue in the browser where you started (your page "
                   "there keeps your place). If you cannot, contact the researcher.")
EXPIRED = ("This session has expired: it was not finished in time, and your place went to another participant. "
           "Return the study on your platform, or contact the researcher.")
INVALID_TOKEN = "This study link is not valid for you: open the study again from the link you were given."
TOO_MANY_UNFINISHED = ("Your network already has unfinished places in this study: finish (or return) those "
                       "first, then try again.")
PROLIFIC_PID = re.compile(r"[0-9a-fA-F]{24}")
INVISIBLE = ("Cc", "Cf")  # Unicode control and format characters (zero-width spaces, direction marks)
BLANK = re.compile(  # Unicode's Default_Ignorable_Code_Point characters and blank fillers outside Cc/Cf
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
RELEASED_HERE = ("This participant id was released by the researcher and cannot be taken again from the same "
                 "network: contact the researcher.")
ANSWERED = "You have already answered the questionnaire."
_lock = threading.Lock()
T = TypeVar("T")


class RaterRefused(ValueError):
    """A registration or a rater's request is refused; the message is for the rater."""


@dataclass(frozen=True)
class Registration:
    rater_id: str
    token: str  # needed for everything after registration
    platform_id: str | None  # PROLIFIC_PID or `rater` from the link; None for an anonymous rater


@dataclass(frozen=True)
class Slots:
    """How long a slot is held and how many may be held at once (from the study definition)."""
    abandon_s: float
    max_raters: int | None = None
    unfinished_per_client: int | None = None  # live unfinished registrations one client address may hold


def clean_rater_id(rater_id: object) -> str:
    """A rater id as stored: trimmed, one line, bounded; ValueError with a message the rater can act on."""
    text = " ".join(str(rater_id or "").split())
    if not text:
        raise ValueError("Enter your participant id to start.")
    if BLANK.search(text) or any(unicodedata.category(char) in INVISIBLE for char in text):
        raise ValueError("Your participant id contains invisible or control characters: type it again, or copy "
                         "it from your platform without anything around it.")
    if len(text) > MAX_RATER_ID_CHARS:
        raise ValueError(f"Your participant id is {len(text)} characters long; at most {MAX_RATER_ID_CHARS}.")
    return text


def identity(platform_id: str) -> str:
    """What two platform ids must share to be the same participant: NFKC-normalised and case-folded."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", platform_id).casefold())


def token_for(secret: bytes, rater_id: str) -> str:
    """The rater id (URL-safe base64) and its HMAC: whoever holds it is that rater."""
    encoded = base64.urlsafe_b64encode(rater_id.encode()).decode().rstrip("=")
    return f"{encoded}.{digest(secret, 'token', rater_id).hex()[:32]}"


def rater_of_token(secret: bytes, token: object) -> str:
    """The rater id a token was signed for; RaterRefused when it is malformed or forged."""
    encoded, _, signature = str(token or "").partition(".")
    try:
        rater_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise RaterRefused(INVALID_TOKEN) from None
    if not rater_id or not hmac.compare_digest(token_for(secret, rater_id), f"{encoded}.{signature}"):
        raise RaterRefused(INVALID_TOKEN)
    return rater_id


def register(study_dir: str | Path, secret: bytes, platform: Mapping[str, str], slots: Slots,
             now: float, client: str = "") -> Registration:
    """A new rater with the lowest free slot; RaterRefused when the platform id is known, the study full or
    `client` holds too many unfinished places; ValueError when an id is malformed."""
    fields = {key: clean_rater_id(platform[key]) for key in PLATFORM_KEYS if str(platform.get(key) or "").strip()}
    if "PROLIFIC_PID" in fields and not PROLIFIC_PID.fullmatch(fields["PROLIFIC_PID"]):
        raise ValueError("Your Prolific id should be 24 letters and digits (0-9, a-f): open the study from its "
                         "Prolific link, or copy the id from your Prolific account.")
    platform_id = next((fields[key] for key in ID_KEYS if key in fields), None)
    client_key = digest(secret, "client", client).hex()[:16]

    def add(records: dict) -> str:
        if platform_id is not None:
            same = [record for record in records.values() if not record.get("withdrawn")
                    and record["platform_id"] is not None and identity(record["platform_id"]) == identity(platform_id)]
            if same:
                raise RaterRefused(EXPIRED if _expired(same[0], slots, now) else ALREADY_STARTED)
            if any(record.get("withdrawn") and record.get("client") == client_key and record["platform_id"] is not None
                   and identity(record["platform_id"]) == identity(platform_id) for record in records.values()):
                raise RaterRefused(RELEASED_HERE)  # the squatter the release was for: the id is for someone else
        if slots.unfinished_per_client is not None and sum(
                record.get("client") == client_key and record["finished_at"] is None and not _expired(record, slots, now)
                for record in records.values()) >= slots.unfinished_per_client:
            raise RaterRefused(TOO_MANY_UNFINISHED)
        rater_id = _new_rater_id(records, platform_id)
        records[rater_id] = {"slot": _free_slot(records, slots, now), "registered_at": now, "platform_id": platform_id,
                             "platform": fields, "client": client_key, "finished_at": None, "released": False,
                             "headphone_check": None, "questionnaire": None}
        return rater_id

    rater_id = _update(study_dir, add)
    return Registration(rater_id, token_for(secret, rater_id), platform_id)


def _new_rater_id(records: dict, platform_id: str | None) -> str:
    """The platform id itself, or with a suffix when an experimenter released an earlier holder of it (whose
    rows keep the plain id); a random id for an anonymous rater."""
    if platform_id is None:
        return f"anon-{secrets.token_hex(8)}"
    taken = {identity(rater_id) for rater_id in records}
    base = platform_id[:MAX_RATER_ID_CHARS - 4]
    return next(candidate for candidate in [platform_id] + [f"{base}~{n}" for n in range(2, 1000)]
                if identity(candidate) not in taken)


def release(study_dir: str | Path, rater_id: str, now: float) -> dict:
    """Withdraw a registration (the experimenter's decision, e.g. someone registered another person's id first):
    its token stops working, its platform id may register again (but not from the network that held it), its
    slot goes to the next arrival, and the analysis excludes its ratings. Returns the record; ValueError for an unknown or already released rater."""
    def withdraw(records: dict) -> dict:
        record = records.get(rater_id)
        if record is None:
            known = ", ".join(list(records)[:5]) or "none yet"
            raise ValueError(f"No rater {rater_id!r} in {Path(study_dir)} (registered, first ones: {known}).")
        if record.get("withdrawn"):
            raise ValueError(f"Rater {rater_id!r} was already released.")
        record.update(withdrawn=now)
        return dict(record)
    return _update(study_dir, withdraw)


def resume(study_dir: str | Path, secret: bytes, token: object, slots: Slots, now: float) -> Registration:
    """The registration a token belongs to; RaterRefused if forged, unknown or expired."""
    rater_id = rater_of_token(secret, token)
    record = read_records(study_dir).get(rater_id)
    if record is None:
        raise RaterRefused(INVALID_TOKEN)
    if _expired(record, slots, now):
        raise RaterRefused(EXPIRED)
    return Registration(rater_id, token_for(secret, rater_id), record["platform_id"])


def slot_of(study_dir: str | Path, rater_id: str, slots: Slots, now: float) -> int:
    """The design slot a registered rater holds; RaterRefused when unknown or expired."""
    record = read_records(study_dir).get(rater_id)
    if record is None:
        raise RaterRefused(INVALID_TOKEN)
    if _expired(record, slots, now):
        raise RaterRefused(EXPIRED)
    return record["slot"]


def mark_finished(study_dir: str | Path, rater_id: str, now: float) -> None:
    """Record that the rater rated every page: the slot is theirs for good."""
    def finish(records: dict) -> None:
        if records[rater_id]["finished_at"] is None:
            records[rater_id]["finished_at"] = now
    _update(study_dir, finish)


def record_questionnaire(study_dir: str | Path, rater_id: str, answers: Mapping[str, str]) -> None:
    """Store the optional questionnaire (every field optional, answers from QUESTIONNAIRE), once; ValueError
    otherwise."""
    if not isinstance(answers, Mapping):
        raise ValueError("The questionnaire answers are missing: answer or skip each question.")
    unknown = sorted(set(answers) - set(QUESTIONNAIRE))
    if unknown:
        raise ValueError(f"Unknown questions: {', '.join(map(str, unknown))}.")
    kept = {}
    for field, answer in answers.items():
        if answer in (None, ""):
            continue  # skipped
        if answer not in QUESTIONNAIRE[field]:
            raise ValueError(f"Choose one of the offered answers for {field}: {', '.join(QUESTIONNAIRE[field])}.")
        kept[field] = answer
    set_field(study_dir, rater_id, "questionnaire", kept, once=ANSWERED)


def set_field(study_dir: str | Path, rater_id: str, field: str, value, *, once: str | None = None) -> None:
    """Set one field of a rater's record; with `once`, refuse (ValueError `once`) when it is already set."""
    def change(records: dict) -> None:
        if rater_id not in records:
            raise RaterRefused(INVALID_TOKEN)
        if once and records[rater_id].get(field) is not None:
            raise ValueError(once)
        records[rater_id][field] = value
    _update(study_dir, change)


def rater_record(study_dir: str | Path, rater_id: str) -> dict:
    """What is known about a rater: slot, registration time, platform ids, headphone check, questionnaire."""
    record = read_records(study_dir).get(rater_id)
    if record is None:
        raise RaterRefused(INVALID_TOKEN)
    return dict(record)


def read_records(study_dir: str | Path) -> dict[str, dict]:
    """rater id -> record, in arrival order (empty before the first rater)."""
    return read_records_file(Path(study_dir) / RATERS_FILE)


def read_records_file(path: Path) -> dict[str, dict]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["raters"])
    except FileNotFoundError:
        return {}


def read_raters(study_dir: str | Path) -> list[str]:
    """Registered rater ids in arrival order."""
    return list(read_records(study_dir))


def _expired(record: dict, slots: Slots, now: float) -> bool:
    if record.get("withdrawn"):
        return True
    if record["finished_at"] is not None:
        return False
    return record["released"] or now - record["registered_at"] > slots.abandon_s


def _free_slot(records: dict, slots: Slots, now: float) -> int:
    """The lowest slot released by an expired rater, else a new one; RaterRefused when the study is full."""
    held, expired = set(), {}
    for rater_id, record in records.items():
        if record["released"]:
            continue
        if _expired(record, slots, now):
            expired.setdefault(record["slot"], rater_id)
        else:
            held.add(record["slot"])
    if slots.max_raters is not None and len(held) >= slots.max_raters:
        raise RaterRefused("This study is full: thank you for your interest. Return it on your platform.")
    free = sorted(slot for slot in expired if slot not in held)
    if free:
        records[expired[free[0]]]["released"] = True
        return free[0]
    return max((record["slot"] for record in records.values()), default=-1) + 1


def _update(study_dir: str | Path, change: Callable[[dict], T]) -> T:
    """Apply `change` to the records under both locks and write them back atomically."""
    study_dir = Path(study_dir)
    with _lock, open(study_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            records = read_records(study_dir)
            result = change(records)
            _write(study_dir / RATERS_FILE, records)
            return result
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, records: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"raters": records}, handle, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
