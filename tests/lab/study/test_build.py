"""lab.study.build and manifest on the tiny text-to-audio model: fair, blind, resumable, verifiable, shardable."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

import quant
from lab.audio import integrated_loudness
from lab.quantized import QuantizedModels
from lab.sat import ModelGuide
from lab.study import blinding
from lab.study.__main__ import main as study_main
from lab.study.build import build_study, estimate_build
from lab.study.definition import StudyDefinition
from lab.study.health import check_study
from lab.study.manifest import StudyError, load_manifest
from tests.lab.study.crowd import enroll

REPO = Path(__file__).resolve().parents[3]
DEFINITION = StudyDefinition(study_id="tiny-mushra", title="Tiny MUSHRA", test_type="mushra",
                             prompts=["sine tone at a4", "white noise"], seeds=[5],
                             conditions=["w8a8-dynamic", "w4a16"], steps=4, seconds=0.5)


@pytest.fixture(scope="module")
def models(tiny_audio, tmp_path_factory):
    return QuantizedModels(tiny_audio, cache_dir=tmp_path_factory.mktemp("cache"), calibration_steps=4,
                           calibration_prompts=["sine tone at a4"], calibration_seconds=0.5, max_models=2)


@pytest.fixture(scope="module")
def built(tiny_audio, models, tmp_path_factory):
    return build_study(DEFINITION, tiny_audio, models, tmp_path_factory.mktemp("studies"), progress=False)


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built study (mtimes kept), for tests that damage or rebuild it."""
    shutil.copytree(built.study_dir, tmp_path / DEFINITION.study_id)
    return tmp_path


def audio(manifest, stimulus):
    data, rate = soundfile.read(manifest.path(stimulus), dtype="float32", always_2d=True)
    return data.T, rate


def test_manifest_records_everything_and_verifies(built, tiny_audio):
    manifest = load_manifest(built.study_dir)
    assert manifest == built and manifest.study_id == "tiny-mushra" and len(manifest.items) == 2
    assert [(item.prompt, item.seed) for item in manifest.items] == DEFINITION.items
    assert manifest.model["id"] == tiny_audio.model_id and manifest.model["fingerprint"] == tiny_audio.fingerprint
    assert manifest.recipes == {name: {"recipe": name, "hash": quant.get_recipe(name).hash()}
                                for name in DEFINITION.conditions}
    assert manifest.sampler["steps"] == 4 and manifest.sampler["seconds"] == 0.5
    assert manifest.sampler["sampler_type"] == tiny_audio.sampling.sampler_type
    for item in manifest.items:
        assert [s.condition for s in item.stimuli] == list(DEFINITION.stimulus_keys)
        assert all(s.seconds == 0.5 and len(s.sha256) == 64 for s in item.stimuli)
    files = sorted(p.name for p in manifest.stimuli_dir.iterdir())
    assert files == sorted(s.file for item in manifest.items for s in item.stimuli) and len(files) == 10
    assert {p.name for p in manifest.study_dir.iterdir()} == {"manifest.json", "study.json", "secret", "stimuli", "shards"}


def test_nothing_on_disk_tells_conditions_apart(built):
    manifest = built
    paths = sorted(manifest.stimuli_dir.iterdir())
    assert all(len(p.stem) == 24 and set(p.stem) <= set("0123456789abcdef") and p.suffix == ".wav" for p in paths)
    assert len({p.stat().st_size for p in paths}) == 1  # one size for every stimulus
    every_file = [p for p in manifest.study_dir.rglob("*") if p.is_file()]
    assert {p.stat().st_mtime for p in every_file} == {manifest.created}  # no write order in mtimes
    for item in manifest.items:
        open_ref, hidden = item.stimulus("reference"), item.stimulus("hidden-reference")
        assert open_ref.file != hidden.file and open_ref.sha256 != hidden.sha256
        np.testing.assert_array_equal(audio(manifest, open_ref)[0], audio(manifest, hidden)[0])
        raw = manifest.path(open_ref).read_bytes()
        assert raw[36:40] == b"JUNK" and int.from_bytes(raw[40:44], "little") == blinding.JUNK_SIZE
    secret = manifest.secret()
    assert not any(secret in p.read_bytes() for p in paths)
    names_again = {blinding.stimulus_name(secret, json.dumps([item.prompt, item.seed, s.condition]))
                   for item in manifest.items for s in item.stimuli}
    assert names_again == {p.name for p in paths}  # derived, not random: a rebuild gives the same names


