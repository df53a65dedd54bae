"""Paired generation, the quantized-model cache and the figures, on a tiny text-to-audio SAT model."""
import dataclasses

import numpy as np
import plotly.graph_objects as go
import pytest
import soundfile
import torch

import quant
from lab import figures, sat
from lab.calibration import calibrate
from lab.comparison import Lab
from lab.generation import (
    LOG_ABS_EDGES,
    GenerationRequest,
    LayerTrace,
    generate_clip,
    generate_pair,
    linear_layer_names,
    parse_seed,
)
from lab.methods import describe, recipe_name
from lab.quantized import QuantizedModels
from lab.quantized_files import save_quantized
from lab.resources import read_prompts
from lab.sat import SamplerSettings

LAYER = "transformer.layers.1.ff.ff.2"
REQUEST = GenerationRequest(prompt="sine tone at a4", seconds=1.0, steps=6, cfg_scale=5.0, seed=11)


@pytest.fixture(scope="module")
def loaded(tiny_audio):
    return tiny_audio


@pytest.fixture(scope="module")
def models(loaded, tmp_path_factory):
    return QuantizedModels(loaded, cache_dir=tmp_path_factory.mktemp("cache"), calibration_steps=6,
                           calibration_prompts=["sine tone at a4", "white noise", "kick drum at 120 bpm"],
                           calibration_seconds=1.0, max_models=2)


@pytest.mark.parametrize("sampler", ["dpmpp-3m-sde", "v-ddim"])
def test_same_seed_same_clip_and_seed_matters(loaded, sampler):
    request = GenerationRequest(**{**REQUEST.__dict__, "sampler": sampler})
    with torch.no_grad():
        first, again = (generate_clip(loaded.model, loaded, request) for _ in range(2))
        other = generate_clip(loaded.model, loaded, GenerationRequest(**{**request.__dict__, "seed": 12}))
    assert first.audio.shape == (1, 16000)
    np.testing.assert_array_equal(first.audio, again.audio)
    assert not np.allclose(first.audio, other.audio)
    assert len(first.denoised) == REQUEST.steps


def test_pair_of_identical_models_has_no_error(loaded):
    pair = generate_pair(loaded, loaded.fresh_copy(), REQUEST, trace_layer=LAYER, decode_steps=3)
    np.testing.assert_array_equal(pair.full_precision.audio, pair.quantized.audio)
    assert (pair.step_snr_db == 120.0).all() and pair.logmel_db == 0.0
    assert list(pair.step_logmel_steps) == [0, 2, 5] and np.allclose(pair.step_logmel_db, 0.0)


def test_quantized_pair_records_error_and_activations(loaded, models):
    model, recipe = models.get("w4a8-sqd")
    pair = generate_pair(loaded, model, REQUEST, trace_layer=LAYER, decode_steps=REQUEST.steps)
    assert not np.array_equal(pair.full_precision.audio, pair.quantized.audio)
    assert len(pair.step_snr_db) == REQUEST.steps and np.isfinite(pair.step_snr_db).all()
    assert len(pair.step_logmel_db) == REQUEST.steps and pair.logmel_db > 0
    assert (pair.step_snr_db < 120).all() and (pair.step_logmel_db > 0).all()
    fp, q = pair.full_precision.trace, pair.quantized.trace
    assert len(fp.timesteps) == REQUEST.steps and fp.timesteps == q.timesteps  # one DiT call per step (CFG batched)
    assert fp.timesteps[0] > fp.timesteps[-1]  # denoising runs from noise (t near 1) down
    for trace in (fp, q):
        assert np.allclose([h.sum() for h in trace.log_abs_hist], 1.0)
        assert trace.channel_max[0].shape == (model.model.model.transformer.layers[1].ff.ff[2].in_features,)
    # the quantized matmul sees smoothed, 8-bit-rounded activations: a different distribution
    assert not np.allclose(fp.log_abs_hist, q.log_abs_hist)


def test_validation_messages(loaded):
    max_seconds = loaded.sample_size / loaded.sample_rate
    cases = [dict(prompt="  "), dict(prompt="x" * 501), dict(seconds=0.1), dict(seconds=max_seconds + 1),
             dict(seconds=float("nan")), dict(steps=1), dict(steps=500), dict(cfg_scale=-1), dict(seed=-5),
             dict(sampler="euler")]
    for change in cases:
        with pytest.raises(ValueError) as error:
            GenerationRequest(**{**REQUEST.__dict__, **change}).validate(max_seconds)
        assert len(str(error.value)) > 10
    with pytest.raises(ValueError, match="whole number"):
        GenerationRequest.from_ui(prompt="x", negative_prompt="", seconds=1, steps=2.5, cfg_scale=1,
                                  sampler="dpmpp-3m-sde", seed="", defaults=SamplerSettings())
    with pytest.raises(ValueError, match="must be a number"):
        GenerationRequest.from_ui(prompt="x", negative_prompt="", seconds="abc", steps=2, cfg_scale=1,
                                  sampler="dpmpp-3m-sde", seed="", defaults=SamplerSettings())


