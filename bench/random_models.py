"""Random stable-audio-tools models for measuring at a shape without trained weights (the benchmark, the scripts
and the tests): SAT zero-initialises each block's output projections and the DiT's pre/post convs, so a model
built as is has dead residual branches (a random SAO outputs zeros); these make every branch live."""
from __future__ import annotations

import torch

from lab import sat


def random_dit(shape: dict, *, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A SAT DiffusionTransformer of `shape` with every Linear/Conv drawn N(0, 0.02) from `seed`, for speed and
    memory at a given shape."""
    torch.manual_seed(seed)
    dit = sat.build_dit(shape, device=device)
    if device != "meta":
        randomize_weights(dit)
    return dit


def make_live(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every Linear and Conv1d with PyTorch's default (Kaiming-uniform) init from `seed`, leaving
    the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                module.reset_parameters()
    return model


def randomize_weights(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Draw every Linear and Conv1d weight N(0, std) from the global RNG: a random model whose branches are live."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
            torch.nn.init.normal_(module.weight, std=std)
    return model
