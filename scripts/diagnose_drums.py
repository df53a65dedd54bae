"""Why the demo model's drum patterns miss their tempo: what it makes of a kick pattern, step by step.

    python scripts/diagnose_drums.py                                   # the embedded model
    python scripts/diagnose_drums.py --model-config C --ckpt-path W    # any demo-grammar model

A kick pattern is one fixed clip per caption (`lab.corpus`: the same hit on the beat from 20 ms), silent
between hits. Four measurements on `--clips` kick captions of the training grammar:

1. From the caption alone. Near t = 1 the DiT's input is almost pure noise, so the best clean estimate is
   the clip itself. Printed: the cosine between the model's clean estimate and the clip (1: the pattern laid
   out from the caption; 0: nothing of it), median over the clips; then the same from 0.25 s on, where the
   first hit has died away, with the clip's own caption and with the clips of the other tempi. Every
   pattern has its first hit at 20 ms, so only after it does a cosine say whether the tempo was read.
2. The floor between hits. v-ddim (the model's steps and CFG) runs from noise; at some of its steps, the RMS
   of its clean estimate in the frames where the clip is silent, in the DiT's unit-std latent units, beside
   the one-step estimate from the clip itself noised to the same t. A denoiser unsure whether a frame is
   silent leaves a little of the noise in its estimate; v-ddim keeps each estimate as signal, so the leak
   builds up into the broadband floor that the onset detector counts as hits.
3. How far the made clip is from passing. The clip plus the sampler's error (made minus clip latent) scaled
   by f, decoded and checked like `lab.adherence`: how many captions come out at their tempo at each f, in
   dB. The f at which most pass is how much cleaner the sampler's output has to become.
4. Whether it is the error's energy or its shape. The corpus clip plus steady white noise with the same RMS
   as the made clip's error: how many are at their tempo, beside the made clips (section 3 at 0 dB). The
   onset detector shrugs off a steady floor (tests/test_adherence.py); if the steady version passes where the
   made clip fails, what the detector counts is how the sampler's error comes and goes between the hits.
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab import adherence, corpus  # noqa: E402
from lab.generation import GenerationRequest, decoder, generate_clip  # noqa: E402
from denoise_by_family import clean_estimate, encoded_clips, model_from_command_line  # noqa: E402

CAPTION_ONLY_T = (1.0, 0.95, 0.9, 0.8)
AFTER_FIRST_HIT_S = 0.25  # a hit lasts 0.25 s (`lab.corpus`); later hits fall where the tempo puts them
SILENT_BELOW = 1e-4  # a frame is silent when its energy is below this fraction of the clip's loudest frame
ERROR_SCALES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)  # section 3: 0, -6, -10, -14, -20 and -26 dB


def kick_captions(clips: int, seed: int) -> list[str]:
    kicks = [c.text for c in corpus.training_captions("rhythm") if c.instrument == "kick drum"]
    return [kicks[i] for i in np.random.default_rng(seed).choice(len(kicks), clips, replace=False)]


def caption_only_cosines(model, latents: torch.Tensor, captions: list[str], t: float,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosines of the clean estimates from the clips noised to t: each with its clip (per clip); from
    AFTER_FIRST_HIT_S on, each with its clip (per clip) and with every clip of another tempo (per pair)."""
    estimate = clean_estimate(model, latents, captions, t, generator)
    whole = torch.nn.functional.cosine_similarity(estimate.flatten(1), latents.flatten(1), dim=1)
    start = math.ceil(AFTER_FIRST_HIT_S / corpus.CLIP_SECONDS * latents.shape[-1])
    later = torch.nn.functional.cosine_similarity(estimate[..., start:].flatten(1)[:, None],
                                                  latents[..., start:].flatten(1)[None], dim=2)  # (estimate, clip)
    bpm = torch.tensor([corpus.parse_caption(c).bpm for c in captions])
    return whole, later.diagonal(), later[bpm[:, None] != bpm[None]]


def silent_frames(latent: torch.Tensor) -> torch.Tensor:
    """(frames,) bool: where a (channels, frames) clip latent is silent."""
    energy = latent.pow(2).sum(dim=0)
    return energy < SILENT_BELOW * energy.max()


def floor_rms(estimate: torch.Tensor, silent: torch.Tensor) -> float:
    return estimate[:, silent].pow(2).mean().sqrt().item()


@torch.no_grad()
def sample(loaded, caption: str, seed: int):
    """A v-ddim run for `caption` at the model's steps and CFG, keeping every step's clean estimate."""
    defaults = loaded.sampling
    request = GenerationRequest(prompt=caption, seconds=corpus.CLIP_SECONDS, steps=defaults.steps,
                                cfg_scale=defaults.cfg_scale, seed=seed, sampler="v-ddim", sigma_min=0.01,
                                sigma_max=1.0)
    return generate_clip(loaded.model, loaded, request)


