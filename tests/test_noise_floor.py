"""scripts/noise_floor.py: the floor measure must rank a clean corpus clip below the same clip with noise added."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import noise_floor  # noqa: E402

from lab import corpus  # noqa: E402


def test_floor_rises_with_broadband_noise_and_ignores_level():
    mdct = noise_floor.mdct_autoencoder()
    clean = corpus.synthesize("soft sine tone at A4", seed=0)
    reference = noise_floor.channel_energy(mdct, clean)
    support = reference > reference.max() * 10 ** (-noise_floor.SUPPORT_DB / 10)
    assert 0 < int(support.sum()) < 32  # a tone occupies a few of the 256 channels
    clean_db = noise_floor.floor_db(reference, support)
    noisy = clean + 0.05 * np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
    noisy_db = noise_floor.floor_db(noise_floor.channel_energy(mdct, noisy), support)
    louder_db = noise_floor.floor_db(noise_floor.channel_energy(mdct, 3 * clean), support)
    assert clean_db < -20 and noisy_db > clean_db + 10
    assert abs(louder_db - clean_db) < 1e-3
