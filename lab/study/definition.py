"""What a listening study is, before anything is generated: `StudyDefinition`, its rating scales and the
names of the stimuli every item carries.

A definition is validated on construction, so a typo in a JSON file fails in seconds with a message naming
the field, not hours into a build. Full precision is always generated as the reference: a quantized model
is only ever judged against the model it came from.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import quant
from lab.generation import MAX_PROMPT_CHARS, MAX_SEED

TEST_TYPES = ("acr", "ab", "mushra")
ANCHORS = {"lowpass-3.5k": 3500.0, "lowpass-7k": 7000.0}  # BS.1534 low-pass anchors: name -> cutoff in Hz
REFERENCE = "reference"  # the full-precision clip (MUSHRA: the open, labelled reference)
HIDDEN_REFERENCE = "hidden-reference"  # MUSHRA: the same audio again, blind among the conditions
ANCHOR = "anchor"  # the low-passed full-precision clip
STUDY_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")  # <= 40 chars, safe as a folder and URL part
MAX_TITLE_CHARS = 200
MAX_INSTRUCTIONS_CHARS = 5000
MAX_ATTENTION_CHECKS = 20
MAX_GOLD_PAGES = 10
MAX_ABANDON_MINUTES = 7 * 24 * 60
_DEFAULT = "default"  # anchor sentinel: MUSHRA gets the 3.5 kHz anchor, the others none


@dataclass(frozen=True)
class Scale:
    """A rating scale as the rater sees it; `integer` scales take whole numbers only."""
    minimum: int
    maximum: int
    integer: bool
    labels: tuple[tuple[int, str], ...]  # (value, words) anchors shown next to the scale
    question: str

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        return self.minimum <= value <= self.maximum


SCALES = {
    # ITU-T P.800 absolute category rating
    "acr": Scale(1, 5, True, ((5, "Excellent"), (4, "Good"), (3, "Fair"), (2, "Poor"), (1, "Bad")),
                 "How good is the sound quality of this clip?"),
    # ITU-T P.800 comparison category rating (CMOS): the second clip against the first
    "ab": Scale(-3, 3, True, ((3, "B much better"), (2, "B better"), (1, "B slightly better"),
                              (0, "About the same"), (-1, "B slightly worse"), (-2, "B worse"),
                              (-3, "B much worse")),
                "Compared with A, how good is the sound quality of B?"),
    # ITU-R BS.1534 continuous quality scale
    "mushra": Scale(0, 100, False, ((100, "Excellent"), (80, "Good"), (60, "Fair"), (40, "Poor"), (20, "Bad")),
                    "Rate each clip against the reference; one of them is the reference itself."),
}


@dataclass(frozen=True)
class StudyDefinition:
    """A listening study: which prompts and seeds (items), which quant presets (conditions), which test.

    Sampler fields left None take the model's defaults; `trials_per_rater` None gives each rater every item.
    Sequences are stored as tuples, so a definition is immutable once validated.
    """
    study_id: str
    title: str
    test_type: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    conditions: tuple[str, ...]
    anchor: str | None = _DEFAULT
    steps: int | None = None
    cfg_scale: float | None = None
    sampler_type: str | None = None
    seconds: float | None = None
    trials_per_rater: int | None = None
    attention_checks: int = 0
    instructions: str = ""
    completion_url: str | None = None  # the platform's completion link: `{code}` is replaced, else ?cc=<code>
    max_raters: int | None = None  # registrations refused past this many live or finished raters
    abandon_minutes: float = 60  # an unfinished rater's slot goes to the next arrival after this long
    headphone_check: bool = True
    questionnaire: bool = True
    gold_pages: int = 0  # pages with a known answer (the anchor clearly below the reference)
    require_max_rating: bool | None = None  # None: True for MUSHRA (BS.1534 asks for one clip at 100)

    def __post_init__(self):
        for name in ("prompts", "seeds", "conditions"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a list, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        if self.anchor == _DEFAULT:
            object.__setattr__(self, "anchor", "lowpass-3.5k" if self.test_type == "mushra" else None)
        if self.require_max_rating is None:
            object.__setattr__(self, "require_max_rating", self.test_type == "mushra")
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.study_id, str) or not STUDY_ID.fullmatch(self.study_id):
            raise ValueError(f"study_id {self.study_id!r} must be 1-40 characters of a-z, 0-9 and '-', "
                             "starting and ending with a letter or digit (it names the study's folder).")
        if not isinstance(self.title, str) or not self.title.strip() or len(self.title) > MAX_TITLE_CHARS:
            raise ValueError(f"title must be non-empty text of at most {MAX_TITLE_CHARS} characters.")
        if self.test_type not in TEST_TYPES:
            raise ValueError(f"test_type {self.test_type!r} is not one of {', '.join(TEST_TYPES)}.")
        self._validate_prompts_and_seeds()
        self._validate_conditions()
        self._validate_sampler()
        if self.trials_per_rater is not None:
            if not _is_int(self.trials_per_rater) or self.trials_per_rater < 1:
                raise ValueError("trials_per_rater must be a whole number >= 1, or null for every item.")
            if self.trials_per_rater > self.n_items:
                raise ValueError(f"trials_per_rater is {self.trials_per_rater} but the design has only "
                                 f"{self.n_items} items (prompts x seeds), one trial each.")
        if not _is_int(self.attention_checks) or not 0 <= self.attention_checks <= MAX_ATTENTION_CHECKS:
            raise ValueError(f"attention_checks must be a whole number from 0 to {MAX_ATTENTION_CHECKS}.")
        if not isinstance(self.instructions, str) or len(self.instructions) > MAX_INSTRUCTIONS_CHARS:
            raise ValueError(f"instructions must be text of at most {MAX_INSTRUCTIONS_CHARS} characters.")
        self._validate_crowd()

    def _validate_crowd(self) -> None:
        """The fields a crowd study needs (platform link, caps, quality controls)."""
        if self.completion_url is not None and not (isinstance(self.completion_url, str)
                                                    and re.fullmatch(r"https?://\S+", self.completion_url)):
            raise ValueError("completion_url must be an http(s) link without spaces (the recruiting platform's "
                             "completion link), or null.")
        if self.max_raters is not None and (not _is_int(self.max_raters) or self.max_raters < 1):
            raise ValueError("max_raters must be a whole number >= 1, or null for no cap.")
        if not (_is_number(self.abandon_minutes) and 1 <= self.abandon_minutes <= MAX_ABANDON_MINUTES):
            raise ValueError(f"abandon_minutes must be a number from 1 to {MAX_ABANDON_MINUTES} (a week).")
        for name in ("headphone_check", "questionnaire", "require_max_rating"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false.")
        if self.require_max_rating and self.test_type != "mushra":
            raise ValueError("require_max_rating applies to MUSHRA only (one clip rated 100); set it to false "
                             f"or null for {self.test_type.upper()}.")
        if not _is_int(self.gold_pages) or not 0 <= self.gold_pages <= MAX_GOLD_PAGES:
            raise ValueError(f"gold_pages must be a whole number from 0 to {MAX_GOLD_PAGES}.")
        if self.gold_pages and self.anchor is None:
            raise ValueError("gold_pages needs an anchor (e.g. \"anchor\": \"lowpass-3.5k\"): a gold page checks "
                             "that the low-passed clip is rated clearly below the reference.")
        if self.gold_pages > self.n_items:
            raise ValueError(f"gold_pages is {self.gold_pages} but the design has only {self.n_items} items; "
                             "each gold page uses a different item.")

    def _validate_prompts_and_seeds(self) -> None:
        if not self.prompts:
            raise ValueError("prompts is empty: a study needs at least one prompt.")
        for prompt in self.prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"Every prompt must be non-empty text, got {prompt!r}.")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"A prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}.")
        _no_duplicates("prompts", self.prompts)
        if not self.seeds:
            raise ValueError("seeds is empty: a study needs at least one seed.")
        for seed in self.seeds:
            if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
                raise ValueError(f"Seeds must be whole numbers from 0 to {MAX_SEED}, got {seed!r}.")
        _no_duplicates("seeds", self.seeds)

    def _validate_conditions(self) -> None:
        if not self.conditions:
            raise ValueError("conditions is empty: name at least one quant preset to compare with full precision "
                             f"(valid presets: {', '.join(quant.PRESETS)}).")
        for name in self.conditions:
            if name not in quant.PRESETS:
                raise ValueError(f"Unknown condition {name!r}: conditions are quant presets, one of "
                                 f"{', '.join(quant.PRESETS)}. Full precision is always included as the reference.")
        _no_duplicates("conditions", self.conditions)
        if self.anchor is not None and self.anchor not in ANCHORS:
            raise ValueError(f"anchor {self.anchor!r} is not one of {', '.join(ANCHORS)} (or null for none).")

    def _validate_sampler(self) -> None:
        """Types only: the values themselves are checked against the model at build time, by the check the Compare
        tab's request goes through (`lab.requests.validate_prompts`), so one rule decides both."""
        if self.steps is not None and not _is_int(self.steps):
            raise ValueError(f"steps must be a whole number, or null for the model's default; got {self.steps!r}.")
        for name in ("cfg_scale", "seconds"):
            if getattr(self, name) is not None and not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number, or null for the model's default; "
                                 f"got {getattr(self, name)!r}.")
        if self.sampler_type is not None and not isinstance(self.sampler_type, str):
            raise ValueError(f"sampler_type must be a sampler's name, or null for the model's default; "
                             f"got {self.sampler_type!r}.")

    # ---- derived ------------------------------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return len(self.prompts) * len(self.seeds)

    @property
    def items(self) -> list[tuple[str, int]]:
        """(prompt, seed) per item, prompt-major: item i is `items[i]`."""
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]

    @property
    def stimulus_keys(self) -> tuple[str, ...]:
        """The stimuli generated for every item, in manifest order."""
        hidden = (HIDDEN_REFERENCE,) if self.test_type == "mushra" else ()
        anchor = (ANCHOR,) if self.anchor else ()
        return (REFERENCE, *hidden, *self.conditions, *anchor)

    @property
    def scale(self) -> Scale:
        return SCALES[self.test_type]

    # ---- JSON ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ("prompts", "seeds", "conditions"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> StudyDefinition:
        if not isinstance(data, dict):
            raise ValueError("A study definition must be a JSON object.")
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"Unknown study definition fields: {', '.join(unknown)} "
                             f"(valid: {', '.join(sorted(fields))}).")
        missing = [name for name in ("study_id", "title", "test_type", "prompts", "seeds", "conditions")
                   if name not in data]
        if missing:
            raise ValueError(f"The study definition is missing: {', '.join(missing)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> StudyDefinition:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"The study definition is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _no_duplicates(name: str, values: tuple) -> None:
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    if repeated:
        raise ValueError(f"{name} lists {', '.join(map(repr, repeated))} more than once.")
