"""Train the embedded demo model (a small stable-audio-tools DiT over an MDCT autoencoder) on the synthetic corpus.

    ptq-train                                        # = make train: runs/demo, 72-80 min on an idle 2-core CPU
    ptq-train --out runs/demo --resume               # continue after an interruption
    ptq-train --out runs/demo --export assets/demo_model          # ship the run's EMA weights
    ptq-train --out runs/gpu --batch 128 --workers 6 --bank 32768 --minutes 7
                                                     # for a GPU (not run on one yet): CPU workers feed a bank

`python -m demo_model.train` takes the same arguments. Stage 1 (seconds, rebuilt on every start) measures
the std of the MDCT coefficients, the config's `scale`; the MDCT is written into the autoencoder
pretransform's weights (`demo_model.mdct`). Stage 2 freezes it and trains the DiT on its latents, doing what
stable-audio-tools' diffusion_cond training does for the v objective (without its Lightning/wandb wrapper):
t ~ U(0, 1) (scrambled Sobol, like SAT), alpha = cos(t pi/2), sigma = sin(t pi/2), z_t = alpha z + sigma eps,
target v = alpha eps - sigma z, the model called through `ConditionedDiffusionModelWrapper.forward` with
the conditioner's output and 10 % CFG dropout.

Training clips are synthesised on the fly in numbered chunks (`demo_model.stream`). By default each step
uses a fresh chunk made in this process; `--workers` makes chunks in parallel processes and `--bank` keeps
the latents of the last N clips on the device, each step drawing its batch there (a GPU consumes clips
faster than CPU cores make them, so clips are reused a few times, with fresh noise and t each time). The
learning rate warms up, then follows a cosine to 10 % at `--steps` or at `--minutes` of step time (a shared
CPU can be slow), whichever comes first, and training stops there. An EMA of the weights is what gets
exported. Steps run under bf16 autocast where bf16 is native (~1.35x faster than fp32 on a CPU with
AVX512-BF16; without it, emulated bf16 steps are ~3.6x slower than fp32, so they run in fp32) and without
SAT's default activation checkpointing (recomputing the blocks cost ~22 % of a CPU step); clips are
encoded in fp32 (`demo_model.mdct.mdct`).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from demo_model import corpus
from demo_model.config import DIT_DEFAULTS, HOP, LATENT_DIM, dit_config, write_model_files
from demo_model.mdct import latent_scale, mdct, mdct_autoencoder
from demo_model.stream import ClipStream
from lab.sat import build_model, read_config
from quant.kernels import cpu_profile, native_bf16

CFG_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 200
CHECKPOINT_EVERY_S = 180
BANK_CHUNK = 64  # clips per chunk a worker makes for the latent bank


def bf16_autocast(device: str, fp32_train: bool = False) -> bool:
    """Whether training steps run under bf16 autocast: where bf16 is native (on a CPU, the CPU profile in
    force, `quant.kernels.cpu_profile`), unless fp32 is asked for."""
    return not fp32_train and native_bf16(device)


def device_line(device: str) -> str:
    """The training device for the log; on a CPU with the profile that decided the autocast."""
    return f"cpu (profile {cpu_profile().describe()})" if torch.device(device).type == "cpu" else device


def learning_rate(step: int, progress: float, peak: float) -> float:
    """Warm-up over WARMUP_STEPS, then a cosine from `peak` to 10 % as `progress` goes from 0 to 1."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    progress = min(1.0, progress)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short memory early, so the EMA is usable soon
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def noise_levels(sobol: torch.quasirandom.SobolEngine, n: int) -> torch.Tensor:
    """(n,) training t ~ U(0, 1), from a scrambled Sobol sequence as in SAT."""
    return sobol.draw(n)[:, 0]


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAT's v-objective schedule, shaped to scale (b, c, frames) latents: x_t = alpha x + sigma noise."""
    return torch.cos(t * math.pi / 2)[:, None, None], torch.sin(t * math.pi / 2)[:, None, None]


