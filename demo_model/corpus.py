"""Synthetic captioned audio: the corpus the embedded demo model is trained on.

Every clip is made by plain DSP from its caption, so every attribute the caption names (pitch, chord,
noise colour, tempo, sweep direction, level) can be checked again from the audio alone
(see `demo_model.adherence`). The caption grammar, one family per line (`[soft|loud]` is optional):

    [soft|loud] <sine|square|sawtooth|triangle> tone at <note C3..C6>
    [soft|loud] <waveform> <major|minor> chord on <root C3..B4>
    [soft|loud] plucked string playing <note C3..C6>
    [soft|loud] <white|pink|brown> noise
    [soft|loud] <kick drum|hi-hat pattern> at <60|70|...|180> bpm
    [soft|loud] <rising|falling> sine sweep

Notes use sharps (`C#4`, never `Db4`); tempi move in steps of 10 bpm so that every number is a word the
tokenizer knows. `HELD_OUT` lists captions never drawn for training: the model has seen each of their
words, but never in that combination, so adherence on them measures generalisation.

Clips are mono, `SAMPLE_RATE` Hz, `CLIP_SAMPLES` long, deterministic given (caption, seed). The seed draws
the noise (and so each pluck's burst and hi-hat's hits) and the point of the cycle where each tone starts.
Random phase is a design choice (not an A/B-measured one): with a fixed phase the DiT would have to compute
each frame's phase from its absolute position (a frequency times a position); with a random one it can read
it from the noisy frames, as a denoiser does. The evaluator never looks at phase. Drum patterns, by contrast,
start on the beat at FIRST_BEAT_SECONDS, so a kick pattern is one fixed clip per tempo and level.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy.signal import lfilter

SAMPLE_RATE = 16000
CLIP_SAMPLES = 32768  # 2.048 s: a whole number of the demo model's 256-sample latent frames
CLIP_SECONDS = CLIP_SAMPLES / SAMPLE_RATE

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
WAVEFORMS = ("sine", "square", "sawtooth", "triangle")
QUALITIES = ("major", "minor")
NOISE_COLOURS = ("white", "pink", "brown")
INSTRUMENTS = ("kick drum", "hi-hat pattern")
DIRECTIONS = ("rising", "falling")
LEVELS = ("soft", "loud")
BPMS = tuple(range(60, 181, 10))
FAMILIES = ("tone", "chord", "pluck", "noise", "rhythm", "sweep")

# Linear gain per level: peak amplitude for pitched/percussive clips, 0.35 x gain RMS for noise.
LEVEL_GAIN = {"soft": 0.3, None: 0.6, "loud": 0.95}
NOISE_RMS_PER_GAIN = 0.35
FIRST_BEAT_SECONDS = 0.02  # every pattern starts on the beat, this long after the clip starts
PLUCK_T60_SECONDS = 4.0  # every plucked note, low or high, fades by 60 dB in this time
PLUCK_BRIGHTNESS = 4.0  # the pluck's noise burst is low-passed at this many times its f0
SWEEP_RANGE_HZ = (200.0, 3200.0)
CHORD_INTERVALS = {"major": (0, 4, 7), "minor": (0, 3, 7)}
# Relative weights of the families when sampling training captions.
FAMILY_WEIGHTS = {"tone": 0.25, "chord": 0.15, "pluck": 0.18, "noise": 0.12, "rhythm": 0.22, "sweep": 0.08}


def midi_to_name(midi: int) -> str:
    return f"{PITCH_CLASSES[midi % 12]}{midi // 12 - 1}"


def name_to_midi(name: str) -> int:
    """'A4' -> 69. Raises ValueError for anything that is not <pitch class><octave>."""
    pitch, octave = name[:-1].upper(), name[-1]
    if pitch not in PITCH_CLASSES or not octave.isdigit():
        raise ValueError(f"not a note name: {name!r} (expected e.g. 'A4' or 'C#5', sharps only)")
    return PITCH_CLASSES.index(pitch) + 12 * (int(octave) + 1)


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


NOTES = tuple(midi_to_name(m) for m in range(name_to_midi("C3"), name_to_midi("C6") + 1))
CHORD_ROOTS = tuple(midi_to_name(m) for m in range(name_to_midi("C3"), name_to_midi("B4") + 1))


@dataclasses.dataclass(frozen=True)
class Caption:
    """One caption, parsed. Fields that do not apply to the family are None."""

    family: str
    waveform: str | None = None
    note: str | None = None  # tones, plucks; the root for chords
    quality: str | None = None
    colour: str | None = None
    instrument: str | None = None
    bpm: int | None = None
    direction: str | None = None
    level: str | None = None  # None = normal level

    @property
    def text(self) -> str:
        body = {
            "tone": f"{self.waveform} tone at {self.note}",
            "chord": f"{self.waveform} {self.quality} chord on {self.note}",
            "pluck": f"plucked string playing {self.note}",
            "noise": f"{self.colour} noise",
            "rhythm": f"{self.instrument} at {self.bpm} bpm",
            "sweep": f"{self.direction} sine sweep",
        }[self.family]
        return f"{self.level} {body}" if self.level else body


def parse_caption(text: str) -> Caption:
    """Inverse of `Caption.text`; case and extra spaces are forgiven, anything else raises ValueError."""
    words = text.lower().split()
    level = None
    if words and words[0] in LEVELS:
        level, words = words[0], words[1:]
    body = " ".join(words)

    def fail() -> ValueError:
        return ValueError(f"caption {text!r} does not follow the demo grammar (see demo_model/corpus.py)")

    def note(word: str, allowed: tuple[str, ...]) -> str:
        name = word[:-1].upper() + word[-1]
        if name not in allowed:
            raise fail()
        return name

    if len(words) == 4 and words[1:3] == ["tone", "at"] and words[0] in WAVEFORMS:
        return Caption("tone", waveform=words[0], note=note(words[3], NOTES), level=level)
    if len(words) == 5 and words[2:4] == ["chord", "on"] and words[0] in WAVEFORMS and words[1] in QUALITIES:
        return Caption("chord", waveform=words[0], quality=words[1], note=note(words[4], CHORD_ROOTS), level=level)
    if len(words) == 4 and words[:3] == ["plucked", "string", "playing"]:
        return Caption("pluck", note=note(words[3], NOTES), level=level)
    if len(words) == 2 and words[1] == "noise" and words[0] in NOISE_COLOURS:
        return Caption("noise", colour=words[0], level=level)
    for instrument in INSTRUMENTS:
        prefix = instrument + " at "
        if body.startswith(prefix) and body.endswith(" bpm"):
            bpm = body[len(prefix):-len(" bpm")]
            if not bpm.isdigit() or int(bpm) not in BPMS:
                raise fail()
            return Caption("rhythm", instrument=instrument, bpm=int(bpm), level=level)
    if len(words) == 3 and words[1:] == ["sine", "sweep"] and words[0] in DIRECTIONS:
        return Caption("sweep", direction=words[0], level=level)
    raise fail()


def _family_captions(family: str, level: str | None) -> list[Caption]:
    if family == "tone":
        return [Caption("tone", waveform=w, note=n, level=level) for w, n in itertools.product(WAVEFORMS, NOTES)]
    if family == "chord":
        return [Caption("chord", waveform=w, quality=q, note=r, level=level)
                for w, q, r in itertools.product(WAVEFORMS, QUALITIES, CHORD_ROOTS)]
    if family == "pluck":
        return [Caption("pluck", note=n, level=level) for n in NOTES]
    if family == "noise":
        return [Caption("noise", colour=c, level=level) for c in NOISE_COLOURS]
    if family == "rhythm":
        return [Caption("rhythm", instrument=i, bpm=b, level=level) for i, b in itertools.product(INSTRUMENTS, BPMS)]
    return [Caption("sweep", direction=d, level=level) for d in DIRECTIONS]


def all_captions(family: str | None = None) -> list[Caption]:
    """Every caption of the grammar (all levels), optionally of one family."""
    families = FAMILIES if family is None else (family,)
    return [c for f in families for level in (None, *LEVELS) for c in _family_captions(f, level)]


# Combinations never drawn for training (at any level unless the level is part of the combination).
HELD_OUT_TEXTS = (
    "sine tone at E4", "square tone at A3", "sawtooth tone at C5", "triangle tone at G#4",
    "sine tone at B5", "square tone at F#5", "sawtooth tone at D3", "triangle tone at C6",
    "plucked string playing D#4", "plucked string playing A5", "plucked string playing F3",
    "sawtooth minor chord on D4", "triangle major chord on A3", "square major chord on F4",
    "sine minor chord on G#3",
    "hi-hat pattern at 100 bpm", "kick drum at 140 bpm", "hi-hat pattern at 170 bpm", "kick drum at 80 bpm",
    "loud brown noise", "soft white noise", "soft rising sine sweep",
)
HELD_OUT = frozenset(parse_caption(t) for t in HELD_OUT_TEXTS)


def is_held_out(caption: Caption) -> bool:
    return caption in HELD_OUT or dataclasses.replace(caption, level=None) in HELD_OUT


def training_captions(family: str) -> list[Caption]:
    return [c for c in all_captions(family) if not is_held_out(c)]


def held_out_captions() -> list[Caption]:
    """The held-out combinations, each at the level(s) it is held out at (normal level if any)."""
    return sorted(HELD_OUT, key=lambda c: c.text)


class CaptionSampler:
    """Draws training captions: a family by FAMILY_WEIGHTS, then a caption uniformly within it (never a
    held-out one). Deterministic given `seed` (anything `np.random.default_rng` takes)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.by_family = {f: training_captions(f) for f in FAMILIES}
        weights = np.array([FAMILY_WEIGHTS[f] for f in FAMILIES])
        self.family_p = weights / weights.sum()

    def __call__(self) -> Caption:
        family = FAMILIES[self.rng.choice(len(FAMILIES), p=self.family_p)]
        pool = self.by_family[family]
        return pool[self.rng.integers(len(pool))]


