"""Train the embedded demo model (a small stable-audio-tools DiT over a small autoencoder) on the synthetic corpus.

    python scripts/train_demo_model.py --out runs/demo                  # 72-80 min on an idle 2-core CPU
    python scripts/train_demo_model.py --out runs/demo --resume         # continue after an interruption
    python scripts/train_demo_model.py --out runs/demo --export assets/demo_model   # ship the EMA weights
    python scripts/train_demo_model.py --out runs/gpu --batch 128 --workers 6 --bank 32768 --minutes 7
                                      # for a GPU (not yet run on one): CPU workers feed a bank of latents

Stage 1 (seconds, rebuilt on every start) measures the std of the MDCT coefficients, the config's `scale`. The
MDCT is written into the autoencoder pretransform's weights. Stage 2 freezes it and trains the DiT on its
latents, doing what stable-audio-tools' diffusion_cond training does for the v objective (without its
Lightning/wandb wrapper): t ~ U(0, 1) (scrambled Sobol, like SAT), alpha = cos(t pi/2), sigma = sin(t pi/2),
z_t = alpha z + sigma eps, target v = alpha eps - sigma z, the model called through
`ConditionedDiffusionModelWrapper.forward` with the conditioner's output and 10 % CFG dropout.

Training clips are synthesised on the fly (`lab.corpus`) in numbered chunks whose captions and seeds derive
from (seed, chunk) alone, never repeating a seed. By default each step uses a fresh chunk made in this
process; `--workers` makes chunks in parallel processes and `--bank` keeps the latents of the last N clips
on the device, each step drawing its batch there (a GPU consumes clips faster than CPU cores make them, so
clips are reused a few times, with fresh noise and t each time). The learning rate warms up, then follows a
cosine to 10 % at `--steps` or at `--minutes` of step time (a shared CPU can be slow), whichever comes
first, and training stops there. An EMA of the weights is what gets exported. Steps run under bf16 autocast
(~1.35x faster than fp32 on this CPU) and without SAT's default activation checkpointing (recomputing the
blocks cost ~22 % of a CPU step); clips are encoded in fp32 (`mdct`). `--position-scale`, `--loss-weighting`,
`--families` and `--high-t-fraction` (all off by default) are the drum-pattern experiments of
docs/demo_model.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab import corpus, vocab  # noqa: E402
from lab.models import build_model, read_config  # noqa: E402

# The shipped model_config.json is built from these dicts: a 12.6 M-parameter DiT with SAO's block structure
# (self-attention, cross-attention to the caption tokens, SwiGLU feed-forward) over the latents of an
# autoencoder pretransform, as SAO's DiT runs over its VAE's latents. The autoencoder is SAT's Oobleck with
# one 256x stride whose weights are set, not learnt, to a sine-window MDCT: 256 coefficients per 256
# samples, frames overlapping by half, so 16 kHz mono becomes 128 tokens of 256 channels per 2.048 s clip and
# the decoder overlap-adds neighbouring frames. (Two designs failed first: raw audio cut into 256-sample DiT
# patches left a comb at multiples of 62.5 Hz where the patches met, and pYIN heard the comb as the pitch;
# an Oobleck trained for 8 min with an L1 + STFT loss still reconstructed at 0 dB SNR.)
HOP = 256
ENCODER_WIDTH = 2  # channels at audio rate: the signal + a constant that cancels the ELUs' offsets
AUTOENCODER = {
    "encoder": {"type": "oobleck", "config": {
        "in_channels": 1, "channels": ENCODER_WIDTH, "c_mults": [HOP // ENCODER_WIDTH], "strides": [HOP],
        "latent_dim": HOP}},
    "decoder": {"type": "oobleck", "config": {
        "out_channels": 1, "channels": ENCODER_WIDTH, "c_mults": [2 * HOP // ENCODER_WIDTH], "strides": [HOP],
        "latent_dim": HOP, "final_tanh": False}},
    "latent_dim": HOP, "downsampling_ratio": HOP, "io_channels": 1,
}
LATENT_DIM = HOP


COND_DIM = 256  # width of the caption token embeddings (the lut table)
# The shipped DiT: wider than the 256 MDCT channels it denoises, as SAO's 1536 is wider than its 64 latent
# channels; the timestep enters as a prepended token, as in SAO.
DIT_DEFAULTS = {"width": 384, "depth": 4, "timestep_cond": "prepend", "positions": "rope+sinusoid"}


def dit_config(width: int, depth: int, timestep_cond: str, positions: str) -> dict:
    """SAT DiffusionTransformer settings: SAO's block structure, heads of 64, caption tokens projected to `width`.

    `positions`: "rope" is SAO's rotary embedding alone (relative positions); "rope+sinusoid" also adds
    SAT's ContinuousTransformer `use_sinusoidal_emb` (absolute positions, no parameters but a scale)."""
    config = {"io_channels": LATENT_DIM, "patch_size": 1, "embed_dim": width, "depth": depth, "num_heads": width // 64,
              "cond_token_dim": COND_DIM, "project_cond_tokens": width != COND_DIM,
              "transformer_type": "continuous_transformer", "global_cond_type": timestep_cond}
    if positions == "rope+sinusoid":
        config["use_sinusoidal_emb"] = True
    return config


