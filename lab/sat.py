"""The one adapter to stable-audio-tools: load a `diffusion_cond` model and sample from it.

Every other module (app, calibration, benchmark, evaluator, training) reaches SAT through here, so a change
of SAT's API is a change of this file. Loading: the embedded demo model, a Hub repo, or local files; all three
routes end in SAT's `create_model_from_config` and the checkpoint's tensors, exactly as Stable Audio Open is
loaded (a .safetensors file read tensor by tensor, which SAT's `load_ckpt_state_dict` would read whole): swapping
the demo model for SAO is a change of arguments only.
Every failure a user can cause (missing file, corrupt checkpoint, bad config, gated repo, no network) is
raised as `ModelLoadError` with a message that says what to do, never as a deep traceback.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.resources import EMBEDDED_DIR

SUPPORTED_MODEL_TYPES = ("diffusion_cond",)
# Stable Audio Open 1.0's DiT (`model_config.json` of stabilityai/stable-audio-open-1.0): 1.057 B parameters.
# The shape `ptq-quantize memory --sao-shape`, the benchmark and the tests measure at, without SAO's gated weights.
SAO_DIT = dict(io_channels=64, embed_dim=1536, depth=24, num_heads=24, cond_token_dim=768, global_cond_dim=1536,
               project_cond_tokens=False, transformer_type="continuous_transformer")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message tells the user why and what to try."""


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler settings: a model's defaults come from `generation.json` next to its config, else SAO's
    recommendation. `seconds` None means the config's full sample_size. `cfg_rescale` and `cfg_interval` are
    SAT's own CFG options (its UI's "CFG rescale amount" and "CFG interval"): off by default, as SAO runs."""
    steps: int = 100
    cfg_scale: float = 7.0
    sampler_type: str = "dpmpp-3m-sde"
    sigma_min: float = 0.3
    sigma_max: float = 500.0
    seconds: float | None = None
    cfg_rescale: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guidance only where the DiT's sigma = sin(t pi / 2) is inside

    def __post_init__(self):
        object.__setattr__(self, "cfg_interval", tuple(self.cfg_interval))  # JSON gives a list

    def replace(self, **changes) -> SamplerSettings:
        """A copy with some fields changed; None values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_values(cls, values: dict) -> SamplerSettings:
        """The settings of a `generation.json`'s values; keys that are not settings are left to ModelGuide."""
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})


@dataclass(frozen=True)
class ModelGuide:
    """What `generation.json` tells a user beyond the defaults: the samplers the model was validated for, each
    with its CFG range (its `validated` entry: {"samplers": {name: [lowest, highest]}, "command": ...}; empty
    where it says nothing, as for SAO: every sampler is offered), and example prompts."""
    validated: tuple[tuple[str, float, float], ...] = ()  # (sampler, lowest CFG, highest CFG)
    validated_by: str = ""  # the command that measured it
    example_prompts: tuple[str, ...] = ()

    @property
    def samplers(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.validated)

    def cfg_range(self, sampler: str) -> tuple[float, float] | None:
        """The CFG range `sampler` is validated at; None when it is not validated."""
        return next(((low, high) for name, low, high in self.validated if name == sampler), None)

    def refusal(self, sampler: str, cfg_scale: float) -> str:
        """'' when nothing is validated (every setting is allowed) or (sampler, CFG) is; else why not."""
        if not self.validated:
            return ""
        cfg_range = self.cfg_range(sampler)
        if cfg_range is None:
            return (f"This model is validated for the samplers {', '.join(self.samplers)} only (generation.json), "
                    f"not {sampler}.")
        low, high = cfg_range
        if not low <= cfg_scale <= high:
            span = f"{low:g}" if low == high else f"{low:g}-{high:g}"
            return f"This model is validated with {sampler} at CFG {span} only (generation.json), not {cfg_scale:g}."
        return ""

    @classmethod
    def from_values(cls, values: dict) -> ModelGuide:
        validated = values.get("validated") or {}
        return cls(validated=tuple((str(name), float(low), float(high))
                                   for name, (low, high) in validated.get("samplers", {}).items()),
                   validated_by=str(validated.get("command", "")),
                   example_prompts=tuple(values.get("example_prompts", ())))


def read_generation(folder: Path) -> tuple[SamplerSettings, ModelGuide]:
    """The sampler defaults and the guide of the `generation.json` in `folder` (SAO's defaults and no guide
    where there is none), read once; a malformed file is a ModelLoadError naming it."""
    path = Path(folder) / "generation.json"
    if not path.is_file():
        return SamplerSettings(), ModelGuide()
    try:
        values = json.loads(path.read_text())
        return SamplerSettings.from_values(values), ModelGuide.from_values(values)
    except (json.JSONDecodeError, TypeError, AttributeError, ValueError) as err:
        raise ModelLoadError(f"{path} is not a valid generation.json: {err}") from err