def test_parse_seed():
    assert parse_seed("42") == 42 and parse_seed(" 7.0 ") == 7
    assert 0 <= parse_seed("") < 2**32 and 0 <= parse_seed(None) < 2**32
    for bad in ("abc", "1.5", "-1", str(2**40)):
        with pytest.raises(ValueError, match="Seed"):
            parse_seed(bad)


def test_sample_length_rounds_up_to_whole_patches(loaded):
    assert loaded.sample_length(1.0) == 16000  # 250 patches of 64
    assert loaded.sample_length(1.01) == 253 * 64  # 16160 samples -> 252.5 patches -> 253
    assert loaded.sample_length(1000.0) == loaded.sample_size


def test_recipe_names_from_ui_choices():
    assert recipe_name("W8A8", "sqd", True) == "w8a8-sqd+lora"
    assert recipe_name("W4A16", "static", False) == "w4a16"  # weight-only ignores the method
    for name in ("w8a8-sqd+lora", "w4a16", "w4a8-static"):
        quant.get_recipe(name)
    assert describe(quant.get_recipe("w4a8-sqd+lora")) == ("W4A8", "sqd+lora")
    with pytest.raises(ValueError, match="precision"):
        recipe_name("W2A2", "sqd")
    with pytest.raises(ValueError, match="method"):
        recipe_name("W8A8", "gptq")


def test_cache_builds_once_keeps_at_most_max_and_reuses_disk(loaded, models, tmp_path):
    first, _ = models.get("w8a8-static")
    assert models.get("w8a8-static")[0] is first
    models.get("w8a8-dynamic")
    models.get("w8a16")  # third model: the least recently used (w4a8-sqd or w8a8-static) goes
    assert len(models.cached_names) == 2 and "w8a16" in models.cached_names
    assert list(models.cache_dir.glob("calibration-*.safetensors"))
    with pytest.raises(ValueError, match="w8a8-sqd"):  # unknown names list the valid ones
        models.get("w8a8-magic")
    # a fresh cache on the same folder loads the saved model: identical output, no recalibration
    again = QuantizedModels(loaded, cache_dir=models.cache_dir.parent, calibration_steps=6,
                            calibration_prompts=list(models.plan.prompts), calibration_seconds=1.0)
    reloaded, _ = again.get("w8a8-static")
    assert again._stats is None
    with torch.no_grad():
        a = generate_clip(first, loaded, REQUEST).audio
        b = generate_clip(reloaded, loaded, REQUEST).audio
    np.testing.assert_array_equal(a, b)


def test_saved_quantized_files_are_served(loaded, models, tmp_path):
    model, recipe = models.get("w8a8-dynamic")
    path = tmp_path / "dit.safetensors"
    save_quantized(model, recipe, path)
    other = QuantizedModels(loaded, cache_dir=tmp_path / "c", calibration_prompts=["x"])
    assert other.add_saved(path).name == "w8a8-dynamic"
    assert other.cached_names == ["w8a8-dynamic"]
    with pytest.raises(ValueError, match="not found"):
        other.add_saved(tmp_path / "missing.safetensors")


