"""What one click of the experimenter's Compare tab does, without Gradio: generate a pair, make it fair to
listen to, draw it.

`Lab` holds the long-lived pieces (FP model, quantized-model cache, output folder); the UI only maps widgets
to its methods and `ValueError`s to messages. Listening studies live in `lab.study`.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

import quant
from lab import figures
from lab.audio import loudness_match, write_wav
from lab.generation import GenerationRequest, PairResult, generate_clip, generate_pair, linear_layer_names, snr_db
from lab.methods import describe
from lab.quantized import QuantizedModels
from lab.requests import validate_request
from lab.resources import app_version, read_prompts
from lab.sat import LoadedModel, load_model
from lab.settings import Settings

OUTPUT_MAX_AGE_S = 3600  # generated WAVs older than this are deleted on the next write
PART_NAMES = {"conditioner": "conditioners", "pretransform": "autoencoder"}  # SAT's attribute -> what it is


@dataclass
class ComparisonView:
    """Everything the Compare tab shows for one generation."""
    full_precision_wav: Path
    quantized_wav: Path
    summary: str  # markdown
    seed: int
    spectrograms: go.Figure
    step_metrics: go.Figure
    activation_heatmap: go.Figure | None
    activation_steps: go.Figure | None
    channel_outliers: go.Figure | None


class Lab:
    def __init__(self, loaded: LoadedModel, quantized: QuantizedModels, output_dir: Path):
        self.loaded = loaded
        self.quantized = quantized
        self.version = app_version()
        self.output_dir = Path(output_dir)
        self.layers = linear_layer_names(loaded.model)

    def warm_up(self) -> None:
        """One short FP generation, so lazy initialisation does not land in the first comparison's timing, and
        one DiT forward timed at calibration's length, so the console can say what calibrating costs."""
        self.quantized.measure_speed()
        sampling = self.loaded.sampling
        request = GenerationRequest(prompt="warm up", seconds=0.5, steps=2, cfg_scale=1.0, seed=0,
                                    sigma_min=sampling.sigma_min, sigma_max=sampling.sigma_max)
        with torch.no_grad():
            generate_clip(self.loaded.model, self.loaded, request)

    @property
    def max_seconds(self) -> float:
        return self.loaded.sample_size / self.loaded.sample_rate

    def default_layer(self) -> str:
        """The feed-forward output projection of the middle block: the layer reported fragile on SAO."""
        ff_out = [name for name in self.layers if name.endswith("ff.ff.2")]
        return ff_out[len(ff_out) // 2] if ff_out else self.layers[0]

    def compare(self, request: GenerationRequest, recipe_name: str, layer: str | None = None,
                on_clip=None, decode_steps: int = 0) -> ComparisonView:
        """One comparison. The request is checked by `lab.requests.validate_request` (ValueError with the user's
        message); a recipe whose calibration has not run is refused with its cost: calibrating is an action of its
        own (`calibrate`), never a side effect of a comparison. `decode_steps`: see `generate_pair`."""
        validate_request(self.loaded, request)  # before any model is quantized: a bad request costs nothing
        if layer is not None and layer not in self.layers:
            raise ValueError(f"Unknown layer {layer!r}; pick one of the DiT's linear layers.")
        if not self.quantized.ready(recipe_name):
            raise ValueError(f"{recipe_name} needs calibration statistics first: {self.quantized.calibration_cost()}. "
                             f"Press Calibrate (other generations go on meanwhile), or pick a method that needs "
                             f"none (dynamic).")
        quantized_model, recipe = self.quantized.get(recipe_name)
        pair = generate_pair(self.loaded, quantized_model, request, trace_layer=layer, on_clip=on_clip,
                             decode_steps=decode_steps)
        fp_wav, q_wav = self._write_pair(pair, f"{uuid.uuid4().hex[:12]}_full-precision",
                                         f"{uuid.uuid4().hex[:12]}_quantized")
        fp, q = pair.full_precision, pair.quantized
        activation_heatmap = activation_steps = channel_outliers = None
        if layer is not None:
            activation_heatmap = figures.activation_heatmap_figure(fp.trace, q.trace)
            activation_steps = figures.activation_step_figure(fp.trace, q.trace)
            channel_outliers = figures.channel_outlier_figure(fp.trace, self._smoothing(quantized_model, layer,
                                                                                         fp.trace.timesteps))
        return ComparisonView(
            full_precision_wav=fp_wav, quantized_wav=q_wav, seed=request.seed,
            summary=self._summary(pair, recipe, quantized_model),
            spectrograms=figures.spectrogram_figure(fp.audio, q.audio, pair.sample_rate),
            step_metrics=figures.step_metrics_figure(pair.step_snr_db, pair.step_logmel_steps, pair.step_logmel_db),
            activation_heatmap=activation_heatmap, activation_steps=activation_steps,
            channel_outliers=channel_outliers)

    def calibration_status(self, recipe_name: str) -> str:
        """What comparing `recipe_name` needs before it can run, in one line of markdown."""
        recipe = quant.get_recipe(recipe_name)
        if recipe.name in self.quantized.served:
            return f"`{recipe.name}` is served from a pre-quantized file: no calibration."
        if not recipe.needs_calibration:
            return f"`{recipe.name}` needs no calibration."
        if self.quantized.ready(recipe.name):
            return f"`{recipe.name}`: calibration statistics are ready."
        return (f"`{recipe.name}` needs calibration first: {self.quantized.calibration_cost()}. Press **Calibrate** "
                f"(other generations go on meanwhile).")

    def default_recipe(self) -> quant.Recipe:
        """The Compare tab's first choice: a served file's recipe, else W8A8 SQD when it needs no calibration run,
        else W8A8 dynamic (never a calibration started by a default click)."""
        if self.quantized.served:
            return quant.get_recipe(self.quantized.served[0])
        return quant.get_recipe("w8a8-sqd" if self.quantized.ready("w8a8-sqd") else "w8a8-dynamic")

    def calibrate(self) -> str:
        """Compute (or load) the calibration statistics every calibrated recipe starts from; says what ran."""
        if self.quantized.stats_ready:
            self.quantized.calibration_stats()
            return "Calibration statistics are ready: every calibrated recipe can be compared."
        started = time.perf_counter()
        self.quantized.calibration_stats()
        return (f"Calibrated in {time.perf_counter() - started:.0f} s ({self.quantized.plan.describe()}): every "
                f"calibrated recipe can be compared.")

    def _write_pair(self, pair: PairResult, fp_name: str, q_name: str) -> tuple[Path, Path]:
        _prune(self.output_dir, OUTPUT_MAX_AGE_S)
        fp_audio, q_audio = loudness_match([pair.full_precision.audio, pair.quantized.audio], pair.sample_rate)
        return (write_wav(self.output_dir / f"{fp_name}.wav", fp_audio, pair.sample_rate),
                write_wav(self.output_dir / f"{q_name}.wav", q_audio, pair.sample_rate))

    def _summary(self, pair: PairResult, recipe: quant.Recipe, quantized_model) -> str:
        precision, method = describe(recipe)
        memory = quant.memory_report(quantized_model)
        waveform_snr = snr_db(torch.from_numpy(pair.full_precision.audio), torch.from_numpy(pair.quantized.audio))
        space = "latent" if getattr(self.loaded.model, "pretransform", None) is not None else "model-space"
        dit = quant.find_dit(quantized_model)
        others = [f"{PART_NAMES.get(name, name)} {nbytes / 2**20:.1f} MiB" for name, nbytes in memory.parts.items()
                  if not any(module is dit for module in getattr(quantized_model, name).modules())]
        lines = [
            f"**Full precision:** {pair.full_precision.seconds_taken:.2f} s · "
            f"**Quantized** (`{recipe.name}`, {precision} {method}): {pair.quantized.seconds_taken:.2f} s "
            f"(sampling; each clip's shared autoencoder decode: {pair.full_precision.decode_seconds:.2f} s / "
            f"{pair.quantized.decode_seconds:.2f} s)",
            f"Seed {pair.request.seed} · waveform SNR {waveform_snr:.1f} dB · {space} SNR of the last denoised "
            f"estimate {pair.step_snr_db[-1]:.1f} dB · log-mel distance {pair.logmel_db:.2f} dB",
            f"DiT linear layers: {memory.linear_bytes / 2**20:.2f} MiB stored vs "
            f"{memory.linear_fp32_bytes / 2**20:.2f} MiB in fp32 ({memory.ratio_fp32:.0%}); {resident_line(memory)}",
            f"The quantized model holds its DiT ({quant.memory_report(dit).model_bytes / 2**20:.1f} MiB) and shares "
            f"the rest with the full-precision model: " + ", ".join(others) if others else "",
        ]
        return "\n\n".join(line for line in lines if line)

    @staticmethod
    def _smoothing(quantized_model, layer: str, timesteps: list[float]) -> list[np.ndarray | None] | None:
        module = quant.find_dit(quantized_model).get_submodule(layer)
        if not isinstance(module, quant.QuantLinear):
            return None
        factors = [module.smoothing_for(t) for t in timesteps]
        return [None if f is None else f.detach().float().cpu().numpy() for f in factors]


def resident_line(memory: quant.MemoryReport) -> str:
    """What the linears hold at run time: the stored bytes alone where the kernel's form is the only copy."""
    if memory.resident_linear_bytes == memory.linear_bytes:
        return "resident the same (one weight copy: the kernel's)"
    return (f"{memory.resident_linear_bytes / 2**20:.2f} MiB resident (the run-time weight form is larger: int4 "
            "codes held as int8, a float copy, or one copy per timestep group)")


def _prune(folder: Path, max_age_s: float) -> None:
    if not folder.exists():
        return
    cutoff = time.time() - max_age_s
    for path in folder.glob("*.wav"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass  # removed by a concurrent prune


def build_lab(settings: Settings, *, model=None, model_config=None, ckpt_path=None, quantized_files=(),
              calibration_stats=None) -> Lab:
    """The engine the app serves: the model and its quantized-model cache (with any pre-quantized files and
    calibration statistics; `calibration_stats` overrides the settings' file)."""
    loaded = load_model(model, model_config=model_config, ckpt_path=ckpt_path,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    quantized = QuantizedModels(loaded, cache_dir=settings.cache_dir,
                                calibration_prompts=read_prompts(settings.calibration_prompts),
                                calibration_count=settings.calibration_count,
                                calibration_steps=settings.calibration_steps,
                                calibration_seconds=settings.calibration_seconds,
                                calibration_stats=calibration_stats or settings.calibration_stats,
                                max_models=settings.max_quantized_models,
                                memory_budget_gib=settings.quantized_memory_gib)
    for path in quantized_files:
        quantized.add_saved(path)
    lab = Lab(loaded, quantized, settings.output_dir)
    lab.warm_up()
    return lab
