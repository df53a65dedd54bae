"""Tiny random stable-audio-tools models for tests: real SAT classes, every branch live.

SAT zero-initialises the transformer blocks' output projections and the pre/post 1x1 convs, so a
freshly built DiT has dead residual branches; `bench.random_models.make_live` re-initialises every Linear and Conv with
PyTorch's default (Kaiming-uniform) init so quantization errors actually show.

    model = tiny_diffusion_cond()                # SAT ConditionedDiffusionModelWrapper, no pretransform
    audio = generate(model, steps=4, seed=0)     # SAT generate_diffusion_cond, CPU
    stats = quant.calibrate(model, calibration_loop(model))
"""
import copy

import torch
from torch import nn

from bench.random_models import make_live

TINY_DIT = dict(
    io_channels=8,
    patch_size=2,
    embed_dim=64,
    depth=2,
    num_heads=2,              # dim_heads 32: SAT rotary embeddings need dim_heads >= 32
    cond_token_dim=32,        # >= dim_heads: cross-attention has cond_token_dim // dim_heads kv heads
    global_cond_dim=64,       # the two number conditioners, concatenated
    project_cond_tokens=False,
    transformer_type="continuous_transformer",
)

TINY_SAMPLE_SIZE = 32        # latent frames (no pretransform): 16 tokens after patching

TINY_CONFIG = {
    "model_type": "diffusion_cond",
    "sample_size": TINY_SAMPLE_SIZE,
    "sample_rate": 32,
    "audio_channels": TINY_DIT["io_channels"],
    "model": {
        "io_channels": TINY_DIT["io_channels"],
        "conditioning": {
            "cond_dim": TINY_DIT["cond_token_dim"],
            "configs": [
                {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 16}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 16}},
            ],
        },
        "diffusion": {
            "type": "dit",
            "cross_attention_cond_ids": ["seconds_start", "seconds_total"],
            "global_cond_ids": ["seconds_start", "seconds_total"],
            "config": {k: v for k, v in TINY_DIT.items()},
        },
    },
}


def tiny_dit(seed: int = 0, **overrides) -> nn.Module:
    """A bare random `DiffusionTransformer` (eval mode)."""
    from stable_audio_tools.models.dit import DiffusionTransformer
    torch.manual_seed(seed)
    return make_live(DiffusionTransformer(**{**TINY_DIT, **overrides}), seed).eval()


def tiny_diffusion_cond(seed: int = 0) -> nn.Module:
    """A random SAT `diffusion_cond` model (number conditioners only, no pretransform, eval mode)."""
    from stable_audio_tools.models.factory import create_model_from_config
    torch.manual_seed(seed)
    return make_live(create_model_from_config(copy.deepcopy(TINY_CONFIG)), seed).eval()


def dit_inputs(batch: int = 2, seed: int = 0, t: float | torch.Tensor = 0.5):
    """Random (x, t, kwargs) for calling a tiny DiT directly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY_DIT["io_channels"], TINY_SAMPLE_SIZE, generator=g)
    t = t if torch.is_tensor(t) else torch.full((batch,), float(t))
    kwargs = dict(cross_attn_cond=torch.randn(batch, 2, TINY_DIT["cond_token_dim"], generator=g),
                  global_embed=torch.randn(batch, TINY_DIT["global_cond_dim"], generator=g))
    return x, t, kwargs


def conditioning(batch: int = 1, seconds_total: float = 8.0):
    return [{"seconds_start": 0, "seconds_total": seconds_total} for _ in range(batch)]


@torch.no_grad()
def generate(model: nn.Module, steps: int = 4, seed: int = 0, batch: int = 1, seconds_total: float = 8.0,
             cfg_scale: float = 3.0) -> torch.Tensor:
    """SAT's `generate_diffusion_cond` on CPU with a few steps: (batch, channels, TINY_SAMPLE_SIZE)."""
    from stable_audio_tools.inference.generation import generate_diffusion_cond
    return generate_diffusion_cond(
        model, steps=steps, cfg_scale=cfg_scale, conditioning=conditioning(batch, seconds_total),
        batch_size=batch, sample_size=TINY_SAMPLE_SIZE, seed=seed, device="cpu",
        sampler_type="dpmpp-2m-sde", sigma_min=0.3, sigma_max=50)


def dit_timestep_loop(dit: nn.Module, x: torch.Tensor, kwargs: dict, timesteps):
    """A zero-argument callable for `quant.calibrate`: one direct DiT call on the same input per t of `timesteps`."""
    return lambda: [dit(x, torch.full((x.shape[0],), float(t)), **kwargs) for t in timesteps]


def calibration_loop(model: nn.Module, steps: int = 8, seeds=(0, 1)):
    """A zero-argument callable for `quant.calibrate`: runs the sampler once per seed."""
    def run():
        for i, seed in enumerate(seeds):
            generate(model, steps=steps, seed=seed, seconds_total=4.0 + 4 * i)
    return run
