"""Which trials a rater gets, in which order, and what of them the rater may see.

Balance: raters are numbered in arrival order (lab.study.raters) and rater k takes slots kT .. kT+T-1 of
one global design sequence (T trials per rater). ACR and AB rotate conditions Latin-square style: slot p
shows condition p mod C and item (p + floor(p / L)) mod n, L = lcm(n, C). So every prefix of raters has
rated every condition equally often (within one), no rater hears an item twice, and every n*C slots cover
each (item, condition) cell once. MUSHRA pages hold every condition, so only items rotate (item p mod n).

The slot of a rater (lab.study.raters) is their arrival number, except that a slot released by a rater who
abandoned goes to the next arrival, so the raters who finish fill a prefix of the slots.

Check pages come on top of the design, at random positions: attention checks (an instructed answer) and gold
pages, whose answer is known because the low-pass anchor must be rated clearly below the reference: MUSHRA a
whole page of one item, AB the reference against the anchor, ACR two pages (the item's reference and its
anchor). Gold pages use distinct items, preferably ones the rater does not rate on regular pages (hearing
an item's anchor first would colour its regular rating); the analysis applies the rule
(lab.study.analysis.GOLD_MARGINS).

Randomness (trial order, A/B sides, MUSHRA page order, check pages) comes from an RNG seeded by
HMAC(study secret, rater id): a reload gives the same list, and no two raters share an order by design.
`Trial` keeps the conditions server-side; `rater_view` is all a browser may receive.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from lab.study.blinding import opaque_id, rater_seed
from lab.study.definition import ANCHOR, REFERENCE, SCALES, Scale, StudyDefinition
from lab.study.manifest import Manifest
from lab.study.raters import Slots, slot_of
from lab.study.schema import ATTENTION, GOLD, REGULAR

REFERENCE_LABEL = "Reference"  # MUSHRA's open reference (heard, not rated)
AB_ATTENTION_TARGETS = (-3, -2, -1, 1, 2, 3)
MUSHRA_ATTENTION_TARGETS = (20, 40, 60, 80)  # never a slider's likely default (0, 50, 100)
MUSHRA_ATTENTION_TOLERANCE = 5


@dataclass(frozen=True)
class TrialStimulus:
    label: str  # what the rater sees: "A"/"B", "1".."n" or "Reference"
    file: str  # opaque file name
    path: Path
    condition: str  # server-side only: never sent to a browser
    rated: bool = True  # False for MUSHRA's open reference


@dataclass(frozen=True)
class Trial:
    """One page of one rater's list. `stimuli` are in page order."""
    trial_id: str  # opaque, stable across reloads
    index: int  # position in the rater's list (0-based)
    total: int  # length of the rater's list
    test_type: str
    item: int
    prompt: str
    stimuli: tuple[TrialStimulus, ...]
    instructions: str
    attention_target: int | None = None  # the answer an attention check asks for
    check: str = REGULAR  # schema.REGULAR, ATTENTION or GOLD

    @property
    def rated(self) -> tuple[TrialStimulus, ...]:
        return tuple(stimulus for stimulus in self.stimuli if stimulus.rated)

    @property
    def is_attention_check(self) -> bool:
        return self.check == ATTENTION

    @property
    def scale(self) -> Scale:
        return SCALES[self.test_type]


@dataclass(frozen=True)
class RaterView:
    """What a rater's browser may receive: no condition, seed, preset or item number."""
    trial_id: str
    number: int  # 1-based position, for "page 3 of 12"
    total: int
    prompt: str
    instructions: str
    reference: Path | None  # MUSHRA's open reference
    stimuli: tuple[tuple[str, Path], ...]  # (label, file) to rate, in page order
    scale: Scale


def trials_for(manifest: Manifest, rater_id: str, *, now: float | None = None) -> list[Trial]:
    """The trials of a registered rater in presentation order; RaterRefused when unknown or expired."""
    slot = slot_of(manifest.study_dir, rater_id, slot_rules(manifest.definition), time.time() if now is None else now)
    return assign(manifest, rater_id, slot)


def slot_rules(definition: StudyDefinition) -> Slots:
    return Slots(abandon_s=definition.abandon_minutes * 60, max_raters=definition.max_raters)


def rater_view(trial: Trial) -> RaterView:
    reference = [s.path for s in trial.stimuli if not s.rated]
    return RaterView(trial_id=trial.trial_id, number=trial.index + 1, total=trial.total, prompt=trial.prompt,
                     instructions=trial.instructions, reference=reference[0] if reference else None,
                     stimuli=tuple((s.label, s.path) for s in trial.rated), scale=trial.scale)


def rotated_conditions(definition: StudyDefinition) -> tuple[str, ...]:
    """The conditions the Latin square rotates: ACR every stimulus, AB everything judged against the
    reference, MUSHRA none (all share a page)."""
    if definition.test_type == "acr":
        return definition.stimulus_keys
    if definition.test_type == "ab":
        return tuple(key for key in definition.stimulus_keys if key != REFERENCE)
    return ()