# ---------------------------------------------------------------- synthesis
def _time() -> np.ndarray:
    return np.arange(CLIP_SAMPLES) / SAMPLE_RATE


def harmonic_amplitudes(waveform: str, f0: float) -> list[tuple[int, float]]:
    """(harmonic number, amplitude) pairs below Nyquist: additive synthesis keeps the waveforms alias-free."""
    out = []
    for h in range(1, int(0.47 * SAMPLE_RATE / f0) + 1):
        if waveform == "sine":
            amp = 1.0 if h == 1 else 0.0
        elif waveform == "square":
            amp = 1.0 / h if h % 2 else 0.0
        elif waveform == "sawtooth":
            amp = 1.0 / h
        elif waveform == "triangle":
            amp = (-1.0) ** ((h - 1) // 2) / h**2 if h % 2 else 0.0
        else:
            raise ValueError(f"unknown waveform {waveform!r}; expected one of {WAVEFORMS}")
        if amp:
            out.append((h, amp))
    return out


def _periodic(waveform: str, f0: float, rng: np.random.Generator) -> np.ndarray:
    """The waveform from a random point of its cycle: see the module docstring for why the phase is random."""
    t = _time() + rng.uniform(0, 1 / f0)
    return sum(a * np.sin(2 * np.pi * h * f0 * t) for h, a in harmonic_amplitudes(waveform, f0))


def _fade(x: np.ndarray, fade_in: float = 0.01, fade_out: float = 0.03) -> np.ndarray:
    env = np.ones_like(x)
    n_in, n_out = int(fade_in * SAMPLE_RATE), int(fade_out * SAMPLE_RATE)
    env[:n_in] = np.linspace(0, 1, n_in)
    env[-n_out:] = np.linspace(1, 0, n_out)
    return x * env


def _pluck(f0: float, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong: a noise burst circulating in a delay line through a loss filter, as one IIR filter.

    With three refinements after Jaffe & Smith (1983):
    - the averaging filter's weight S is lowered for high notes and a loop gain set so that every note rings
      for PLUCK_T60_SECONDS (plain Karplus-Strong dies ~40x faster at C6 than at C3: high plucks were silent
      after 0.25 s);
    - a first-order allpass supplies the fractional part of the loop delay, so that high notes are in tune
      (a whole-sample delay is off by up to half a semitone at C6);
    - the burst is low-passed, so that more of the clip's peak-normalised energy is in harmonics that ring.
    """
    period = SAMPLE_RATE / f0
    w = 2 * np.pi * f0 / SAMPLE_RATE
    loss_per_period = 10.0 ** (-3.0 / (PLUCK_T60_SECONDS * f0))  # amplitude kept per trip round the loop
    # |(1 - S) + S e^{-jw}|^2 = 1 - 2 S (1 - S)(1 - cos w): the largest S <= 0.5 that loses no more than asked
    need = (1 - loss_per_period**2) / (2 * (1 - np.cos(w)))
    stretch = 0.5 if need >= 0.25 else 0.5 * (1 - np.sqrt(1 - 4 * need))
    gain = loss_per_period / np.sqrt(1 - 2 * stretch * (1 - stretch) * (1 - np.cos(w)))
    delay = int(period - stretch - 0.1)  # whole samples; the allpass adds the remaining 0.1..1.1
    frac = period - stretch - delay
    c = (1 - frac) / (1 + frac)  # allpass (c + z^-1) / (1 + c z^-1), phase delay ~ frac at low frequencies
    # Y (1 + c z^-1) = X (1 + c z^-1) + gain z^-delay ((1 - S) + S z^-1)(c + z^-1) Y
    a = np.zeros(delay + 3)
    a[:2] = 1, c
    a[delay:delay + 3] -= gain * np.array([(1 - stretch) * c, (1 - stretch) + stretch * c, stretch])
    # The burst, low-passed at PLUCK_BRIGHTNESS x f0 (a soft pick: more of its energy in the harmonics that ring).
    r = np.exp(-np.pi * PLUCK_BRIGHTNESS * f0 / SAMPLE_RATE)
    noise = lfilter([1 - r], [1, -r], np.tile(rng.uniform(-1, 1, delay), 4))[-delay:]  # periodic steady state
    burst = np.zeros(CLIP_SAMPLES)
    burst[:delay] = noise - noise.mean()
    return lfilter([1, c], a, burst)


def _coloured_noise(colour: str, rng: np.random.Generator) -> np.ndarray:
    """White, pink (power ~ 1/f) or brown (~ 1/f^2) Gaussian noise, shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(CLIP_SAMPLES))
    f = np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)
    f[0] = f[1]
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[colour]
    x = np.fft.irfft(spectrum / f**exponent, CLIP_SAMPLES)
    return x - x.mean()


