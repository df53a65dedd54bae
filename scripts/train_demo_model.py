"""Train the embedded demo model (a small stable-audio-tools DiT over a small autoencoder) on the synthetic corpus.

    python scripts/train_demo_model.py --out runs/demo                  # ~85 min on an idle 2-core CPU
    python scripts/train_demo_model.py --out runs/demo --resume         # continue after an interruption
    python scripts/train_demo_model.py --out runs/demo --export assets/demo_model   # ship the EMA weights

Stage 1 (seconds, rebuilt on every start) writes an MDCT into the autoencoder pretransform's weights and
measures the latent std that becomes the config's `scale`. Stage 2 freezes it and trains the DiT on its
latents, doing what stable-audio-tools' diffusion_cond training does for the v objective (without its Lightning/wandb wrapper): t ~ U(0, 1) (scrambled Sobol,
like SAT), alpha = cos(t pi/2), sigma = sin(t pi/2), z_t = alpha z + sigma eps, target v = alpha eps - sigma z,
and the model is called through `ConditionedDiffusionModelWrapper.forward` with the conditioner's output
and 10 % CFG dropout. Training clips are synthesised on the fly (`lab.corpus`), never repeating a seed.
The learning rate warms up, then follows a cosine to 10 % at `--steps`; `--minutes` caps the wall-clock
time of the DiT's steps (a shared CPU can be slow) and training stops at whichever comes first. An EMA of
the weights is what gets exported. Steps run under bf16 autocast (~1.35x faster than fp32 on this CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab import corpus, vocab  # noqa: E402
from lab.models import build_model, read_config  # noqa: E402

# The shipped model_config.json is built from these dicts: an 8 M-parameter DiT with SAO's block structure
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


def model_config(latent_scale: float) -> dict:
    """The demo model's SAT config; `latent_scale` (latent std, measured after stage 1) makes latents ~unit."""
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
                "cond_dim": 256,
            },
            "diffusion": {
                "cross_attention_cond_ids": ["prompt"],
                "type": "dit",
                "diffusion_objective": "v",
                "config": {
                    "io_channels": LATENT_DIM, "patch_size": 1, "embed_dim": 256, "depth": 6, "num_heads": 4,
                    "cond_token_dim": 256, "project_cond_tokens": False,
                    "transformer_type": "continuous_transformer",
                },
            },
        },
    }


# Sampler defaults shipped next to the model (generation.json), chosen on the 24 calibration prompts (never
# on the evaluation or held-out sets): v-ddim CFG 3 and 6 passed 5/24, dpmpp-3m-sde CFG 5 4/24, CFG 3 3/24.
# v-ddim steps uniformly in t from 1 (it ignores sigma_min and clamps sigma_max to 1).
GENERATION_DEFAULTS = {"steps": 50, "cfg_scale": 3.0, "sampler_type": "v-ddim",
                       "sigma_min": 0.01, "sigma_max": 1.0, "seconds": corpus.CLIP_SECONDS}

CFG_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 200
CHECKPOINT_EVERY_S = 180
OFFSET = 64.0  # added before each ELU so that it only sees positive values (where ELU(x) = x), removed after

