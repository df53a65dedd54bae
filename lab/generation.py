"""Paired generation: the same prompt, seed and initial noise through the full-precision and a quantized model.

stable-audio-tools' `generate_diffusion_cond` calls `torch.manual_seed(seed)` right before drawing the initial
noise (and the SDE samplers draw their Brownian-tree seed from the same generator), so two runs with the same
seed start from identical noise: every difference between the clips is the quantization's doing. Along the
way the sampler callback records each step's denoised estimate (-> per-step SNR in the sampler's space; a
log-mel distance per step only when asked, since it decodes) and forward pre-hooks record the input activations
of one chosen DiT layer at every denoising step.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import quant
from lab import sat
from lab.audio import log_mel_distance
from lab.sat import LoadedModel, SamplerSettings

# Samplers offered by stable-audio-tools' own UI that take a fixed number of steps. v-ddim steps uniformly
# in t (it clamps sigma_max to 1); the k-diffusion ones step log-uniformly in sigma from sigma_max to sigma_min.
SAMPLERS = ("dpmpp-3m-sde", "dpmpp-2m-sde", "dpmpp-2m", "k-heun", "k-lms", "k-dpmpp-2s-ancestral", "k-dpm-2",
            "v-ddim")
MAX_PROMPT_CHARS = 500
STEPS_RANGE = (2, 250)  # k-diffusion's multistep samplers fail with a single step
CFG_RANGE = (0.0, 25.0)
MAX_SEED = 2**32 - 1
# log10|x| histogram bins for activation statistics; |x| below 1e-6 (zeros included) lands in the first bin
LOG_ABS_EDGES = np.linspace(-6.0, 3.0, 91)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seconds: float
    steps: int
    cfg_scale: float
    seed: int
    sampler: str = "dpmpp-3m-sde"
    negative_prompt: str = ""
    sigma_min: float = 0.3  # noise schedule: the model's (generation.json), SAO's by default
    sigma_max: float = 500.0

    def validate(self, max_seconds: float) -> None:
        """Raise ValueError with a message a UI user can act on, for the sizes alone: `lab.requests.validate_request`
        is the whole check (the model's validated sampler settings and prompt words too)."""
        if not self.prompt.strip():
            raise ValueError("The prompt is empty: describe the sound to generate.")
        for name, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"The {name} is {len(text)} characters long; at most {MAX_PROMPT_CHARS}.")
        if not (math.isfinite(self.seconds) and 0.5 <= self.seconds <= max_seconds):
            raise ValueError(f"Seconds must be between 0.5 and {max_seconds:g} for this model.")
        if not STEPS_RANGE[0] <= self.steps <= STEPS_RANGE[1]:
            raise ValueError(f"Steps must be an integer between {STEPS_RANGE[0]} and {STEPS_RANGE[1]}.")
        if not (math.isfinite(self.cfg_scale) and CFG_RANGE[0] <= self.cfg_scale <= CFG_RANGE[1]):
            raise ValueError(f"CFG scale must be between {CFG_RANGE[0]:g} and {CFG_RANGE[1]:g}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"Seed must be an integer between 0 and {MAX_SEED}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")


    @classmethod
    def from_ui(cls, *, prompt, negative_prompt, seconds, steps, cfg_scale, sampler, seed,
                defaults: SamplerSettings) -> GenerationRequest:
        """Coerce raw widget/API values (strings, floats, None) with messages a user can act on; the noise
        schedule comes from the model's sampling defaults."""
        return cls(prompt=str(prompt or ""), negative_prompt=str(negative_prompt or ""),
                   seconds=_number("Seconds", seconds), steps=_whole("Steps", steps),
                   cfg_scale=_number("CFG scale", cfg_scale), sampler=str(sampler or ""), seed=parse_seed(seed),
                   sigma_min=defaults.sigma_min, sigma_max=defaults.sigma_max)


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None


def _whole(name: str, value) -> int:
    number = _number(name, value)
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def parse_seed(text: str | float | int | None) -> int:
    """A seed from a UI textbox: blank -> random, otherwise a non-negative integer."""
    if text is None or str(text).strip() == "":
        return int(np.random.randint(0, MAX_SEED))
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"Seed must be a whole number (or blank for a random one), got {text!r}.") from None
    if not value.is_integer() or not 0 <= value <= MAX_SEED:
        raise ValueError(f"Seed must be a whole number between 0 and {MAX_SEED}, got {text!r}.")
    return int(value)


