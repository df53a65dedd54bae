"""Train the embedded demo model (a small stable-audio-tools DiT) on the synthetic corpus, on CPU.

    python scripts/train_demo_model.py --out runs/demo                  # 4500 steps: ~70 min on an idle 2-core CPU
    python scripts/train_demo_model.py --out runs/demo --resume         # continue after an interruption
    python scripts/train_demo_model.py --out runs/demo --export assets/demo_model   # ship the EMA weights

The loop does what stable-audio-tools' diffusion_cond training does for the v objective (without its
Lightning/wandb wrapper): t ~ U(0, 1) (scrambled Sobol, like SAT), alpha = cos(t pi/2),
sigma = sin(t pi/2), x_t = alpha x + sigma eps, target v = alpha eps - sigma x, and the model is called
through `ConditionedDiffusionModelWrapper.forward` with the conditioner's output and 10 % CFG dropout.
Training clips are synthesised on the fly (`lab.corpus`), never repeating a seed. The learning rate
warms up, then follows a cosine to 10 % at `--steps`; `--minutes` caps the wall-clock time of the
training steps (a shared CPU can be slow) and training stops at whichever comes first. An EMA of the
weights is what gets exported.
"""
from __future__ import annotations

import argparse
import copy
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

# The shipped model_config.json is written from this dict: 8.3 M-parameter DiT, SAO's block structure
# (self-attention, cross-attention to the caption tokens, SwiGLU feed-forward), raw 16 kHz mono audio cut
# into 256-sample patches -> 128 tokens per 2.048 s clip.
MODEL_CONFIG = {
    "model_type": "diffusion_cond",
    "sample_size": corpus.CLIP_SAMPLES,
    "sample_rate": corpus.SAMPLE_RATE,
    "audio_channels": 1,
    "model": {
        "io_channels": 1,
        "conditioning": {
            "configs": [{"id": "prompt", "type": "lut", "config": {"tokenizer_name": "tokenizer", "max_length": 8}}],
            "cond_dim": 256,
        },
        "diffusion": {
            "cross_attention_cond_ids": ["prompt"],
            "type": "dit",
            "diffusion_objective": "v",
            "config": {
                "io_channels": 1, "patch_size": 256, "embed_dim": 256, "depth": 6, "num_heads": 4,
                "cond_token_dim": 256, "project_cond_tokens": False, "transformer_type": "continuous_transformer",
            },
        },
    },
}
# Sampler defaults shipped next to the model (generation.json), chosen on development prompts.
GENERATION_DEFAULTS = {"steps": 50, "cfg_scale": 5.0, "sampler_type": "dpmpp-3m-sde",
                       "sigma_min": 0.01, "sigma_max": 50.0, "seconds": corpus.CLIP_SECONDS}

CFG_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 200
CHECKPOINT_EVERY_S = 180


def write_model_files(directory: Path) -> Path:
    """model_config.json + tokenizer/ + generation.json in `directory` (the layout of assets/demo_model)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
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


def v_loss(model, audio: torch.Tensor, captions: list[str], t: torch.Tensor) -> torch.Tensor:
    """SAT's v-objective loss for one batch. audio: (b, 1, n), t: (b,) in [0, 1]."""
    alpha, sigma = torch.cos(t * math.pi / 2)[:, None, None], torch.sin(t * math.pi / 2)[:, None, None]
    noise = torch.randn_like(audio)
    noised = audio * alpha + noise * sigma
    target = noise * alpha - audio * sigma
    cond = model.conditioner([{"prompt": c} for c in captions], audio.device)
    output = model(noised, t, cond=cond, cfg_dropout_prob=CFG_DROPOUT)
    return torch.nn.functional.mse_loss(output, target)


def export(out: Path, target: Path, half: bool) -> None:
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    from safetensors.torch import save_file

    write_model_files(target)
    weights = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state["ema"].items()}
    save_file(weights, str(target / "model.safetensors"), metadata={
        "step": str(state["step"]), "train_minutes": f"{state['elapsed_s'] / 60:.1f}", "seed": str(state["seed"])})
    print(f"exported EMA weights of step {state['step']} ({state['elapsed_s'] / 60:.1f} min) to {target}")


def train(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    config_path = write_model_files(out)
    ckpt_path = out / "checkpoint.pt"

    torch.manual_seed(args.seed)
    model = build_model(read_config(config_path)).train().requires_grad_(True).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, elapsed_s = 0, 0.0
    if args.resume:
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
    print(f"DiT {n_params / 1e6:.2f} M params, batch {args.batch}, {args.steps} steps or {args.minutes} min, {device}, "
          f"starting at step {step} ({elapsed_s / 60:.1f} min done)")

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed_s": elapsed_s, "seed": args.seed, "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(ckpt_path)

    budget_s = args.minutes * 60
    bar = tqdm(total=args.steps, initial=step, unit="step", mininterval=30, dynamic_ncols=False, ascii=True)
    loss_avg, last_save = None, time.monotonic()
    while step < args.steps and elapsed_s < budget_s:
        started = time.monotonic()
        audio, captions = corpus.training_batch(sampler, args.batch, seed_rng)
        audio = torch.from_numpy(audio).to(device)
        t = sobol.draw(args.batch)[:, 0].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        loss = v_loss(model, audio, captions, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, step)
        step += 1
        dt = time.monotonic() - started
        elapsed_s += dt
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
    parser.add_argument("--steps", type=int, default=4500, help="training steps in all (sets the lr schedule)")
    parser.add_argument("--minutes", type=float, default=90.0, help="cap on the time spent in training steps")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    parser.add_argument("--export", metavar="DIR", help="write the run's EMA weights + config to DIR and exit")
    parser.add_argument("--fp32", action="store_true", help="export fp32 weights (default fp16)")
    args = parser.parse_args()
    if args.export:
        export(Path(args.out), Path(args.export), half=not args.fp32)
    else:
        train(args)


if __name__ == "__main__":
    main()