def v_loss(model, latents: torch.Tensor, captions: list[str], t: torch.Tensor) -> torch.Tensor:
    """SAT's v-objective loss (mean squared v error) for one batch of pretransform latents (b, c, frames), t: (b,)."""
    alpha, sigma = alpha_sigma(t)
    noise = torch.randn_like(latents)
    noised = latents * alpha + noise * sigma
    target = noise * alpha - latents * sigma
    cond = model.conditioner([{"prompt": c} for c in captions], latents.device)
    output = model(noised, t, cond=cond, cfg_dropout_prob=CFG_DROPOUT, use_checkpointing=False)
    return (output.float() - target.float()).pow(2).mean(dim=(1, 2)).mean()  # per clip, then over the batch


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
    """Write the run's EMA weights (fp16 if `half`) and its model files to `target`."""
    from safetensors.torch import save_file

    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    dit = json.loads((out / "model_config.json").read_text())["model"]["diffusion"]["config"]  # the run's own
    write_model_files(target, state["latent_scale"], dit)
    weights = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state["ema"].items()}
    save_file(weights, str(target / "model.safetensors"), metadata={
        "step": str(state["step"]), "train_minutes": f"{state['elapsed_s'] / 60:.1f}", "seed": str(state["seed"])})
    print(f"exported EMA weights of step {state['step']} ({state['elapsed_s'] / 60:.1f} min) to {target}")


def _models(args: argparse.Namespace, device: str, config_path: Path, ckpt_path: Path):
    """(model, EMA model, optimizer, trainable parameters, (step, elapsed seconds, next clip chunk)): fresh, or
    from the run's checkpoint with --resume."""
    torch.manual_seed(args.seed)
    model = build_model(read_config(config_path)).to(device)
    model.pretransform.model.load_state_dict(mdct_autoencoder().state_dict())
    model.train()
    model.pretransform.eval()  # frozen: only the DiT and the prompt embeddings learn
    trainable = [p for name, p in model.named_parameters() if not name.startswith("pretransform.")]
    for p in trainable:
        p.requires_grad_(True)
    ema = build_model(read_config(config_path)).to(device)  # not deepcopy: weight-normed convs refuse it
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                  fused=device == "cuda")
    progress = (0, 0.0, 0)
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        progress = (state["step"], state["elapsed_s"], state["chunk"])
        torch.set_rng_state(state["torch_rng"])
    return model, ema, optimizer, trainable, progress


def train(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)
    scale = latent_scale(args.seed, device)
    dit = dit_config(args.width, args.depth, args.timestep_cond, args.positions)
    config_path = write_model_files(out, scale, dit)

    model, ema, optimizer, trainable, (step, elapsed_s, first_chunk) = _models(args, device, config_path, ckpt_path)
    sobol = torch.quasirandom.SobolEngine(1, scramble=True, seed=args.seed + step)
    draw = torch.Generator().manual_seed(args.seed + step)  # which bank clips each step uses

    def encoded(chunk: tuple[np.ndarray, list[str]]) -> tuple[torch.Tensor, list[str]]:
        """What the model's pretransform would encode, without its cost (see `mdct`)."""
        audio, captions = chunk
        return mdct(torch.from_numpy(audio).to(device)) / model.pretransform.scale, captions

    with ClipStream(args.seed, BANK_CHUNK if args.bank else args.batch, first_chunk, args.workers) as stream:
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
        autocast = bf16_autocast(device, args.fp32_train)
        print(f"stage 2: DiT {n_params / 1e6:.2f} M params, batch {args.batch}, {args.steps} steps or "
              f"{args.minutes} min, {device_line(device)}, {'bf16 autocast' if autocast else 'fp32'}, "
              f"starting at step {step} ({elapsed_s / 60:.1f} min done)")

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
            t = noise_levels(sobol, args.batch).to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, max(step / args.steps, elapsed_s / budget_s), args.lr)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = v_loss(model, latents, captions, t)
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
        bar.close()
    running = f"{loss_avg.item():.4f}" if loss_avg is not None else "-"
    print(f"done: step {step}, {elapsed_s / 60:.1f} min, running loss {running}; checkpoint {ckpt_path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptq-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--fp32-train", action="store_true",
                        help="train in fp32 even where bf16 is native (default: bf16 autocast there, fp32 elsewhere)")
    parser.add_argument("--export", metavar="DIR", help="write the run's EMA weights + config to DIR and exit")
    parser.add_argument("--fp32", action="store_true", help="export fp32 weights (default fp16)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers cannot be negative")
    if args.bank and (args.workers < 1 or args.bank < args.batch):
        parser.error("--bank needs --workers >= 1 and at least --batch clips")
    if args.export:
        export(Path(args.out), Path(args.export), half=not args.fp32)
    else:
        train(args)


if __name__ == "__main__":
    main()
