"""quantize_ / save / load / calibrate on tiny random SAT models, and clear errors on bad input."""
import copy

import pytest
import torch

import quant
from quant.primitives import sqnr
from tests.tiny_models import calibration_loop, dit_inputs, dit_timestep_loop, generate, tiny_diffusion_cond, tiny_dit


@pytest.fixture(scope="module")
def model():
    return tiny_diffusion_cond()


@pytest.fixture(scope="module")
def stats(model):
    return quant.calibrate(model, calibration_loop(model), progress=False)


@pytest.fixture(scope="module")
def reference(model):
    return generate(model, steps=4)


def quantized(model, stats, recipe):
    recipe = quant.get_recipe(recipe) if isinstance(recipe, str) else recipe
    return quant.quantize_(copy.deepcopy(model), recipe, stats if recipe.needs_calibration else None)


@pytest.mark.parametrize("preset", list(quant.PRESETS))
def test_every_preset_runs_the_sat_sampler_end_to_end(model, stats, reference, preset):
    q = quantized(model, stats, preset)
    layers = quant.quantized_layers(q)
    assert layers and all(not quant.model.matches_any(name, quant.DEFAULT_SKIP) for name in layers)
    audio = generate(q, steps=4)
    assert audio.shape == reference.shape and torch.isfinite(audio).all()
    assert 10 < sqnr(reference, audio) < float("inf")  # changed by quantization, still the same sample


def test_calibration_records_every_linear_at_every_sampler_timestep(model, stats):
    dit = quant.find_dit(model)
    assert set(stats.absmax) == set(quant.linear_layers(dit))
    assert stats.forwards == 16 and len(stats.timesteps) == 8  # 2 runs x 8 steps, same schedule: 8 distinct t
    assert stats.timesteps == sorted(stats.timesteps) and 0 < stats.timesteps[0] < stats.timesteps[-1] < 1
    layer = "transformer.layers.0.ff.ff.2"
    assert stats.absmax[layer].shape == (8, dit.transformer.layers[0].ff.ff[2].in_features)
    assert (stats.absmax[layer] > 0).all()


def test_calibration_stats_save_load_round_trip(stats, tmp_path):
    stats.save(tmp_path / "stats.safetensors")
    loaded = quant.CalibrationStats.load(tmp_path / "stats.safetensors")
    assert loaded.timesteps == stats.timesteps and loaded.forwards == stats.forwards
    assert all(torch.equal(loaded.absmax[k], v) for k, v in stats.absmax.items())


def test_timestep_groups_split_the_calibrated_timesteps(stats):
    boundaries = stats.group_boundaries(4)
    assert len(boundaries) == 3 and boundaries == sorted(boundaries)
    groups = [quant.timestep.group_index(t, boundaries) for t in stats.timesteps]
    assert groups == sorted(groups) and [groups.count(g) for g in range(4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="calibrated timesteps"):
        stats.group_boundaries(9)


def test_sqd_picks_the_smoothing_of_the_current_timestep_group():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    stats = quant.calibrate(dit, dit_timestep_loop(dit, x, kwargs, (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)), progress=False)
    assert len(stats.timesteps) == 6
    q = quant.quantize_(copy.deepcopy(dit), quant.get_recipe("w8a8-sqd-pergroup").replace(timestep_groups=3), stats)
    layer = q.transformer.layers[1].ff.ff[0].proj
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append((module.group_for(), module.smoothing_for())))
    with torch.no_grad():
        for t in (0.1, 0.9):  # the tracker reads t from the DiT forward; nobody passes it to the layer
            q(x, torch.full((2,), t), **kwargs)
    (low_group, low_s), (high_group, high_s) = seen
    assert (low_group, high_group) == (0, 2)
    assert not torch.allclose(low_s, high_s)
    assert torch.equal(low_s, layer.smoothing_for(t=0.1)) and torch.equal(high_s, layer.smoothing_for(t=0.9))


