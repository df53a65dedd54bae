"""scripts/denoise_by_family.py: on the shipped model, the clean estimate must improve as the noise falls."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import denoise_by_family  # noqa: E402

from lab import corpus  # noqa: E402
from lab.models import load_model  # noqa: E402


def test_clean_estimate_error_falls_with_the_noise_level():
    model = load_model().model
    latents, captions = denoise_by_family.family_latents(model, "tone", clips=4, seed=0)
    assert latents.shape[0] == 4 and {corpus.parse_caption(c).family for c in captions} == {"tone"}
    low, high = (denoise_by_family.clean_estimate_error_db(model, latents, captions, t,
                                                           torch.Generator().manual_seed(0)) for t in (0.1, 0.9))
    assert torch.isfinite(low).all() and torch.isfinite(high).all()
    assert low.median() < high.median() - 6 and high.median() < 3  # at t = 0.1 a tone is 16 dB above the noise
