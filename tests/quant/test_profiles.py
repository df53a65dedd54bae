"""CPU profiles: each named profile makes the choices written for it, on any machine; the detected one reports
torch's own feature checks; the variable, the setter and the context manager force and restore them."""
import pytest
import torch

from demo_model import train
from quant import kernels
from quant.lowrank import LowRankBranch

# profile -> (int8 kernel where this torch has oneDNN's int8 ops, the weight-only paths auto may pick, the dtype
# weight-only layers, bf16 low-rank branches and training steps compute float32 inputs in)
EXPECTED = {
    "generic": ("int_mm", ("resident",), torch.float32),
    "avx2": ("onednn", ("resident",), torch.float32),
    "vnni": ("onednn", ("resident",), torch.float32),
    "vnni-bf16": ("onednn", ("resident", "packed"), torch.bfloat16),
    "amx": ("onednn", ("resident", "packed"), torch.bfloat16),
}


def test_the_table_covers_every_profile():
    assert set(EXPECTED) == set(kernels.PROFILES) and kernels.PROFILE_CHOICES == ("auto", *kernels.PROFILES)


@pytest.mark.parametrize("name", EXPECTED)
def test_each_profile_selects_its_kernels_and_dtypes(use_profile, name):
    int8_kernel, candidates, dtype = EXPECTED[name]
    use_profile(name)
    profile = kernels.cpu_profile()
    assert (profile.name, profile.forced) == (name, True)
    assert (profile.avx2, profile.vnni, profile.native_bf16, profile.amx) == kernels.PROFILES[name]
    assert kernels.choose_kernel("cpu") == (int8_kernel if kernels.onednn_available() else "int_mm")
    assert kernels.weight_only_candidates("cpu") == candidates
    for bits in (8, 4):
        chosen = kernels.choose_weight_only_kernel("cpu", bits)  # of two candidates, the faster one here
        assert chosen in candidates
        assert kernels.weight_only_dtype(chosen, "cpu", torch.float32) == dtype
    assert kernels.weight_only_dtype("resident", "cpu", torch.float16) == torch.float16  # 16-bit inputs as they are
    assert kernels.weight_only_dtype("packed", "cpu", torch.float32) == torch.bfloat16  # its kernels take bf16 only
    assert LowRankBranch(16, 8, 4, torch.bfloat16).compute_dtype("cpu") == dtype
    assert LowRankBranch(16, 8, 4, torch.float32).compute_dtype("cpu") == torch.float32
    assert train.bf16_autocast("cpu") == (dtype == torch.bfloat16)
    assert not train.bf16_autocast("cpu", fp32_train=True)
    for line in (kernels.kernel_name(), kernels.weight_only_kernel_name(), train.device_line("cpu")):
        assert f"{name}, forced by set_cpu_profile" in line


def test_the_variable_picks_a_profile_and_the_setter_wins(monkeypatch, use_profile):
    monkeypatch.setenv(kernels.PROFILE_ENV, " VNNI ")
    profile = kernels.cpu_profile()
    assert (profile.name, profile.source) == ("vnni", kernels.PROFILE_ENV)
    assert f"vnni, forced by {kernels.PROFILE_ENV}" in kernels.kernel_name()
    use_profile("amx")
    assert kernels.cpu_profile().name == "amx"
    use_profile(None)
    assert kernels.cpu_profile().name == "vnni"
    for auto in ("auto", ""):
        monkeypatch.setenv(kernels.PROFILE_ENV, auto)
        assert kernels.cpu_profile() == kernels.detected_cpu_profile()
        assert not kernels.cpu_profile().forced and "detected" in kernels.kernel_name()
    monkeypatch.setenv(kernels.PROFILE_ENV, "avx9")
    with pytest.raises(ValueError, match=f"{kernels.PROFILE_ENV}='avx9': must be one of auto, generic"):
        kernels.choose_kernel("cpu")
    with pytest.raises(ValueError, match="CPU profile must be one of"):
        kernels.set_cpu_profile("avx9")


def test_using_cpu_profile_restores_what_was_forced(use_profile):
    use_profile("vnni")
    with kernels.using_cpu_profile("generic") as outer:
        assert outer.name == kernels.cpu_profile().name == "generic"
        with pytest.raises(RuntimeError, match="inner"), kernels.using_cpu_profile("amx"):
            assert kernels.native_bf16("cpu")
            raise RuntimeError("inner")
        assert kernels.cpu_profile().name == "generic" and not kernels.native_bf16("cpu")
    assert kernels.cpu_profile().name == "vnni"


def test_the_detected_profile_is_torchs_feature_checks():
    detected = kernels.detected_cpu_profile()
    amx = torch.cpu._is_amx_tile_supported()
    assert detected.amx == amx and not detected.forced
    assert detected.vnni == (torch.cpu._is_vnni_supported() or amx)
    assert detected.avx2 == (torch.cpu._is_avx2_supported() or detected.vnni)
    assert detected.native_bf16 == (torch.cpu._is_avx512_bf16_supported() or amx)
    flags = (detected.avx2, detected.vnni, detected.native_bf16, detected.amx)
    assert kernels.PROFILES.get(detected.name, flags) == flags  # named after the profile with its features
    assert detected.describe() == f"{detected.name}, detected"


def test_the_weight_only_variable_overrides_the_profile(monkeypatch, use_profile):
    use_profile("vnni")
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, "packed")
    assert kernels.choose_weight_only_kernel("cpu", 4) == "packed"
    assert kernels.weight_only_kernel_name().startswith("packed (forced; float32 inputs computed in bfloat16")
    assert kernels.choose_weight_only_kernel(torch.device("cuda", 0), 4) == "resident"  # CUDA's only path
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, "auto")
    assert kernels.weight_only_kernel_name().startswith("resident (auto; float32 inputs computed in float32")
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, "fastest")
    with pytest.raises(ValueError, match=kernels.WEIGHT_ONLY_ENV):
        kernels.choose_weight_only_kernel("cpu", 8)