def model_config(latent_scale: float, dit: dict | None = None) -> dict:
    """The demo model's SAT config; `latent_scale` (from stage 1) sets the std of the DiT's latents."""
    return {
        "model_type": "diffusion_cond",
        "sample_size": corpus.CLIP_SAMPLES,
        "sample_rate": corpus.SAMPLE_RATE,
        "audio_channels": 1,
        "model": {
            "io_channels": LATENT_DIM,
            "pretransform": {"type": "autoencoder", "config": AUTOENCODER, "scale": round(latent_scale, 4)},
            "conditioning": {
                "configs": [{"id": "prompt", "type": "lut", "config": {"tokenizer_name": "tokenizer", "max_length": 8}}],
                "cond_dim": COND_DIM,
            },
            "diffusion": {
                "cross_attention_cond_ids": ["prompt"],
                "type": "dit",
                "diffusion_objective": "v",
                "config": dit or dit_config(**DIT_DEFAULTS),
            },
        },
    }


# Sampler defaults shipped next to the model (generation.json), chosen on the 24 calibration prompts (never
# on the evaluation or held-out sets): v-ddim CFG 1.5 passed 12/24, CFG 3 and 6 10/24, dpmpp-3m-sde (sigma_max
# 80) CFG 5 9/24. v-ddim steps uniformly in t from 1 (it ignores sigma_min and clamps sigma_max to 1).
GENERATION_DEFAULTS = {"steps": 50, "cfg_scale": 1.5, "sampler_type": "v-ddim",
                       "sigma_min": 0.01, "sigma_max": 1.0, "seconds": corpus.CLIP_SECONDS}

CFG_DROPOUT = 0.1
ENERGY_FLOOR = 0.1  # clip_weights: no clip weighs more than 10x one at unit latent energy
HIGH_T = 0.9  # --high-t-fraction: where the caption alone must place a pattern (cosine 0.01 at t = 1, shipped)
EMA_DECAY = 0.999
WARMUP_STEPS = 200
CHECKPOINT_EVERY_S = 180
BANK_CHUNK = 64  # clips per chunk a worker makes for the latent bank
OFFSET = 64.0  # added before each ELU so that it only sees positive values (where ELU(x) = x), removed after