def write_model_files(directory: Path, latent_scale: float) -> Path:
    """model_config.json + tokenizer/ + generation.json in `directory` (the layout of assets/demo_model)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_config.json").write_text(json.dumps(model_config(latent_scale), indent=2) + "\n")
    (directory / "generation.json").write_text(json.dumps(GENERATION_DEFAULTS, indent=2) + "\n")
    vocab.save_tokenizer(directory / "tokenizer")
    return directory / "model_config.json"


def learning_rate(step: int, total_steps: int, peak: float) -> float:
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    progress = min(1.0, step / total_steps)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short memory early, so the EMA is usable soon
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


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
def mdct_autoencoder(channel_gain: torch.Tensor | None = None, device: str = "cpu") -> torch.nn.Module:
    """SAT's Oobleck autoencoder (AUTOENCODER) with weights that compute an MDCT and its inverse exactly.

    Every ELU sees its input shifted up by OFFSET, where ELU is the identity; a constant channel carries
    the same shift through the strided (transposed) convolution so that it cancels. Reconstruction is
    exact except in the first and last 128 samples, which only one frame covers (the corpus fades there).
    `channel_gain` (HOP,) multiplies each MDCT coefficient on the way in and divides it on the way out.
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
    gain = torch.ones(HOP) if channel_gain is None else channel_gain.float().cpu()
    _set_weight(enc[3], torch.diag(gain)[:, :, None] * torch.tensor([0.0, 1.0, 0.0]), -OFFSET * gain)

    dec = autoencoder.decoder.layers  # conv k7, DecoderBlock, ELU, conv k7 (no bias)
    into = torch.zeros(2 * HOP, HOP, 7)
    into[:HOP, :, 3] = torch.diag(1 / gain)  # channels < HOP: coefficient + OFFSET, channels >= HOP: OFFSET
    _set_weight(dec[0], into, OFFSET)
    upsample = torch.zeros(2 * HOP, width, 2 * HOP)  # ConvTranspose1d weight: (in, out, kernel)
    upsample[:HOP, 0], upsample[HOP:, 0] = basis, -basis
    _set_weight(dec[1].layers[1], upsample, OFFSET)  # channel 0: y + OFFSET, channel 1: OFFSET
    _identity_residual_units(dec[1])
    last = torch.zeros(1, width, 7)
    last[0, 0, 3], last[0, 1, 3] = 1.0, -1.0
    _set_weight(dec[3], last)
    return autoencoder.to(device).eval()


def build_autoencoder(seed: int, device: str, whiten: bool = False) -> tuple[torch.nn.Module, float]:
    """Stage 1: the MDCT autoencoder and its latent std over 256 corpus clips (the config's `scale`).

    whiten: also divide each MDCT channel by its own std over those clips (folded into the weights), so
    that every channel goes from signal to noise at the same t; the low channels carry far more energy than
    the high ones. Tried against the broadband floor the shipped model leaves in quiet channels: it did not lower
    it (docs/demo_model.md), so it is off by default."""
    audio, _ = corpus.training_batch(corpus.CaptionSampler(seed=seed + 7), 256, np.random.default_rng([seed, 7]))

    def latents(autoencoder: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([autoencoder.encode(torch.from_numpy(a).to(device)) for a in np.split(audio, 16)])

    autoencoder = mdct_autoencoder(device=device)
    if whiten:
        channel_std = latents(autoencoder).std(dim=(0, 2))
        autoencoder = mdct_autoencoder(1 / channel_std.clamp_min(1e-3 * channel_std.max().item()), device)
    return autoencoder, latents(autoencoder).std().item()


def v_loss(model, audio: torch.Tensor, captions: list[str], t: torch.Tensor) -> torch.Tensor:
    """SAT's v-objective loss for one batch, in the pretransform's latent space. audio: (b, 1, n), t: (b,)."""
    with torch.no_grad():
        latents = model.pretransform.encode(audio) if model.pretransform is not None else audio
    alpha, sigma = torch.cos(t * math.pi / 2)[:, None, None], torch.sin(t * math.pi / 2)[:, None, None]
    noise = torch.randn_like(latents)
    noised = latents * alpha + noise * sigma
    target = noise * alpha - latents * sigma
    cond = model.conditioner([{"prompt": c} for c in captions], audio.device)
    output = model(noised, t, cond=cond, cfg_dropout_prob=CFG_DROPOUT)
    return torch.nn.functional.mse_loss(output.float(), target.float())


def export(out: Path, target: Path, half: bool) -> None:
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    from safetensors.torch import save_file

    write_model_files(target, state["latent_scale"])
    weights = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state["ema"].items()}
    save_file(weights, str(target / "model.safetensors"), metadata={
        "step": str(state["step"]), "train_minutes": f"{state['elapsed_s'] / 60:.1f}", "seed": str(state["seed"])})
    print(f"exported EMA weights of step {state['step']} ({state['elapsed_s'] / 60:.1f} min) to {target}")


