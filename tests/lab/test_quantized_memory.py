"""What a comparison's quantized clip holds and times: the cache's memory budget (lab.quantized), models prepared
before their first clip, the decode timed apart from sampling and the traced layer's histogram (lab.generation)."""
import gc
import weakref

import numpy as np
import pytest
import torch

import quant
from lab import sat
from lab.generation import LOG_ABS_EDGES, GenerationRequest, LayerTrace, generate_clip
from lab.model_copies import copy_for_quantization
from lab.quantized import QuantizedModels, default_memory_budget_gib
from lab.quantized_files import save_quantized
from lab.settings import Settings
from quant import kernels

REQUEST = GenerationRequest(prompt="sine tone at a4", seconds=0.5, steps=3, cfg_scale=5.0, seed=7)


@pytest.fixture
def served_file(tiny_audio, tmp_path):
    recipe = quant.get_recipe("w8a8-dynamic")
    path = tmp_path / "served.safetensors"
    save_quantized(quant.quantize_(copy_for_quantization(tiny_audio.model, recipe), recipe), recipe, path)
    return path


def cache(loaded, folder, **kwargs) -> QuantizedModels:
    return QuantizedModels(loaded, cache_dir=folder, calibration_prompts=["sine tone at a4"], **kwargs)


def clip(model, loaded) -> np.ndarray:
    with torch.no_grad():
        return generate_clip(model, loaded, REQUEST).audio


def test_the_cache_evicts_to_stay_within_its_budget_and_reloads_a_served_file(tiny_audio, served_file, tmp_path):
    models = cache(tiny_audio, tmp_path / "cache")
    served, _ = models.get(models.add_saved(served_file).name)
    one_model = models.held_bytes
    assert one_model > 0
    before = clip(served, tiny_audio)
    gone = weakref.ref(served)
    del served
    models.memory_budget = int(1.5 * one_model)  # room for one model, not two
    models.get("w4a8-dynamic")  # as large as the served model
    assert models.cached_names == ["w4a8-dynamic"] and models.held_bytes <= models.memory_budget
    gc.collect()
    assert gone() is None  # evicted means released, not kept alive by the cache
    reloaded, _ = models.get("w8a8-dynamic")  # from the served file, not rebuilt
    assert models.cached_names == ["w8a8-dynamic"]
    np.testing.assert_array_equal(clip(reloaded, tiny_audio), before)
    models.memory_budget = 3 * one_model  # a larger budget keeps both
    models.get("w4a8-dynamic")
    assert models.cached_names == ["w8a8-dynamic", "w4a8-dynamic"] and models.held_bytes <= models.memory_budget


def test_a_model_larger_than_the_budget_is_still_served_alone(tiny_audio, tmp_path):
    models = cache(tiny_audio, tmp_path, memory_budget_gib=0.0)
    models.get("w8a8-dynamic")
    models.get("w8a16")
    assert models.cached_names == ["w8a16"]


def test_the_budget_comes_from_a_setting_or_the_available_memory(tiny_audio, tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_QUANTIZED_MEMORY_GIB", "1.5")
    assert Settings.from_env().quantized_memory_gib == 1.5
    assert cache(tiny_audio, tmp_path, memory_budget_gib=1.5).memory_budget == int(1.5 * 2**30)
    assert cache(tiny_audio, tmp_path).memory_budget == pytest.approx(default_memory_budget_gib() * 2**30, rel=0.2)
    assert default_memory_budget_gib() > 0
    with pytest.raises(ValueError, match="negative"):
        cache(tiny_audio, tmp_path, memory_budget_gib=-1.0)


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a16"])
def test_weights_are_prepared_when_a_model_is_built_or_loaded_not_in_its_first_clip(tiny_audio, served_file,
                                                                                     tmp_path, monkeypatch, recipe):
    built = []
    for kind in (kernels.PreparedWeight, kernels.WeightOnlyWeight):
        original = kind.__init__
        monkeypatch.setattr(kind, "__init__", lambda self, *a, _original=original, **k: (
            built.append(type(self).__name__), _original(self, *a, **k))[-1])
    models = cache(tiny_audio, tmp_path)
    model, _ = models.get(recipe) if recipe != "w8a8-dynamic" else models.get(models.add_saved(served_file).name)
    assert len(built) == len(quant.quantized_layers(model))  # one prepared weight per layer, before any clip
    built.clear()
    clip(model, tiny_audio)
    assert built == []


def test_a_clip_is_sats_own_decode_with_the_decode_timed_apart(demo_model):
    request = GenerationRequest(prompt="sine tone at a4", seconds=0.5, steps=2, cfg_scale=3.0, seed=3)
    with torch.no_grad():
        result = generate_clip(demo_model.model, demo_model, request)
        settings = demo_model.sampling.replace(steps=2, cfg_scale=3.0, sampler_type=request.sampler,
                                               sigma_min=request.sigma_min, sigma_max=request.sigma_max)
        audio = sat.sample(demo_model.model, [request.prompt], settings=settings, seconds=0.5, seed=3,
                           sample_size=demo_model.sample_length(0.5))
    np.testing.assert_array_equal(result.audio, audio[0, :, :8000].numpy())  # generate_diffusion_cond's decode
    assert result.decode_seconds > 0 and result.seconds_taken > 0


def test_the_trace_histogram_is_numpys_over_the_log_bins():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 512, generator=generator) * torch.logspace(-8, 4, 512)  # below, inside, above the bins
    x[0, :5] = 0.0
    trace = LayerTrace("layer")
    trace.record(0.5, x)
    logs = np.log10(np.maximum(np.abs(x.numpy().astype(np.float64)), 10.0 ** LOG_ABS_EDGES[0])).ravel()
    counts, _ = np.histogram(np.clip(logs, LOG_ABS_EDGES[0], LOG_ABS_EDGES[-1]), bins=LOG_ABS_EDGES)
    np.testing.assert_allclose(trace.log_abs_hist[0], counts / logs.size, atol=2e-4)  # bin-edge ties only
    assert trace.log_abs_hist[0].sum() == pytest.approx(1.0)
    assert trace.log_abs_hist[0][0] > 0 and trace.log_abs_hist[0][-1] > 0
    np.testing.assert_array_equal(trace.channel_max[0], x.abs().reshape(-1, 512).amax(0).numpy())
