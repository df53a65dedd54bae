"""lab.audio: loudness matching (what makes A/B fair), WAV files, log-mel distance."""
import numpy as np
import pytest
import soundfile

from lab.audio import PEAK_CEILING, integrated_loudness, log_mel_distance, loudness_match, write_wav

SR = 16000


def tone(freq=440.0, amplitude=0.5, seconds=2.0, channels=1):
    t = np.arange(int(seconds * SR)) / SR
    return np.tile(amplitude * np.sin(2 * np.pi * freq * t), (channels, 1)).astype(np.float32)


def test_pair_gets_the_same_integrated_loudness():
    quiet, loud = tone(amplitude=0.05), tone(freq=880, amplitude=0.6)
    matched = loudness_match([quiet, loud], SR)
    levels = [integrated_loudness(clip, SR) for clip in matched]
    assert abs(levels[0] - levels[1]) < 0.1
    assert abs(levels[0] - (-23.0)) < 0.5


def test_peak_protection_keeps_the_pair_equally_loud():
    # a sparse click train has a high peak-to-loudness ratio: bringing it to -23 LUFS would clip
    clicks = np.zeros((1, 2 * SR), np.float32)
    clicks[0, ::4000] = 0.9
    matched = loudness_match([tone(amplitude=0.2), clicks], SR, target_lufs=-10.0)
    assert max(np.abs(clip).max() for clip in matched) <= PEAK_CEILING + 1e-6
    levels = [integrated_loudness(clip, SR) for clip in matched]
    assert abs(levels[0] - levels[1]) < 0.1
    assert levels[0] < -10.0  # the common cut lowered both


def test_silence_and_short_clips_do_not_break_matching():
    silent, short = np.zeros((1, SR), np.float32), tone(seconds=0.2)
    matched = loudness_match([silent, short], SR)
    assert not np.any(matched[0])
    assert np.isfinite(matched[1]).all() and np.abs(matched[1]).max() > 0


def test_wav_round_trip_is_16_bit_pcm(tmp_path):
    stereo = tone(channels=2, amplitude=0.5)
    path = write_wav(tmp_path / "sub" / "x.wav", stereo, SR)
    info = soundfile.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (SR, 2, "PCM_16")
    data, _ = soundfile.read(path, dtype="float32")
    np.testing.assert_allclose(data.T, stereo, atol=1 / 2**15 + 1e-6)


def test_log_mel_distance():
    noise = np.random.default_rng(0).normal(0, 0.1, (1, SR)).astype(np.float32)
    assert log_mel_distance(noise, noise, SR) == pytest.approx(0.0)
    # half the amplitude is -6 dB in every band
    assert log_mel_distance(noise, noise * 0.5, SR) == pytest.approx(20 * np.log10(2), rel=0.01)
    assert log_mel_distance(tone(), tone(freq=2000), SR) > 10