@dataclass
class LoadedModel:
    model: torch.nn.Module  # ConditionedDiffusionModelWrapper, eval mode, no grads
    config: dict  # the SAT model config (tokenizer paths already resolved)
    model_id: str  # "embedded:demo_model", "hub:<repo>" or "local:<ckpt path>"
    sample_rate: int
    sample_size: int  # the config's default length in audio samples
    ckpt_path: Path | None = None
    sampling: SamplerSettings = SamplerSettings()
    guide: ModelGuide = ModelGuide()

    @property
    def fingerprint(self) -> str:
        """Short id of these exact weights, for on-disk caches (calibration statistics, quantized models)."""
        digest = hashlib.sha256(self.model_id.encode())
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        if self.ckpt_path is not None:
            stat = self.ckpt_path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]

    @property
    def channels(self) -> int:
        pretransform = getattr(self.model, "pretransform", None)
        return pretransform.io_channels if pretransform is not None else self.model.io_channels

    @property
    def seconds(self) -> float:
        """The clip length the model is sampled at by default."""
        return self.sampling.seconds or self.sample_size / self.sample_rate

    @property
    def seconds_per_token(self) -> float:
        """Audio seconds per DiT token (pretransform downsampling x patch size): what sizes a forward."""
        return int(self.model.min_input_length) / self.sample_rate

    def sample_length(self, seconds: float) -> int:
        """Audio samples to generate for `seconds`, rounded up to what the DiT's patching/pretransform accept."""
        step = int(self.model.min_input_length)
        return min(self.sample_size, math.ceil(seconds * self.sample_rate / step) * step)

    def fresh_copy(self) -> torch.nn.Module:
        """An independent FP copy of the model (the starting point of every quantized variant)."""
        return copy.deepcopy(self.model)


