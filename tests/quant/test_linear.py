"""QuantLinear on hand-built layers: smoothing equivalence, integer == simulated, outliers, low-rank, SQNR."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import kernels
from quant.lowrank import fit_low_rank
from quant.primitives import fake_quant_weight, sqnr
from quant.smooth import smooth_activation, smooth_weight, smoothing_factors
from tests.quant.conftest import bf16_sqnr_floor, int8_kernel_of

ACTIVATION_METHODS = ("static", "dynamic", "smoothquant", "sqd")


def outlier_input(tokens=256, channels=256, outliers=(3, 77, 150, 201), gain=40.0, seed=0):
    """Activations with a few loud input channels, as transformers have (the case SmoothQuant targets)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    x[:, list(outliers)] *= gain
    return x


def toy_model(seed=0):
    """Two linears with a GELU: the torchao-style toy model."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()


def quantized_copy(model, recipe, x):
    stats = quant.calibrate(model, lambda: model(x), progress=False) if recipe.needs_calibration else None
    return quant.quantize_(copy.deepcopy(model), recipe, stats)


def recipe(method, w_bits=8, backend="integer", **changes):
    a_bits = 16 if method == "weight-only" else 8
    return quant.Recipe(f"w{w_bits}a{a_bits}-{method}", w_bits, a_bits, method, backend=backend, **changes)


def test_smoothing_alone_leaves_the_float_output_unchanged():
    x, layer = outlier_input(), nn.Linear(256, 64)
    s = smoothing_factors(x.abs().amax(dim=0), layer.weight, alpha=0.5)
    assert s.max() / s.min() > 5  # the factors really differ per channel
    y = F.linear(x, layer.weight, layer.bias)
    y_smoothed = F.linear(smooth_activation(x, s), smooth_weight(layer.weight, s), layer.bias)
    assert torch.linalg.norm(y_smoothed - y) / torch.linalg.norm(y) < 1e-5


def test_smoothing_flattens_outlier_channels():
    x, w = outlier_input(), torch.randn(64, 256)
    s = smoothing_factors(x.abs().amax(dim=0), w, alpha=0.5)
    def ratio(t):
        return (t.abs().amax(dim=0).max() / t.abs().amax(dim=0).median()).item()
    assert ratio(smooth_activation(x, s)) < ratio(x) / 5


# two profiles cover both int8 kernels and both compute dtypes (tests/quant/test_kernels.py runs all four per layer)
@pytest.mark.parametrize("each_profile", ["generic", "vnni-bf16"], indirect=True)
@pytest.mark.parametrize("method", ACTIVATION_METHODS + ("weight-only",))
@pytest.mark.parametrize("w_bits", [8, 4])
def test_integer_path_matches_simulated_within_rounding(each_profile, method, w_bits):
    model, x = toy_model(), outlier_input()
    sim = quantized_copy(model, recipe(method, w_bits, "simulated", lora_rank=8), x)
    integer = quantized_copy(model, recipe(method, w_bits, "integer", lora_rank=8), x)
    with torch.no_grad():
        y_sim, y_int = sim(x), integer(x)
    ran = {layer._prepared[1] for layer in quant.quantized_layers(integer).values()}  # kernel (and dtype) per layer
    if method != "weight-only":
        # Same codes and scales; only float summation order differs (and, through it, a rare code of the
        # second layer's input landing on the other side of a rounding boundary).
        assert ran == {int8_kernel_of(each_profile)}
        assert sqnr(y_sim, y_int) > 60
    elif not each_profile.native_bf16:
        assert ran == {("resident", torch.float32)}
        assert sqnr(y_sim, y_int) > 60
    else:  # both layers in bf16 (the low-rank branch too, in both backends alike): each rounds x, W and y,
        # and torch's packed kernels the scales too
        (kernel, dtype), = ran
        assert dtype == torch.bfloat16 and kernel in kernels.weight_only_candidates()
        assert sqnr(y_sim, y_int) > bf16_sqnr_floor(2 * (4 if kernel == "packed" else 3))


# SQNR floors (dB) on the toy model with outlier channels, a few dB under what the methods reach.
# Their order is the story: per-tensor static suffers from the outliers, smoothing and per-token fix it.
MIN_SQNR = {8: {"static": 20, "dynamic": 27, "smoothquant": 31, "sqd": 35, "weight-only": 40},
            4: dict.fromkeys(ACTIVATION_METHODS + ("weight-only",), 15)}


@pytest.mark.parametrize("backend", ["simulated", "integer"])
@pytest.mark.parametrize("method", ACTIVATION_METHODS + ("weight-only",))
@pytest.mark.parametrize("w_bits", [8, 4])
def test_toy_model_sqnr(method, w_bits, backend):
    model, x = toy_model(), outlier_input()
    q = quantized_copy(model, recipe(method, w_bits, backend), x)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > MIN_SQNR[w_bits][method]


def test_smoothquant_beats_static_on_outlier_channels():
    model, x = nn.Sequential(nn.Linear(256, 128)).eval(), outlier_input()
    with torch.no_grad():
        ref = model(x)
        static = sqnr(ref, quantized_copy(model, recipe("static", 8), x)(x))
        smooth = sqnr(ref, quantized_copy(model, recipe("smoothquant", 8), x)(x))
    assert smooth > static + 3


def test_low_rank_branch_lowers_weight_error_monotonically_in_rank():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * smoothing_factors(outlier_input(channels=128, outliers=(5, 60)).abs().amax(0),
                                                 torch.randn(96, 128), 0.5)
    def quantizer(m):
        return fake_quant_weight(m, 4)
    errors = []
    for rank in (1, 2, 4, 8, 16, 32, 64):
        to_quantize, a, b = fit_low_rank(w, quantizer, rank)
        errors.append(torch.linalg.matrix_norm(w - quantizer(to_quantize) - (a @ b).t()).item())
    no_branch = torch.linalg.matrix_norm(w - quantizer(w)).item()
    assert no_branch > errors[0]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


def test_alternating_low_rank_is_no_worse_than_one_shot():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    def quantizer(m):
        return fake_quant_weight(m, 4)
    def error(iterations):
        to_quantize, a, b = fit_low_rank(w, quantizer, 8, iterations)
        return torch.linalg.matrix_norm(w - quantizer(to_quantize) - (a @ b).t()).item()
    assert error(4) <= error(1)


def test_effective_weight_reproduces_the_simulated_output():
    model, x = nn.Sequential(nn.Linear(256, 64)).eval(), outlier_input()
    layer = quantized_copy(model, recipe("smoothquant", 4, "simulated"), x)[0]
    with torch.no_grad():
        expected = F.linear(layer.input_fake_quant(x) * layer.smoothing_for(), layer.effective_weight(), layer.bias)
        assert sqnr(expected, layer(x)) > 100


def test_low_rank_branch_brings_the_effective_weight_closer():
    model, x = nn.Sequential(nn.Linear(256, 64)).eval(), outlier_input()
    plain, corrected = (quantized_copy(model, recipe("smoothquant", 4, "simulated", lora_rank=r), x)[0]
                        for r in (0, 16))
    w = model[0].weight
    assert sqnr(w, corrected.effective_weight()) > sqnr(w, plain.effective_weight()) + 1


def test_random_low_rank_init_keeps_the_shape_but_not_the_correction():
    """lora_init="random" is for memory/speed rows: same bytes as the SVD branch, none of its accuracy."""
    model, x = nn.Sequential(nn.Linear(256, 64)).eval(), outlier_input()
    svd, shape_only = (quantized_copy(model, recipe("dynamic", 4, lora_rank=16, lora_init=init), x)
                       for init in ("svd", "random"))
    assert quant.memory_report(svd).linear_bytes == quant.memory_report(shape_only).linear_bytes
    assert shape_only[0].lowrank[0].A.abs().max() > 0
    w = model[0].weight
    assert sqnr(w, svd[0].effective_weight()) > sqnr(w, shape_only[0].effective_weight()) + 1
    with pytest.raises(ValueError, match="lora_init"):
        quant.Recipe(lora_rank=4, lora_init="zeros")


def test_input_fake_quant_is_what_the_matmul_sees():
    model, x = nn.Sequential(nn.Linear(256, 64)).eval(), outlier_input()
    layer = quantized_copy(model, recipe("dynamic", 8, "simulated"), x)[0]
    seen = layer.input_fake_quant(x)
    assert not torch.equal(seen, x) and sqnr(x, seen) > 25
    assert torch.allclose(layer(x), F.linear(seen, layer.dequantized_weight(), layer.bias), atol=1e-5)
    assert layer.smoothing_for() is None


def test_per_group_int4_runs_simulated_and_is_refused_by_the_integer_backend():
    model, x = toy_model(), outlier_input()
    grouped = quantized_copy(model, recipe("dynamic", 4, "simulated", group_size=32), x)
    channel = quantized_copy(model, recipe("dynamic", 4, "simulated"), x)
    with torch.no_grad():
        assert sqnr(model(x), grouped(x)) > sqnr(model(x), channel(x))
    with pytest.raises(ValueError, match="group_size"):
        recipe("dynamic", 4, "integer", group_size=32)
    weight_only = quantized_copy(model, recipe("weight-only", 4, "integer", group_size=32), x)
    assert torch.isfinite(weight_only(x)).all()


def test_activation_only_w16_keeps_float_weights():
    model, x = toy_model(), outlier_input()
    q = quantized_copy(model, quant.Recipe("w16a8", 16, 8, "dynamic", backend="simulated"), x)
    assert q[0].qweight.dtype == torch.float32
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 30


def test_randomized_svd_branches_are_bit_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(5)
    layer = torch.nn.Sequential(torch.nn.Linear(1100, 1100))  # above EXACT_SVD_MAX_DIM: the randomized path
    recipe = quant.get_recipe("w8a8-dynamic+lora")
    first, second = copy.deepcopy(layer), copy.deepcopy(layer)
    state = torch.random.get_rng_state()
    quant.quantize_(first, recipe)
    torch.manual_seed(123)  # whatever the caller's RNG holds
    quant.quantize_(second, recipe)
    assert torch.equal(first[0].lowrank[0].A, second[0].lowrank[0].A)
    assert torch.equal(first[0].lowrank[0].B, second[0].lowrank[0].B)
    torch.random.set_rng_state(state)
    quant.quantize_(copy.deepcopy(layer), recipe)
    assert torch.equal(torch.random.get_rng_state(), state)
