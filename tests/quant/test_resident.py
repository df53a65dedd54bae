"""One resident weight copy: once the integer backend has prepared a layer's weight for its kernel, the layer
holds that form alone (the stored codes' storage is freed) wherever the codes come back from it exactly, and
everything that reads the stored state (state_dict, save, copies, moves) still gets the stored codes, bit for bit."""
import copy

import pytest
import torch
from torch import nn

import quant
from quant import kernels
from quant.primitives import dequantize_weight, quantize_weight
from tests.tiny_models import dit_inputs, tiny_dit

INT8_KERNELS = ["int_mm"] + (["onednn"] if kernels.onednn_available() else [])
WEIGHT_ONLY_PATHS = ("resident", "packed", "dequant")


def quantized_layer(w_bits, a_bits, *, in_features=128, out_features=96, group_size=None, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    method = "dynamic" if a_bits == 8 else "weight-only"
    recipe = quant.Recipe("k", w_bits, a_bits, method, group_size=group_size, backend="integer")
    return quant.QuantLinear.from_float(linear, recipe)


def tokens(n=24, channels=128, seed=1):
    return torch.randn(n, channels, generator=torch.Generator().manual_seed(seed))


def nbytes(tensor):
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_int8_kernels_hold_one_weight_copy(use_kernel, kernel, w_bits):
    use_kernel(kernel)
    layer = quantized_layer(w_bits, 8)
    stored = layer.qweight.clone()
    before = layer.held_bytes()
    with torch.no_grad():
        y = layer(tokens())
    after = layer.held_bytes()
    assert {k: v for k, v in after.items() if k != "cache"} == {k: v for k, v in before.items() if k != "cache"}
    n_weights = layer.out_features * layer.in_features
    # int8 codes: the kernel's copy is the only one (resident = stored); int4: the GEMM's int8 codes replace the
    # packed nibbles, half a byte per weight more than stored
    assert after["cache"] == (0 if w_bits == 8 else n_weights // 2)
    # int_mm multiplies the stored int8 buffer itself; every other form replaces it
    assert layer.qweight.is_meta == (kernel == "onednn" or w_bits == 4)
    assert torch.equal(layer.stored_weight(), stored)
    assert torch.equal(layer.state_dict()["qweight"], stored)
    with torch.no_grad():
        assert torch.equal(layer(tokens()), y)  # the copy in use is unchanged by reading the codes back


@pytest.mark.parametrize("path", WEIGHT_ONLY_PATHS)
@pytest.mark.parametrize("w_bits,group_size", [(8, None), (4, None), (4, 32)])
def test_weight_only_paths_hold_one_weight_copy(monkeypatch, use_profile, path, w_bits, group_size):
    use_profile("vnni-bf16")  # bf16 compute: the packed kernels' dtype, and the resident copy's
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, path)
    layer = quantized_layer(w_bits, 16, group_size=group_size)
    stored = layer.qweight.clone()
    with torch.no_grad():
        layer(tokens())
    prepared = layer._prepared[2]
    n_weights = layer.out_features * layer.in_features
    cache = layer.held_bytes()["cache"]
    if path == "resident":  # a bf16 copy in place of the codes: 2 bytes per weight instead of 1 or 1/2
        assert layer.qweight.is_meta and cache == 2 * n_weights - nbytes(stored)
    elif path == "packed" and w_bits == 8:  # torch's int8 kernel multiplies the stored codes themselves
        assert not layer.qweight.is_meta and cache == nbytes(prepared.scales)
    elif path == "packed":  # the int4-packed copy replaces the stored nibbles, same size, plus its scales
        assert layer.qweight.is_meta and cache == nbytes(prepared.packed) + nbytes(prepared.scales) - nbytes(stored)
        assert nbytes(prepared.packed) == nbytes(stored)
    else:
        assert not layer.qweight.is_meta and cache == 0
    assert torch.equal(layer.state_dict()["qweight"], stored)


def test_onednn_copy_gives_back_full_range_codes_exactly():
    if not kernels.onednn_available():
        pytest.skip("this torch lacks oneDNN's int8 linear ops")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (80, 1100), dtype=torch.int8, generator=g)  # K not a multiple of a pass
    codes[:, :3] = torch.tensor([-127, 127, 0], dtype=torch.int8)
    prepared = kernels.PreparedWeight(codes, torch.rand(80) + 1e-3, "onednn", owns_codes=False)
    assert prepared.replaces_stored and torch.equal(prepared.int8_codes(rows_per_pass=256), codes)


@pytest.mark.parametrize("dtype,replaces", [(torch.bfloat16, True), (torch.float32, True), (torch.float16, False)])
def test_resident_float_copy_replaces_the_codes_only_where_it_rounds_back_exactly(dtype, replaces):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-9, 1, 64).unsqueeze(1)  # scales from 1e-11 to 0.1
    codes, scale = quantize_weight(w, 8)
    prepared = kernels.WeightOnlyWeight(lambda: codes, scale, 8, "resident", dtype)
    assert prepared.replaces_stored == replaces  # fp16 flushes the smallest scales' weights to zero
    if replaces:
        assert torch.equal(prepared.int8_codes(), codes)
        assert torch.equal(prepared.weight, dequantize_weight(codes, scale).to(dtype))


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w4a8-dynamic", "w8a16", "w4a16"])
def test_stored_state_is_bit_identical_after_packing_forwards_and_kernel_switches(use_kernel, tmp_path, preset):
    dit = quant.quantize_(tiny_dit(), quant.get_recipe(preset).replace(backend="integer"))
    x, t, kwargs = dit_inputs()
    reference = {key: value.clone() for key, value in dit.state_dict().items()}

    def assert_stored_unchanged():
        state = dit.state_dict()
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key

    with torch.no_grad():
        y = dit(x, t, **kwargs)
    assert_stored_unchanged()
    for kernel in INT8_KERNELS[::-1]:  # switch away from (or stay on) the kernel the first forward used
        use_kernel(kernel)
        with torch.no_grad():
            assert torch.equal(dit(x, t, **kwargs), y) or "a8" in preset  # int8 kernels round their rescale apart
        assert_stored_unchanged()
    quant.save(dit, preset, tmp_path / "q.safetensors")
    fresh = tiny_dit()
    quant.load(fresh, tmp_path / "q.safetensors")
    assert {key: value for key, value in fresh.state_dict().items()}.keys() == reference.keys()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_a_layer_holding_one_copy_still_copies_moves_and_loads(use_kernel, kernel):
    use_kernel(kernel)
    layer = quantized_layer(4, 8)
    stored = layer.qweight.clone()
    with torch.no_grad():
        y = layer(tokens())
    assert layer.qweight.is_meta
    twin = copy.deepcopy(layer)
    assert not twin.qweight.is_meta and torch.equal(twin.qweight, stored)
    layer.to("cpu")  # a move that leaves int8 tensors where they are keeps the prepared copy
    assert layer.qweight.is_meta and layer._prepared is not None
    with torch.no_grad():
        assert torch.equal(twin(tokens()), y) and torch.equal(layer(tokens()), y)
    layer._apply(lambda tensor: tensor.to(torch.int16) if tensor.dtype == torch.uint8 else tensor)
    assert layer._prepared is None and layer.qweight.dtype == torch.int16  # a cast gets the codes back first
    assert torch.equal(layer.qweight, stored.to(torch.int16))
    with torch.no_grad():
        twin(tokens())
    twin.load_state_dict(quantized_layer(4, 8, seed=3).state_dict())  # loading replaces what was released
    assert twin._prepared is None and torch.equal(twin.qweight, quantized_layer(4, 8, seed=3).qweight)
