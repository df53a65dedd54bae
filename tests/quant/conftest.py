"""Fixtures that pin a processor decision for one test and hand it back afterwards: the tests then assert what
each CPU profile must choose on whatever machine runs them (a profile claiming a feature the CPU lacks still
computes correctly, only slower)."""
import math

import pytest
import torch

from quant import kernels


@pytest.fixture
def use_kernel():
    """Force a CPU int8 kernel for the test (kernels.set_kernel)."""
    yield kernels.set_kernel
    kernels.set_kernel(None)


@pytest.fixture
def use_profile():
    """Force a CPU profile for the test (kernels.set_cpu_profile): wins over QUANT_CPU_PROFILE."""
    yield kernels.set_cpu_profile
    kernels.set_cpu_profile(None)


@pytest.fixture(params=list(kernels.PROFILES))
def each_profile(request):
    """Run the test once under every named CPU profile; the forced kernels.CpuProfile."""
    with kernels.using_cpu_profile(request.param) as profile:
        yield profile


def int8_kernel_of(profile: kernels.CpuProfile) -> str:
    """The int8 kernel `profile` must pick: oneDNN's where the CPU has AVX2 or better and this torch has the ops."""
    return "onednn" if profile.avx2 and kernels.onednn_available() else "int_mm"


def computing_in(dtype: torch.dtype):
    """Autocast a float reference to `dtype` (bf16 paths round inputs, weights and outputs to bf16), so that it
    rounds as the path it is compared with; nothing for float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def bf16_sqnr_floor(roundings: int) -> float:
    """The SQNR (dB) a float32 result keeps against its exact value after `roundings` roundings to bf16 of
    tensors of its size along the way (inputs, weights, scales, outputs). bf16 keeps 8 significant bits: one
    rounding moves a value by at most 2^-8 of it, modelled as uniform noise, 2^-8 / sqrt(3) of the signal
    (52.9 dB; real data, spread over a binade, lands ~3 dB above); independent roundings add their noise."""
    return 20 * math.log10(2 ** 8 * math.sqrt(3)) - 10 * math.log10(roundings)
