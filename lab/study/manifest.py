"""A built study on disk: its folder layout, the manifest that describes it, and `load_manifest`.

The manifest is the single record of what raters hear: for every item (prompt, seed) and every stimulus
the condition behind it, its opaque file name and the sha256 of its bytes, together with the model and the
recipe hash of every quantized condition, so a result can always be traced to the exact weights. Loading
verifies the files against it, because a study whose audio changed under it is no longer the same study.

    <root>/<study_id>/
        study.json       definition, model and creation time (written when the build starts)
        secret           HMAC key of names, trial ids and rater orders (never served)
        stimuli/         the WAVs raters hear: the only folder to serve
        shards/          rank-<r>.jsonl: one record per finished item (what a resumed build skips)
        manifest.json    written once every item is done
        raters.json      rater ids in arrival order (assignment)
        ratings.csv      the long-format ratings (store)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.study.blinding import read_secret, sha256_file
from lab.study.definition import StudyDefinition

MANIFEST_FILE = "manifest.json"
STUDY_FILE = "study.json"
STIMULI_DIR = "stimuli"
SHARDS_DIR = "shards"
RATERS_FILE = "raters.json"
RATINGS_FILE = "ratings.csv"
FORMAT = 1


class StudyError(ValueError):
    """A study folder is missing, unfinished or damaged; the message says what to do."""


@dataclass(frozen=True)
class Stimulus:
    condition: str  # "reference", "hidden-reference", "anchor" or a quant preset name
    file: str  # opaque file name under stimuli/
    sha256: str
    seconds: float


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    seed: int
    stimuli: tuple[Stimulus, ...]

    def stimulus(self, condition: str) -> Stimulus:
        for stimulus in self.stimuli:
            if stimulus.condition == condition:
                return stimulus
        raise KeyError(f"Item {self.index} has no {condition!r} stimulus.")


@dataclass(frozen=True)
class Manifest:
    """Everything about a built study except the secret, which `secret()` reads when needed."""
    study_dir: Path
    study_id: str
    created: int  # unix seconds; also the mtime of every file of the study
    definition: StudyDefinition
    model: dict[str, Any]  # id, fingerprint, sample_rate
    sampler: dict[str, Any]  # steps, cfg_scale, sampler_type, sigma_min, sigma_max, seconds
    recipes: dict[str, dict[str, str]]  # preset -> {"recipe": name, "hash": Recipe.hash()}
    items: tuple[Item, ...] = field(default_factory=tuple)

    @property
    def stimuli_dir(self) -> Path:
        return self.study_dir / STIMULI_DIR

    def path(self, stimulus: Stimulus | str) -> Path:
        """Absolute path of a stimulus (or of a stimulus file name)."""
        return self.stimuli_dir / (stimulus.file if isinstance(stimulus, Stimulus) else stimulus)

    def secret(self) -> bytes:
        return read_secret(self.study_dir)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "study_id": self.study_id, "created": self.created,
            "definition": self.definition.to_dict(), "model": self.model, "sampler": self.sampler,
            "recipes": self.recipes,
            "items": [{"index": item.index, "prompt": item.prompt, "seed": item.seed,
                       "stimuli": [stimulus.__dict__ for stimulus in item.stimuli]} for item in self.items],
        }

    @classmethod
    def from_dict(cls, data: dict, study_dir: str | Path) -> Manifest:
        try:
            items = tuple(Item(index=int(item["index"]), prompt=item["prompt"], seed=int(item["seed"]),
                               stimuli=tuple(Stimulus(**stimulus) for stimulus in item["stimuli"]))
                          for item in data["items"])
            return cls(study_dir=Path(study_dir), study_id=data["study_id"], created=int(data["created"]),
                       definition=StudyDefinition.from_dict(data["definition"]), model=dict(data["model"]),
                       sampler=dict(data["sampler"]), recipes=dict(data["recipes"]), items=items)
        except (KeyError, TypeError) as err:
            raise StudyError(f"The manifest of {study_dir} is malformed ({type(err).__name__}: {err}); "
                             "rebuild the study to rewrite it.") from None


def study_path(root: str | Path, study_id: str) -> Path:
    return Path(root) / study_id


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StudyError(f"{path} is not valid JSON ({err}); rebuild the study to rewrite it.") from None


def load_manifest(study_dir: str | Path, verify: bool = True) -> Manifest:
    """The manifest of a built study; with `verify`, every stimulus file must exist with its recorded sha256.

    Raises StudyError (a ValueError) for an unknown study, an unfinished build, or missing/damaged files."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StudyError(f"No study at {study_dir}: build it first with "
                         "`python -m lab.study build DEFINITION.json`.")
    manifest_path = study_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        if (study_dir / STUDY_FILE).is_file():
            raise StudyError(f"The study in {study_dir} has not finished building (no {MANIFEST_FILE}): run the "
                             "same build command again to resume it.")
        raise StudyError(f"{study_dir} is not a study folder (no {MANIFEST_FILE}).")
    manifest = Manifest.from_dict(read_json(manifest_path), study_dir)
    if verify:
        verify_files(manifest)
        manifest.secret()  # assignment needs it: fail now, not when the first rater arrives
    return manifest


def verify_files(manifest: Manifest) -> None:
    """Raise StudyError listing every stimulus file that is missing or whose bytes changed."""
    missing, damaged = [], []
    for item in manifest.items:
        for stimulus in item.stimuli:
            path = manifest.path(stimulus)
            if not path.is_file():
                missing.append(f"{stimulus.file} (item {item.index}, {stimulus.condition})")
            elif sha256_file(path) != stimulus.sha256:
                damaged.append(f"{stimulus.file} (item {item.index}, {stimulus.condition})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} stimulus file(s) missing: {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else ""))
    if damaged:
        problems.append(f"{len(damaged)} stimulus file(s) damaged (sha256 differs from the manifest): "
                        f"{', '.join(damaged[:5])}" + (" ..." if len(damaged) > 5 else ""))
    if problems:
        raise StudyError(f"Study {manifest.study_id!r}: {'; '.join(problems)}. Run the same build command again "
                         "to regenerate them (generation is deterministic, names and bytes come back the same).")
