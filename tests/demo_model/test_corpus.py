"""The synthetic corpus: grammar round-trip, determinism, held-out combinations, tokenizer coverage."""
import numpy as np
import pytest

from demo_model import corpus, vocab


def test_every_caption_round_trips_through_the_parser():
    captions = corpus.all_captions()
    assert len(captions) == len(set(captions)) > 1000
    for caption in captions:
        assert corpus.parse_caption(caption.text) == caption
    assert corpus.parse_caption("  LOUD Sine tone at c#4 ") == corpus.Caption("tone", waveform="sine", note="C#4",
                                                                             level="loud")


@pytest.mark.parametrize("text", ["sine tone at H4", "sine tone at C7", "violin tone at A4", "kick drum at 65 bpm",
                                  "purple noise", "sine tone at Db4", ""])
def test_captions_outside_the_grammar_are_rejected(text):
    with pytest.raises(ValueError, match="grammar|note name"):
        corpus.parse_caption(text)


def test_synthesis_is_deterministic_and_seeded():
    for text in ("square tone at A4", "plucked string playing C3", "pink noise", "hi-hat pattern at 120 bpm"):
        a, b = corpus.synthesize(text, seed=3), corpus.synthesize(text, seed=3)
        assert a.dtype == np.float32 and a.shape == (corpus.CLIP_SAMPLES,) and np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
    # noise (hence plucks and hi-hats) and phase come from the seed; a sweep or a kick pattern is the same clip
    for text in ("pink noise", "sine tone at A4", "plucked string playing C3", "hi-hat pattern at 90 bpm"):
        assert not np.allclose(corpus.synthesize(text, 1), corpus.synthesize(text, 2))
    for text in ("rising sine sweep", "kick drum at 90 bpm"):
        np.testing.assert_array_equal(corpus.synthesize(text, 1), corpus.synthesize(text, 2))


def test_levels_set_the_peak_or_the_noise_rms():
    for level, gain in corpus.LEVEL_GAIN.items():
        prefix = f"{level} " if level else ""
        assert np.abs(corpus.synthesize(prefix + "sawtooth tone at C4")).max() == pytest.approx(gain, rel=1e-5)
        assert corpus.synthesize(prefix + "brown noise").std() == pytest.approx(gain * corpus.NOISE_RMS_PER_GAIN,
                                                                               rel=1e-4)


def test_tone_has_its_fundamental_and_rhythm_its_beats():
    y = corpus.synthesize("sine tone at A4")
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.fft.rfftfreq(len(y), 1 / corpus.SAMPLE_RATE)[spectrum.argmax()]
    assert peak_hz == pytest.approx(440, abs=1)
    starts = (corpus.beat_times(120) * corpus.SAMPLE_RATE).round().astype(int)
    starts = starts[starts + 400 <= corpus.CLIP_SAMPLES]  # a beat in the last 25 ms is cut short
    assert len(starts) == 5
    for seed in range(3):
        for instrument in corpus.INSTRUMENTS:
            y = corpus.synthesize(f"{instrument} at 120 bpm", seed=seed)
            assert np.flatnonzero(y)[0] == starts[0]  # every pattern starts on the beat
            assert all(np.abs(y[s:s + 400]).max() > 0.3 for s in starts)
            assert all(np.abs(y[s - 1600:s - 400]).max() < 0.1 * np.abs(y).max() for s in starts[1:])  # quiet between


@pytest.mark.parametrize("note", ["C3", "A4", "B5", "C6"])
def test_plucks_are_in_tune_and_ring_as_long_low_or_high(note):
    y = corpus.synthesize(f"plucked string playing {note}", seed=1)
    f0 = corpus.midi_to_hz(corpus.name_to_midi(note))
    # Pitch: the strongest spectral peak of the ringing part (1..2 s), refined by parabolic interpolation.
    ring = y[corpus.SAMPLE_RATE:2 * corpus.SAMPLE_RATE] * np.hanning(corpus.SAMPLE_RATE)
    spectrum = np.abs(np.fft.rfft(ring, 8 * corpus.SAMPLE_RATE))
    k = int(spectrum[: int(1.5 * f0 * 8)].argmax())  # below the 2nd harmonic: the fundamental
    a, b, c = np.log(spectrum[k - 1:k + 2])
    peak_hz = (k + 0.5 * (a - c) / (a - 2 * b + c)) / 8
    assert abs(12 * np.log2(peak_hz / f0)) < 0.1
    # Decay: the level from 0.25 s to 1.75 s falls by about 1.5 s / T60 x 60 dB, whatever the note.
    def level_db(t):
        s = int(t * corpus.SAMPLE_RATE)
        return 10 * np.log10(np.mean(y[s:s + 2048] ** 2))
    assert level_db(0.25) - level_db(1.75) == pytest.approx(1.5 / corpus.PLUCK_T60_SECONDS * 60, abs=6)


def test_held_out_combinations_are_never_sampled_but_their_words_are():
    sampler = corpus.CaptionSampler(seed=0)
    drawn = [sampler() for _ in range(5000)]
    assert not any(corpus.is_held_out(c) for c in drawn)
    assert {c.family for c in drawn} == set(corpus.FAMILIES)
    assert corpus.is_held_out(corpus.parse_caption("loud sine tone at E4"))  # held out at every level
    assert not corpus.is_held_out(corpus.parse_caption("brown noise"))  # only "loud brown noise" is held out
    training_words = {w for f in corpus.FAMILIES for c in corpus.training_captions(f) for w in c.text.lower().split()}
    for caption in corpus.held_out_captions():
        assert set(caption.text.lower().split()) <= training_words, caption.text


def test_sampler_draws_families_in_their_weights_and_is_seeded():
    sampler = corpus.CaptionSampler(seed=1)
    drawn = [sampler() for _ in range(5000)]
    families = [c.family for c in drawn]
    total = sum(corpus.FAMILY_WEIGHTS.values())
    for family, weight in corpus.FAMILY_WEIGHTS.items():
        assert abs(families.count(family) / len(drawn) - weight / total) < 0.03, family
    again, other = corpus.CaptionSampler(seed=1), corpus.CaptionSampler(seed=2)
    assert [again() for _ in range(50)] == drawn[:50] != [other() for _ in range(50)]


def test_tokenizer_knows_every_caption_word(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab.save_tokenizer(tmp_path / "tok"))
    unk = tokenizer.convert_tokens_to_ids(vocab.UNK)
    ids = tokenizer(["loud sawtooth minor chord on C#4", "hi-hat pattern at 120 bpm"])["input_ids"]
    assert [len(i) for i in ids] == [6, 5] and unk not in ids[0] + ids[1]
    assert tokenizer("violin tone")["input_ids"][0] == unk
    words = vocab.caption_words()
    assert len(set(tokenizer.convert_tokens_to_ids(words))) == len(words)