@dataclass
class LayerTrace:
    """Input statistics of one linear layer, one row per DiT forward call (= denoising step for 1-eval samplers)."""
    layer: str
    timesteps: list[float] = field(default_factory=list)  # the DiT's t at each call
    log_abs_hist: list[np.ndarray] = field(default_factory=list)  # (bins,) fraction of |x| per log10 bin
    channel_max: list[np.ndarray] = field(default_factory=list)  # (in_features,) max |x| over tokens

    def record(self, t: float, x: torch.Tensor) -> None:
        """One call's row, computed in torch on x's device (it runs inside every DiT forward, so inside the clip's
        time): `torch.histc` on the uniform log10 bins, cheaper than np.histogram's search over the edges."""
        x = x.detach().float().abs().reshape(-1, x.shape[-1])  # (tokens, in_features)
        low, high = float(LOG_ABS_EDGES[0]), float(LOG_ABS_EDGES[-1])
        logs = torch.log10(x.clamp_min(10.0 ** low)).clamp_(low, high)  # histc drops what falls outside
        counts = torch.histc(logs, bins=len(LOG_ABS_EDGES) - 1, min=low, max=high)
        self.timesteps.append(float(t))
        self.log_abs_hist.append((counts / max(1, logs.numel())).cpu().numpy())
        self.channel_max.append(x.amax(dim=0).cpu().numpy())


@dataclass
class Clip:
    audio: np.ndarray  # (channels, samples) float32, as the model produced it (no normalisation)
    seconds_taken: float  # sampling: conditioners and DiT forwards (what the model's precision changes)
    denoised: list[torch.Tensor]  # each sampler step's denoised estimate (model space: latents or audio)
    trace: LayerTrace | None
    decode_seconds: float = 0.0  # the autoencoder's decode of the final latents (shared by both models)


@dataclass
class PairResult:
    request: GenerationRequest
    sample_rate: int
    full_precision: Clip
    quantized: Clip
    step_snr_db: np.ndarray  # (steps,) SNR of the quantized denoised estimate against the FP one (model space)
    logmel_db: float  # mean |log-mel difference| in dB of the two clips
    step_logmel_steps: np.ndarray  # the steps whose estimates were decoded (none unless asked for)
    step_logmel_db: np.ndarray  # mean |log-mel difference| in dB of the decoded estimates at those steps


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names (relative to the DiT) of every linear layer, FP or already quantized."""
    dit = quant.find_dit(model)
    return [name for name, module in dit.named_modules()
            if isinstance(module, (torch.nn.Linear, quant.QuantLinear))]


def generate_clip(model: torch.nn.Module, loaded: LoadedModel, request: GenerationRequest, *,
                  trace_layer: str | None = None, quantized: bool = False) -> Clip:
    """One clip through SAT's sampler, recording each step's denoised estimate and, optionally, one layer.

    Sampling (`seconds_taken`) and the autoencoder's decode of its latents (`decode_seconds`) are timed apart:
    the decode is the same fp32 autoencoder for every model, so a comparison's two times differ by what the DiT's
    precision changes. The audio is SAT's own: its `generate_diffusion_cond` decodes the same way."""
    denoised: list[torch.Tensor] = []
    trace = LayerTrace(trace_layer) if trace_layer else None
    settings = loaded.sampling.replace(steps=request.steps, cfg_scale=request.cfg_scale,
                                       sampler_type=request.sampler, sigma_min=request.sigma_min,
                                       sigma_max=request.sigma_max)
    with _recording(model, trace, quantized):
        start = time.perf_counter()
        latents = sat.sample(model, [request.prompt], settings=settings, seconds=request.seconds,
                             negative_prompt=request.negative_prompt, seed=request.seed,
                             sample_size=loaded.sample_length(request.seconds), return_latents=True,
                             callback=lambda info: denoised.append(info["denoised"].detach().float().cpu()))
        if latents.is_cuda:  # kernels run asynchronously: the sampling is done when they are
            torch.cuda.synchronize(latents.device)
        seconds_taken = time.perf_counter() - start
    start = time.perf_counter()
    audio = sat.decoder(model)(latents)
    decode_seconds = time.perf_counter() - start
    samples = round(request.seconds * loaded.sample_rate)
    return Clip(audio=audio[0, :, :samples].float().cpu().numpy(), seconds_taken=seconds_taken,
                denoised=denoised, trace=trace, decode_seconds=decode_seconds)


