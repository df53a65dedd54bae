"""Where the demo model's buzz at its latent frame rate comes from: the two measurements behind
docs/demo_model.md, "Samplers".

1. Guidance gain. Noise a corpus clip to t and ask the DiT for its clean estimate with and without the
   caption (the unconditional branch is SAT's own: the caption dropped, as CFG dropout drops it in training).
   The gain of an estimate is its projection on the clip (1 = the clip's amplitude); CFG at scale s gives
   u + s (c - u). Below 1 at every t, guided sampling shrinks the clip step after step.
2. Frame-constant share. The share of a latent's energy in each channel's mean over the frames. A latent that
   is the same in every frame decodes to a waveform that repeats every hop: lines at multiples of the frame
   rate. The corpus's clips have almost none; the clip is decoded with and without that part and checked
   by the evaluator, so the share and the buzz can be compared. Where the input carries nothing, every token
   of the DiT is the same (its absolute position embedding, printed first, is all that tells them apart) and
   attention and feed-forward keep them the same: its output is frame-constant.

    python -m demo_model.guidance                                  # gains on the corpus's sine tones, CFG 5
    python -m demo_model.guidance --prompt "sine tone at A4" --sampler dpmpp-3m-sde --cfg 5 --seeds 1000 1001
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from demo_model import adherence, corpus
from demo_model.mdct import mdct

GAIN_TIMES = (0.2, 0.4, 0.6, 0.8)
GAIN_NOTES = ("A4", "C4", "G3", "E5", "D5", "F#4")


def frame_constant_share(latents: torch.Tensor, edge: int = 2) -> float:
    """Share of the energy of (channels, frames) latents in each channel's mean over the frames (the first and
    last `edge` frames left out: the corpus fades there). Independent frames give about 1 / frames."""
    z = latents.double()[:, edge:-edge]
    return float(z.mean(dim=1).pow(2).sum() * z.shape[1] / z.pow(2).sum())


def without_frame_constant(latents: torch.Tensor, edge: int = 2) -> torch.Tensor:
    """The latents less each channel's mean over the frames (the same frames as `frame_constant_share`)."""
    return latents - latents[..., edge:-edge].mean(dim=-1, keepdim=True)


@torch.no_grad()
def guidance_gains(model: torch.nn.Module, prompts: list[str], t: float, cfg_scale: float, seed: int) -> dict:
    """{"cond", "uncond", "cfg"}: the gain (projection on the clips) of the clean estimates of the corpus clips of
    `prompts` (seed + i) noised to t, with the caption, without it, and guided at `cfg_scale`."""
    audio = np.stack([corpus.synthesize(p, seed=seed + i) for i, p in enumerate(prompts)])[:, None]
    clips = mdct(torch.from_numpy(audio)) / model.pretransform.scale  # the DiT's latents (unit std)
    alpha, sigma = math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed))
    noised = alpha * clips + sigma * noise
    cond = model.conditioner([{"prompt": p} for p in prompts], "cpu")
    times = torch.full((len(prompts),), t)
    v_cond = model(noised, times, cond=cond, cfg_scale=1.0)
    v_uncond = model(noised, times, cond=cond, cfg_scale=1.0, cfg_dropout_prob=1.0)  # SAT's null caption

    def gain(v: torch.Tensor) -> float:
        return float(((alpha * noised - sigma * v) * clips).sum() / clips.pow(2).sum())

    cond_gain, uncond_gain = gain(v_cond), gain(v_uncond)
    return {"cond": cond_gain, "uncond": uncond_gain, "cfg": uncond_gain + cfg_scale * (cond_gain - uncond_gain)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo_model.guidance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", type=float, default=5.0, help="CFG scale (default 5)")
    parser.add_argument("--prompt", help="generate this caption and report its latents (else: the gains)")
    parser.add_argument("--sampler", default="dpmpp-3m-sde",
                        help="with --prompt (default dpmpp-3m-sde; the k-diffusion ones over sigma 0.03..500)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000], help="with --prompt: one clip per seed")
    args = parser.parse_args(argv)
    from lab.sat import decoder, load_model, sample

    loaded = load_model()
    model = loaded.model
    if args.prompt is None:
        scale = float(model.model.model.transformer.pos_emb.scale)
        print(f"scale of the DiT's absolute (sinusoidal) position embedding: {scale:.4f}")
        print(f"gain of the clean estimate on the corpus's sine tones ({', '.join(GAIN_NOTES)}), CFG {args.cfg:g}:")
        print("level    t    caption  no caption  guided")
        for level in ("soft", None, "loud"):
            prompts = [corpus.Caption("tone", waveform="sine", note=n, level=level).text for n in GAIN_NOTES]
            for t in GAIN_TIMES:
                gains = guidance_gains(model, prompts, t, args.cfg, seed=3)
                print(f"{level or 'normal':<7} {t:.1f}  {gains['cond']:7.2f}  {gains['uncond']:10.2f}  {gains['cfg']:6.2f}")
        return
    corpus.parse_caption(args.prompt)
    settings = loaded.sampling.replace(sampler_type=args.sampler, cfg_scale=args.cfg, sigma_min=0.03, sigma_max=500.0)
    to_audio = decoder(model)
    clip = mdct(torch.from_numpy(corpus.synthesize(args.prompt))[None, None])[0] / model.pretransform.scale
    print(f"{args.prompt!r}, {settings.sampler_type} CFG {settings.cfg_scale:g} (sigma 0.03..500); the corpus clip: "
          f"latent rms {clip.pow(2).mean().sqrt():.2f}, frame-constant share {frame_constant_share(clip):.4f}")
    print("seed   latent rms  frame-constant share  ok  buzz (peak Hz) | frame-constant part removed: ok  buzz (peak Hz)")
    for seed in args.seeds:
        latents = sample(model, [args.prompt], settings=settings, sample_size=loaded.sample_size, seed=seed,
                         return_latents=True)
        verdicts = [adherence.evaluate(args.prompt, to_audio(z)[0, 0].cpu().numpy(), loaded.sample_rate)
                    for z in (latents, without_frame_constant(latents))]
        print(f"{seed:<6} {latents.pow(2).mean().sqrt():10.2f}  {frame_constant_share(latents[0]):20.3f}  "
              + " | ".join(f"{'yes' if r['ok'] else 'no':>3} {'yes' if r['buzz'] else 'no':>4} ({r['peak_hz']:.1f})"
                           for r in verdicts))


if __name__ == "__main__":
    main()
