"""The demo model's pretransform: SAT's Oobleck autoencoder with weights that compute an MDCT, and its inverse.

`mdct_autoencoder()` writes the transform into the autoencoder's weights (what ships in model.safetensors);
`mdct()` computes the same coefficients in one strided convolution, which is what training encodes its
clips with; `latent_scale()` measures the std that the config's `scale` divides out.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from demo_model import corpus
from demo_model.config import AUTOENCODER, ENCODER_WIDTH, HOP

OFFSET = 64.0  # added before each ELU so that it only sees positive values (where ELU(x) = x), removed after


def mdct_basis() -> torch.Tensor:
    """(HOP, 2 HOP) orthonormal MDCT rows with a sine window: analysis and synthesis at once (TDAC)."""
    n, k = torch.arange(2 * HOP, dtype=torch.float64), torch.arange(HOP, dtype=torch.float64)
    window = torch.sin(math.pi * (n + 0.5) / (2 * HOP))
    phase = math.pi / HOP * (n[None, :] + 0.5 + HOP / 2) * (k[:, None] + 0.5)
    return (math.sqrt(2 / HOP) * window * torch.cos(phase)).float()


def _set_weight(conv: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | float | None = None) -> None:
    """Give a weight-normed conv the effective weight `weight` (weight = g v / |v|, per slice of dim 0)."""
    norms = weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))
    conv.weight_v.data.copy_(torch.where(norms > 0, weight, torch.ones_like(weight)))
    conv.weight_g.data.copy_(norms)
    if bias is not None:
        conv.bias.data.copy_(torch.as_tensor(bias).expand_as(conv.bias))


def _identity_residual_units(block: torch.nn.Module) -> None:
    for unit in block.layers:
        if unit.__class__.__name__ == "ResidualUnit":
            _set_weight(unit.layers[3], torch.zeros_like(unit.layers[3].weight_v), 0.0)  # x + 0


@torch.no_grad()
def mdct_autoencoder() -> torch.nn.Module:
    """SAT's Oobleck autoencoder (config.AUTOENCODER) with weights that compute an MDCT and its inverse exactly.

    Every ELU sees its input shifted up by OFFSET, where ELU is the identity; a constant channel carries
    the same shift through the strided (transposed) convolution so that it cancels. Reconstruction is
    exact except in the first and last 128 samples, which only one frame covers (the corpus fades there).
    """
    from stable_audio_tools.models.autoencoders import create_autoencoder_from_config

    autoencoder = create_autoencoder_from_config({"sample_rate": corpus.SAMPLE_RATE, "model": AUTOENCODER})
    basis = mdct_basis()  # (HOP, 2 HOP)
    width = ENCODER_WIDTH
    enc = autoencoder.encoder.layers  # conv k7, EncoderBlock, ELU, conv k3
    first = torch.zeros(width, 1, 7)
    first[0, 0, 3] = 1.0  # channel 0: x + OFFSET, channel 1: OFFSET
    _set_weight(enc[0], first, OFFSET)
    _identity_residual_units(enc[1])
    strided = torch.zeros(HOP, width, 2 * HOP)
    strided[:, 0], strided[:, 1] = basis, -basis  # MDCT of (x + OFFSET) - MDCT of OFFSET
    _set_weight(enc[1].layers[4], strided, OFFSET)
    _set_weight(enc[3], torch.eye(HOP)[:, :, None] * torch.tensor([0.0, 1.0, 0.0]), -OFFSET)

    dec = autoencoder.decoder.layers  # conv k7, DecoderBlock, ELU, conv k7 (no bias)
    into = torch.zeros(2 * HOP, HOP, 7)
    into[:HOP, :, 3] = torch.eye(HOP)  # channels < HOP: coefficient + OFFSET, channels >= HOP: OFFSET
    _set_weight(dec[0], into, OFFSET)
    upsample = torch.zeros(2 * HOP, width, 2 * HOP)  # ConvTranspose1d weight: (in, out, kernel)
    upsample[:HOP, 0], upsample[HOP:, 0] = basis, -basis
    _set_weight(dec[1].layers[1], upsample, OFFSET)  # channel 0: y + OFFSET, channel 1: OFFSET
    _identity_residual_units(dec[1])
    last = torch.zeros(1, width, 7)
    last[0, 0, 3], last[0, 1, 3] = 1.0, -1.0
    _set_weight(dec[3], last)
    return autoencoder.eval()


def mdct(audio: torch.Tensor) -> torch.Tensor:
    """(b, 1, n) audio -> (b, HOP, n / HOP) MDCT coefficients in fp32, in one strided convolution.

    The same numbers as the encoder of `mdct_autoencoder()` (tests/demo_model/test_train.py checks), which
    training does not use directly: SAT's Oobleck runs its (identity) residual units on 2 channels at the
    audio rate, ~30x slower on a CPU than the transform itself, and it must run in fp32: it sees x + 64,
    where bf16 keeps steps of 0.25-0.5, and under bf16 autocast most latents of a batch round to 0.
    Autocast is off here, whatever the caller has on.
    """
    basis = mdct_basis().to(audio.device)[:, None, :]
    with torch.autocast(audio.device.type, enabled=False):
        return torch.nn.functional.conv1d(audio.float(), basis, stride=HOP, padding=HOP // 2)


def latent_scale(seed: int, device: str) -> float:
    """The std of the MDCT coefficients over 256 corpus clips: the config's `scale` (unit-std latents).

    Scaling the latents up instead (std 4, so that quiet plucks and drum patterns are not buried under the
    noise for most of the schedule) made pitch worse (docs/demo_model.md, "Tried and not shipped")."""
    audio, _ = corpus.training_batch(corpus.CaptionSampler(seed=seed + 7), 256, np.random.default_rng([seed, 7]))
    return mdct(torch.from_numpy(audio).to(device)).std().item()