def test_clips_are_paired_loudness_matched_and_anchored(built, tiny_audio):
    for item in built.items:
        clips = {s.condition: audio(built, s)[0] for s in item.stimuli}
        rate = audio(built, item.stimuli[0])[1]
        assert rate == tiny_audio.sample_rate and clips["reference"].shape == (1, 8000)
        loudness = [integrated_loudness(clip, rate) for clip in clips.values()]
        assert max(loudness) - min(loudness) < 0.5
        assert not np.allclose(clips["w4a16"], clips["reference"], atol=1e-3)  # quantization is audible

        assert high_share(clips["anchor"], rate) < 0.01 < high_share(clips["reference"], rate)


def high_share(clip, rate, above_hz=4500):
    """Share of the clip's power above `above_hz`."""
    power = np.abs(np.fft.rfft(clip[0])) ** 2
    return power[np.fft.rfftfreq(clip.shape[-1], 1 / rate) > above_hz].sum() / power.sum()


def test_rebuild_skips_finished_items(built, tiny_audio, models, copy, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("a finished item was generated again")

    monkeypatch.setattr("lab.study.build.generate_clip", no_generation)
    again = build_study(DEFINITION, tiny_audio, models, copy, progress=False)
    assert again.to_dict() == built.to_dict()


def test_interrupted_build_resumes_with_the_missing_item(built, tiny_audio, models, copy, monkeypatch):
    study_dir = copy / DEFINITION.study_id
    (study_dir / "manifest.json").unlink()
    with pytest.raises(StudyError, match="has not finished building"):
        load_manifest(study_dir)
    shard = study_dir / "shards" / "rank-0.jsonl"
    first_line = shard.read_text().splitlines()[0]
    shard.write_text(first_line + "\n" + '{"index": 1, "torn')  # item 1's record was cut by a crash
    import lab.study.build as build_module

    calls = []
    real = build_module.generate_clip
    monkeypatch.setattr(build_module, "generate_clip", lambda *a, **k: calls.append(a[2].prompt) or real(*a, **k))
    again = build_study(DEFINITION, tiny_audio, models, copy, progress=False)
    assert calls == ["white noise"] * 3  # full precision and two conditions of item 1 only
    assert again.to_dict() == built.to_dict()  # deterministic: same names, same bytes
    load_manifest(study_dir)


def test_damaged_or_missing_files_are_reported_and_rebuilt(built, tiny_audio, models, copy):
    study_dir = copy / DEFINITION.study_id
    damaged, missing = built.items[0].stimuli[2], built.items[1].stimuli[0]
    path = study_dir / "stimuli" / damaged.file
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    (study_dir / "stimuli" / missing.file).unlink()
    health = check_study(copy, DEFINITION.study_id)  # what the experimenter's views show
    with pytest.raises(StudyError) as error:
        load_manifest(study_dir)
    message = str(error.value)
    assert health.problem == message and health.manifest.items == built.items and not health.ok
    assert f"1 stimulus file(s) missing: {missing.file} (item 1, reference)" in message
    assert f"damaged (sha256 differs from the manifest): {damaged.file} (item 0, w8a8-dynamic)" in message
    assert "Run the same build command again" in message
    assert load_manifest(study_dir, verify=False).items == built.items  # the app may skip the check
    build_study(DEFINITION, tiny_audio, models, copy, progress=False)
    assert load_manifest(study_dir).to_dict() == built.to_dict()
    assert path.read_bytes() == built.path(damaged).read_bytes()
    assert check_study(copy, DEFINITION.study_id).ok
    path.write_bytes(bytes(data))  # damaged again after it verified: seen at the next check
    assert damaged.file in check_study(copy, DEFINITION.study_id).problem
    unreadable = check_study(copy, "no-such-study")
    assert unreadable.manifest is None and "No study at" in unreadable.problem


def test_unknown_study_and_foreign_folders(tmp_path, built, tiny_audio, models, copy):
    with pytest.raises(StudyError, match="No study at .*build it first"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StudyError, match="not a study folder"):
        load_manifest(tmp_path / "plain")
    changed = StudyDefinition(**{**DEFINITION.to_dict(), "steps": 5})
    with pytest.raises(StudyError, match=r"different definition \(changed: steps\)"):
        build_study(changed, tiny_audio, models, copy, progress=False)
    (copy / DEFINITION.study_id / "secret").unlink()
    with pytest.raises(ValueError, match="secret is missing"):
        build_study(DEFINITION, tiny_audio, models, copy, progress=False)


def test_definitions_the_model_cannot_serve(tiny_audio, models, tmp_path):
    """Refused before anything is written; the request checks are Compare's (tests/lab/test_requests.py)."""
    too_long = StudyDefinition(**{**DEFINITION.to_dict(), "seconds": 30.0})
    with pytest.raises(ValueError, match="Seconds must be between 0.5 and 2.048"):
        build_study(too_long, tiny_audio, models, tmp_path, progress=False)
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        build_study(DEFINITION, tiny_audio, models, tmp_path, rank=2, world_size=2)
    # a model whose generation.json validates v-ddim only: a study cannot be built with another sampler
    guided = dataclasses.replace(tiny_audio, guide=ModelGuide(validated=(("v-ddim", 1.0, 5.0),)))
    unvalidated = StudyDefinition(**{**DEFINITION.to_dict(), "sampler_type": "dpmpp-3m-sde"})
    with pytest.raises(ValueError, match="validated for the samplers v-ddim only"):
        build_study(unvalidated, guided, models, tmp_path, progress=False)
    assert not (tmp_path / DEFINITION.study_id).exists()


def test_the_estimate_counts_clips_files_and_bytes_and_holds_back_large_builds(tiny_audio, models, tmp_path):
    estimate = estimate_build(DEFINITION, tiny_audio, models)
    assert (estimate.items, estimate.clips, estimate.files) == (2, 2 * 3, 2 * 5)  # reference + 2 conditions;
    # the hidden reference and the anchor are written, not generated
    assert estimate.file_bytes == 44 + 8 + blinding.JUNK_SIZE + 2 * round(0.5 * 16000)  # 16-bit mono WAV
    assert estimate.seconds_per_clip > 0 and "6 clips to generate" in estimate.describe()
    estimate.check_confirmed(False, "tick the box")  # small: no confirmation needed
    huge = estimate_build(dataclasses.replace(DEFINITION, seeds=tuple(range(100_000))), tiny_audio, models)
    assert huge.large and huge.clips == 600_000
    with pytest.raises(ValueError, match=r"This study is large: .*600000 clips.*Confirm it \(tick the box\)"):
        huge.check_confirmed(False, "tick the box")
    huge.check_confirmed(True, "tick the box")


def test_the_cli_says_the_estimate_and_wants_yes_for_a_large_study(tiny_audio_files, tmp_path, capsys):
    config, ckpt = tiny_audio_files
    definition = tmp_path / "definition.json"
    definition.write_text(dataclasses.replace(DEFINITION, seeds=tuple(range(100_000))).to_json())
    args = ["build", str(definition), "--model-config", str(config), "--ckpt-path", str(ckpt), "--root",
            str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    with pytest.raises(SystemExit, match="This study is large.*add --yes"):
        study_main(args)
    assert "200000 items x 3 clips" in capsys.readouterr().err and not (tmp_path / "studies").exists()


def _cli_build(args, root, env):
    command = [*args, "build", str(root / "definition.json"), "--model-config", str(env["CONFIG"]), "--ckpt-path",
               str(env["CKPT"]), "--root", str(root), "--cache-dir", str(root / "cache"), "--no-progress"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_build_gives_the_same_manifest(tiny_audio_files, tmp_path):
    config, ckpt = tiny_audio_files
    definition = StudyDefinition(study_id="sharded", title="Sharded", test_type="ab", anchor="lowpass-7k",
                                 prompts=["sine tone at a4", "white noise", "kick drum"], seeds=[2],
                                 conditions=["w8a8-dynamic"], steps=4, seconds=0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "CONFIG": str(config),
           "CKPT": str(ckpt)}
    roots = {}
    for name in ("two", "one"):
        roots[name] = tmp_path / name
        roots[name].mkdir()
        (roots[name] / "definition.json").write_text(definition.to_json())
    result = _cli_build([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "lab.study"], roots["two"], env)
    assert "items      3 (3 prompts x 1 seeds), 9 stimuli, all files verified" in result.stdout
    shards = roots["two"] / "sharded" / "shards"
    assert [len((shards / f"rank-{r}.jsonl").read_text().splitlines()) for r in (0, 1)] == [2, 1]  # i % 2
    (roots["one"] / "sharded").mkdir()  # the same secret, so the same names and JUNK bytes
    shutil.copy(roots["two"] / "sharded" / "secret", roots["one"] / "sharded" / "secret")
    _cli_build([sys.executable, "-m", "lab.study"], roots["one"], env)
    manifests = [json.loads((roots[name] / "sharded" / "manifest.json").read_text()) for name in ("two", "one")]
    for manifest in manifests:
        manifest.pop("created")
    assert manifests[0] == manifests[1]
    load_manifest(roots["two"] / "sharded")


def test_cli_show_and_analyse(copy, capsys):
    import time

    from lab.study.__main__ import main
    from lab.study.assignment import trials_for
    from lab.study.raters import set_field
    from lab.study.store import RatingsStore

    study_dir = copy / DEFINITION.study_id
    with pytest.raises(SystemExit, match="error: No ratings file"):
        main(["analyse", str(study_dir)])
    manifest = load_manifest(study_dir)
    store = RatingsStore(manifest)
    for k in range(3):
        enroll(manifest, f"rater-{k}")
        set_field(study_dir, f"rater-{k}", "headphone_check", {"passed": True, "correct": 6, "total": 6})
        for trial in trials_for(manifest, f"rater-{k}"):
            scores = {s.label: 100 if s.condition == "hidden-reference" else 50 + 10 * k for s in trial.rated}
            heard = {s.label: 1 for s in trial.stimuli}
            store.submit(trial, f"rater-{k}", scores, heard, presented_at=time.time() - 60, streamed=heard)
    main(["show", str(study_dir)])
    shown = capsys.readouterr().out
    assert "tiny-mushra: Tiny MUSHRA" in shown and "raters     3 registered, 24 rating rows" in shown
    main(["analyse", str(study_dir)])
    assert "| w4a16 | 6 | 60.00 |" in capsys.readouterr().out
    assert (study_dir / "analysis" / "report.md").is_file() and (study_dir / "analysis" / "scores.html").is_file()
    with pytest.raises(SystemExit, match="error: No study at"):
        main(["show", str(copy / "missing")])


def test_a_study_sharing_model_prompt_and_seed_with_another_is_warned_about(copy):
    from lab.study.build import shared_items

    manifest = load_manifest(copy / DEFINITION.study_id)
    assert shared_items(copy, manifest) == []
    shutil.copytree(manifest.study_dir, copy / "same-clips")  # same model, prompts and seeds
    other_model = copy / "other-model"
    shutil.copytree(manifest.study_dir, other_model)
    study = json.loads((other_model / "study.json").read_text())
    study["model"]["fingerprint"] = "f" * 16
    (other_model / "study.json").write_text(json.dumps(study))
    warnings = shared_items(copy, manifest)
    assert len(warnings) == 1 and "'same-clips'" in warnings[0] and "shares 2 of its 2 items" in warnings[0]
