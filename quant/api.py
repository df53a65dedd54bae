"""Apply a recipe to a model in place, and store / restore the result (safetensors + recipe JSON)."""
import json

import torch
from torch import nn

from .attention import quantize_attention_
from .linear import QuantLinear
from .mixed import eight_bit_layers
from .model import find_dit, linear_layers, matches_any, replace_module
from .observers import CalibrationStats
from .recipes import Recipe, get_recipe
from .rotation import layer_block
from .timestep import TimestepTracker

_FORMAT = "audio-dit-ptq/quantized-1"


def quantization_targets(model: nn.Module, recipe: Recipe) -> dict[str, nn.Linear]:
    """The DiT's linears that `recipe` quantizes (all minus those matching `recipe.skip`), by DiT-relative name."""
    return {name: layer for name, layer in linear_layers(find_dit(model)).items()
            if not matches_any(name, recipe.skip)}


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The QuantLinear layers of the model's DiT, by DiT-relative name."""
    return {name: m for name, m in find_dit(model).named_modules() if isinstance(m, QuantLinear)}


def _as_recipe(recipe) -> Recipe:
    return get_recipe(recipe) if isinstance(recipe, str) else recipe


def _check_rotation(recipe: Recipe, targets: dict[str, nn.Linear]) -> None:
    """ValueError naming the first layer the recipe's rotation cannot rotate (an odd width)."""
    for name, linear in targets.items():
        layer_block(recipe.rotation, linear.in_features, name)


def _check_stats(recipe: Recipe, stats: CalibrationStats) -> None:
    if recipe.needs_samples and not stats.has_samples:
        raise ValueError(f"recipe '{recipe.name}' needs calibration sample rows (alpha search, GPTQ, a memory "
                         "budget, or a static scale of a smoothed or rotated activation), and these statistics have none (a format-1 "
                         "file, or calibrate(..., sample_rows=0)): recalibrate with quant.calibrate")
    if recipe.needs_histograms and not stats.has_histograms:
        raise ValueError(f"recipe '{recipe.name}' (estimator '{recipe.estimator}') needs |x| histograms, and these "
                         "statistics have none (a format-1 file): recalibrate with quant.calibrate")


def _check_not_quantized(root: nn.Module) -> None:
    if any(isinstance(m, QuantLinear) for m in root.modules()):
        raise ValueError("the model is already quantized: start again from a full-precision model")


@torch.no_grad()
def quantize_(model: nn.Module, recipe: Recipe | str, stats: CalibrationStats | None = None, *,
              progress: bool = False) -> nn.Module:
    """Swap the DiT's nn.Linear layers for QuantLinear in place (skipping `recipe.skip`); returns `model`.

    model: a SAT `diffusion_cond` model, a bare DiffusionTransformer, or any module tree of linears.
    stats: from `quant.calibrate`; required by static, smoothquant and sqd recipes and by GPTQ rounding.
    """
    recipe = _as_recipe(recipe)
    root = find_dit(model)
    _check_not_quantized(root)
    if recipe.needs_calibration and stats is None:
        why = (f"method '{recipe.method}'" if recipe.calibrates_activations else
               f"{'GPTQ' if recipe.weight_rounding == 'gptq' else 'AdaRound'} weight rounding" if recipe.rounds_by_hessian
               else "a memory budget's choice of 8-bit layers")
        raise ValueError(f"recipe '{recipe.name}' ({why}) needs calibration statistics: "
                         "run stats = quant.calibrate(model, forward_loop) first and pass stats=stats")
    targets = quantization_targets(root, recipe)
    if not targets:
        raise ValueError(f"recipe '{recipe.name}' leaves no nn.Linear layer to quantize (skip={recipe.skip})")
    _check_rotation(recipe, targets)
    if recipe.needs_calibration:
        _check_stats(recipe, stats)
    groups = recipe.timestep_groups
    boundaries = stats.group_boundaries(groups) if recipe.needs_calibration else None
    tracker = TimestepTracker.shared(root) if groups > 1 else None
    items = targets.items()
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=f"quantizing ({recipe.name})", unit="layer")
    eight_bit = eight_bit_layers(targets, recipe, stats, boundaries) if recipe.memory_budget is not None else set()
    for name, linear in items:
        calibration = stats.layer(name, boundaries) if recipe.needs_calibration else None
        layer_recipe = recipe.eight_bit_layer if name in eight_bit else recipe
        replace_module(root, name, QuantLinear.from_float(linear, layer_recipe, None, boundaries, tracker,
                                                          calibration=calibration, name=name))
    if recipe.attention == "int8":
        quantize_attention_(root, recipe.backend)
    return model


