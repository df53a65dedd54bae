"""Integer kernels: under every CPU profile, the path the profile picks equals the simulated reference to float
rounding (bf16 paths: to bf16's), the choice falls back cleanly, prepared weights stay derived state (not saved,
counted as cache), CUDA padding rules."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import quant
from quant import kernels
from quant.primitives import per_token_scale, quantize, sqnr
from tests.quant.conftest import bf16_sqnr_floor, computing_in, int8_kernel_of
from tests.tiny_models import dit_inputs, dit_timestep_loop, tiny_dit

KERNELS = ["int_mm"] + (["onednn"] if kernels.onednn_available() else [])
METHODS = ("static", "dynamic", "smoothquant", "sqd")


def outlier_input(tokens=96, channels=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    x[:, [3, 50, 99]] *= 30.0
    return x


def make_layer(method, w_bits, backend, *, bias=True, lora_rank=0, groups=1, seed=0):
    """QuantLinear.from_float on a random nn.Linear, with calibration statistics taken from outlier_input."""
    torch.manual_seed(seed)
    linear = nn.Linear(128, 72, bias=bias)
    recipe = quant.Recipe("k", w_bits, 8, method, timestep_groups=groups, lora_rank=lora_rank, backend=backend)
    absmax = boundaries = None
    if recipe.needs_calibration:
        absmax = torch.stack([outlier_input(seed=g).abs().amax(dim=0) * (1 + g) for g in range(groups)])
        boundaries = [0.5 + i for i in range(groups - 1)]
    tracker = SimpleNamespace(t=0.2)
    return quant.QuantLinear.from_float(linear, recipe, absmax, boundaries, tracker)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("bias,lora_rank", [(True, 0), (False, 8), (True, 8)])
def test_each_profiles_kernel_matches_the_simulated_path(each_profile, method, w_bits, bias, lora_rank):
    sim = make_layer(method, w_bits, "simulated", bias=bias, lora_rank=lora_rank)
    integer = make_layer(method, w_bits, "integer", bias=bias, lora_rank=lora_rank)
    x = outlier_input(seed=5)
    with torch.no_grad():
        y_sim, y_int = sim(x), integer(x)
        y_again = integer(x)  # second call: the prepared weight is reused
    assert integer._prepared[1] == int8_kernel_of(each_profile)
    if lora_rank:  # the bf16 branch computes in bf16 where the profile has it natively, in both backends alike
        expected = torch.bfloat16 if each_profile.native_bf16 else torch.float32
        assert integer.lowrank[0].compute_dtype(x.device) == sim.lowrank[0].compute_dtype(x.device) == expected
    assert sqnr(y_sim, y_int) > 60
    assert torch.equal(y_int, y_again)


@pytest.mark.parametrize("method", ["smoothquant", "sqd", "static"])
def test_timestep_groups_switch_the_prepared_copy(each_profile, method):
    sim = make_layer(method, 8, "simulated", lora_rank=4, groups=3)
    integer = make_layer(method, 8, "integer", lora_rank=4, groups=3)
    x = outlier_input(seed=2)
    for t in (0.2, 1.2, 2.2, 0.2):
        sim.tracker.t = integer.tracker.t = t
        with torch.no_grad():
            assert sqnr(sim(x), integer(x)) > 60
        assert integer._prepared[:2] == (integer.group_for(t) if integer.recipe.smooths else 0,
                                         int8_kernel_of(each_profile))


@pytest.mark.skipif(len(KERNELS) < 2, reason="the oneDNN int8 ops are not in this torch")
def test_onednn_products_are_exact_on_full_range_codes():
    """uint8 codes up to 255 times weights up to +-127, the pairs AVX2's vpmaddubsw would saturate: where the CPU
    lacks VNNI the codes go in as two halves, and the halves alone are exact on every CPU."""
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (48, 512), dtype=torch.int8)
    b = torch.randint(-127, 128, (80, 512), dtype=torch.int8)
    weight = kernels.PreparedWeight(b, torch.ones(80), "onednn", owns_codes=False)
    expected = torch._int_mm(a, b.t()).float()  # |sum| < 512 x 127^2 < 2^24: exact in float32
    codes_u8 = (a.to(torch.int16) + 128).to(torch.uint8)
    assert torch.equal(kernels._qlinear(codes_u8, 1.0, weight, None), expected)
    assert torch.equal(kernels._qlinear(codes_u8, 1.0, weight, None, split=True), expected)
    assert not weight.one_pass


@pytest.mark.skipif(len(KERNELS) < 2, reason="the oneDNN int8 ops are not in this torch")
def test_weights_within_64_take_one_exact_pass():
    """Weights within +-64 (every 4-bit code) cannot saturate a pair of uint8 products even on AVX2, so they go
    through oneDNN in one pass: exact on every CPU, including the extreme pairs 2 x 255 x (+-64)."""
    torch.manual_seed(1)
    b = torch.randint(-64, 65, (80, 512), dtype=torch.int8)
    b[:2] = torch.tensor([64, -64], dtype=torch.int8)[:, None]  # whole rows at either bound
    codes_u8 = torch.randint(0, 256, (48, 512), dtype=torch.uint8)
    codes_u8[:2] = torch.tensor([255, 0], dtype=torch.uint8)[:, None]  # x - 128 at +127 and -128
    weight = kernels.PreparedWeight(b, torch.ones(80), "onednn", owns_codes=False)
    expected = torch._int_mm((codes_u8.to(torch.int16) - 128).to(torch.int8), b.t()).float()
    assert weight.one_pass
    assert torch.equal(kernels._qlinear(codes_u8, 1.0, weight, None, split=False), expected)
    assert torch.equal(kernels._qlinear(codes_u8, 1.0, weight, None), expected)
    b[5, 7] = 65
    assert not kernels.PreparedWeight(b, torch.ones(80), "onednn", owns_codes=False).one_pass


@pytest.mark.skipif(len(KERNELS) < 2, reason="the oneDNN int8 ops are not in this torch")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_onednn_and_int_mm_agree(use_kernel, method, w_bits):
    layer = make_layer(method, w_bits, "integer", lora_rank=4)
    x = outlier_input(seed=3)
    outputs = {}
    for kernel in KERNELS:
        use_kernel(kernel)
        with torch.no_grad():
            outputs[kernel] = layer(x)
    # same integer accumulators; only the float rescale may round differently
    assert torch.allclose(outputs["onednn"], outputs["int_mm"], rtol=1e-5, atol=1e-5)
    assert layer._prepared[2].one_pass == (w_bits == 4)  # 4-bit codes never saturate: one pass on AVX2 too


def test_missing_onednn_falls_back_to_int_mm(monkeypatch, use_kernel):
    layer = make_layer("dynamic", 8, "integer", lora_rank=4)
    x = outlier_input(seed=4)
    with torch.no_grad():
        y_auto = layer(x)
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    assert not kernels.onednn_fast()
    assert kernels.choose_kernel("cpu") == "int_mm"
    assert kernels.kernel_name().startswith("int_mm")
    with torch.no_grad():
        y_fallback = layer(x)
    assert layer._prepared[1] == "int_mm"
    assert torch.allclose(y_auto, y_fallback, rtol=1e-5, atol=1e-5)
    use_kernel("onednn")
    with pytest.raises(RuntimeError, match="oneDNN"):
        kernels.choose_kernel("cpu")


def test_kernel_choice_from_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, "int_mm")
    assert kernels.choose_kernel("cpu") == "int_mm"
    assert "forced" in kernels.kernel_name()
    monkeypatch.setenv(kernels.KERNEL_ENV, "auto")
    assert kernels.choose_kernel("cpu") == ("onednn" if kernels.onednn_fast() else "int_mm")
    assert kernels.choose_kernel(torch.device("cuda", 0)) == "cuda"
    monkeypatch.setenv(kernels.KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match=kernels.KERNEL_ENV):
        kernels.choose_kernel("cpu")
    with pytest.raises(ValueError):
        kernels.set_kernel("fastest")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_prepared_weight_is_derived_state_counted_as_cache(use_kernel, kernel, w_bits):
    use_kernel(kernel)
    layer = make_layer("dynamic", w_bits, "integer")
    keys = set(layer.state_dict())
    assert layer.held_bytes()["cache"] == 0
    with torch.no_grad():
        y = layer(outlier_input())
    # one resident copy: int8 codes cost nothing beyond the stored ones; int4 codes held as int8 cost half a byte
    extra = 0 if w_bits == 8 else layer.out_features * layer.in_features // 2
    assert layer.held_bytes()["cache"] == extra
    assert layer.held_bytes()["weight"] == layer.qweight.numel()  # still 4-bit (packed) or 8-bit stored
    assert set(layer.state_dict()) == keys
    twin = copy.deepcopy(layer)  # copies leave the prepared state behind
    assert twin._prepared is None and layer._prepared is not None
    with torch.no_grad():
        assert torch.equal(twin(outlier_input()), y)
    layer.load_state_dict(twin.state_dict())
    assert layer._prepared is None and layer.held_bytes()["cache"] == 0


# two profiles cover both int8 kernels and both compute dtypes (the layer tests in this file run all four)
@pytest.mark.parametrize("each_profile", ["generic", "vnni-bf16"], indirect=True)
@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w4a8-sqd+lora", "w8a8-smoothquant", "w4a16"])
def test_tiny_dit_integer_matches_simulated_and_save_load_is_bit_identical(each_profile, preset, tmp_path):
    dit = tiny_dit()
    x, t, kwargs = dit_inputs()
    recipe = quant.get_recipe(preset)
    stats = quant.calibrate(dit, dit_timestep_loop(dit, x, kwargs, (0.1, 0.4, 0.7, 0.95)),
                            progress=False) if recipe.needs_calibration else None
    models = {backend: quant.quantize_(copy.deepcopy(dit), recipe.replace(backend=backend), stats)
              for backend in ("simulated", "integer")}
    with torch.no_grad():
        y_sim, y_int = (models[b](x, t, **kwargs) for b in ("simulated", "integer"))
    # per layer > 60 dB (weight-only layers on a bf16 profile: ~50 dB, their bf16 rounding, which the DiT's
    # unquantized paths dilute); a rare code flips across a rounding boundary downstream
    assert sqnr(y_sim, y_int) > 50
    integer = models["integer"]
    prepared = [layer._prepared for layer in quant.quantized_layers(integer).values()]
    assert all(entry is not None for entry in prepared)
    if recipe.quantizes_activations:
        assert {key for _, key, _ in prepared} == {int8_kernel_of(each_profile)}
    else:
        assert {weights.dtype for _, _, weights in prepared} == \
            {torch.bfloat16 if each_profile.native_bf16 else torch.float32}
    # one resident weight copy: int8 codes with int8 activations add nothing; int4 codes held as int8 for the
    # int8 GEMM, or a weight-only layer's float copy, add what they hold beyond the stored codes
    cache = quant.memory_report(integer).by_kind["cache"]
    assert cache == 0 if (recipe.w_bits == 8 and recipe.quantizes_activations) else cache > 0

    quant.save(integer, recipe, tmp_path / "a.safetensors")
    fresh = tiny_dit()
    quant.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x, t, **kwargs), y_int)
    quant.save(fresh, recipe, tmp_path / "b.safetensors")
    # same tensors and metadata (safetensors may order the header's metadata differently between writes)
    from safetensors import safe_open
    files = [safe_open(str(tmp_path / name), framework="pt") for name in ("a.safetensors", "b.safetensors")]
    assert files[0].metadata() == files[1].metadata() and set(files[0].keys()) == set(files[1].keys())
    for key in files[0].keys():
        first, second = files[0].get_tensor(key), files[1].get_tensor(key)
        assert first.dtype == second.dtype and torch.equal(first, second), key


def test_activation_quantizers_give_the_reference_codes():
    x = outlier_input(seed=7)
    x[5] = 0.0  # an all-zero token
    x[7] = 0.0
    x[7, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -126.5]) / 16  # scale 1/16: exact ties
    codes, scale = kernels.quantize_per_token(x, 8)
    assert codes[7, :6].tolist() == [127, 0, 2, 2, 0, -126]
    assert torch.equal(scale, per_token_scale(x, 8))
    assert torch.equal(codes, quantize(x, per_token_scale(x, 8), 8))
    codes_u8, _ = kernels.quantize_per_token(x, 8, unsigned=True)
    assert codes_u8.dtype == torch.uint8 and torch.equal(codes_u8.int() - 128, codes.int())
    static = torch.tensor(2.0 ** -4)  # a power of two: the ties below are exact
    x[6, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 300.0]) * static  # ties and a clipped value
    ref = quantize(x, static, 8)
    assert ref[6, :8].tolist() == [0, 2, 2, 0, -2, 126, -127, 127]  # ties to even, as torch.round
    assert torch.equal(kernels.quantize_per_tensor(x, static, 8), ref)
    assert torch.equal(kernels.quantize_per_tensor(x, static, 8, unsigned=True).int() - 128, ref.int())
    x16 = x.bfloat16()  # a bf16 model's activation: the codes of its float32 values
    assert torch.equal(kernels.quantize_per_token(x16, 8)[0], quantize(x16, per_token_scale(x16, 8), 8))


@pytest.mark.parametrize("m,k,n", [(1, 13, 7), (16, 16, 8), (17, 8, 9), (40, 1536, 6144 + 3), (3, 64, 64)])
def test_cuda_padding_rules_checked_on_cpu(monkeypatch, m, k, n):
    assert kernels.cuda_padding(17, 8, 8) == (0, 0, 0)
    pad_m, pad_k, pad_n = kernels.cuda_padding(m, k, n)
    assert m + pad_m > 16 and (k + pad_k) % 8 == 0 and (n + pad_n) % 8 == 0
    assert pad_m < 17 and pad_k < 8 and pad_n < 8
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    expected = torch._int_mm(a, w.t())
    real_int_mm, shapes = torch._int_mm, []

    def cuda_rules_int_mm(a, b):  # what CUDA would accept
        shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        assert a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0
        return real_int_mm(a, b)
    monkeypatch.setattr(torch, "_int_mm", cuda_rules_int_mm)
    assert torch.equal(kernels.padded_int_mm(a, w.t()), expected)
    assert shapes == [(m + pad_m, k + pad_k, n + pad_n)]


def test_gpu_check_exits_clearly_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from bench import gpu_check
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "gpu.json")])
    assert exit_info.value.code != 0
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_check_dry_run_on_the_cpu_with_a_tiny_shape():
    """The GPU check's whole flow (inputs, calibration, every preset's integer-vs-simulated twin, JSON) on the
    CPU with a tiny DiT: what runs on CUDA differs only in the timer and the device."""
    import json

    from bench import gpu_check
    from tests.tiny_models import TINY_DIT

    args = gpu_check.parse_args(["--out", "unused.json", "--latent-tokens", "16", "--cond-tokens", "3",
                                 "--reps", "1", "--presets", "w8a8-dynamic", "w4a8-sqd+lora", "w8a16"])
    result = gpu_check.run(args, device="cpu", shape=dict(TINY_DIT))
    assert not result["errors"] and result["all_agree"], result["errors"]
    assert set(result["presets"]) == {"w8a8-dynamic", "w4a8-sqd+lora", "w8a16"}
    assert set(result["float"]) == {"fp32", "bf16", "fp16"}
    json.dumps(result)


WEIGHT_ONLY_PATHS = ("resident", "dequant", "packed")


def weight_only_pair(w_bits, group_size=None, out_features=96, seed=0):
    """A simulated and an integer weight-only layer built from the same nn.Linear (out_features % 16 == 0
    so that torch's packed int4 kernel accepts it)."""
    torch.manual_seed(seed)
    linear = nn.Linear(128, out_features)
    recipe = quant.Recipe("k", w_bits, 16, "weight-only", group_size=group_size, backend="simulated")
    return (quant.QuantLinear.from_float(linear, recipe),
            quant.QuantLinear.from_float(linear, recipe.replace(backend="integer")))


@pytest.mark.parametrize("path", WEIGHT_ONLY_PATHS)
@pytest.mark.parametrize("w_bits,group_size", [(8, None), (4, None), (4, 32), (8, 64)])
def test_weight_only_paths_match_the_simulated_path(monkeypatch, each_profile, path, w_bits, group_size):
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, path)
    sim, integer = weight_only_pair(w_bits, group_size)
    stored = integer.held_bytes()["weight"]
    x = outlier_input(tokens=40, seed=6).reshape(2, 20, 128)
    # torch's packed kernels take bf16 activations; the others compute in bf16 where the profile has it natively
    dtype = torch.bfloat16 if path == "packed" or each_profile.native_bf16 else torch.float32
    with torch.no_grad():
        y_int, y_sim = integer(x), sim(x)
        with computing_in(dtype):
            y_reference = sim(x)  # the simulated path rounded to `dtype` as the integer path is
    prepared = integer._prepared[2]
    assert y_int.dtype == x.dtype and y_int.shape == y_sim.shape
    assert prepared.dtype == dtype
    # 8-bit per-group scales do not fit _weight_int8pack_mm: that layer falls back to "resident"
    assert prepared.kernel == ("resident" if (path, w_bits, group_size) == ("packed", 8, 64) else path)
    if prepared.kernel == "packed":
        assert sqnr(y_sim, y_int) > bf16_sqnr_floor(4)  # activations, scales, weights and outputs in bf16
    else:
        assert torch.equal(y_int, y_reference)  # the same float matmul on the same dequantized weight
    full_copy = integer.out_features * integer.in_features * prepared.dtype.itemsize
    cache = integer.held_bytes()["cache"]
    if prepared.kernel == "resident":  # the float copy stands in for the stored codes
        assert cache == full_copy - stored
    elif prepared.kernel == "dequant":
        assert cache == 0
    else:
        assert 0 < cache < full_copy  # scales (and for int4 the repacked codes)
    assert integer.held_bytes()["weight"] == stored  # stored bytes unchanged by any path