def test_read_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\nsine tone at A4\n\n  white noise  \n")
    assert read_prompts(path) == ["sine tone at A4", "white noise"]
    with pytest.raises(ValueError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_layer_names_match_in_both_models(loaded, models):
    model, _ = models.get("w8a8-dynamic")
    assert linear_layer_names(loaded.model) == linear_layer_names(model)
    assert LAYER in linear_layer_names(model)


def test_figures(loaded, models):
    model, _ = models.get("w8a8-smoothquant")
    pair = generate_pair(loaded, model, REQUEST, trace_layer=LAYER, decode_steps=3)
    fp, q = pair.full_precision, pair.quantized
    spectrograms = figures.spectrogram_figure(fp.audio, q.audio, pair.sample_rate)
    assert [trace.type for trace in spectrograms.data] == ["heatmap"] * 3
    np.testing.assert_allclose(spectrograms.data[2].z, spectrograms.data[1].z - spectrograms.data[0].z)
    hz = np.asarray(spectrograms.data[0].y)  # mel band centres in Hz, rising, below Nyquist
    assert len(hz) == spectrograms.data[0].z.shape[0] and 0 < hz[0] < 100 and np.all(np.diff(hz) > 0)
    assert hz[-1] < pair.sample_rate / 2
    difference = spectrograms.data[2]  # a fixed, symmetric colour range whatever this pair's error is
    assert (difference.zmin, difference.zmax) == (-figures.DIFFERENCE_DB, figures.DIFFERENCE_DB)
    steps = figures.step_metrics_figure(pair.step_snr_db, pair.step_logmel_steps, pair.step_logmel_db)
    assert len(steps.data[0].y) == REQUEST.steps and list(steps.data[1].x) == [1, 3, 6]  # decoded steps, 1-based
    latent_only = figures.step_metrics_figure(pair.step_snr_db, np.arange(0), np.arange(0))
    assert len(latent_only.data) == 1 and "decode per-step" in latent_only.layout.title.text
    heatmap = figures.activation_heatmap_figure(fp.trace, q.trace)
    assert heatmap.data[0].z.shape == (REQUEST.steps, len(LOG_ABS_EDGES) - 1)
    slider = figures.activation_step_figure(fp.trace, q.trace)
    assert len(slider.data) == 2 * REQUEST.steps and len(slider.layout.sliders[0].steps) == REQUEST.steps
    layer = quant.find_dit(model).get_submodule(LAYER)
    smoothing = [layer.smoothing_for(t).numpy() for t in fp.trace.timesteps]
    outliers = figures.channel_outlier_figure(fp.trace, smoothing)
    np.testing.assert_allclose(outliers.data[0].y, np.max(fp.trace.channel_max, axis=0))
    np.testing.assert_allclose(outliers.data[1].y, np.max([m / s for m, s in zip(fp.trace.channel_max, smoothing)],
                                                          axis=0), rtol=1e-6)
    assert len(figures.channel_outlier_figure(fp.trace, None).data) == 1
    for figure in (spectrograms, steps, heatmap, slider, outliers):
        assert isinstance(figure, go.Figure) and figure.to_json()


def test_outlier_figure_shows_smoothing_flattening_an_outlier_channel():
    trace = LayerTrace("layer")
    x = torch.ones(4, 16)
    x[:, 3] = 100.0  # one outlier channel
    for t in (0.9, 0.5, 0.1):
        trace.record(t, x)
    divisor = np.sqrt(trace.channel_max[0])  # SmoothQuant alpha=0.5 with flat weights
    figure = figures.channel_outlier_figure(trace, [divisor] * 3)
    before, after = figure.data[0].y, figure.data[1].y
    assert before.max() / np.median(before) == pytest.approx(100.0)
    assert after.max() / np.median(after) == pytest.approx(10.0)
    assert "100.0 before, 10.0 after" in figure.layout.title.text


def test_compare_rejects_a_bad_request_before_quantizing(loaded, tmp_path):
    models = QuantizedModels(loaded, cache_dir=tmp_path / "cache", calibration_prompts=["white noise"],
                             calibration_steps=4, calibration_seconds=0.5, max_models=1)
    lab = Lab(loaded, models, tmp_path / "out")
    with pytest.raises(ValueError, match="prompt is empty"):
        lab.compare(GenerationRequest(**{**REQUEST.__dict__, "prompt": "  "}), "w8a8-sqd")
    assert models.cached_names == [] and not (tmp_path / "cache").exists()  # nothing calibrated or quantized


def test_compare_writes_the_pair_and_says_what_each_snr_measures(loaded, models, tmp_path):
    lab = Lab(loaded, models, tmp_path / "out")
    view = lab.compare(GenerationRequest(**{**REQUEST.__dict__, "steps": 2}), "w8a8-dynamic")
    full_precision, quantized = (soundfile.read(path)[0] for path in (view.full_precision_wav, view.quantized_wav))
    assert full_precision.shape == quantized.shape and not np.array_equal(full_precision, quantized)
    assert "waveform SNR" in view.summary and "model-space SNR of the last denoised estimate" in view.summary
    assert "shares the rest with the full-precision model: conditioners" in view.summary
    assert len(view.step_metrics.data) == 1  # nothing decoded per step unless asked for


def test_compare_refuses_an_uncalibrated_recipe_with_its_cost_until_calibrated(loaded, tmp_path):
    models = QuantizedModels(loaded, cache_dir=tmp_path / "cache", calibration_prompts=["white noise"],
                             calibration_steps=4, calibration_seconds=0.5)
    lab = Lab(loaded, models, tmp_path / "out")
    lab.warm_up()
    assert lab.default_recipe().name == "w8a8-dynamic"  # no statistics: the first click calibrates nothing
    assert "needs no calibration" in lab.calibration_status("w8a8-dynamic")
    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 2})
    with pytest.raises(ValueError, match=r"needs calibration statistics first: 1 prompts x 4 steps .* about"):
        lab.compare(request, "w8a8-sqd")
    assert "Press **Calibrate**" in lab.calibration_status("w8a8-sqd") and not models.stats_ready
    assert "Calibrated in" in lab.calibrate() and "ready" in lab.calibrate()
    assert lab.default_recipe().name == "w8a8-sqd" and "ready" in lab.calibration_status("w8a8-sqd")
    assert "w8a8-sqd" in lab.compare(request, "w8a8-sqd").summary


@pytest.mark.parametrize("sampler", ["v-ddim", "k-heun"])
def test_calibration_announces_the_forwards_it_makes(loaded, sampler, capsys):
    prompts = ["white noise", "sine tone at a4", "kick drum at 120 bpm"]
    settings = dataclasses.replace(loaded, sampling=loaded.sampling.replace(sampler_type=sampler, sigma_max=1.0))
    stats = calibrate(settings, prompts, steps=3, seconds=0.5, batch=2)
    expected = 2 * sat.dit_forwards(sampler, 3)  # two batches
    assert stats.forwards == expected
    assert f"/{expected}" in capsys.readouterr().err  # the bar's total: tqdm prints n/total