def train(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)
    autoencoder, latent_scale = build_autoencoder(args.seed, device, args.whiten)
    config_path = write_model_files(out, latent_scale)

    torch.manual_seed(args.seed)
    model = build_model(read_config(config_path)).to(device)
    model.pretransform.model.load_state_dict(autoencoder.state_dict())
    model.train()
    model.pretransform.eval()  # frozen: only the DiT and the prompt embeddings learn
    trainable = [p for name, p in model.named_parameters() if not name.startswith("pretransform.")]
    for p in trainable:
        p.requires_grad_(True)
    ema = build_model(read_config(config_path)).to(device)  # not deepcopy: weight-normed convs refuse it
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, elapsed_s = 0, 0.0
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_s = state["step"], state["elapsed_s"]
        torch.set_rng_state(state["torch_rng"])
    # Caption and clip seeds derive from (seed, step): a resumed run draws fresh clips, never repeats.
    sampler = corpus.CaptionSampler(seed=args.seed * 1_000_003 + step)
    seed_rng = np.random.default_rng([args.seed, step])
    sobol = torch.quasirandom.SobolEngine(1, scramble=True, seed=args.seed + step)

    n_params = sum(p.numel() for p in model.model.parameters())
    print(f"stage 2: DiT {n_params / 1e6:.2f} M params, batch {args.batch}, {args.steps} steps or {args.minutes} min, "
          f"{device}, starting at step {step} ({elapsed_s / 60:.1f} min done)")

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed_s": elapsed_s, "seed": args.seed, "latent_scale": latent_scale,
                    "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(ckpt_path)

    budget_s = args.minutes * 60
    bar = tqdm(desc="stage 2: DiT", total=args.steps, initial=step, unit="step", mininterval=30, ascii=True)
    loss_avg, last_save = None, time.monotonic()
    while step < args.steps and elapsed_s < budget_s:
        started = time.monotonic()
        audio, captions = corpus.training_batch(sampler, args.batch, seed_rng)
        audio = torch.from_numpy(audio).to(device)
        t = sobol.draw(args.batch)[:, 0].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not args.fp32_train):
            loss = v_loss(model, audio, captions, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        update_ema(ema, model, step)
        step += 1
        elapsed_s += time.monotonic() - started
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix_str(f"loss {loss_avg:.4f}, {elapsed_s / 60:.1f} min", refresh=False)
        bar.update(1)
        if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
            save()
            last_save = time.monotonic()
    save()
    bar.close()
    print(f"done: step {step}, {elapsed_s / 60:.1f} min, running loss {loss_avg}; checkpoint {ckpt_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder: checkpoint.pt + model files")
    parser.add_argument("--steps", type=int, default=5000, help="DiT training steps in all (sets the lr schedule)")
    parser.add_argument("--minutes", type=float, default=85.0, help="cap on the time spent in DiT training steps")
    parser.add_argument("--resume", action="store_true", help="continue stage 2 from OUT/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate of the DiT")
    parser.add_argument("--whiten", action="store_true",
                        help="scale each MDCT channel to unit std (default: one scale for all, as shipped)")
    parser.add_argument("--fp32-train", action="store_true",
                        help="train in fp32 (default: bf16 autocast, ~1.35x faster per step on an AVX512-BF16 CPU)")
    parser.add_argument("--export", metavar="DIR", help="write the run's EMA weights + config to DIR and exit")
    parser.add_argument("--fp32", action="store_true", help="export fp32 weights (default fp16)")
    args = parser.parse_args()
    if args.export:
        export(Path(args.out), Path(args.export), half=not args.fp32)
    else:
        train(args)


if __name__ == "__main__":
    main()