def generate_pair(loaded: LoadedModel, quantized_model: torch.nn.Module, request: GenerationRequest, *,
                  trace_layer: str | None = None, decode_steps: int = 0,
                  on_clip: Callable[[str], None] | None = None) -> PairResult:
    """Generate `request` with the FP model and `quantized_model` from the same noise, and compare them.

    Per-step error is measured where the sampler works (latents for SAO), which costs nothing; `decode_steps`
    > 0 also decodes both models' estimates at that many evenly spaced steps for a per-step log-mel distance
    (two decodes each: on SAO that costs more than the generations). `on_clip("full precision" | "quantized")`
    is called before each clip (for progress messages). The request is the caller's to check
    (`lab.requests.validate_request`).
    """
    clips = {}
    for name, model, is_quantized in (("full precision", loaded.model, False),
                                      ("quantized", quantized_model, True)):
        if on_clip:
            on_clip(name)
        with torch.no_grad():
            clips[name] = generate_clip(model, loaded, request, trace_layer=trace_layer, quantized=is_quantized)
    fp, q = clips["full precision"], clips["quantized"]
    steps = _evenly_spaced(len(fp.denoised), decode_steps)
    to_audio = sat.decoder(loaded.model)
    logmel = [log_mel_distance(to_audio(fp.denoised[i])[0].numpy(), to_audio(q.denoised[i])[0].numpy(),
                               loaded.sample_rate)
              for i in steps]
    return PairResult(request=request, sample_rate=loaded.sample_rate, full_precision=fp, quantized=q,
                      step_snr_db=np.array([snr_db(a, b) for a, b in zip(fp.denoised, q.denoised)]),
                      logmel_db=log_mel_distance(fp.audio, q.audio, loaded.sample_rate),
                      step_logmel_steps=steps, step_logmel_db=np.array(logmel))


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - est|^2); capped at 120 dB for identical tensors."""
    noise = (reference - estimate).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise <= signal * 1e-12:
        return 120.0
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def _evenly_spaced(count: int, at_most: int) -> np.ndarray:
    if at_most <= 0:
        return np.arange(0)
    if count <= at_most:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, at_most).round().astype(int))


@contextlib.contextmanager
def _recording(model: torch.nn.Module, trace: LayerTrace | None, quantized: bool):
    """While active, record `trace.layer`'s input at every DiT call (as the quantized matmul sees it)."""
    if trace is None:
        yield
        return
    dit = quant.find_dit(model)
    try:
        layer = dit.get_submodule(trace.layer)
    except AttributeError:
        raise ValueError(f"Unknown layer {trace.layer!r}; pick one of the DiT's linear layers.") from None

    def hook(module, args):
        x = args[0]
        if quantized and isinstance(module, quant.QuantLinear):
            x = module.input_fake_quant(x, tracker.t)
        trace.record(tracker.t, x)

    with quant.TimestepTracker(dit) as tracker:
        handle = layer.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()
