"""What one click of the app does, without Gradio: generate a pair, make it fair to listen to, draw it,
present it blind, store the ratings.

`Lab` holds the long-lived pieces (FP model, quantized-model cache, ratings store, output folder);
app.py only maps widgets to these methods and `ValueError`s to `gr.Error`.
"""
from __future__ import annotations

import random
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

import quant
from lab import figures
from lab.audio import loudness_match, write_wav
from lab.generation import GenerationRequest, PairResult, generate_clip, generate_pair, linear_layer_names
from lab.models import LoadedModel
from lab.quantized import QuantizedModels, describe
from lab.ratings import SYSTEMS, RatingsStore, Trial
from lab.settings import REPO_ROOT

APP_VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
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


@dataclass
class BlindPair:
    trial: Trial
    wav_a: Path
    wav_b: Path


class Lab:
    def __init__(self, loaded: LoadedModel, quantized: QuantizedModels, store: RatingsStore, output_dir: Path):
        self.loaded = loaded
        self.quantized = quantized
        self.store = store
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

    def blind_pair(self, request: GenerationRequest, recipe_name: str, session_id: str) -> BlindPair:
        """Generate a pair and present it as A/B in random order; file names reveal nothing."""
        quantized_model, recipe = self.quantized.get(recipe_name)
        pair = generate_pair(self.loaded, quantized_model, request)
        precision, method = describe(recipe)
        trial = Trial(trial_id=uuid.uuid4().hex[:12], session_id=session_id, prompt=request.prompt,
                      negative_prompt=request.negative_prompt, seed=request.seed, steps=request.steps,
                      cfg=request.cfg_scale, sampler=request.sampler, model_id=self.loaded.model_id,
                      recipe=recipe.name, recipe_hash=recipe.hash(), precision=precision, method=method,
                      a_system=random.choice(SYSTEMS), presented_at=time.time())
        label_of = {system: label for label, system in trial.systems.items()}
        fp_wav, q_wav = self._write_pair(pair, f"{trial.trial_id}_{label_of['full precision']}",
                                         f"{trial.trial_id}_{label_of['quantized']}")
        wav_of = {"full precision": fp_wav, "quantized": q_wav}
        return BlindPair(trial=trial, wav_a=wav_of[trial.systems["A"]], wav_b=wav_of[trial.systems["B"]])

    def submit_rating(self, trial: Trial | None, played: set[str], *, rater_id: str, score_a, score_b,
                      preference: str = "", attention_check: str = "") -> int:
        """Validate one A/B submission and append its two rows; returns the number of rows written."""
        if trial is None:
            raise ValueError("There is no pair to rate yet: press 'New pair' first.")
        missing = {"A", "B"} - set(played)
        if missing:
            raise ValueError(f"Play both clips before submitting (not played yet: {', '.join(sorted(missing))}).")
        if not str(rater_id or "").strip():
            raise ValueError("Enter a rater id (or keep the generated one).")
        scores = {"A": _score(score_a, "A"), "B": _score(score_b, "B")}
        rows = trial.rows(rater_id=str(rater_id).strip(), scores=scores, preference=preference or "",
                          attention_check=attention_check, app_version=APP_VERSION, now=time.time())
        return self.store.append(rows)

    def _write_pair(self, pair: PairResult, fp_name: str, q_name: str) -> tuple[Path, Path]:
        _prune(self.output_dir, OUTPUT_MAX_AGE_S)
        fp_audio, q_audio = loudness_match([pair.full_precision.audio, pair.quantized.audio], pair.sample_rate)
        return (write_wav(self.output_dir / f"{fp_name}.wav", fp_audio, pair.sample_rate),
                write_wav(self.output_dir / f"{q_name}.wav", q_audio, pair.sample_rate))

    def _summary(self, pair: PairResult, recipe: quant.Recipe, quantized_model) -> str:
        precision, method = describe(recipe)
        memory = quant.memory_report(quantized_model)
        lines = [
            f"**Full precision:** {pair.full_precision.seconds_taken:.2f} s · "
            f"**Quantized** (`{recipe.name}`, {precision} {method}): {pair.quantized.seconds_taken:.2f} s",
            f"Seed {pair.request.seed} · final-step SNR {pair.step_snr_db[-1]:.1f} dB · "
            f"final log-mel distance {pair.step_logmel_db[-1]:.2f} dB",
            f"DiT linear layers: {memory.linear_bytes / 2**20:.2f} MiB quantized vs "
            f"{memory.linear_fp32_bytes / 2**20:.2f} MiB in fp32 ({memory.ratio_fp32:.0%})",
        ]
        return "\n\n".join(line for line in lines if line)

    @staticmethod
    def _smoothing(quantized_model, layer: str, timesteps: list[float]) -> list[np.ndarray | None] | None:
        module = quant.find_dit(quantized_model).get_submodule(layer)
        if not isinstance(module, quant.QuantLinear):
            return None
        factors = [module.smoothing_for(t) for t in timesteps]
        return [None if f is None else f.detach().float().cpu().numpy() for f in factors]


def _score(value, label: str) -> int:
    try:
        score = int(str(value).split()[0])  # accepts 4 or "4 - Good"
    except (ValueError, IndexError):
        raise ValueError(f"Rate clip {label} on the 1-5 scale.") from None
    if not 1 <= score <= 5:
        raise ValueError(f"Rate clip {label} on the 1-5 scale.")
    return score


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