def design_slots(definition: StudyDefinition, number: int) -> list[tuple[int, int, str | None]]:
    """(slot, item, condition) of rater `number`'s block of the design, before shuffling."""
    n = definition.n_items
    per_rater = definition.trials_per_rater or n
    slots = range(number * per_rater, (number + 1) * per_rater)
    rotated = rotated_conditions(definition)
    if not rotated:
        return [(p, p % n, None) for p in slots]
    c = len(rotated)
    period = math.lcm(n, c)
    return [(p, (p + p // period) % n, rotated[p % c]) for p in slots]


def assign(manifest: Manifest, rater_id: str, number: int) -> list[Trial]:
    """The trials of rater `rater_id` holding design slot `number` (trials_for looks the slot up)."""
    definition = manifest.definition
    secret = manifest.secret()
    rng = random.Random(rater_seed(secret, rater_id))
    slots = design_slots(definition, number)
    rng.shuffle(slots)
    sides = [True] * (len(slots) - len(slots) // 2) + [False] * (len(slots) // 2)  # reference on A?
    rng.shuffle(sides)
    pages = [(opaque_id(secret, "trial", rater_id, slot), item, _stimuli(manifest, item, condition, side, rng),
              None, REGULAR) for (slot, item, condition), side in zip(slots, sides)]
    rotated = rotated_conditions(definition)
    for check in range(definition.attention_checks):
        item = rng.randrange(definition.n_items)
        condition = rng.choice(rotated) if rotated else None
        stimuli = _stimuli(manifest, item, condition, rng.random() < 0.5, rng)
        page = (opaque_id(secret, "attention", rater_id, check), item, stimuli, _attention_target(definition, rng),
                ATTENTION)
        pages.insert(rng.randint(0, len(pages)), page)
    regular_items = {item for _, item, _ in slots}
    fresh = [item for item in range(definition.n_items) if item not in regular_items]
    heard = sorted(regular_items)
    rng.shuffle(fresh)
    rng.shuffle(heard)
    for check, item in enumerate((fresh + heard)[:definition.gold_pages]):  # items the rater does not rate first
        for part, stimuli in enumerate(_gold_stimuli(manifest, item, rng)):
            page = (opaque_id(secret, "gold", rater_id, check, part), item, stimuli, None, GOLD)
            pages.insert(rng.randint(0, len(pages)), page)
    return [Trial(trial_id=trial_id, index=index, total=len(pages), test_type=definition.test_type, item=item,
                  prompt=manifest.items[item].prompt, stimuli=stimuli,
                  instructions=_instructions(definition.scale, target), attention_target=target, check=check)
            for index, (trial_id, item, stimuli, target, check) in enumerate(pages)]


def _gold_stimuli(manifest: Manifest, item: int, rng: random.Random) -> list[tuple[TrialStimulus, ...]]:
    """The page(s) of one gold check: the anchor where the rater must judge it against the reference."""
    test_type = manifest.definition.test_type
    if test_type == "mushra":
        return [_stimuli(manifest, item, None, True, rng)]
    if test_type == "ab":
        return [_stimuli(manifest, item, ANCHOR, rng.random() < 0.5, rng)]
    return [_stimuli(manifest, item, REFERENCE, True, rng), _stimuli(manifest, item, ANCHOR, True, rng)]


def _stimuli(manifest: Manifest, item_index: int, condition: str | None, reference_first: bool,
             rng: random.Random) -> tuple[TrialStimulus, ...]:
    item = manifest.items[item_index]

    def shown(condition: str, label: str, rated: bool = True) -> TrialStimulus:
        stimulus = item.stimulus(condition)
        return TrialStimulus(label, stimulus.file, manifest.path(stimulus), condition, rated)

    test_type = manifest.definition.test_type
    if test_type == "acr":
        return (shown(condition, "A"),)
    if test_type == "ab":
        pair = (REFERENCE, condition) if reference_first else (condition, REFERENCE)
        return shown(pair[0], "A"), shown(pair[1], "B")
    rated = [key for key in manifest.definition.stimulus_keys if key != REFERENCE]
    rng.shuffle(rated)
    return (shown(REFERENCE, REFERENCE_LABEL, rated=False),
            *(shown(key, str(position)) for position, key in enumerate(rated, start=1)))


def _attention_target(definition: StudyDefinition, rng: random.Random) -> int:
    if definition.test_type == "acr":
        return rng.randint(1, 5)
    if definition.test_type == "ab":
        return rng.choice(AB_ATTENTION_TARGETS)
    return rng.choice(MUSHRA_ATTENTION_TARGETS)


def _instructions(scale: Scale, target: int | None) -> str:
    if target is None:
        return scale.question
    if scale.integer:
        words = dict(scale.labels).get(target, "")
        answer = f"{target:+d}" if scale.minimum < 0 else str(target)
        return f"Attention check: whatever you hear, answer {answer}" + (f" ({words})." if words else ".")
    return f"Attention check: whatever you hear, set every slider to {target}."


def attention_passed(trial: Trial, answers: list[float]) -> bool:
    """Whether the answers of an attention-check trial are the ones it asked for."""
    tolerance = 0 if trial.scale.integer else MUSHRA_ATTENTION_TOLERANCE
    return all(abs(answer - trial.attention_target) <= tolerance for answer in answers)