def load_model(spec: str | None = None, *, model_config: str | Path | None = None,
               ckpt_path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load a model the way the CLI flags describe it.

    spec None and no files -> the embedded demo model in assets/demo_model; spec "owner/name" -> Hugging Face Hub (token from $HF_TOKEN); model_config + ckpt_path ->
    local files (the same pair as stable-audio-tools' `--model-config/--ckpt-path`).
    """
    if model_config is not None or ckpt_path is not None:
        if spec is not None:
            raise ModelLoadError("Give either a Hub model name or --model-config/--ckpt-path, not both.")
        if model_config is None or ckpt_path is None:
            raise ModelLoadError("Local models need both --model-config (JSON) and --ckpt-path "
                                 "(.safetensors or .ckpt).")
        loaded = _load_files(Path(model_config), Path(ckpt_path), model_id=f"local:{ckpt_path}")
    elif spec is None or spec in ("embedded", "demo"):
        loaded = _load_embedded()
    else:
        loaded = _load_hub(spec)
    loaded.model.to(device)
    return loaded


def _load_embedded() -> LoadedModel:
    config_path = EMBEDDED_DIR / "model_config.json"
    if not config_path.exists():
        raise ModelLoadError(f"The embedded demo model is missing ({config_path}): restore assets/demo_model "
                             "from git, or retrain it with `make train`.")
    return _load_files(config_path, EMBEDDED_DIR / "model.safetensors", model_id="embedded:demo_model")


def _load_hub(repo_id: str) -> LoadedModel:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    token = os.environ.get("HF_TOKEN") or None

    def download(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename=filename, repo_type="model", token=token))

    try:
        config_path = download("model_config.json")
        try:
            ckpt = download("model.safetensors")
        except RemoteEntryNotFoundError:
            ckpt = download("model.ckpt")
    except GatedRepoError as err:
        raise ModelLoadError(f"{repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN "
                             f"to a token with access.") from err
    except RepositoryNotFoundError as err:
        raise ModelLoadError(f"No model repo {repo_id!r} on the Hugging Face Hub (or it is private and "
                             f"HF_TOKEN is missing).") from err
    except RemoteEntryNotFoundError as err:
        raise ModelLoadError(f"{repo_id} has no model_config.json with model.safetensors or model.ckpt.") from err
    except LocalEntryNotFoundError as err:
        raise ModelLoadError(f"Cannot download {repo_id}: the Hub is unreachable (offline?) and the files are "
                             f"not in the local cache. Use --model-config/--ckpt-path for local files.") from err
    return _load_files(config_path, ckpt, model_id=f"hub:{repo_id}")


def _load_files(config_path: Path, ckpt_path: Path, *, model_id: str) -> LoadedModel:
    config = read_config(config_path)
    model = build_model(config)
    if not ckpt_path.is_file():
        raise ModelLoadError(f"Checkpoint not found: {ckpt_path}")
    _load_weights(model, ckpt_path)
    _fold_weight_norm(model)
    sampling, guide = read_generation(config_path.parent)
    return LoadedModel(model=model, config=config, model_id=model_id, sample_rate=int(config["sample_rate"]),
                       sample_size=int(config["sample_size"]), ckpt_path=ckpt_path.resolve(),
                       sampling=sampling, guide=guide)


def read_config(config_path: str | Path) -> dict:
    """Read a SAT model config and resolve relative lut tokenizer paths against the config's folder."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ModelLoadError(f"Model config not found: {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"Model config {config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"Model config {config_path} must be a JSON object.")
    return resolve_tokenizer_paths(config, config_path.parent)


def resolve_tokenizer_paths(config: dict, base_dir: Path) -> dict:
    """Point `lut` conditioners' relative `tokenizer_name` at `base_dir/<name>` when that folder exists.

    A name that is not a folder there (e.g. "t5-base") is left alone: it is a Hub tokenizer id.
    """
    config = copy.deepcopy(config)
    conditioning = config.get("model", {}).get("conditioning") or {}
    for conditioner in conditioning.get("configs", []):
        settings = conditioner.get("config", {})
        name = settings.get("tokenizer_name")
        if conditioner.get("type") == "lut" and name and not Path(name).is_absolute():
            candidate = base_dir / name
            if candidate.is_dir():
                settings["tokenizer_name"] = str(candidate.resolve())
    return config


def build_model(config: dict) -> torch.nn.Module:
    """SAT's `create_model_from_config`, with config mistakes turned into a readable error."""
    from stable_audio_tools.models.factory import create_model_from_config

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"model_type {model_type!r} is not supported: the lab compares text-to-audio "
                             f"models, model_type must be one of {SUPPORTED_MODEL_TYPES}.")
    for key in ("sample_rate", "sample_size"):
        if not isinstance(config.get(key), int):
            raise ModelLoadError(f"Model config needs an integer {key!r}.")
    try:
        model = create_model_from_config(config)
    except (AssertionError, KeyError, TypeError, ValueError, OSError) as err:
        raise ModelLoadError(f"Model config could not be built by stable-audio-tools: "
                             f"{type(err).__name__}: {err}") from err
    return model.eval().requires_grad_(False)


def _fold_weight_norm(model: torch.nn.Module) -> None:
    """Fold the weight-normed convs of an Oobleck autoencoder (SAO's and the demo model's) into plain weights.

    Same outputs, one multiply less per call, and the model can be deep-copied: old-style weight norm keeps a
    derived `weight` tensor that `copy.deepcopy` refuses, and every quantized variant starts from a copy.
    """
    for module in model.modules():
        if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            torch.nn.utils.remove_weight_norm(module)


def _load_weights(model: torch.nn.Module, ckpt_path: Path) -> None:
    """Fill the model from a checkpoint. A .safetensors file (SAT's `load_ckpt_state_dict` would `load_file` it
    whole) is read one tensor at a time into the model's own tensors, with pread rather than a mapping: loading
    never holds a second copy of the weights (4.5 GiB for SAO). Other files go through SAT's loader."""
    if ckpt_path.suffix == ".safetensors":
        return _stream_safetensors(model, ckpt_path)
    from stable_audio_tools.models.utils import load_ckpt_state_dict

    try:
        state_dict = load_ckpt_state_dict(str(ckpt_path))
    except Exception as err:  # pickle raises many types for a damaged file
        raise ModelLoadError(f"Checkpoint {ckpt_path} is unreadable (corrupt or not a SAT checkpoint): "
                             f"{type(err).__name__}: {err}") from err
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ModelLoadError(f"Checkpoint {ckpt_path} does not match the model config: "
                             f"{str(err)[:500]}") from err


@torch.no_grad()
def _stream_safetensors(model: torch.nn.Module, ckpt_path: Path) -> None:
    """`model.load_state_dict(load_file(ckpt_path))`, strict, one tensor in memory at a time; every key and shape
    is checked before the first copy, so a checkpoint that does not fit leaves the model as it was."""
    from safetensors import safe_open

    targets = model.state_dict()  # the model's own tensors (detached views), written in place below
    try:
        with safe_open(str(ckpt_path), framework="pt", backend="pread") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
            missing, unexpected = sorted(set(targets) - set(shapes)), sorted(set(shapes) - set(targets))
            wrong = [f"{key}: {shapes[key]} in the file, {tuple(targets[key].shape)} in the model"
                     for key in sorted(set(targets) & set(shapes)) if shapes[key] != tuple(targets[key].shape)]
            if missing or unexpected or wrong:
                raise ModelLoadError(f"Checkpoint {ckpt_path} does not match the model config: missing keys "
                                     f"{missing[:5]}, unexpected keys {unexpected[:5]}, shapes differ {wrong[:5]}")
            for key, target in targets.items():
                target.copy_(file.get_tensor(key))
    except ModelLoadError:
        raise
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise ModelLoadError(f"Checkpoint {ckpt_path} is unreadable (corrupt or not a SAT checkpoint): "
                             f"{type(err).__name__}: {err}") from err


# ---- sampling -----------------------------------------------------------------------------------------

# Samplers that call the model twice per step (a second-order or ancestral midpoint), except on the last step.
TWO_CALL_SAMPLERS = ("k-heun", "k-dpm-2", "k-dpmpp-2s-ancestral")


def dit_forwards(sampler_type: str, steps: int) -> int:
    """DiT forwards one sampling run makes (CFG is batched into each): for progress totals and ETAs."""
    return 2 * steps - 1 if sampler_type in TWO_CALL_SAMPLERS else steps


def conditioning(model: torch.nn.Module, prompt: str, seconds: float) -> dict:
    """One conditioning dict for every conditioner of the model: timing numbers get 0 and `seconds`, text
    conditioners (SAO's `prompt`, whatever its id) get the prompt."""
    timing = {"seconds_start": 0.0, "seconds_total": float(seconds)}
    return {key: timing.get(key, prompt) for key in model.conditioner.conditioners}


def unknown_words(model: torch.nn.Module, text: str) -> list[str]:
    """Words of `text` that a word-level text conditioner (SAT's `lut`) maps to its tokenizer's unknown token, in
    order of appearance: such a model reads them all as one meaningless token. Empty for other conditioners (T5
    splits any word into known pieces)."""
    from stable_audio_tools.models.conditioners import TokenizerLUTConditioner

    unknown = []
    for conditioner in model.conditioner.conditioners.values():
        tokenizer = getattr(conditioner, "tokenizer", None)
        if not isinstance(conditioner, TokenizerLUTConditioner) or tokenizer.unk_token_id is None:
            continue
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token == tokenizer.unk_token_id and text[start:end] not in unknown:
                unknown.append(text[start:end])
    return unknown


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: list[str], *, settings: SamplerSettings, sample_size: int, seed: int,
           seconds: float | None = None, negative_prompt: str = "",
           callback: Callable[[dict], None] | None = None, return_latents: bool = False) -> torch.Tensor:
    """All `prompts` in one `generate_diffusion_cond` batch: (batch, channels, samples) on the model's device.

    SAT seeds with `torch.manual_seed(seed)` right before drawing the initial noise (the SDE samplers draw
    their Brownian-tree seed from the same generator): the same prompts, seed and settings start every model
    from identical noise. `callback(info)` receives SAT's per-step dict (`x`, `i`, `sigma`, `denoised`).
    """
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    seconds = settings.seconds if seconds is None else seconds
    seconds = seconds or sample_size / model.sample_rate
    positive = [conditioning(model, prompt, seconds) for prompt in prompts]
    negative = [conditioning(model, negative_prompt, seconds)] * len(prompts) if negative_prompt.strip() else None
    with contextlib.redirect_stdout(io.StringIO()):  # SAT prints the seed
        return generate_diffusion_cond(
            model, steps=settings.steps, cfg_scale=settings.cfg_scale, conditioning=positive,
            negative_conditioning=negative, batch_size=len(prompts), sample_size=sample_size, seed=seed,
            device=str(model_device(model)), sampler_type=settings.sampler_type, sigma_min=settings.sigma_min,
            sigma_max=settings.sigma_max, callback=callback, return_latents=return_latents,
            scale_phi=settings.cfg_rescale, cfg_interval=settings.cfg_interval)


def decoder(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model space -> audio (batch, channels, samples) on the CPU: the pretransform's decoder for latent models,
    else identity."""
    pretransform = getattr(model, "pretransform", None)

    @torch.no_grad()
    def to_audio(x: torch.Tensor) -> torch.Tensor:
        if pretransform is not None:
            x = pretransform.decode(x.to(next(pretransform.parameters())))  # its device and dtype
        return x.float().cpu()

    return to_audio


def build_dit(shape: dict, *, device: str = "cpu") -> torch.nn.Module:
    """SAT's DiffusionTransformer of `shape` (e.g. SAO_DIT) as SAT initialises it, on `device` ("meta": shapes
    and dtypes only, no memory: what a memory report needs)."""
    from stable_audio_tools.models.dit import DiffusionTransformer

    with torch.device(device):
        return DiffusionTransformer(**shape).eval().requires_grad_(False)