@pytest.mark.parametrize("preset", ["w8a8-sqd+lora", "w4a8-static", "w4a16", "w8a8-dynamic"])
@pytest.mark.parametrize("backend", ["integer", "simulated"])
def test_save_load_gives_bit_identical_outputs(model, stats, preset, backend, tmp_path):
    recipe = quant.get_recipe(preset, backend=backend)
    q = quantized(model, stats, recipe)
    path = tmp_path / "q.safetensors"
    quant.save(q, recipe, path)
    fresh = tiny_diffusion_cond(seed=123)  # same config, different random weights: all must come from the file
    assert quant.load(fresh, path, recipe=recipe) == recipe
    assert torch.equal(generate(q, steps=3), generate(fresh, steps=3))


def test_quantized_model_has_the_expected_layers(model, stats):
    q = quantized(model, stats, "w4a8-sqd-pergroup+lora")
    layer = q.model.model.transformer.layers[0].self_attn.to_qkv
    assert isinstance(layer, quant.QuantLinear)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape[0] == 4  # 4 groups, packed int4
    assert len(layer.lowrank) == 4 and layer.lowrank[0].rank == 32
    assert isinstance(q.model.model.transformer.project_out, torch.nn.Linear)  # skipped by default


# ---- bad input -----------------------------------------------------------------------------

def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="w8a8-sqd"):
        quant.get_recipe("w8a8-magic")


@pytest.mark.parametrize("field, value", [("w_bits", 3), ("a_bits", 2), ("w_bits", 32), ("method", "awq"),
                                          ("backend", "cuda"), ("alpha", 1.5), ("timestep_groups", 0),
                                          ("lora_rank", -1)])
def test_bad_recipe_fields_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        quant.Recipe(**{field: value})


def test_inconsistent_recipes_are_refused():
    with pytest.raises(ValueError, match="a_bits"):
        quant.Recipe(w_bits=8, a_bits=16, method="dynamic")
    with pytest.raises(ValueError, match="timestep_groups"):
        quant.Recipe(method="dynamic", timestep_groups=4)
    with pytest.raises(ValueError, match="unknown Recipe fields"):
        quant.Recipe.from_dict({"w_bits": 8, "colour": "red"})


@pytest.mark.parametrize("preset", ["w8a8-static", "w8a8-smoothquant", "w4a8-sqd+lora"])
def test_quantizing_a_calibrated_method_without_stats_is_refused(model, preset):
    fresh = copy.deepcopy(model)
    with pytest.raises(ValueError, match="calibrat"):
        quant.quantize_(fresh, preset)
    assert not quant.quantized_layers(fresh)


def test_quantizing_twice_is_refused(model):
    q = quant.quantize_(copy.deepcopy(model), "w8a16")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_(q, "w8a16")


def test_stats_from_another_model_are_refused(stats):
    other = tiny_dit(embed_dim=96)
    with pytest.raises(ValueError, match="calibration statistics"):
        quant.quantize_(other, "w8a8-smoothquant", stats)


def test_loading_a_file_with_another_recipe_is_refused(model, tmp_path):
    q = quant.quantize_(copy.deepcopy(model), "w8a8-dynamic")
    quant.save(q, "w8a8-dynamic", tmp_path / "q.safetensors")
    fresh = tiny_diffusion_cond()
    with pytest.raises(ValueError, match="w_bits"):
        quant.load(fresh, tmp_path / "q.safetensors", recipe="w4a8-dynamic")
    assert not quant.quantized_layers(fresh)


def test_loading_into_a_model_of_another_shape_is_refused(model, tmp_path):
    q = quant.quantize_(copy.deepcopy(model), "w8a8-dynamic")
    quant.save(q, "w8a8-dynamic", tmp_path / "q.safetensors")
    other = tiny_dit(embed_dim=96)
    with pytest.raises(ValueError, match="does not fit"):
        quant.load(other, tmp_path / "q.safetensors")
    assert not quant.quantized_layers(other)
    deeper = tiny_dit(depth=3)
    with pytest.raises(ValueError, match="does not fit"):
        quant.load(deeper, tmp_path / "q.safetensors")


def test_loading_a_file_that_is_not_a_quantized_model_is_refused(stats, tmp_path):
    stats.save(tmp_path / "stats.safetensors")
    with pytest.raises(ValueError, match="not written by quant.save"):
        quant.load(tiny_diffusion_cond(), tmp_path / "stats.safetensors")