def write_model_files(directory: Path, latent_scale: float, dit: dict | None = None) -> Path:
    """model_config.json + tokenizer/ + generation.json in `directory` (the layout of assets/demo_model)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_config.json").write_text(json.dumps(model_config(latent_scale, dit), indent=2) + "\n")
    (directory / "generation.json").write_text(json.dumps(GENERATION_DEFAULTS, indent=2) + "\n")
    vocab.save_tokenizer(directory / "tokenizer")
    return directory / "model_config.json"


def learning_rate(step: int, progress: float, peak: float) -> float:
    """Warm-up over WARMUP_STEPS, then a cosine from `peak` to 10 % as `progress` goes from 0 to 1."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    progress = min(1.0, progress)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short memory early, so the EMA is usable soon
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def mdct_basis() -> torch.Tensor:
    """(HOP, 2 HOP) orthonormal MDCT rows with a sine window: analysis and synthesis at once (TDAC)."""
    n, k = torch.arange(2 * HOP, dtype=torch.float64), torch.arange(HOP, dtype=torch.float64)
    window = torch.sin(math.pi * (n + 0.5) / (2 * HOP))
    phase = math.pi / HOP * (n[None, :] + 0.5 + HOP / 2) * (k[:, None] + 0.5)
    return (math.sqrt(2 / HOP) * window * torch.cos(phase)).float()


def _set_weight(conv: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | float | None = None) -> None:
    """Give a weight-normed conv the effective weight `weight` (weight = g v / |v|, per slice of dim 0)."""
    norms = weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))
    conv.weight_v.data.copy_(torch.where(norms > 0, weight, torch.ones_like(weight)))
    conv.weight_g.data.copy_(norms)
    if bias is not None:
        conv.bias.data.copy_(torch.as_tensor(bias).expand_as(conv.bias))


def _identity_residual_units(block: torch.nn.Module) -> None:
    for unit in block.layers:
        if unit.__class__.__name__ == "ResidualUnit":
            _set_weight(unit.layers[3], torch.zeros_like(unit.layers[3].weight_v), 0.0)  # x + 0


@torch.no_grad()
def mdct_autoencoder() -> torch.nn.Module:
    """SAT's Oobleck autoencoder (AUTOENCODER) with weights that compute an MDCT and its inverse exactly.

    Every ELU sees its input shifted up by OFFSET, where ELU is the identity; a constant channel carries
    the same shift through the strided (transposed) convolution so that it cancels. Reconstruction is
    exact except in the first and last 128 samples, which only one frame covers (the corpus fades there).
    """
    from stable_audio_tools.models.autoencoders import create_autoencoder_from_config

    autoencoder = create_autoencoder_from_config({"sample_rate": corpus.SAMPLE_RATE, "model": AUTOENCODER})
    basis = mdct_basis()  # (HOP, 2 HOP)
    width = ENCODER_WIDTH
    enc = autoencoder.encoder.layers  # conv k7, EncoderBlock, ELU, conv k3
    first = torch.zeros(width, 1, 7)
    first[0, 0, 3] = 1.0  # channel 0: x + OFFSET, channel 1: OFFSET
    _set_weight(enc[0], first, OFFSET)
    _identity_residual_units(enc[1])
    strided = torch.zeros(HOP, width, 2 * HOP)
    strided[:, 0], strided[:, 1] = basis, -basis  # MDCT of (x + OFFSET) - MDCT of OFFSET
    _set_weight(enc[1].layers[4], strided, OFFSET)
    _set_weight(enc[3], torch.eye(HOP)[:, :, None] * torch.tensor([0.0, 1.0, 0.0]), -OFFSET)

    dec = autoencoder.decoder.layers  # conv k7, DecoderBlock, ELU, conv k7 (no bias)
    into = torch.zeros(2 * HOP, HOP, 7)
    into[:HOP, :, 3] = torch.eye(HOP)  # channels < HOP: coefficient + OFFSET, channels >= HOP: OFFSET
    _set_weight(dec[0], into, OFFSET)
    upsample = torch.zeros(2 * HOP, width, 2 * HOP)  # ConvTranspose1d weight: (in, out, kernel)
    upsample[:HOP, 0], upsample[HOP:, 0] = basis, -basis
    _set_weight(dec[1].layers[1], upsample, OFFSET)  # channel 0: y + OFFSET, channel 1: OFFSET
    _identity_residual_units(dec[1])
    last = torch.zeros(1, width, 7)
    last[0, 0, 3], last[0, 1, 3] = 1.0, -1.0
    _set_weight(dec[3], last)
    return autoencoder.eval()