def save(model: nn.Module, recipe: Recipe | str, path) -> None:
    """Write the model's whole state (quantized layers included) as safetensors, the recipe in the metadata.

    Load it with `quant.load(fresh_fp_model, path)`: no calibration, no FP checkpoint for the DiT needed.
    """
    from safetensors.torch import save_file
    recipe = _as_recipe(recipe)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layers: call quant.quantize_(model, recipe, stats) first")
    eight_bit = sorted(name for name, layer in layers.items()
                       if recipe.memory_budget is not None and layer.recipe.hash() == recipe.eight_bit_layer.hash())
    for name, layer in layers.items():
        if layer.recipe.hash() != recipe.hash() and name not in eight_bit:
            raise ValueError(f"layer '{name}' was quantized with recipe '{layer.recipe.name}', not '{recipe.name}'")
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    layer_shapes = {name: [layer.out_features, layer.in_features, layer.bias is not None]
                    for name, layer in layers.items()}
    save_file(state, str(path), metadata={
        "format": _FORMAT, "recipe": json.dumps(recipe.to_dict()), "layers": json.dumps(layer_shapes),
        "eight_bit_layers": json.dumps(eight_bit)})


def read_recipe(path) -> Recipe:
    """The recipe stored in a file written by `quant.save`."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} was not written by quant.save (format {metadata.get('format')!r})")
    return Recipe.from_dict(json.loads(metadata["recipe"]))


@torch.no_grad()
def load(model: nn.Module, path, *, recipe: Recipe | str | None = None) -> Recipe:
    """Quantize a freshly built FP `model` (same config) from a file written by `quant.save`; returns its recipe.

    Raises ValueError when the file's recipe differs from `recipe` (if given), or when its layers or
    tensor shapes do not fit the model; the model is left unchanged then.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    file_recipe = read_recipe(path)
    if recipe is not None:
        recipe = _as_recipe(recipe)
        if recipe.hash() != file_recipe.hash():
            diff = {k: (v, file_recipe.to_dict()[k]) for k, v in recipe.to_dict().items()
                    if k != "name" and v != file_recipe.to_dict()[k]}
            raise ValueError(f"{path} holds recipe '{file_recipe.name}', not '{recipe.name}' "
                             f"(field: (expected, in file) = {diff})")
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads(f.metadata()["layers"])
        eight_bit = set(json.loads(f.metadata().get("eight_bit_layers", "[]")))  # a memory budget's 8-bit layers
    root = find_dit(model)
    _check_not_quantized(root)
    targets = quantization_targets(root, file_recipe)
    if set(saved) != set(targets):
        only_file = sorted(set(saved) - set(targets))[:5]
        only_model = sorted(set(targets) - set(saved))[:5]
        raise ValueError(f"{path} does not fit this model: layers only in the file {only_file}, "
                         f"only in the model {only_model}")
    wrong = [f"{name}: file {saved[name]}, model {[m.out_features, m.in_features, m.bias is not None]}"
             for name, m in targets.items()
             if saved[name] != [m.out_features, m.in_features, m.bias is not None]]
    if wrong:
        raise ValueError(f"{path} does not fit this model, layer shapes differ: {wrong[:5]}")
    _check_rotation(file_recipe, targets)

    tracker = TimestepTracker.shared(root) if file_recipe.timestep_groups > 1 else None
    for name, linear in targets.items():
        layer_recipe = file_recipe.eight_bit_layer if name in eight_bit else file_recipe
        layer = QuantLinear(linear.in_features, linear.out_features, layer_recipe, bias=linear.bias is not None,
                            dtype=linear.weight.dtype, device=linear.weight.device)
        layer.attach(tracker)
        replace_module(root, name, layer)
    try:
        model.load_state_dict(load_file(str(path), device=str(next(iter(targets.values())).weight.device)))
    except RuntimeError as error:
        for name, linear in targets.items():  # put the float layers back: the model stays usable
            replace_module(root, name, linear)
        hint = (" (progressive group scales are read packed two per byte, 1..15; a file with one byte per scale "
                "must be quantized again)" if "weight_group_scale" in str(error) else "")
        raise ValueError(f"{path} does not fit this model: {error}{hint}") from None
    if file_recipe.attention == "int8":
        quantize_attention_(root, file_recipe.backend)
    return file_recipe
