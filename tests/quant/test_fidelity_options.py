"""The fidelity options: rotation, range estimators, per-layer alpha search, single-copy smoothing, GPTQ
rounding, timestep-aware static scales; calibration statistics that carry histograms and sample rows; clear
errors on bad values."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import estimators, rotation
from quant.plan import plan_layer
from quant.primitives import sqnr
from tests.tiny_models import dit_inputs, dit_timestep_loop, tiny_dit


def outlier_channels(tokens=512, channels=256, seed=0):
    """Activations with a few loud input channels (what smoothing and rotation target)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    x[:, [3, 77, 150, 201]] *= 40.0
    return x


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()


def calibrated(model, x, **kwargs):
    return quant.calibrate(model, lambda: model(x), progress=False, **kwargs)


def quantized(model, recipe, stats):
    return quant.quantize_(copy.deepcopy(model), recipe, stats if recipe.needs_calibration else None)


# Every new option, alone and combined, on both activation families (static scale / per-token).
OPTIONS = {
    "static-percentile": dict(method="static", estimator="percentile", percentile=99.99),
    "static-mse": dict(method="static", estimator="mse"),
    "static-rot": dict(method="static", rotation=128),
    "static-rot-mse": dict(method="static", rotation=64, estimator="mse"),
    "static-holdout": dict(method="static", estimator="holdout"),
    "static-rot-holdout": dict(method="static", rotation=64, estimator="holdout"),
    "dynamic-rot": dict(method="dynamic", rotation=128),
    "smoothquant-search": dict(method="smoothquant", alpha="search"),
    "smoothquant-search-mse-rot": dict(method="smoothquant", alpha="search", estimator="mse", rotation=128),
    "sqd-max": dict(method="sqd", smoothing="max"),
    "sqd-mean-search": dict(method="sqd", smoothing="mean", alpha="search"),
    "sqd-max-rot": dict(method="sqd", smoothing="max", rotation=128),
    "dynamic-gptq": dict(method="dynamic", weight_rounding="gptq"),
    "sqd-max-rot-gptq+lora": dict(method="sqd", smoothing="max", rotation=128, weight_rounding="gptq", lora_rank=4),
}
# the same options with timestep groups, where they have a meaning there (run in a DiT)
GROUPED_OPTIONS = {
    "static-G4-mse": dict(method="static", timestep_groups=4, estimator="mse"),
    "static-G4-rot-holdout": dict(method="static", timestep_groups=4, rotation=32, estimator="holdout"),
    "smoothquant-G4-single": dict(method="smoothquant", timestep_groups=4, smoothing="max", estimator="percentile"),
    "smoothquant-G2-pergroup-search-rot": dict(method="smoothquant", timestep_groups=2, alpha="search", rotation=32),
    "sqd-G4-pergroup-search": dict(method="sqd", timestep_groups=4, alpha="search"),
    "sqd-single-rot+lora": dict(method="sqd", smoothing="mean", rotation=32, lora_rank=4),
    "sqd-G4-pergroup-gptq": dict(method="sqd", timestep_groups=4, weight_rounding="gptq"),
}


# ---- rotation ------------------------------------------------------------------------------------

def test_hadamard_blocks_are_orthogonal_and_their_own_inverse():
    h = rotation.hadamard(64)
    assert torch.allclose(h @ h.t(), torch.eye(64), atol=1e-6) and torch.equal(h, h.t())
    x = torch.randn(7, 3, 256)
    assert torch.allclose(rotation.rotate(rotation.rotate(x, 64), 64), x, atol=1e-5)


