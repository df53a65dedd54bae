"""Copies of the FP model that share its tensors: a calibration view (every tensor shared) and the starting
point of a quantized model (the weights its recipe replaces shared until replaced, the DiT's other tensors its own).
Memory is the FP model + the quantized DiT, never a second FP model."""
from __future__ import annotations

import copy

import torch

import quant


def _copy_sharing(model: torch.nn.Module, tensors) -> torch.nn.Module:
    """A new module tree for `model` whose parts outside the DiT, and the given `tensors`, are the FP model's own
    objects (not copies). The copy carries no hooks: a hook on the FP model at copy time belongs to its caller."""
    dit = quant.find_dit(model)
    memo = {id(child): child for child in model.children() if not any(m is dit for m in child.modules())}
    memo.update({id(tensor): tensor for tensor in tensors})
    duplicate = copy.deepcopy(model, memo)
    for module in duplicate.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                      module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.clear()
    return duplicate


def shared_view(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` sharing every tensor: costs no tensor memory. Calibration runs its hooks here, so a
    generation of the FP model in another thread neither sees them nor is recorded by them."""
    return _copy_sharing(model, [*model.parameters(), *model.buffers()])


def copy_for_quantization(model: torch.nn.Module, recipe: quant.Recipe) -> torch.nn.Module:
    """A copy of the FP `model` to quantize with `recipe`: the weights of the linears the recipe replaces are
    shared (read once by `QuantLinear.from_float`, then dropped from the copy); the DiT's other tensors are
    the copy's own, since loading a file writes into them."""
    targets = quant.quantization_targets(model, recipe).values()
    return _copy_sharing(model, [t for layer in targets for t in (layer.weight, layer.bias) if t is not None])
