"""The adherence evaluator: right on the corpus's own audio, and it rejects audio made for another caption."""
import dataclasses
import json
import re

import numpy as np
import pytest

from demo_model import adherence, corpus
from lab.resources import CALIBRATION_PROMPTS, read_prompts
from lab.sat import SamplerSettings

SR = corpus.SAMPLE_RATE


def _sample(n_per_family: int, seed: int) -> list[corpus.Caption]:
    rng = np.random.default_rng(seed)
    picked = []
    for family in corpus.FAMILIES:
        pool = corpus.all_captions(family)
        picked += [pool[i] for i in rng.choice(len(pool), size=n_per_family, replace=False)]
    return picked


def _wrong(caption: corpus.Caption) -> corpus.Caption:
    """A caption of the same family whose checked attribute differs clearly from `caption`'s."""
    if caption.family in ("tone", "pluck", "chord"):
        midi = corpus.name_to_midi(caption.note)
        allowed = corpus.CHORD_ROOTS if caption.family == "chord" else corpus.NOTES
        shifted = corpus.midi_to_name(midi + 4 if corpus.midi_to_name(midi + 4) in allowed else midi - 4)
        return dataclasses.replace(caption, note=shifted)
    if caption.family == "noise":
        return dataclasses.replace(caption, colour={"white": "brown", "pink": "white", "brown": "pink"}[caption.colour])
    if caption.family == "rhythm":
        return dataclasses.replace(caption, bpm=caption.bpm + 40 if caption.bpm <= 140 else caption.bpm - 50)
    return dataclasses.replace(caption, direction="falling" if caption.direction == "rising" else "rising")


@pytest.fixture(scope="module")
def ground_truth():
    captions = _sample(6, seed=11)
    return [(c, corpus.synthesize(c, seed=100 + i)) for i, c in enumerate(captions)]


def test_ground_truth_audio_is_judged_adherent(ground_truth):
    results = adherence.evaluate_many([(c.text, y) for c, y in ground_truth], SR)
    table = adherence.accuracy_by_family(results)
    assert set(table) == {*corpus.FAMILIES, "all"}
    assert table["all"]["accuracy"] >= 0.95, adherence.format_table(results)
    assert all(row["accuracy"] >= 5 / 6 for row in table.values()), adherence.format_table(results)
    assert table["all"]["level_accuracy"] >= 0.95
    assert table["all"]["buzz"] == 0, [(r["prompt"], r["peak_hz"]) for r in results if r["buzz"]]


def test_audio_of_another_caption_is_rejected(ground_truth):
    results = adherence.evaluate_many([(_wrong(c).text, y) for c, y in ground_truth], SR)
    assert adherence.accuracy_by_family(results)["all"]["accuracy"] <= 0.05, adherence.format_table(results)


def test_a_steady_noise_floor_under_the_hits_leaves_the_tempo_alone():
    """Generated drum patterns are never digitally silent between hits: a floor that does not come and go must not
    count as onsets (docs/demo_model.md, "Known limits"), and the wrong tempo still fails."""
    rng = np.random.default_rng(3)
    pool = corpus.all_captions("rhythm")
    for i in rng.choice(len(pool), size=6, replace=False):
        caption = pool[i]
        y = corpus.synthesize(caption, seed=int(i))
        floored = y + 10 ** (-40 / 20) * np.abs(y).max() * rng.standard_normal(y.shape)
        assert adherence.evaluate(caption.text, floored, SR)["ok"], caption.text
        assert not adherence.evaluate(_wrong(caption).text, floored, SR)["ok"], caption.text


def test_major_and_minor_chords_are_told_apart():
    for waveform in corpus.WAVEFORMS:
        y = corpus.synthesize(f"{waveform} minor chord on D4")
        assert adherence.evaluate(f"{waveform} minor chord on D4", y, SR)["ok"]
        assert not adherence.evaluate(f"{waveform} major chord on D4", y, SR)["ok"]


def test_a_tone_is_not_noise_and_silence_adheres_to_nothing():
    tone = corpus.synthesize("sine tone at A4")
    assert not any(adherence.evaluate(f"{c} noise", tone, SR)["ok"] for c in corpus.NOISE_COLOURS)
    silent = adherence.evaluate("white noise", np.zeros(corpus.CLIP_SAMPLES), SR)
    assert silent["ok"] is False and silent["silent"]


