"""A headphone check before rating (ITU-T P.808 asks crowd raters to wear headphones; Milne et al. 2021,
"An online headphone screening test based on dichotic pitch").

Huggins pitch: white noise, the same in both ears except a narrow band (±6 % around a pitch) whose phase is
inverted in one ear. Over headphones the brain hears a faint tone in that noise; over loudspeakers the two
channels mix in the air and the tone disappears. Each trial plays three noises, one with the tone; the
rater says which. Six trials, pass with at least five right (chance of passing by guessing: 1.8 %).

The other two noises are not identical in both ears either: every frequency of the right channel is turned
by the same small phase angle (random sign per frequency), a broadband decorrelation with no pitch, sized so
that the L-R difference carries exactly the target's share of the energy. That stops only the crudest
script (the interval whose channels differ, or differ most): the target's L-R is narrowband and the others'
broadband, so its smaller peaks, fewer zero crossings or spectrum still give it away. The check screens out
loudspeakers, not scripts, as the blinding cannot stop a script that analyses the study's clips.

Stimuli are generated here (numpy), deterministic per (study secret, rater): a reload gives the same trials.
The answers stay on the server: `score_headphone_check` recomputes them; a rater takes the check once.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lab.study.blinding import digest, wav_bytes
from lab.study.manifest import Manifest
from lab.study.raters import set_field

TRIALS = 6
PASS_MARK = 5
INTERVALS = 3
SAMPLE_RATE = 22050
SECONDS = 1.0
BANDWIDTH = 0.06  # half-width of the phase-inverted band, relative to its centre (Milne et al.)
PITCHES_HZ = (500.0, 600.0, 700.0, 800.0)
LEVEL_RMS = 0.05  # about -26 dBFS: comfortable, far from clipping
RAMP_S = 0.02
QUESTION = "Which of the three noises has a faint tone in it? Answer 1, 2 or 3."
ALREADY_TAKEN = "You have already taken the headphone check."


@dataclass(frozen=True)
class HeadphoneTrial:
    index: int
    intervals: tuple[bytes, ...]  # stereo WAV bytes, in playing order
    question: str = QUESTION


@dataclass(frozen=True)
class HeadphoneCheck:
    trials: tuple[HeadphoneTrial, ...]


@dataclass(frozen=True)
class HeadphoneResult:
    passed: bool
    correct: int
    total: int


def headphone_check(manifest: Manifest, rater_id: str) -> HeadphoneCheck:
    """The rater's six trials (the answers are not in them)."""
    secret = manifest.secret()
    return HeadphoneCheck(tuple(HeadphoneTrial(index, tuple(_intervals(secret, rater_id, index)))
                                for index in range(TRIALS)))


def headphone_interval(manifest: Manifest, rater_id: str, trial: int, interval: int) -> bytes:
    """One sound of a rater's check (what `headphone_check` holds at trials[trial].intervals[interval]), made
    from its own trial alone: serving one interval needs three syntheses, not the whole check's eighteen."""
    return _intervals(manifest.secret(), rater_id, trial)[interval]


def score_headphone_check(manifest: Manifest, rater_id: str, answers: Sequence[str | int]) -> HeadphoneResult:
    """Score the answers (1-based interval numbers), record the result with the rater, once."""
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence) or len(answers) != TRIALS:
        raise ValueError(f"Answer all {TRIALS} questions of the headphone check (1, 2 or 3 each).")
    chosen = []
    for answer in answers:
        text = str(answer).strip()
        if isinstance(answer, bool) or text not in {str(k) for k in range(1, INTERVALS + 1)}:
            raise ValueError(f"Answer each headphone question with 1, 2 or 3 (got {str(answer)[:20]!r}).")
        chosen.append(int(text) - 1)
    secret = manifest.secret()
    correct = sum(choice == _target(secret, rater_id, index) for index, choice in enumerate(chosen))
    result = HeadphoneResult(passed=correct >= PASS_MARK, correct=correct, total=TRIALS)
    set_field(manifest.study_dir, rater_id, "headphone_check", dataclasses.asdict(result), once=ALREADY_TAKEN)
    return result


def _target(secret: bytes, rater_id: str, index: int) -> int:
    """Which interval (0-based) of a trial holds the tone."""
    return digest(secret, "headphones-target", rater_id, index)[0] % INTERVALS


def _intervals(secret: bytes, rater_id: str, index: int) -> list[bytes]:
    seed = int.from_bytes(digest(secret, "headphones-noise", rater_id, index)[:8], "big")
    rng = np.random.default_rng(seed)
    pitch = PITCHES_HZ[int(rng.integers(len(PITCHES_HZ)))]
    target = _target(secret, rater_id, index)
    return [wav_bytes(huggins_noise(rng, pitch, huggins=interval == target), SAMPLE_RATE, b"")
            for interval in range(INTERVALS)]


def huggins_noise(rng: np.random.Generator, pitch: float, *, huggins: bool) -> np.ndarray:
    """(2, samples) white noise whose right channel differs from the left as much as a Huggins band at `pitch`
    would make it: with `huggins`, the band pitch ± 6 % phase-inverted (the tone); without, every frequency
    turned by a small angle of random sign (no tone, the same L-R energy share)."""
    samples = int(SAMPLE_RATE * SECONDS)
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    frequencies = np.fft.rfftfreq(samples, 1 / SAMPLE_RATE)
    band = np.abs(frequencies - pitch) <= BANDWIDTH * pitch
    right = spectrum.copy()
    if huggins:
        right[band] *= -1
    else:  # |1 - e^(i·angle)|² = 4·sin²(angle/2) = 4·band share, the L-R energy the band inversion gives
        power = np.abs(spectrum) ** 2
        angle = 2 * np.arcsin(np.sqrt(np.sum(power[band]) / np.sum(power[1:-1])))
        signs = rng.choice((-1.0, 1.0), size=len(spectrum))
        signs[[0, -1]] = 0.0  # DC and Nyquist stay real
        right *= np.exp(1j * angle * signs)
    stereo = np.stack([np.fft.irfft(spectrum, samples), np.fft.irfft(right, samples)])
    stereo *= LEVEL_RMS / np.sqrt(np.mean(stereo[0] ** 2))
    ramp = np.minimum(1.0, np.minimum(np.arange(samples), np.arange(samples)[::-1]) / (RAMP_S * SAMPLE_RATE))
    return (stereo * ramp).astype(np.float32)