def beat_times(bpm: int) -> np.ndarray:
    """When a pattern's hits start, in seconds: on the beat from FIRST_BEAT_SECONDS."""
    return np.arange(FIRST_BEAT_SECONDS, CLIP_SECONDS, 60.0 / bpm)


def _hit(instrument: str, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.25 * SAMPLE_RATE)) / SAMPLE_RATE
    tail = np.clip((0.25 - t) / 0.1, 0, 1)  # fade the last 100 ms to zero: no click where the hit ends
    if instrument == "kick drum":  # a sine gliding from 150 Hz to 45 Hz, decaying in ~0.1 s
        freq = 45 + 105 * np.exp(-t / 0.03)
        return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * np.exp(-t / 0.07) * tail
    noise = np.diff(rng.standard_normal(len(t) + 1))  # first difference: a high-passed burst
    return noise * np.exp(-t / 0.02) * tail


def _rhythm(instrument: str, bpm: int, rng: np.random.Generator) -> np.ndarray:
    x = np.zeros(CLIP_SAMPLES)
    for start_s in beat_times(bpm):
        hit = _hit(instrument, rng)
        start = int(round(start_s * SAMPLE_RATE))
        n = min(len(hit), CLIP_SAMPLES - start)
        x[start:start + n] += hit[:n]
    return x


