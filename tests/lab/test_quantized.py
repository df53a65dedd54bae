"""Quantized models on the tiny text-to-audio model: the calibration plan (lab.calibration), copies that share the
FP model's tensors (lab.model_copies), one quantized-file format with clear errors (lab.quantized_files), given
statistics, reproducible +lora, calibration beside serving (lab.quantized)."""
import dataclasses
import threading

import pytest
import torch

import quant
from lab import sat
from lab.calibration import CalibrationPlan, spread
from lab.model_copies import copy_for_quantization, shared_view
from lab.quantized import QuantizedModels
from lab.quantized_files import load_quantized, save_quantized
from lab.resources import CALIBRATION_PROMPTS, read_prompts
from tests.tiny_audio import write_tiny_audio_model
from tests.tiny_models import calibration_loop, tiny_diffusion_cond

PROMPTS = ["sine tone at a4", "white noise", "kick drum at 120 bpm"]


def cache(loaded, folder, **kwargs) -> QuantizedModels:
    return QuantizedModels(loaded, cache_dir=folder, calibration_prompts=PROMPTS, calibration_steps=6, **kwargs)


def tensors(model) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@pytest.fixture(scope="module")
def stats_file(tiny_audio, tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    CalibrationPlan.default(tiny_audio, PROMPTS, steps=6).run(tiny_audio, progress=False).save(path)
    return path


@pytest.fixture(scope="module")
def dynamic_file(tiny_audio, tmp_path_factory):
    recipe = quant.get_recipe("w8a8-dynamic")
    model = quant.quantize_(copy_for_quantization(tiny_audio.model, recipe), recipe)
    path = tmp_path_factory.mktemp("files") / "dynamic.safetensors"
    save_quantized(model, recipe, path)
    return path


def test_spread_takes_evenly_spaced_items():
    assert spread(list("abcdefgh"), 4) == ["a", "c", "e", "g"]
    assert spread(["a", "b"], 4) == ["a", "b"]


def test_the_default_plan_scales_the_clip_and_steps_to_the_model(tiny_audio, demo_model):
    prompts = read_prompts(CALIBRATION_PROMPTS)
    plan = CalibrationPlan.default(tiny_audio, prompts)  # no generation.json: SAO's 100 steps, dpmpp-3m-sde
    assert plan.prompts == tuple(spread(prompts, 4)) and len(set(plan.prompts)) == 4
    assert plan.sampling.steps == 25 and plan.forwards == 25 and plan.prompt_forwards == 100
    assert plan.seconds == pytest.approx(64 * 64 / 16000)  # 64 DiT tokens of 64 samples at 16 kHz
    demo = CalibrationPlan.default(demo_model, prompts)
    assert demo.seconds == pytest.approx(1.024) and demo.sampling.steps == 25  # 64 of its 128 tokens; 25 of 50 steps
    short = dataclasses.replace(tiny_audio, sampling=tiny_audio.sampling.replace(seconds=0.1))
    assert CalibrationPlan.default(short, prompts).seconds == pytest.approx(0.1)  # never longer than the model's clip
    few_steps = dataclasses.replace(tiny_audio, sampling=tiny_audio.sampling.replace(steps=10))
    assert CalibrationPlan.default(few_steps, prompts).sampling.steps == 10
    chosen = CalibrationPlan.default(tiny_audio, prompts, count=8, steps=5, seconds=0.25, batch=3)
    assert (len(chosen.prompts), chosen.sampling.steps, chosen.seconds, chosen.forwards) == (8, 5, 0.25, 15)
    with pytest.raises(ValueError, match="at least one prompt"):
        CalibrationPlan.default(tiny_audio, [])


def test_a_quantized_copy_holds_only_its_dit_and_leaves_the_fp_model_alone(tiny_audio):
    before = {key: value.clone() for key, value in tiny_audio.model.state_dict().items()}
    recipe = quant.get_recipe("w8a8-dynamic")
    model = quant.quantize_(copy_for_quantization(tiny_audio.model, recipe), recipe)
    assert model.conditioner is tiny_audio.model.conditioner
    fp_storage = {t.untyped_storage().data_ptr() for t in tensors(tiny_audio.model)}
    own = [t for t in tensors(model) if t.untyped_storage().data_ptr() not in fp_storage]
    own_bytes = sum(t.numel() * t.element_size() for t in own)
    fp_dit_bytes = sum(t.numel() * t.element_size() for t in tensors(quant.find_dit(tiny_audio.model)))
    assert own_bytes < 0.5 * fp_dit_bytes  # int8 linears and the DiT's few float tensors, nothing shared copied
    assert not quant.quantized_layers(tiny_audio.model)
    assert all(torch.equal(value, before[key]) for key, value in tiny_audio.model.state_dict().items())


def test_calibration_views_share_every_tensor_and_none_of_the_hooks(tiny_audio):
    dit = quant.find_dit(tiny_audio.model)
    handle = dit.register_forward_pre_hook(lambda *_: None)  # e.g. a comparison's trace in another thread
    try:
        view = shared_view(tiny_audio.model)
    finally:
        handle.remove()
    assert [t.data_ptr() for t in tensors(view)] == [t.data_ptr() for t in tensors(tiny_audio.model)]
    assert quant.find_dit(view) is not dit and not quant.find_dit(view)._forward_pre_hooks
    stats = CalibrationPlan.default(tiny_audio, PROMPTS, steps=4).run(tiny_audio, view, progress=False)
    assert stats.forwards == 4 and not dit._forward_pre_hooks and not dit._forward_hooks


def test_the_progress_bar_changes_nothing_it_counts(tiny_audio, capsys):
    plan = CalibrationPlan.default(tiny_audio, PROMPTS, steps=4)
    quiet = plan.run(tiny_audio, progress=False)
    shown = plan.run(tiny_audio, progress=True)  # the bar redraws on every forward
    assert "4/4" in capsys.readouterr().err
    assert shown.timesteps == quiet.timesteps
    assert all(torch.equal(shown.absmax[name], quiet.absmax[name]) for name in quiet.absmax)


def test_a_saved_file_loads_into_a_fresh_model_bit_identically(tiny_audio, dynamic_file, tmp_path):
    model, recipe = load_quantized(tiny_audio, dynamic_file)
    assert recipe.name == "w8a8-dynamic" and set(quant.quantized_layers(model))
    save_quantized(model, recipe, tmp_path / "again.safetensors")
    again, _ = load_quantized(tiny_audio, tmp_path / "again.safetensors")
    first, second = quant.find_dit(model).state_dict(), quant.find_dit(again).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_bad_quantized_files_get_messages_naming_what_differs(tiny_audio, dynamic_file, stats_file, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(dynamic_file.read_bytes()[:5000])
    other_shape = tiny_diffusion_cond()  # another DiT (8 latent channels, 64 wide)
    save_quantized(quant.quantize_(other_shape, "w8a8-dynamic"), "w8a8-dynamic", tmp_path / "shape.safetensors")
    config_path, ckpt_path = write_tiny_audio_model(tmp_path / "other", seed=1)  # same shapes, other weights
    other_weights = sat.load_model(model_config=config_path, ckpt_path=ckpt_path).model
    save_quantized(quant.quantize_(other_weights, "w8a8-dynamic"), "w8a8-dynamic", tmp_path / "weights.safetensors")
    whole = quant.quantize_(tiny_audio.fresh_copy(), "w8a8-dynamic")
    quant.save(whole, "w8a8-dynamic", tmp_path / "whole.safetensors")  # the whole SAT model, not its DiT
    cases = [(truncated, None, "truncated"), (tmp_path / "shape.safetensors", None, "does not fit this model"),
             (tmp_path / "whole.safetensors", None, "holds a whole model, not its DiT"),
             (tmp_path / "weights.safetensors", None, "other weights"), (dynamic_file, "w4a8-dynamic", "w_bits"),
             (stats_file, None, "not written by quant.save"), (tmp_path / "missing.safetensors", None, "not found")]
    for path, recipe, message in cases:
        with pytest.raises(ValueError, match=message):
            load_quantized(tiny_audio, path, recipe)
    assert not quant.quantized_layers(tiny_audio.model)


def test_given_statistics_replace_calibration(tiny_audio, stats_file, tmp_path):
    models = cache(tiny_audio, tmp_path, calibration_stats=stats_file)
    assert models.stats_ready and models.ready("w8a8-sqd")
    model, recipe = models.get("w8a8-smoothquant")
    assert not list(models.cache_dir.glob("calibration-*"))  # nothing calibrated, nothing cached as statistics
    expected = quant.quantize_(copy_for_quantization(tiny_audio.model, recipe), recipe,
                               quant.CalibrationStats.load(stats_file))
    built, wanted = quant.find_dit(model).state_dict(), quant.find_dit(expected).state_dict()
    assert all(torch.equal(built[k], wanted[k]) for k in wanted)


def test_bad_statistics_files_are_refused_at_start(tiny_audio, stats_file, tmp_path):
    other = tiny_diffusion_cond()
    quant.calibrate(other, calibration_loop(other), progress=False).save(tmp_path / "other.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(stats_file.read_bytes()[:3000])
    for path, message in ((tmp_path / "other.safetensors", "do not fit this model"), (truncated, "truncated"),
                          (tmp_path / "missing.safetensors", "not found")):
        with pytest.raises(ValueError, match=message):
            cache(tiny_audio, tmp_path / "cache", calibration_stats=path)


def test_lora_recipes_are_bit_reproducible_from_calibration_on(tiny_audio, tmp_path):
    built = [quant.find_dit(cache(tiny_audio, tmp_path / name).get("w4a8-sqd+lora")[0]).state_dict()
             for name in ("a", "b")]
    assert any(key.endswith("lowrank.0.A") for key in built[0])
    assert built[0].keys() == built[1].keys() and all(torch.equal(built[0][k], built[1][k]) for k in built[0])


def test_a_calibration_in_progress_does_not_hold_up_a_model_that_needs_none(tiny_audio, tmp_path, monkeypatch):
    models, started, release = cache(tiny_audio, tmp_path), threading.Event(), threading.Event()
    run = CalibrationPlan.run

    def held_run(plan, *args, **kwargs):  # the real calibration, held at its start until the test lets it go
        started.set()
        release.wait(60)
        return run(plan, *args, **kwargs)

    monkeypatch.setattr(CalibrationPlan, "run", held_run)
    calibrating = threading.Thread(target=models.calibration_stats, kwargs=dict(progress=False))
    calibrating.start()
    started.wait(60)
    serving = threading.Thread(target=models.get, args=("w8a8-dynamic",))
    serving.start()
    serving.join(60)
    served_meanwhile = not serving.is_alive()
    release.set()
    calibrating.join(60)
    assert served_meanwhile and "w8a8-dynamic" in models.cached_names and models.stats_ready


def test_calibration_cost_is_measured_and_said(tiny_audio, tmp_path):
    models = cache(tiny_audio, tmp_path)
    assert "DiT forwards" in models.calibration_cost() and "about" not in models.calibration_cost()
    assert models.measure_speed() > 0
    assert "on this machine" in models.calibration_cost()
    assert not models.stats_ready and not models.ready("w8a8-sqd") and models.ready("w8a8-dynamic")