def mdct(audio: torch.Tensor) -> torch.Tensor:
    """(b, 1, n) audio -> (b, HOP, n / HOP) MDCT coefficients in fp32, in one strided convolution.

    The same numbers as the encoder of `mdct_autoencoder()` (tests/test_train_demo_model.py checks), which
    training cannot use directly: SAT's Oobleck runs its (identity) residual units on 2 channels at the audio
    rate, ~30x slower on this CPU than the transform itself, and under bf16 autocast it sees x + 64 where
    bf16 keeps steps of 0.25-0.5: 99 % of a training batch's latents round to exactly 0, the rest to coarse
    steps (0 dB SNR). The models shipped before 2026-11-30 were trained on those. Autocast is off here,
    whatever the caller has on.
    """
    basis = mdct_basis().to(audio.device)[:, None, :]
    with torch.autocast(audio.device.type, enabled=False):
        return torch.nn.functional.conv1d(audio.float(), basis, stride=HOP, padding=HOP // 2)


def latent_scale(seed: int, device: str) -> float:
    """Stage 1: the std of the MDCT coefficients over 256 corpus clips, the config's `scale` (unit-std latents).

    Scaling the latents up instead (std 4, so that quiet plucks and drum patterns are not buried under the
    noise for most of the schedule) was tried and made pitch worse: docs/demo_model.md, Measured."""
    audio, _ = corpus.training_batch(corpus.CaptionSampler(seed=seed + 7), 256, np.random.default_rng([seed, 7]))
    return mdct(torch.from_numpy(audio).to(device)).std().item()


def noise_levels(sobol: torch.quasirandom.SobolEngine, n: int, high_fraction: float = 0.0) -> torch.Tensor:
    """(n,) training t: U(0, 1) from scrambled Sobol (as SAT), the first round(high_fraction n) moved to [HIGH_T, 1].

    Near t = 1 the DiT sees almost pure noise, so it has only the caption to place a pattern fixed in time (a
    kick's hits); uniform t gives that range a tenth of the steps (docs/demo_model.md, drum-pattern pilots)."""
    t = sobol.draw(n)[:, 0]
    high = round(high_fraction * n)
    t[:high] = HIGH_T + (1 - HIGH_T) * t[:high]
    return t


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAT's v-objective schedule, shaped to scale (b, c, frames) latents: x_t = alpha x + sigma noise."""
    return torch.cos(t * math.pi / 2)[:, None, None], torch.sin(t * math.pi / 2)[:, None, None]


def hold_position_scale(model: torch.nn.Module, scale: float) -> torch.nn.Parameter:
    """Hold the absolute sinusoidal embedding's amplitude at `scale`; returns that (now frozen) parameter.

    SAT learns it (init width^-0.5); over the shipped run it fell from 0.05 to 0.002, as most families are
    random-phase and absolute position only disturbed them, and from the caption alone the DiT could not place
    a kick pattern (cosine 0.01 with the clip at t = 1; docs/demo_model.md)."""
    transformer = model.model.model.transformer
    if not transformer.use_sinusoidal_emb:
        raise SystemExit("--position-scale needs --positions rope+sinusoid")
    transformer.pos_emb.scale.data.fill_(scale)
    return transformer.pos_emb.scale.requires_grad_(False)


def v_loss(model, latents: torch.Tensor, captions: list[str], t: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """SAT's v-objective loss for one batch of pretransform latents (b, c, frames), t: (b,).

    `relative`: each clip's loss divided by its energy (`clip_weights`) instead of SAT's plain mean."""
    alpha, sigma = alpha_sigma(t)
    noise = torch.randn_like(latents)
    noised = latents * alpha + noise * sigma
    target = noise * alpha - latents * sigma
    cond = model.conditioner([{"prompt": c} for c in captions], latents.device)
    output = model(noised, t, cond=cond, cfg_dropout_prob=CFG_DROPOUT, use_checkpointing=False)
    per_clip = (output.float() - target.float()).pow(2).mean(dim=(1, 2))
    return (per_clip * clip_weights(latents)).mean() if relative else per_clip.mean()


def clip_weights(latents: torch.Tensor) -> torch.Tensor:
    """(b,) loss weights: 1 / the clip's latent energy, floored at ENERGY_FLOOR.

    The v loss is |x0 error|^2 / sigma^2, an absolute error: a kick pattern or a pluck, 14 dB quieter than a
    tone, is worth a twentieth of one, and the plain loss left drum patterns no better denoised than silence
    from t = 0.5 up (docs/demo_model.md). Divided by its energy, each clip counts by its relative error."""
    return 1 / latents.float().pow(2).mean(dim=(1, 2)).clamp_min(ENERGY_FLOOR)


def synthesize_chunk(seed: int, index: int, size: int,
                     families: tuple[str, ...] = corpus.FAMILIES) -> tuple[np.ndarray, list[str]]:
    """Chunk `index` of the training stream: `size` clips of `families` whose captions and seeds derive from
    (seed, index) alone, so any process can make it and a resumed run goes on where it stopped."""
    captions = corpus.CaptionSampler(seed=[seed, index], families=families)
    return corpus.training_batch(captions, size, np.random.default_rng([seed, index, 1]))


class ClipStream:
    """The training stream's chunks, in order: made on demand here, or ahead of time by `workers` processes."""

    def __init__(self, seed: int, chunk_size: int, first_chunk: int, workers: int,
                 families: tuple[str, ...] = corpus.FAMILIES):
        self.seed, self.chunk_size, self.next_chunk, self.families = seed, chunk_size, first_chunk, families
        # spawned, not forked: a fork copies whatever lock another thread holds (a test suite's app server,
        # torch's thread pool), and a worker that needs it hangs
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers else None
        self.pending: collections.deque = collections.deque()
        self.submitted, self.depth = first_chunk, 2 * workers  # chunks asked for; how many ahead
        self._top_up()

    def _top_up(self) -> None:
        while len(self.pending) < self.depth:
            self.pending.append(self.pool.apply_async(
                synthesize_chunk, (self.seed, self.submitted, self.chunk_size, self.families)))
            self.submitted += 1

    def get(self, wait: bool = True) -> tuple[np.ndarray, list[str]] | None:
        """The next chunk (audio (n, 1, samples), captions), or None if `wait` is False and it is not made yet."""
        if self.pool is None:
            chunk = synthesize_chunk(self.seed, self.next_chunk, self.chunk_size, self.families)
        elif not wait and not self.pending[0].ready():
            return None
        else:
            chunk = self.pending.popleft().get()
            self._top_up()
        self.next_chunk += 1
        return chunk

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


class LatentBank:
    """A ring buffer of the latents (and captions) of the last `size` clips, on the training device."""

    def __init__(self, size: int, shape: tuple[int, ...], device: str):
        self.latents = torch.empty(size, *shape, device=device)
        self.captions: list[str] = [""] * size
        self.size, self.filled, self.cursor = size, 0, 0

    def add(self, latents: torch.Tensor, captions: list[str]) -> None:
        for latent, caption in zip(latents, captions):
            self.latents[self.cursor] = latent
            self.captions[self.cursor] = caption
            self.cursor = (self.cursor + 1) % self.size
        self.filled = min(self.size, self.filled + len(captions))

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(self.filled, (n,), generator=generator)
        return self.latents[index.to(self.latents.device)], [self.captions[i] for i in index.tolist()]


def export(out: Path, target: Path, half: bool) -> None:
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    from safetensors.torch import save_file

    dit = json.loads((out / "model_config.json").read_text())["model"]["diffusion"]["config"]  # the run's own
    write_model_files(target, state["latent_scale"], dit)
    weights = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state["ema"].items()}
    save_file(weights, str(target / "model.safetensors"), metadata={
        "step": str(state["step"]), "train_minutes": f"{state['elapsed_s'] / 60:.1f}", "seed": str(state["seed"])})
    print(f"exported EMA weights of step {state['step']} ({state['elapsed_s'] / 60:.1f} min) to {target}")


def train(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)
    scale = latent_scale(args.seed, device)
    dit = dit_config(args.width, args.depth, args.timestep_cond, args.positions)
    config_path = write_model_files(out, scale, dit)

    torch.manual_seed(args.seed)
    model = build_model(read_config(config_path)).to(device)
    model.pretransform.model.load_state_dict(mdct_autoencoder().state_dict())
    model.train()
    model.pretransform.eval()  # frozen: only the DiT and the prompt embeddings learn
    trainable = [p for name, p in model.named_parameters() if not name.startswith("pretransform.")]
    for p in trainable:
        p.requires_grad_(True)
    if args.position_scale is not None:
        held = hold_position_scale(model, args.position_scale)
        trainable = [p for p in trainable if p is not held]
    ema = build_model(read_config(config_path)).to(device)  # not deepcopy: weight-normed convs refuse it
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                  fused=device == "cuda")
    step, elapsed_s, first_chunk = 0, 0.0, 0
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_s, first_chunk = state["step"], state["elapsed_s"], state["chunk"]
        torch.set_rng_state(state["torch_rng"])
    stream = ClipStream(args.seed, BANK_CHUNK if args.bank else args.batch, first_chunk, args.workers,
                        tuple(args.families))
    sobol = torch.quasirandom.SobolEngine(1, scramble=True, seed=args.seed + step)
    draw = torch.Generator().manual_seed(args.seed + step)  # which bank clips each step uses

    def encoded(chunk: tuple[np.ndarray, list[str]]) -> tuple[torch.Tensor, list[str]]:
        """What the model's pretransform would encode, without its cost (see `mdct`)."""
        audio, captions = chunk
        return mdct(torch.from_numpy(audio).to(device)) / model.pretransform.scale, captions

    bank = None
    if args.bank:
        bank = LatentBank(args.bank, (LATENT_DIM, corpus.CLIP_SAMPLES // HOP), device)
        with tqdm(desc="filling the latent bank", total=args.bank, unit="clip", ascii=True) as fill:
            while bank.filled < args.bank:
                bank.add(*encoded(stream.get()))
                fill.update(bank.filled - fill.n)

    def next_batch() -> tuple[torch.Tensor, list[str]]:
        if bank is None:
            return encoded(stream.get())
        for _ in range(args.workers):  # what the workers have made since, up to one chunk each per step
            if (chunk := stream.get(wait=False)) is None:
                break
            bank.add(*encoded(chunk))
        return bank.sample(args.batch, draw)

    n_params = sum(p.numel() for p in model.model.parameters())
    print(f"stage 2: DiT {n_params / 1e6:.2f} M params, batch {args.batch}, {args.steps} steps or {args.minutes} min, "
          f"{device}, starting at step {step} ({elapsed_s / 60:.1f} min done)")

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed_s": elapsed_s, "chunk": stream.next_chunk, "seed": args.seed,
                    "latent_scale": scale, "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(ckpt_path)

    budget_s = args.minutes * 60
    bar = tqdm(desc="stage 2: DiT", total=args.steps, initial=step, unit="step", mininterval=30, ascii=True)
    loss_avg, last_save = None, time.monotonic()
    while step < args.steps and elapsed_s < budget_s:
        started = time.monotonic()
        latents, captions = next_batch()
        t = noise_levels(sobol, args.batch, args.high_t_fraction).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, max(step / args.steps, elapsed_s / budget_s), args.lr)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not args.fp32_train):
            loss = v_loss(model, latents, captions, t, relative=args.loss_weighting == "relative")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        update_ema(ema, model, step)
        step += 1
        elapsed_s += time.monotonic() - started
        loss_avg = loss.detach() if loss_avg is None else loss_avg.lerp(loss.detach(), 0.02)  # no sync per step
        if step % 50 == 0:
            bar.set_postfix_str(f"loss {loss_avg.item():.4f}, {elapsed_s / 60:.1f} min", refresh=False)
        bar.update(1)
        if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
            save()
            last_save = time.monotonic()
    save()
    stream.close()
    bar.close()
    print(f"done: step {step}, {elapsed_s / 60:.1f} min, running loss {loss_avg.item():.4f}; checkpoint {ckpt_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder: checkpoint.pt + model files")
    parser.add_argument("--steps", type=int, default=6000, help="DiT training steps in all (sets the lr schedule)")
    parser.add_argument("--minutes", type=float, default=80.0, help="cap on the time spent in DiT training steps")
    parser.add_argument("--resume", action="store_true", help="continue stage 2 from OUT/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate of the DiT")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes synthesising training clips (default 0: this one, between steps)")
    parser.add_argument("--bank", type=int, default=0, metavar="N",
                        help="draw each batch from the latents of the last N clips made (needs --workers; "
                             "default 0: every clip is used once)")
    parser.add_argument("--width", type=int, default=DIT_DEFAULTS["width"], help="DiT embedding width (heads of 64)")
    parser.add_argument("--depth", type=int, default=DIT_DEFAULTS["depth"], help="DiT blocks")
    parser.add_argument("--timestep-cond", choices=("adaLN", "prepend"), default=DIT_DEFAULTS["timestep_cond"],
                        help="how the blocks see the timestep: adaLN scale/shift/gate, or a prepended token (SAO)")
    parser.add_argument("--positions", choices=("rope", "rope+sinusoid"), default=DIT_DEFAULTS["positions"],
                        help="rotary embeddings only (SAO), or plus absolute sinusoidal ones")
    parser.add_argument("--position-scale", type=float, metavar="S",
                        help="hold the absolute sinusoidal embedding's amplitude at S (default: learnt, as in SAT)")
    parser.add_argument("--loss-weighting", choices=("absolute", "relative"), default="absolute",
                        help="SAT's plain mean squared v error, or each clip's divided by its latent energy")
    parser.add_argument("--families", nargs="+", choices=corpus.FAMILIES, default=list(corpus.FAMILIES),
                        metavar="FAMILY", help="train on these caption families only (default: all, in "
                        "corpus.FAMILY_WEIGHTS proportions; stage 1's latent scale is always the whole corpus's)")
    parser.add_argument("--high-t-fraction", type=float, default=0.0, metavar="F",
                        help=f"draw this fraction of each batch's t from [{HIGH_T}, 1] instead of U(0, 1) (default 0)")
    parser.add_argument("--fp32-train", action="store_true",
                        help="train in fp32 (default: bf16 autocast, ~1.35x faster per step on an AVX512-BF16 CPU)")
    parser.add_argument("--export", metavar="DIR", help="write the run's EMA weights + config to DIR and exit")
    parser.add_argument("--fp32", action="store_true", help="export fp32 weights (default fp16)")
    args = parser.parse_args()
    if not 0 <= args.high_t_fraction <= 1:
        parser.error("--high-t-fraction is a fraction: 0 to 1")
    if args.bank and (args.workers < 1 or args.bank < args.batch):
        parser.error("--bank needs --workers >= 1 and at least --batch clips")
    if args.export:
        export(Path(args.out), Path(args.export), half=not args.fp32)
    else:
        train(args)


if __name__ == "__main__":
    main()
