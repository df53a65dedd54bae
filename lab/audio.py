"""Audio for fair listening: loudness-match the pair, write WAV files, compare log-mel spectrograms.

Louder sounds better to listeners, and both Gradio (numpy input is peak-normalised) and stable-audio-tools
(peak normalisation in its UI) change the level clip by clip. So the two clips of a comparison get the same
integrated loudness (ITU-R BS.1770 via pyloudnorm), one shared gain cut keeps both below full scale, and the
browser receives WAV files, never arrays.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TARGET_LUFS = -23.0  # EBU R128 programme loudness
PEAK_CEILING = 0.89  # -1 dBFS: headroom for the 16-bit conversion and the player
SILENCE_LUFS = -70.0  # BS.1770's absolute gate: quieter clips cannot be measured, they keep gain 1


def integrated_loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS of (channels, samples) audio. BS.1770 needs one 400 ms block: shorter
    clips are measured tiled to that length."""
    import pyloudnorm

    data = np.asarray(audio, dtype=np.float64).T  # (samples, channels)
    block = int(0.4 * sample_rate) + 1
    if data.shape[0] < block:
        data = np.tile(data, (math.ceil(block / max(1, data.shape[0])), 1))
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(data))


def loudness_match(clips: list[np.ndarray], sample_rate: int, target_lufs: float = TARGET_LUFS,
                   peak_ceiling: float = PEAK_CEILING) -> list[np.ndarray]:
    """Scale every clip to `target_lufs`, then apply one common gain so the loudest peak is <= peak_ceiling.

    The common gain keeps the clips' loudness equal (to each other) even when peak protection kicks in.
    Silent or unmeasurably quiet clips are left at their level.
    """
    scaled = []
    for clip in clips:
        clip = np.nan_to_num(np.asarray(clip, dtype=np.float32))
        loudness = integrated_loudness(clip, sample_rate) if np.any(clip) else -np.inf
        gain = 10.0 ** ((target_lufs - loudness) / 20.0) if loudness > SILENCE_LUFS else 1.0
        scaled.append(clip * np.float32(gain))
    peak = max(float(np.abs(clip).max(initial=0.0)) for clip in scaled)
    if peak > peak_ceiling:
        scaled = [clip * np.float32(peak_ceiling / peak) for clip in scaled]
    return scaled


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write (channels, samples) float audio in [-1, 1] as 16-bit PCM WAV (plays in every browser)."""
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.clip(np.asarray(audio, dtype=np.float32).T, -1.0, 1.0), sample_rate,
                    subtype="PCM_16")
    return path


def log_mel_db(audio: np.ndarray, sample_rate: int, n_mels: int = 64) -> np.ndarray:
    """(n_mels, frames) log-mel power in dB with a fixed reference (1.0), so two clips are comparable."""
    import librosa

    mono = np.asarray(audio, dtype=np.float32).reshape(-1, np.shape(audio)[-1]).mean(axis=0)
    n_fft = 1024 if sample_rate <= 24000 else 2048
    mel = librosa.feature.melspectrogram(y=mono, sr=sample_rate, n_fft=n_fft, hop_length=n_fft // 4,
                                         n_mels=n_mels, power=2.0)
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)


def log_mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """Mean absolute log-mel difference in dB, floored at -100 dB so silence does not dominate."""
    a = np.maximum(log_mel_db(reference, sample_rate), -100.0)
    b = np.maximum(log_mel_db(estimate, sample_rate), -100.0)
    return float(np.mean(np.abs(a - b)))