@torch.no_grad()
def floor_by_step(loaded, caption: str, latent: torch.Tensor, clip, steps_to_show: list[int],
                  generator: torch.Generator) -> list[tuple[float, float, float]]:
    """(t, sampler's floor, one-step floor) at each step in `steps_to_show` of `clip`, a `sample` of `caption`."""
    silent = silent_frames(latent)
    rows = []
    for step in steps_to_show:
        t = 1 - step / loaded.sampling.steps  # v-ddim's schedule: t from 1 in equal steps
        one_step = clean_estimate(loaded.model, latent[None], [caption], t, generator)[0]
        rows.append((t, floor_rms(clip.denoised[step][0], silent), floor_rms(one_step, silent)))
    return rows


@torch.no_grad()
def at_tempo_with_error_scaled(model, caption: str, latent: torch.Tensor, made: torch.Tensor) -> list[bool]:
    """For each f in ERROR_SCALES: is latent + f (made - latent), decoded, at the caption's tempo?"""
    bpm, to_audio = corpus.parse_caption(caption).bpm, decoder(model)
    error = made - latent
    return [adherence.check_rhythm(to_audio((latent + f * error)[None])[0], corpus.SAMPLE_RATE, bpm)["ok"]
            for f in ERROR_SCALES]


@torch.no_grad()
def at_tempo_with_steady_floor(model, caption: str, latent: torch.Tensor, made: torch.Tensor,
                               rng: np.random.Generator) -> bool:
    """Is the clip plus steady white noise of the made clip's error RMS at the caption's tempo?"""
    bpm, to_audio = corpus.parse_caption(caption).bpm, decoder(model)
    clip = to_audio(latent[None])[0]
    steady = clip + np.sqrt(np.mean((to_audio(made[None])[0] - clip) ** 2)) * rng.standard_normal(clip.shape)
    return adherence.check_rhythm(steady, corpus.SAMPLE_RATE, bpm)["ok"]


def main() -> None:
    args, loaded, generator = model_from_command_line(__doc__.splitlines()[0], 8, "kick captions")
    captions = kick_captions(args.clips, args.seed)
    latents = encoded_clips(loaded.model, captions, args.seed)
    print(f"{loaded.model_id}: {len(captions)} kick captions")
    print(f"1. clean estimate from the clip noised to t, cosine (median) with the clip | from {AFTER_FIRST_HIT_S:g} s "
          "on, with the clip | with the clips of the other tempi:")
    for t in CAPTION_ONLY_T:
        cosines = caption_only_cosines(loaded.model, latents, captions, t, generator)
        print(f"   t = {t:<4g}  " + " | ".join(f"{c.median().item():5.2f}" for c in cosines))
    steps = loaded.sampling.steps
    shown = sorted({0, steps // 10, steps // 5, steps // 2, (4 * steps) // 5, steps - 1})
    print(f"2. RMS in the silent frames (median; unit-std latents): v-ddim's clean estimate, {steps} steps, "
          f"CFG {loaded.sampling.cfg_scale:g} | one step from the clip noised to the same t")
    clips = [sample(loaded, c, args.seed + i) for i, c in enumerate(captions)]
    table = np.median([floor_by_step(loaded, c, z, clip, shown, generator)
                       for c, z, clip in zip(captions, latents, clips)], axis=0)
    for step, (t, sampled, one_step) in zip(shown, table):
        print(f"   step {step:3d}  t = {t:4.2f}  {sampled:6.3f} | {one_step:6.3f}")
    print("3. at the caption's tempo (lab.adherence's check), the clip + the sampler's error scaled by:")
    passed = np.sum([at_tempo_with_error_scaled(loaded.model, c, z, clip.denoised[-1][0])
                     for c, z, clip in zip(captions, latents, clips)], axis=0)
    print("   " + " | ".join(f"{20 * math.log10(f):4.0f} dB {n}/{len(captions)}" for f, n in zip(ERROR_SCALES, passed)))
    rng = np.random.default_rng(args.seed)
    steady = sum(at_tempo_with_steady_floor(loaded.model, c, z, clip.denoised[-1][0], rng)
                 for c, z, clip in zip(captions, latents, clips))
    print(f"4. at the caption's tempo: the clip + steady white noise of the made clip's error RMS {steady}/"
          f"{len(captions)} (the made clip itself: 0 dB above)")


if __name__ == "__main__":
    main()
