"""scripts/diagnose_drums.py: kick captions, their silent frames and both floors, on the shipped model."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import diagnose_drums  # noqa: E402
from denoise_by_family import encoded_clips  # noqa: E402

from lab import corpus  # noqa: E402
from lab.models import load_model  # noqa: E402


def test_kick_patterns_have_silent_frames_and_the_floor_is_measured_at_each_step():
    loaded = load_model()
    captions = diagnose_drums.kick_captions(3, seed=0)
    assert len({corpus.parse_caption(c).bpm for c in captions}) == 3
    assert all(c.family == "rhythm" and c.instrument == "kick drum" and not corpus.is_held_out(c)
               for c in map(corpus.parse_caption, captions))
    latents = encoded_clips(loaded.model, captions, seed=0)
    silent = diagnose_drums.silent_frames(latents[0])
    assert 0.2 < silent.float().mean() < 0.9  # hits, then silence until the next beat

    generator = torch.Generator().manual_seed(0)
    near_clean, pure_noise = (diagnose_drums.caption_only_cosines(loaded.model, latents, captions, t, generator)
                              for t in (0.5, 1.0))
    assert near_clean[0].min() > 0.8 and near_clean[0].min() > pure_noise[0].max()
    assert near_clean[1].min() > 0.8 > near_clean[2].max()  # beyond the first hit: its own tempo, not another's
    assert len(near_clean[2]) == 6  # every ordered pair of the 3 tempi

    clip = diagnose_drums.sample(loaded, captions[0], seed=0)
    rows = diagnose_drums.floor_by_step(loaded, captions[0], latents[0], clip, [0, 49], generator=generator)
    assert [round(t, 2) for t, _, _ in rows] == [1.0, 0.02]
    assert all(sampled >= 0 and one_step >= 0 for _, sampled, one_step in rows)
    assert rows[-1][2] < 0.05  # one step from a barely noised clip: the silent frames come back silent

    # Section 3 scales the made clip's error: with none left (f = 0) the corpus clip is at its tempo.
    assert diagnose_drums.at_tempo_with_error_scaled(loaded.model, captions[0], latents[0], latents[0]) == [
        True] * len(diagnose_drums.ERROR_SCALES)
    made = clip.denoised[-1][0]
    assert len(diagnose_drums.at_tempo_with_error_scaled(loaded.model, captions[0], latents[0], made)) == len(
        diagnose_drums.ERROR_SCALES)

    # Section 4: the clip plus a steady floor of the made clip's error RMS; with no error it is the clip itself.
    rng = np.random.default_rng(0)
    assert diagnose_drums.at_tempo_with_steady_floor(loaded.model, captions[0], latents[0], latents[0], rng) is True
    assert isinstance(diagnose_drums.at_tempo_with_steady_floor(loaded.model, captions[0], latents[0], made, rng), bool)