@pytest.mark.parametrize("block", [2, rotation.MATMUL_BLOCK, 2 * rotation.MATMUL_BLOCK, 128, 256])
def test_rotate_multiplies_by_the_block_diagonal_hadamard(block):
    """The matmul-and-butterflies form equals x @ diag(H_block, ...) written out, on a strided input too, and
    leaves the cached Hadamard matrices as they were."""
    before = {n: rotation.hadamard(n).clone() for n in (block, min(block, rotation.MATMUL_BLOCK))}
    x = torch.randn(3, 512, 5, dtype=torch.float64).transpose(1, 2)  # (3, 5, 512), not contiguous
    written_out = torch.block_diag(*[rotation.hadamard(block, dtype=torch.float64)] * (512 // block))
    assert torch.allclose(rotation.rotate(x, block), x @ written_out, rtol=0, atol=1e-6)
    assert torch.allclose(rotation.rotate(x.float(), block).double(), x @ written_out, rtol=0, atol=1e-5)
    assert all(torch.equal(rotation.hadamard(n), h) for n, h in before.items())


@pytest.mark.parametrize("method, block", [("static", 128), ("smoothquant", 64), ("sqd", 256)])
def test_rotation_leaves_the_float_output_unchanged(method, block):
    """The stored weight copy and the run-time activation are rotated (and smoothed) so that, before rounding,
    their product is the original layer's: relative error < 1e-5."""
    model, x = nn.Sequential(nn.Linear(256, 96)).eval(), outlier_channels()
    recipe = quant.Recipe(method=method, rotation=block, backend="simulated",
                          timestep_groups=1)
    layer = quantized(model, recipe, calibrated(model, x) if recipe.needs_calibration else None)[0]
    weight = model[0].weight.detach()
    plan = plan_layer(weight.float(), recipe, calibrated(model, x).layer("0", []) if recipe.needs_calibration
                      else None)
    transformed = layer._transformed(x, 0)
    assert sqnr(x, transformed) < 20  # really rotated (and smoothed)
    y = F.linear(x, weight)
    y_rotated = F.linear(transformed, plan.weights[0])
    assert torch.linalg.norm(y_rotated - y) / torch.linalg.norm(y) < 1e-5
    assert sqnr(weight, layer.effective_weight()) > 35  # what the layer applies to the raw x, rounding aside


def test_rotation_flattens_outlier_channels():
    x = outlier_channels()
    def ratio(t):
        return (t.abs().amax() / t.pow(2).mean().sqrt()).item()
    assert ratio(rotation.rotate(x, 128)) < ratio(x) / 3


def test_each_layer_rotates_over_the_largest_block_its_width_allows():
    model = nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    q = quant.quantize_(copy.deepcopy(model), quant.Recipe(method="dynamic", rotation=128, backend="simulated"))
    layers = quant.quantized_layers(q)
    assert [layers[name].rotation_block for name in ("0", "2")] == [32, 64]  # 96 = 3 x 32; 64 < 128
    for name in ("0", "2"):  # Q(W R) R ~ W: the weight was rotated and is rotated back with the same block
        w = model[int(name)].weight.detach()
        error = (layers[name].effective_weight() - w).norm() / w.norm()
        assert error < 0.02


def test_rotation_refuses_an_odd_width():
    model = nn.Sequential(nn.Linear(255, 64)).eval()
    with pytest.raises(ValueError, match="even in_features to rotate over, got 255 of layer '0'"):
        quant.quantize_(copy.deepcopy(model), quant.Recipe(method="dynamic", rotation=128))
    assert not quant.quantized_layers(model)


# ---- integer == simulated, for every option ------------------------------------------------------

@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("w_bits", [8, 4])
def test_integer_matches_simulated_for_every_option(option, w_bits):
    model, x = toy_model(), outlier_channels()
    stats = calibrated(model, x)
    recipe = quant.Recipe(w_bits=w_bits, **OPTIONS[option])
    sim = quantized(model, recipe.replace(backend="simulated"), stats)
    integer = quantized(model, recipe, stats)
    with torch.no_grad():
        y_ref, y_sim, y_int = model(x), sim(x), integer(x)
    assert sqnr(y_sim, y_int) > 60  # same codes and scales; float summation order only
    assert sqnr(y_ref, y_sim) > (20 if w_bits == 8 else 12)  # and still close to the float model


@pytest.fixture(scope="module")
def dit_and_stats():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    return dit, quant.calibrate(dit, dit_timestep_loop(dit, x, kwargs, (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)),
                                progress=False)


@pytest.mark.parametrize("option", list(GROUPED_OPTIONS))
def test_integer_matches_simulated_with_timestep_groups(dit_and_stats, option):
    dit, stats = dit_and_stats
    recipe = quant.Recipe(**GROUPED_OPTIONS[option])
    x, _, kwargs = dit_inputs(seed=3)
    outputs = {}
    for backend in ("simulated", "integer"):
        q = quantized(dit, recipe.replace(backend=backend), stats)
        with torch.no_grad():
            outputs[backend] = [q(x, torch.full((2,), t), **kwargs) for t in (0.1, 0.5, 0.9)]
    with torch.no_grad():
        reference = [dit(x, torch.full((2,), t), **kwargs) for t in (0.1, 0.5, 0.9)]
    for ref, sim, integer in zip(reference, outputs["simulated"], outputs["integer"]):
        assert sqnr(sim, integer) > 50
        assert sqnr(ref, sim) > 15


# ---- estimators ----------------------------------------------------------------------------------

def test_histograms_count_every_value_in_its_log_bin():
    x = torch.tensor([0.0, 1e-9, 1.0, 1.05, 3.0, -3.0, 1e9, float("inf"), float("nan")])
    counts = estimators.histogram(x)
    assert counts.sum() == x.numel() and counts.shape == (estimators.N_BINS,)
    assert counts[0] == 2 and counts[-1] == 3  # zero and tiny / too large, inf and NaN
    one = 1 + (0 - estimators.LOW_EXP) * estimators.BINS_PER_OCTAVE  # the bin starting at 1.0
    assert counts[one] == 2 and estimators.BIN_EDGES[one - 1] == 1.0
    assert estimators.histogram(torch.randn(1000)).add(estimators.histogram(torch.randn(50))).sum() == 1050


def test_percentile_of_a_histogram_is_close_to_the_exact_one():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    exact = torch.quantile(x.abs()[:100_000], 0.999).item()
    estimated = estimators.clip_value(estimators.histogram(x[:100_000]), x.abs().max(), "percentile", 8, 99.9)
    assert abs(estimated / exact - 1) < 0.05  # within one bin (2^(1/8) = 9 % wide)
    assert estimators.clip_value(None, 7.0, "max", 8) == 7.0
    assert estimators.clip_value(estimators.histogram(x), 1.5, "percentile", 8, 99.9) == 1.5  # never above max


def outlier_tokens(tokens=16384, channels=64, seed=0, glitches=2):
    """Gaussian activations plus a few glitch tokens, each with one huge value: rare, but they set the max."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    for i in range(glitches):
        x[i * 997 + 11, (i * 13) % channels] = 40.0 * (-1) ** i
    return x


def test_holdout_clipping_widens_a_range_that_held_out_rows_exceed():
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(512, 64, generator=g).pow(3)  # heavy tails: each half's max misses the other's loudest rows
    bounded = torch.rand(512, 64, generator=g) * 2 - 1  # every half sees the same range
    assert estimators.holdout_clip(heavy, 8) > heavy.abs().amax()
    assert estimators.holdout_clip(bounded, 8) <= bounded.abs().amax()


@pytest.mark.parametrize("estimator", ["percentile", "mse"])
def test_percentile_and_mse_beat_max_on_a_layer_with_outlier_tokens(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    calibration = outlier_tokens()
    stats = calibrated(model, calibration)
    base = quant.Recipe(method="static", backend="simulated")
    by_max = quantized(model, base, stats)
    clipped = quantized(model, base.replace(estimator=estimator), stats)
    assert clipped[0].act_scale < by_max[0].act_scale / 2
    held_out = outlier_tokens(seed=1, glitches=0)  # new tokens of the same distribution
    with torch.no_grad():
        assert sqnr(model(held_out), clipped(held_out)) > sqnr(model(held_out), by_max(held_out)) + 6
        if estimator == "mse":  # chosen to minimise the activation's squared error on the calibration data itself
            x_max, x_mse = by_max[0].input_fake_quant(calibration), clipped[0].input_fake_quant(calibration)
            assert (x_mse - calibration).pow(2).sum() <= (x_max - calibration).pow(2).sum()


def test_timestep_groups_give_static_one_scale_per_group_and_one_weight_copy(dit_and_stats):
    dit, stats = dit_and_stats
    q = quantized(dit, quant.Recipe(method="static", timestep_groups=3), stats)
    layer = q.transformer.layers[0].ff.ff[2]
    assert layer.act_scale.shape == (3,) and layer.qweight.shape[0] == 1 and layer.smooth is None
    scales = layer.act_scale.tolist()
    assert len(set(scales)) == 3  # the input's range differs between the groups


# ---- alpha search --------------------------------------------------------------------------------

@pytest.mark.parametrize("option", [dict(method="smoothquant"), dict(method="sqd", smoothing="max"),
                                    dict(method="smoothquant", estimator="mse", rotation=64),
                                    dict(method="sqd", w_bits=4)])
def test_alpha_search_is_never_worse_than_half_on_its_calibration_rows(option):
    model, x = toy_model(), outlier_channels()
    stats = calibrated(model, x)
    recipe = quant.Recipe(backend="simulated", **option)
    searched = quantized(model, recipe.replace(alpha="search"), stats)
    half = quantized(model, recipe.replace(alpha=0.5), stats)
    chosen = []
    for name in ("0", "2"):
        rows = stats.layer(name, []).all_samples()
        reference = F.linear(rows, model.get_submodule(name).weight, model.get_submodule(name).bias)
        with torch.no_grad():
            errors = [(q.get_submodule(name)(rows) - reference).pow(2).sum().item() for q in (searched, half)]
        assert errors[0] <= errors[1] * (1 + 1e-6)
        chosen += searched.get_submodule(name).alphas
    assert half[0].alphas == [0.5] and all(a in quant.smooth.ALPHA_GRID for a in chosen)


# ---- single-copy SQD -----------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", ["max", "mean"])
def test_single_copy_sqd_holds_one_weight_copy(smoothing):
    from lab import sat
    dit = sat.build_dit(sat.SAO_DIT, device="meta")
    recipe = quant.get_recipe("w8a8-sqd", smoothing=smoothing, timestep_groups=1)
    quant.quantize_(dit, recipe, quant.CalibrationStats.placeholder(dit, 4))
    report = quant.memory_report(dit)
    layers = quant.quantized_layers(dit)
    assert all(layer.qweight.shape[0] == 1 and layer.smooth.shape[0] == 1 for layer in layers.values())
    weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    assert sum(entry.held["weight"] for entry in report.layers if entry.quantized) == weights  # int8, once
    assert report.ratio_fp32 <= 0.26


def test_single_smoothing_vectors_differ_by_statistic(dit_and_stats):
    dit, stats = dit_and_stats
    by_max, by_mean = (quantized(dit, quant.Recipe(method="sqd", smoothing=s), stats) for s in ("max", "mean"))
    a, b = by_max.transformer.layers[0].ff.ff[2].smooth, by_mean.transformer.layers[0].ff.ff[2].smooth
    assert a.shape == b.shape == (1, 256) and not torch.allclose(a, b)


# ---- persistence ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option", list(OPTIONS) + list(GROUPED_OPTIONS))
def test_save_load_is_bit_identical_for_every_option(dit_and_stats, option, tmp_path):
    dit, stats = dit_and_stats
    recipe = quant.Recipe(name=option, w_bits=4 if "lora" in option else 8,
                          **{**OPTIONS, **GROUPED_OPTIONS}[option])
    q = quantized(dit, recipe, stats)
    quant.save(q, recipe, tmp_path / "q.safetensors")
    fresh = tiny_dit(seed=9)
    assert quant.load(fresh, tmp_path / "q.safetensors") == recipe
    saved, loaded = q.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    x, _, kwargs = dit_inputs(seed=4)
    with torch.no_grad():
        for t in (0.1, 0.9):
            assert torch.equal(q(x, torch.full((2,), t), **kwargs), fresh(x, torch.full((2,), t), **kwargs))


def test_calibration_keeps_histograms_and_sample_rows_and_saves_them(dit_and_stats, tmp_path):
    dit, stats = dit_and_stats
    name = "transformer.layers.0.ff.ff.2"
    width = dit.transformer.layers[0].ff.ff[2].in_features
    assert stats.histograms[name].shape == (6, estimators.N_BINS)
    assert stats.samples[name].shape == (6, 8, width) and stats.sample_counts[name].tolist() == [8] * 6
    tokens = 2 * (16 + 1)  # batch 2 x (16 latent tokens + the prepended global token)
    assert stats.histograms[name].sum(dim=1).tolist() == [tokens * width] * 6
    stats.save(tmp_path / "stats.safetensors")
    loaded = quant.CalibrationStats.load(tmp_path / "stats.safetensors")
    for kind in ("absmax", "histograms", "samples", "sample_counts"):
        ours, theirs = getattr(stats, kind), getattr(loaded, kind)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    grouped = loaded.layer(name, loaded.group_boundaries(2))
    assert [rows.shape[0] for rows in grouped.samples] == [24, 24] and grouped.histogram.shape[0] == 2


def test_sampled_rows_are_reproducible_and_really_rows_the_layer_saw():
    model, x = nn.Sequential(nn.Linear(16, 8)).eval(), torch.randn(300, 16)
    first, second = calibrated(model, x), calibrated(model, x)
    rows = first.samples["0"][0].float()
    assert torch.equal(first.samples["0"], second.samples["0"])
    seen = x.to(torch.bfloat16).float()
    assert all(any(torch.equal(row, other) for other in seen) for row in rows)
    assert calibrated(model, x, sample_rows=0).samples == {}


def test_format_1_statistics_load_with_maxima_only(dit_and_stats, tmp_path):
    from safetensors.torch import save_file
    dit, stats = dit_and_stats
    tensors = {f"absmax::{k}": v for k, v in stats.absmax.items()}
    tensors["timesteps"] = torch.tensor(stats.timesteps, dtype=torch.float64)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"format": "audio-dit-ptq/calibration-1",
                                                                     "forwards": "6", "meta": "{}"})
    old = quant.CalibrationStats.load(tmp_path / "old.safetensors")
    assert not old.has_histograms and not old.has_samples
    quantized(dit, quant.get_recipe("w8a8-smoothquant"), old)  # the max estimator needs nothing more
    with pytest.raises(ValueError, match="histograms.*recalibrate"):
        quantized(dit, quant.Recipe(method="static", estimator="mse"), old)
    with pytest.raises(ValueError, match="sample rows.*recalibrate"):
        quantized(dit, quant.Recipe(method="smoothquant", alpha="search"), old)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a calibration file"):
        quant.CalibrationStats.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("option", list(OPTIONS) + list(GROUPED_OPTIONS))
def test_every_option_quantizes_a_meta_device_model_from_placeholder_stats(option):
    dit = tiny_dit().to("meta")
    recipe = quant.Recipe(**{**OPTIONS, **GROUPED_OPTIONS}[option])
    quant.quantize_(dit, recipe, quant.CalibrationStats.placeholder(dit, 4))
    layers = quant.quantized_layers(dit)
    assert layers and all(layer.qweight.shape[0] == recipe.weight_copies for layer in layers.values())
    assert quant.memory_report(dit).by_kind["weight"] > 0


# ---- bad values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(method="static", estimator="median"), "estimator must be one of"),
    (dict(method="static", estimator="percentile", percentile=0), r"percentile must be a number in \(0, 100\]"),
    (dict(method="static", estimator="percentile", percentile=101), "percentile"),
    (dict(method="static", percentile="high"), "percentile"),
    (dict(method="dynamic", estimator="mse"), "estimator='mse'.*static or smoothquant.*per-token"),
    (dict(method="sqd", estimator="percentile"), "needs method static or smoothquant"),
    (dict(method="smoothquant", alpha="best"), "alpha must be a number in .0, 1. or 'search'"),
    (dict(method="smoothquant", alpha=-0.1), "alpha"),
    (dict(method="static", alpha="search"), "alpha='search'.*smoothquant or sqd"),
    (dict(method="sqd", smoothing="median"), "smoothing must be one of"),
    (dict(method="dynamic", smoothing="max"), "smoothing='max'.*smoothquant or sqd"),
    (dict(method="sqd", smoothing="max", timestep_groups=4), "timestep_groups must be 1"),
    (dict(method="dynamic", rotation=96), "power of two"),
    (dict(method="dynamic", rotation=1), "power of two"),
    (dict(method="dynamic", rotation=True), "power of two"),
    (dict(method="weight-only", a_bits=16, rotation=64), "rotation.*weight-only"),
    (dict(weight_rounding="stochastic"), "weight_rounding must be one of"),
    (dict(w_bits=16, backend="simulated", weight_rounding="gptq"), "gptq.*w_bits=16"),
    (dict(method="dynamic", weight_rounding="gptq", timestep_groups=2), "needs a calibrated method"),
])
def test_bad_option_values_get_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        quant.Recipe(**fields)


def test_calibrate_refuses_a_bad_sample_size():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="sample_rows"):
        quant.calibrate(model, lambda: model(torch.randn(2, 4)), progress=False, sample_rows=-1)
