"""A study manifest without audio: enough for assignment, store and analysis tests (no model, no files)."""
from pathlib import Path

from lab.study import blinding
from lab.study.build import stimulus_key
from lab.study.definition import StudyDefinition
from lab.study.manifest import Item, Manifest, Stimulus

DEFAULTS = dict(study_id="fake", title="Fake study", test_type="acr", prompts=["sine tone", "white noise"],
                seeds=[1, 2, 3], conditions=["w8a8-dynamic", "w4a16"])


def fake_manifest(root: Path, **overrides) -> Manifest:
    definition = StudyDefinition(**{**DEFAULTS, **overrides})
    study_dir = Path(root) / definition.study_id
    secret = blinding.ensure_secret(study_dir)
    items = tuple(
        Item(index=index, prompt=prompt, seed=seed,
             stimuli=tuple(Stimulus(condition=key, file=blinding.stimulus_name(secret, stimulus_key(prompt, seed, key)),
                                    sha256="0" * 64, seconds=1.0)
                           for key in definition.stimulus_keys))
        for index, (prompt, seed) in enumerate(definition.items))
    return Manifest(study_dir=study_dir, study_id=definition.study_id, created=1_700_000_000, definition=definition,
                    model={"id": "fake", "fingerprint": "0" * 16, "sample_rate": 16000}, sampler={},
                    recipes={name: {"recipe": name, "hash": "x"} for name in definition.conditions}, items=items)
