"""Finding the DiT and its linear layers inside a SAT model, by structure and by name."""
from fnmatch import fnmatchcase

from torch import nn


def find_dit(model: nn.Module) -> nn.Module:
    """The `DiffusionTransformer` inside a SAT model (`diffusion_cond` wrapper, DiTWrapper, or the DiT
    itself); any other module tree is returned as is, so the library also works on plain stacks of linears.

    Matched by class name, so `import quant` never imports stable_audio_tools.
    """
    for module in model.modules():
        if type(module).__name__ == "DiffusionTransformer":
            return module
    return model


def linear_layers(root: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` under `root`, by its name relative to `root`, in module order."""
    return {name: module for name, module in root.named_modules() if isinstance(module, nn.Linear)}


def matches_any(name: str, patterns) -> bool:
    """True when `name` matches one of the fnmatch `patterns` (case-sensitive)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
