"""The one format of quantized-model files: `save_quantized` writes, `load_quantized` reads.

A file holds the DiT alone (`quant.save` of the DiffusionTransformer: its quantized linears and its float
tensors); the autoencoder and conditioners come from the FP checkpoint, which the app and the CLI load anyway.
The CLI, the app's cache and `--quantized` share this format.
"""
from __future__ import annotations

from pathlib import Path

import torch

import quant
from lab.model_copies import copy_for_quantization
from lab.sat import LoadedModel


def save_quantized(model: torch.nn.Module, recipe: quant.Recipe | str, path: str | Path) -> None:
    """Write the quantized DiT of `model` (see the module docstring for what the file holds)."""
    quant.save(quant.find_dit(model), recipe, path)


def load_quantized(loaded: LoadedModel, path: str | Path,
                   recipe: quant.Recipe | str | None = None) -> tuple[torch.nn.Module, quant.Recipe]:
    """(model, recipe) from a `save_quantized` file: the loaded model with the file's DiT. ValueError naming
    what differs when the file is missing, unreadable (truncated), for another recipe than `recipe`, for a DiT
    of another shape, or quantized from other weights than the loaded model's."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Quantized model file not found: {path}")
    try:
        file_recipe = quant.read_recipe(path)
    except ValueError:
        raise
    except Exception as error:  # safetensors raises its own error type for a truncated or damaged file
        raise ValueError(f"{path} is not a readable quantized model file (truncated or damaged?): {error}") from None
    _check_holds_a_dit(loaded.model, path)
    model = copy_for_quantization(loaded.model, file_recipe)
    quant.load(quant.find_dit(model), path, recipe=recipe)
    fp_state, q_state = quant.find_dit(loaded.model).state_dict(), quant.find_dit(model).state_dict()
    differ = [key for key, value in q_state.items() if key in fp_state and fp_state[key].shape == value.shape
              and not torch.equal(fp_state[key], value)]
    if differ:
        raise ValueError(f"{path} was quantized from other weights than the loaded model ({loaded.model_id}): "
                         f"{len(differ)} float tensors differ, e.g. {differ[:3]}")
    return model.eval(), file_recipe


def _check_holds_a_dit(model: torch.nn.Module, path: Path) -> None:
    """A `quant.save` of the whole SAT model (its DiT's tensors under the wrapper's prefix) is not this format."""
    from safetensors import safe_open

    dit = quant.find_dit(model)
    prefix = next(name for name, module in model.named_modules() if module is dit)
    with safe_open(str(path), framework="pt") as file:
        if prefix and any(key.startswith(prefix + ".") for key in file.keys()):
            raise ValueError(f"{path} holds a whole model, not its DiT: write files with `ptq-quantize quantize` "
                             f"or lab.quantized_files.save_quantized (quant.save of quant.find_dit(model))")