def _sweep(direction: str) -> np.ndarray:
    lo, hi = SWEEP_RANGE_HZ
    t = _time()
    ratio = hi / lo if direction == "rising" else lo / hi
    f_start = lo if direction == "rising" else hi
    freq = f_start * ratio ** (t / CLIP_SECONDS)  # exponential: equal time per octave
    return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)


def synthesize(caption: Caption | str, seed: int = 0) -> np.ndarray:
    """The clip for a caption: float32 (CLIP_SAMPLES,), deterministic given (caption, seed)."""
    if isinstance(caption, str):
        caption = parse_caption(caption)
    rng = np.random.default_rng(seed)
    gain = LEVEL_GAIN[caption.level]
    if caption.family == "noise":
        x = _coloured_noise(caption.colour, rng)
        return (x * (NOISE_RMS_PER_GAIN * gain / x.std())).astype(np.float32)
    if caption.family == "tone":
        x = _fade(_periodic(caption.waveform, midi_to_hz(name_to_midi(caption.note)), rng))
    elif caption.family == "chord":
        root = name_to_midi(caption.note)
        x = _fade(sum(_periodic(caption.waveform, midi_to_hz(root + i), rng) for i in CHORD_INTERVALS[caption.quality]))
    elif caption.family == "pluck":
        x = _fade(_pluck(midi_to_hz(name_to_midi(caption.note)), rng), fade_in=0.005)
    elif caption.family == "rhythm":
        x = _rhythm(caption.instrument, caption.bpm, rng)
    else:
        x = _fade(_sweep(caption.direction))
    return (x * (gain / np.abs(x).max())).astype(np.float32)


def training_batch(sampler: CaptionSampler, batch_size: int, seed_rng: np.random.Generator):
    """(audio (batch, 1, CLIP_SAMPLES) float32, captions) for one training step."""
    captions = [sampler() for _ in range(batch_size)]
    audio = np.stack([synthesize(c, int(seed_rng.integers(2**31))) for c in captions])[:, None, :]
    return audio, [c.text for c in captions]
