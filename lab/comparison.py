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
from lab.quantized import QuantizedModels, describe
from lab.resources import app_version, read_prompts
from lab.sat import LoadedModel, load_model
from lab.settings import Settings

OUTPUT_MAX_AGE_S = 3600  # generated WAVs older than this are deleted on the next write


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
        """One short FP generation, so lazy initialisation does not land in the first comparison's timing."""
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
                on_clip=None) -> ComparisonView:
        request.validate(max_seconds=self.max_seconds)  # before any model is quantized: a bad request costs nothing
        if layer is not None and layer not in self.layers:
            raise ValueError(f"Unknown layer {layer!r}; pick one of the DiT's linear layers.")
        quantized_model, recipe = self.quantized.get(recipe_name)
        pair = generate_pair(self.loaded, quantized_model, request, trace_layer=layer, on_clip=on_clip)
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
        lines = [
            f"**Full precision:** {pair.full_precision.seconds_taken:.2f} s · "
            f"**Quantized** (`{recipe.name}`, {precision} {method}): {pair.quantized.seconds_taken:.2f} s",
            f"Seed {pair.request.seed} · waveform SNR {waveform_snr:.1f} dB · {space} SNR of the last denoised "
            f"estimate {pair.step_snr_db[-1]:.1f} dB · log-mel distance {pair.step_logmel_db[-1]:.2f} dB",
            f"DiT linear layers: {memory.linear_bytes / 2**20:.2f} MiB stored vs "
            f"{memory.linear_fp32_bytes / 2**20:.2f} MiB in fp32 ({memory.ratio_fp32:.0%}); "
            f"{memory.resident_linear_bytes / 2**20:.2f} MiB resident with the kernel's run-time weight copies",
        ]
        return "\n\n".join(line for line in lines if line)

    @staticmethod
    def _smoothing(quantized_model, layer: str, timesteps: list[float]) -> list[np.ndarray | None] | None:
        module = quant.find_dit(quantized_model).get_submodule(layer)
        if not isinstance(module, quant.QuantLinear):
            return None
        factors = [module.smoothing_for(t) for t in timesteps]
        return [None if f is None else f.detach().float().cpu().numpy() for f in factors]


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


def build_lab(settings: Settings, *, model=None, model_config=None, ckpt_path=None, quantized_files=()) -> Lab:
    """The engine the app serves: the model and its quantized-model cache (with any pre-quantized files)."""
    loaded = load_model(model, model_config=model_config, ckpt_path=ckpt_path,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    quantized = QuantizedModels(loaded, cache_dir=settings.cache_dir,
                                calibration_prompts=read_prompts(settings.calibration_prompts),
                                calibration_steps=settings.calibration_steps,
                                max_models=settings.max_quantized_models)
    for path in quantized_files:
        quantized.add_saved(path)
    lab = Lab(loaded, quantized, settings.output_dir)
    lab.warm_up()
    return lab
