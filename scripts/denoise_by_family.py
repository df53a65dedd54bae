"""How well does a demo model denoise each caption family at each noise level? Where sampling decides what it makes.

    python scripts/denoise_by_family.py                                   # the embedded model
    python scripts/denoise_by_family.py --model-config C --ckpt-path W    # any demo-grammar model

For each family: 16 training-grammar clips, encoded by the model's own pretransform, noised to t as in
training (x_t = cos(t pi/2) x + sin(t pi/2) noise), one conditional forward; the error of the model's clean
estimate relative to the clip's energy, median over clips, in dB (0 dB: no better than predicting silence).
Also each family's latent RMS: under one schedule a quiet family is buried under the noise for longer.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab import corpus  # noqa: E402
from lab.models import load_model  # noqa: E402
from train_demo_model import alpha_sigma  # noqa: E402  (same directory)

NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # at t = 1 the model sees pure noise: the caption alone


def family_latents(model, family: str, clips: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`clips` training captions of `family` (drawn with `seed`) and their latents as the DiT sees them."""
    captions = corpus.training_captions(family)
    rng = np.random.default_rng(seed)
    texts = [captions[i].text for i in rng.choice(len(captions), clips)]
    return encoded_clips(model, texts, seed), texts


@torch.no_grad()
def encoded_clips(model, captions: list[str], seed: int) -> torch.Tensor:
    """The corpus clips of `captions` (clip i with seed + i), encoded by the model's own pretransform."""
    audio = np.stack([corpus.synthesize(text, seed=seed + i) for i, text in enumerate(captions)])[:, None]
    return model.pretransform.encode(torch.from_numpy(audio).float())


@torch.no_grad()
def clean_estimate(model, latents: torch.Tensor, captions: list[str], t: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The model's clean estimate (conditional, no CFG) from the latents noised to t as in training (v objective)."""
    t_batch = torch.full((len(captions),), t)
    alpha, sigma = alpha_sigma(t_batch)
    noised = alpha * latents + sigma * torch.randn(latents.shape, generator=generator)
    cond = model.conditioner([{"prompt": c} for c in captions], latents.device)
    v = model(noised, t_batch, cond=cond, cfg_dropout_prob=0.0)
    return alpha * noised - sigma * v


def clean_estimate_error_db(model, latents: torch.Tensor, captions: list[str], t: float,
                            generator: torch.Generator) -> torch.Tensor:
    """Per clip: 10 log10(|x0_hat - x0|^2 / |x0|^2) of the model's clean estimate from x_t."""
    estimate = clean_estimate(model, latents, captions, t, generator)
    return 10 * torch.log10((estimate - latents).pow(2).mean(dim=(1, 2)) / latents.pow(2).mean(dim=(1, 2)))


def model_from_command_line(description: str, clips: int, clips_help: str):
    """The command line the demo-model diagnostics share: (args, the loaded model, a seeded generator)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-config", help="defaults to the embedded demo model")
    parser.add_argument("--ckpt-path")
    parser.add_argument("--clips", type=int, default=clips, help=clips_help)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loaded = load_model(model_config=args.model_config, ckpt_path=args.ckpt_path)
    return args, loaded, torch.Generator().manual_seed(args.seed)


def main() -> None:
    args, loaded, generator = model_from_command_line(__doc__.splitlines()[0], 16, "clips per family")
    print(f"{loaded.model_id}: median clean-estimate error relative to the clip (dB), conditional, no CFG")
    print(f"{'family':8s}{'latent RMS':>11s}" + "".join(f"{f't={t:g}':>8s}" for t in NOISE_LEVELS))
    for family in corpus.FAMILIES:
        latents, captions = family_latents(loaded.model, family, args.clips, args.seed)
        errors = [clean_estimate_error_db(loaded.model, latents, captions, t, generator).median().item()
                  for t in NOISE_LEVELS]
        rms = latents.pow(2).mean().sqrt().item()
        print(f"{family:8s}{rms:11.2f}" + "".join(f"{e:8.1f}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