def test_weight_only_path_change_rebuilds_the_prepared_weight(monkeypatch, each_profile):
    _, integer = weight_only_pair(4)
    x = outlier_input(tokens=8)
    dtype = torch.bfloat16 if each_profile.native_bf16 else torch.float32
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, "resident")
    with torch.no_grad():
        y_resident = integer(x)
        assert integer._prepared[1] == ("resident", dtype)
        monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, "dequant")
        assert torch.equal(integer(x), y_resident)
    assert integer._prepared[1] == ("dequant", dtype) and integer.held_bytes()["cache"] == 0


@pytest.mark.parametrize("w_bits", [8, 4])
def test_weight_only_layer_in_a_bf16_model_is_plain_bf16s_matmul(monkeypatch, use_profile, w_bits):
    """Cast to bf16 (the A16 model), a weight-only layer keeps float32 scales (the same quantized weight) and
    multiplies bf16 activations by its resident bf16 copy with no cast: what a bf16 nn.Linear computes."""
    use_profile("vnni-bf16")
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, "resident")
    _, integer = weight_only_pair(w_bits)
    scale = integer.weight_scale.clone()
    integer.to(torch.bfloat16)
    assert integer.weight_scale.dtype == torch.float32 and torch.equal(integer.weight_scale, scale)
    assert integer.bias.dtype == torch.bfloat16
    x = outlier_input(tokens=12).bfloat16()
    plain = nn.Linear(integer.in_features, integer.out_features).to(torch.bfloat16)
    with torch.no_grad():
        plain.weight.copy_(integer.dequantized_weight(0))
        plain.bias.copy_(integer.bias)
        y = integer(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, plain(x))
