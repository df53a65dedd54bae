"""Post-training quantization of stable-audio-tools' DiffusionTransformer (and any tree of nn.Linear).

    stats = quant.calibrate(model, lambda: run_sampler(model, prompts))   # static / smoothquant / sqd
    quant.quantize_(model, quant.get_recipe("w8a8-sqd"), stats)
    print(quant.memory_report(model))
    quant.save(model, "w8a8-sqd", "dit_w8a8_sqd.safetensors")

Imports only torch, safetensors and tqdm: the stable-audio-tools side (loading, sampling, the CLI) is `lab`.
"""
from .api import load, quantization_targets, quantize_, quantized_layers, read_recipe, save
from .kernels import CpuProfile, cpu_profile, set_cpu_profile, using_cpu_profile
from .linear import QuantLinear
from .lowrank import LowRankBranch
from .memory import MemoryReport, memory_report
from .model import find_dit, linear_layers
from .observers import SAMPLE_ROWS, CalibrationStats, calibrate
from .recipes import ACTIVATION_METHODS, DEFAULT_SKIP, PRESETS, Recipe, get_recipe, preset_name
from .timestep import TimestepTracker

__all__ = [
    "ACTIVATION_METHODS", "SAMPLE_ROWS", "CalibrationStats", "CpuProfile", "DEFAULT_SKIP", "LowRankBranch", "MemoryReport", "PRESETS",
    "QuantLinear", "Recipe", "TimestepTracker", "calibrate", "cpu_profile", "find_dit", "get_recipe", "linear_layers",
    "load", "memory_report", "quantization_targets", "quantize_", "preset_name", "quantized_layers", "read_recipe",
    "save", "set_cpu_profile", "using_cpu_profile",
]