def _frame_periodic(seed: int, hop: int = 256) -> np.ndarray:
    """What a latent that is the same in every frame decodes to: one random hop-long waveform, repeated."""
    frame = np.random.default_rng(seed).standard_normal(hop)
    return 0.3 * np.tile(frame, corpus.CLIP_SAMPLES // hop)


@pytest.mark.parametrize("prompt", ["sine tone at C4", "plucked string playing E5", "white noise",
                                    "kick drum at 150 bpm", "rising sine sweep"])
def test_a_waveform_that_repeats_every_hop_is_a_buzz(prompt):
    result = adherence.evaluate(prompt, _frame_periodic(seed=len(prompt)), SR)
    assert result["buzz"], result
    assert result["peak_hz"] % adherence.FRAME_RATE_HZ == pytest.approx(0, abs=adherence.BUZZ_TOLERANCE_HZ)


def test_a_line_on_the_frame_rate_is_no_buzz_when_the_caption_asks_for_that_pitch():
    """437.5 Hz is 7 x 62.5 Hz and 0.1 semitone under A4: an A4 tone may sit there, a C4 tone may not."""
    line = 0.5 * np.sin(2 * np.pi * 7 * adherence.FRAME_RATE_HZ * np.arange(corpus.CLIP_SAMPLES) / SR)
    assert not adherence.evaluate("sine tone at A4", line, SR)["buzz"]
    assert not adherence.evaluate("sine major chord on F4", line, SR)["buzz"]  # F4 A4 C5
    assert adherence.evaluate("sine tone at C4", line, SR)["buzz"]
    assert not adherence.evaluate("sine tone at C4", corpus.synthesize("sine tone at C4"), SR)["buzz"]
    # another model's frame rate: the same line is on a multiple of 62.5 Hz but not of 50 Hz
    assert not adherence.evaluate("sine tone at C4", line, SR, frame_rate=50.0)["buzz"]


def test_sweep_table_has_a_column_per_setting_and_counts_buzzing_clips():
    clips = [("sine tone at C4", corpus.synthesize("sine tone at C4")), ("white noise", _frame_periodic(1))]
    results = {"v-ddim CFG 1.5": adherence.evaluate_many(clips, SR),
               "dpmpp-3m-sde CFG 5": adherence.evaluate_many(clips[:1], SR)}
    lines = adherence.sweep_table(results).splitlines()
    assert lines[0] == "| family | v-ddim CFG 1.5 | dpmpp-3m-sde CFG 5 |"
    assert "| tone | 1 / 1 | 1 / 1 |" in lines and "| noise | 0 / 1 |  |" in lines
    assert "| all | 1 / 2 | 1 / 1 |" in lines and lines[-1] == "| buzzing clips | 1 | 0 |"


def test_accepts_tensors_and_stereo_and_reports_details():
    import torch

    y = torch.from_numpy(corpus.synthesize("sine tone at A4")).repeat(1, 2, 1)  # (batch, channels, n)
    result = adherence.evaluate("sine tone at A4", y, SR)
    assert result["ok"] and result["family"] == "tone" and abs(result["f0_hz"] - 440) < 5


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="grammar"):
        adherence.evaluate("a violin solo", np.zeros(100), SR)
    with pytest.raises(ValueError, match="NaN"):
        adherence.evaluate("white noise", np.full(100, np.nan), SR)


def test_prompt_sets_are_disjoint_and_cover_every_family():
    evaluation, held_out = adherence.evaluation_prompts(), adherence.held_out_prompts()
    calibration = read_prompts(CALIBRATION_PROMPTS)
    assert (len(evaluation), len(held_out), len(calibration)) == (56, 22, 24)
    for prompts in (evaluation, held_out, calibration):
        assert {corpus.parse_caption(p).family for p in prompts} == set(corpus.FAMILIES)
    assert not set(evaluation) & set(calibration) and not set(held_out) & (set(evaluation) | set(calibration))
    assert all(corpus.is_held_out(corpus.parse_caption(p)) for p in held_out)


def test_cli_checks_the_corpus_audio_of_a_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two families\nsine tone at A4\n\nbrown noise\n")
    out = tmp_path / "results.json"
    adherence.main(["--set", "ground-truth", "--prompts", str(prompts), "--seed", "7", "--json", str(out)])
    results = json.loads(out.read_text())["file"]
    assert [(r["prompt"], r["ok"]) for r in results] == [("sine tone at A4", True), ("brown noise", True)]
    assert "all" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--override", '{"cfg": 3}'], "unknown setting.*cfg.*cfg_scale"),
    (["--override", "[3]"], "must be a JSON object"),
    (["--override", "{cfg_scale: 3}"], "not valid JSON"),
    (["--prompts", "no/such/file.txt"], "not found"),
    (["--sampler", "v-ddim", "euler"], "unknown euler.*dpmpp-3m-sde"),
    (["--set", "ground-truth", "--cfg", "5"], "need a model"),
])
def test_cli_rejects_bad_arguments_before_loading_a_model(argv, message, capsys, monkeypatch):
    import lab.sat

    monkeypatch.setattr(lab.sat, "load_model", lambda **_: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        adherence.main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_cli_rejects_a_prompt_outside_the_grammar(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sine tone at A4\na violin solo\n")
    with pytest.raises(SystemExit):
        adherence.main(["--set", "ground-truth", "--prompts", str(prompts)])
    assert "a violin solo" in capsys.readouterr().err


def test_override_changes_only_the_named_settings():
    defaults = SamplerSettings(steps=50, cfg_scale=1.5, sampler_type="v-ddim", sigma_max=1.0)
    changed = defaults.replace(**adherence.parse_override('{"cfg_scale": 3, "steps": 20}'))
    assert changed == SamplerSettings(steps=20, cfg_scale=3, sampler_type="v-ddim", sigma_max=1.0)


def test_generate_makes_clip_i_from_seed_plus_i_as_sat_does(demo_model):
    """The published adherence figures were made with one generate_diffusion_cond call per prompt, seed + i."""
    import torch
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    settings = demo_model.sampling.replace(steps=3)
    prompts = ["sine tone at A4", "pink noise"]
    clips = adherence.generate(demo_model.model, prompts, seed=1000, settings=settings,
                               sample_size=demo_model.sample_size)
    with torch.no_grad():
        second = generate_diffusion_cond(
            demo_model.model, steps=3, cfg_scale=settings.cfg_scale, sample_size=demo_model.sample_size, seed=1001,
            conditioning=[{"prompt": "pink noise", "seconds_start": 0, "seconds_total": 2.048}], device="cpu",
            sampler_type=settings.sampler_type, sigma_min=settings.sigma_min, sigma_max=settings.sigma_max)
    assert [c.shape for c in clips] == [(corpus.CLIP_SAMPLES,)] * 2 and clips[0].dtype == np.float32
    np.testing.assert_array_equal(clips[1], second[0, 0].numpy())
    assert not np.allclose(clips[0], clips[1])
