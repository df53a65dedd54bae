"""Prompt adherence from audio alone: does a clip contain what its demo-grammar caption asks for?

One check per family (the caption is parsed with `demo_model.corpus.parse_caption`):

- tone, pluck: median pYIN f0 (search range C2..C7, whatever the caption says) within +-1 semitone;
- chord: mean constant-Q chroma matched against the 24 major/minor templates of the caption's waveform
  (harmonics included); ok when the quality is right and the root's pitch class is within +-1 semitone
  (octave not judged: chroma folds it);
- noise: slope of the power spectrum in third-octave bands (63 Hz..6.3 kHz) on log-log axes: white ~ 0,
  pink ~ -1, brown ~ -2, nearest wins; and the spectrum must be flat around that slope (no band more
  than `MAX_TONAL_DB` above the fit), so a tone is never called noise;
- rhythm: librosa onsets; tempo = 60 / median inter-onset interval, within 15 % of the asked bpm;
- sweep: f0 track (strongest STFT peak per frame); its slope in octaves/s must have the asked sign and
  exceed `MIN_SWEEP_OCT_PER_S`.

The level word (soft/loud) is measured and reported as `level_ok`, but `ok` judges the family's attribute.
Every clip is also checked for the latent frame-rate buzz (`buzz`): its strongest spectral line sits on a
multiple of the latent frame rate (sample rate / hop = 62.5 Hz), where a latent that repeats frame after
frame puts its energy, and the caption does not ask for that pitch.

    ptq-adherence                       # generate with the demo model and print the table (= python -m demo_model.adherence)
    ptq-adherence --set held-out        # the combinations never seen in training
    ptq-adherence --set ground-truth    # the corpus's own audio: how far the checks can be trusted
    ptq-adherence --prompts assets/calibration_prompts.txt --override '{"cfg_scale": 3}'
    ptq-adherence --set eval --sampler v-ddim dpmpp-3m-sde --cfg 1.5 5   # every sampler x CFG, then a family x setting table
    ptq-adherence --model-config run/model_config.json --ckpt-path run/model.safetensors --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from demo_model import corpus
from demo_model.config import HOP
from lab.resources import read_prompts

if TYPE_CHECKING:  # lab.sat imports torch: the evaluator itself does without
    from lab.sat import SamplerSettings

PITCH_TOLERANCE_SEMITONES = 1.0
BPM_TOLERANCE = 0.15
MAX_TONAL_DB = 12.0
MIN_SWEEP_OCT_PER_S = 0.5
SILENCE_RMS = 1e-4
NOISE_SLOPES = {"white": 0.0, "pink": -1.0, "brown": -2.0}
FRAME_RATE_HZ = corpus.SAMPLE_RATE / HOP  # the demo model's latent frame rate
BUZZ_TOLERANCE_HZ = 0.5  # about the frequency resolution of a 2 s clip
MIN_LINE_DB = 15.0


def _mono(audio, sr: int) -> np.ndarray:
    """Any (n,), (channels, n) or (batch, channels, n) array/tensor -> float64 mono at `sr`."""
    if hasattr(audio, "detach"):
        audio = audio.detach().float().cpu().numpy()
    y = np.asarray(audio, dtype=np.float64)
    while y.ndim > 1:
        y = y.mean(axis=0)
    if not np.all(np.isfinite(y)):
        raise ValueError("audio contains NaN or inf")
    return y


def _semitones(f: float, target: float) -> float:
    return 12.0 * math.log2(f / target)


def check_pitch(y: np.ndarray, sr: int, note: str) -> dict:
    import librosa

    target = corpus.midi_to_hz(corpus.name_to_midi(note))
    f0, voiced, _ = librosa.pyin(y.astype(np.float32), fmin=librosa.note_to_hz("C2"), fmax=librosa.note_to_hz("C7"),
                                 sr=sr, frame_length=2048)
    f0 = f0[voiced & np.isfinite(f0)]
    if len(f0) == 0:
        return {"ok": False, "f0_hz": None, "error_semitones": None, "voiced_fraction": 0.0}
    f = float(np.median(f0))
    error = _semitones(f, target)
    return {"ok": abs(error) <= PITCH_TOLERANCE_SEMITONES, "f0_hz": round(f, 2), "error_semitones": round(error, 2),
            "voiced_fraction": round(float(voiced.mean()), 2)}


def chord_template(waveform: str, root_pc: int, quality: str) -> np.ndarray:
    """Expected chroma (12,) of a chord played with the corpus's waveform: every chord tone's harmonics."""
    template = np.zeros(12)
    for interval in corpus.CHORD_INTERVALS[quality]:
        for h, amp in corpus.harmonic_amplitudes(waveform, f0=corpus.SAMPLE_RATE / 64):  # first 30 harmonics
            template[(root_pc + interval + round(12 * math.log2(h))) % 12] += abs(amp)
    return template / np.linalg.norm(template)


def check_chord(y: np.ndarray, sr: int, waveform: str, root: str, quality: str) -> dict:
    import librosa

    chroma = librosa.feature.chroma_cqt(y=y, sr=sr, fmin=librosa.note_to_hz("C2"), n_octaves=6).mean(axis=1)
    chroma = chroma / (np.linalg.norm(chroma) + 1e-12)
    candidates = [(pc, q) for q in corpus.QUALITIES for pc in range(12)]
    scores = [float(chroma @ chord_template(waveform, pc, q)) for pc, q in candidates]
    best_pc, best_quality = candidates[int(np.argmax(scores))]
    asked_pc = corpus.name_to_midi(root) % 12
    root_error = (best_pc - asked_pc + 6) % 12 - 6  # signed pitch-class distance in -6..5
    return {"ok": best_quality == quality and abs(root_error) <= PITCH_TOLERANCE_SEMITONES,
            "detected": f"{corpus.PITCH_CLASSES[best_pc]} {best_quality}", "root_error_semitones": root_error,
            "match": round(max(scores), 3)}


def noise_slope(y: np.ndarray, sr: int) -> tuple[float, float]:
    """(slope of log10 power vs log10 frequency over third-octave bands, largest band excess over the fit in dB)."""
    from scipy.signal import welch

    f, power = welch(y, fs=sr, nperseg=2048)
    centres = 1000.0 * 2.0 ** (np.arange(-12, 9) / 3)  # 63 Hz .. 6.3 kHz
    centres = centres[centres * 2 ** (1 / 6) < sr / 2]
    band = np.array([power[(f >= c * 2 ** (-1 / 6)) & (f < c * 2 ** (1 / 6))].mean() for c in centres])
    logf, logp = np.log10(centres), np.log10(band + 1e-20)
    slope, intercept = np.polyfit(logf, logp, 1)
    excess_db = 10 * (logp - (slope * logf + intercept))
    # A spectral line shows in the fine (Welch-bin) spectrum, not only in band means: compare bins to the fit.
    in_range = (f > centres[0]) & (f < centres[-1])
    fine_excess = 10 * (np.log10(power[in_range] + 1e-20) - (slope * np.log10(f[in_range]) + intercept))
    return float(slope), float(max(excess_db.max(), np.percentile(fine_excess, 99.5)))


def check_noise(y: np.ndarray, sr: int, colour: str) -> dict:
    import librosa

    slope, tonal_db = noise_slope(y, sr)
    detected = min(NOISE_SLOPES, key=lambda c: abs(NOISE_SLOPES[c] - slope))
    return {"ok": detected == colour and tonal_db <= MAX_TONAL_DB, "detected": detected, "slope": round(slope, 2),
            "tonal_excess_db": round(tonal_db, 1),
            "flatness": round(float(librosa.feature.spectral_flatness(y=y).mean()), 3)}


def check_rhythm(y: np.ndarray, sr: int, bpm: int) -> dict:
    import librosa

    onsets = librosa.onset.onset_detect(y=y, sr=sr, units="time", hop_length=128)
    if len(onsets) < 2:
        return {"ok": False, "bpm": None, "onsets": len(onsets), "error": None}
    measured = 60.0 / float(np.median(np.diff(onsets)))
    error = measured / bpm - 1
    return {"ok": abs(error) <= BPM_TOLERANCE, "bpm": round(measured, 1), "onsets": len(onsets),
            "error": round(error, 3)}


def check_sweep(y: np.ndarray, sr: int, direction: str) -> dict:
    import librosa

    spectrum = np.abs(librosa.stft(y, n_fft=1024, hop_length=256))
    freqs = librosa.fft_frequencies(sr=sr, n_fft=1024)
    energy = spectrum.sum(axis=0)
    frames = np.flatnonzero(energy > 0.1 * energy.max())
    peak_hz = freqs[spectrum[:, frames].argmax(axis=0)]
    keep = peak_hz > 0
    if keep.sum() < 4:
        return {"ok": False, "octaves_per_s": None}
    seconds = frames[keep] * 256 / sr
    slope = float(np.polyfit(seconds, np.log2(peak_hz[keep]), 1)[0])
    detected = "rising" if slope > MIN_SWEEP_OCT_PER_S else "falling" if slope < -MIN_SWEEP_OCT_PER_S else "flat"
    return {"ok": detected == direction, "detected": detected, "octaves_per_s": round(slope, 2)}


def strongest_line(y: np.ndarray, sr: int, frame_rate: float) -> tuple[float, float]:
    """(frequency, prominence in dB) of the clip's strongest spectral peak above 20 Hz: Hann window, 4x zero
    padding, parabolic interpolation of the log power (a fraction of a bin); prominence over the median power
    within half a frame rate either side."""
    n = 4 * len(y)
    power = np.abs(np.fft.rfft(y * np.hanning(len(y)), n)) ** 2
    lowest = math.ceil(20 * n / sr)
    k = lowest + int(np.argmax(power[lowest:-1]))
    left, centre, right = np.log(power[k - 1:k + 2] + 1e-30)
    curvature = left - 2 * centre + right
    shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
    half_width = int(frame_rate / 2 * n / sr)
    floor = np.median(power[max(k - half_width, 0):k + half_width + 1])
    return (k + shift) * sr / n, float(10 * np.log10(power[k] / (floor + 1e-30)))


def asked_pitches_hz(caption: corpus.Caption) -> list[float]:
    """Fundamentals the caption asks for: a tone's or pluck's note, a chord's three notes; none otherwise."""
    if caption.family in ("tone", "pluck"):
        return [corpus.midi_to_hz(corpus.name_to_midi(caption.note))]
    if caption.family == "chord":
        root = corpus.name_to_midi(caption.note)
        return [corpus.midi_to_hz(root + interval) for interval in corpus.CHORD_INTERVALS[caption.quality]]
    return []


def check_buzz(y: np.ndarray, sr: int, caption: corpus.Caption, frame_rate: float = FRAME_RATE_HZ) -> dict:
    """Is the strongest spectral peak a line on a multiple of the latent frame rate, at no pitch the caption asks
    for (+-1 semitone)? A latent that is the same in every frame decodes to a waveform that repeats every hop:
    lines at exactly those multiples, a buzz pitched at the frame rate. A line stands `MIN_LINE_DB` over its
    neighbourhood; the strongest peak of noise does not (at most 13.2 dB on the evaluation sets' noise)."""
    peak, prominence = strongest_line(y, sr, frame_rate)
    harmonic = round(peak / frame_rate)
    on_multiple = harmonic >= 1 and abs(peak - harmonic * frame_rate) <= BUZZ_TOLERANCE_HZ
    asked = any(abs(_semitones(peak, f)) <= PITCH_TOLERANCE_SEMITONES for f in asked_pitches_hz(caption))
    return {"buzz": bool(on_multiple and prominence >= MIN_LINE_DB and not asked), "peak_hz": round(peak, 2),
            "peak_db": round(prominence, 1)}


def measured_level(y: np.ndarray, family: str) -> str | None:
    """The level word whose gain is nearest (in dB) to the clip's peak (or its RMS, for noise)."""
    gain = y.std() / corpus.NOISE_RMS_PER_GAIN if family == "noise" else np.abs(y).max()
    return min(corpus.LEVEL_GAIN, key=lambda level: abs(math.log(corpus.LEVEL_GAIN[level] / max(gain, 1e-9))))


def evaluate(prompt: str, audio, sr: int, frame_rate: float = FRAME_RATE_HZ) -> dict:
    """Check one clip against its caption: {"prompt", "family", "ok", "level_ok", "buzz", ...family details}.
    `frame_rate`: the latent frame rate of the model that made the clip (sample rate / hop)."""
    caption = corpus.parse_caption(prompt)
    y = _mono(audio, sr)
    result = {"prompt": prompt, "family": caption.family}
    if np.sqrt(np.mean(y**2)) < SILENCE_RMS:
        return {**result, "ok": False, "level_ok": False, "buzz": False, "silent": True}
    if caption.family in ("tone", "pluck"):
        details = check_pitch(y, sr, caption.note)
    elif caption.family == "chord":
        details = check_chord(y, sr, caption.waveform, caption.note, caption.quality)
    elif caption.family == "noise":
        details = check_noise(y, sr, caption.colour)
    elif caption.family == "rhythm":
        details = check_rhythm(y, sr, caption.bpm)
    else:
        details = check_sweep(y, sr, caption.direction)
    level = measured_level(y, caption.family)
    return {**result, **details, "level": level, "level_ok": level == caption.level,
            **check_buzz(y, sr, caption, frame_rate)}


def evaluate_many(pairs: Iterable[tuple[str, object]], sr: int, frame_rate: float = FRAME_RATE_HZ) -> list[dict]:
    """`evaluate` over (prompt, audio) pairs, e.g. the FP model's clips or a quantized recipe's."""
    return [evaluate(prompt, audio, sr, frame_rate) for prompt, audio in pairs]


def accuracy_by_family(results: list[dict]) -> dict[str, dict]:
    """{family: {"n", "ok", "accuracy", "level_accuracy", "buzz"}} plus "all", families in corpus order."""
    table = {}
    for family in (*corpus.FAMILIES, "all"):
        rows = [r for r in results if family in ("all", r["family"])]
        if rows:
            ok = sum(r["ok"] for r in rows)
            table[family] = {"n": len(rows), "ok": ok, "accuracy": ok / len(rows),
                             "level_accuracy": sum(r["level_ok"] for r in rows) / len(rows),
                             "buzz": sum(r["buzz"] for r in rows)}
    return table


def format_table(results: list[dict]) -> str:
    lines = [f"{'family':<8} {'n':>4} {'ok':>4} {'accuracy':>9} {'level':>6} {'buzz':>5}"]
    for family, row in accuracy_by_family(results).items():
        lines.append(f"{family:<8} {row['n']:>4} {row['ok']:>4} {row['accuracy']:>8.0%} {row['level_accuracy']:>6.0%} "
                     f"{row['buzz']:>5}")
    return "\n".join(lines)


def sweep_table(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per family (then all, then buzzing clips), one column per sampler setting; cells ok / n."""
    tables = {label: accuracy_by_family(rows) for label, rows in results.items()}
    families = [f for f in (*corpus.FAMILIES, "all") if any(f in table for table in tables.values())]
    lines = ["| family | " + " | ".join(tables) + " |", "|---|" + "---|" * len(tables)]
    for family in families:
        cells = [f"{t[family]['ok']} / {t[family]['n']}" if family in t else "" for t in tables.values()]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines.append("| buzzing clips | " + " | ".join(str(t["all"]["buzz"]) for t in tables.values()) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- prompt sets
# family: (captions drawn, clips per caption). Noise and sweeps have only 9 and 6 captions in all, so
# fewer captions are drawn (leaving some for calibration) and each is generated twice (seeds differ).
EVAL_DRAWS = {"tone": (12, 1), "chord": (6, 1), "pluck": (10, 1), "noise": (5, 2), "rhythm": (12, 1), "sweep": (3, 2)}
EVAL_SEED = 2026


def evaluation_prompts() -> list[str]:
    """The fixed evaluation set: training-grammar captions (no held-out ones), drawn once with EVAL_SEED.

    Never used to train or to choose the sampler settings (those were chosen on the calibration prompts)."""
    rng = np.random.default_rng(EVAL_SEED)
    prompts = []
    for family, (count, repeats) in EVAL_DRAWS.items():
        pool = corpus.training_captions(family)
        prompts += [pool[i].text for i in sorted(rng.choice(len(pool), size=count, replace=False))] * repeats
    return prompts


def held_out_prompts() -> list[str]:
    return [c.text for c in corpus.held_out_captions()]


def generate(model, prompts: list[str], *, seed: int, settings: SamplerSettings,
             sample_size: int = corpus.CLIP_SAMPLES) -> list[np.ndarray]:
    """One clip per prompt (mono, on the CPU), each its own `lab.sat.sample` call: prompt i uses seed + i.

    One call per prompt, not one batch: a batch draws its noise from one seed, so the figures measured
    with seed + i would not be reproduced."""
    from lab.sat import sample

    return [sample(model, [prompt], settings=settings, sample_size=sample_size, seed=seed + i)[0, 0].float().cpu().numpy()
            for i, prompt in enumerate(prompts)]


def parse_override(text: str) -> dict:
    """The sampler settings that `--override` (a JSON object) changes; ValueError says what is wrong."""
    from lab.sat import SamplerSettings

    try:
        changes = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--override is not valid JSON ({err}): give e.g. '{{\"cfg_scale\": 3}}'") from None
    if not isinstance(changes, dict):
        raise ValueError(f"--override must be a JSON object, e.g. '{{\"cfg_scale\": 3}}', not {text!r}")
    known = [field.name for field in dataclasses.fields(SamplerSettings)]
    if unknown := sorted(set(changes) - set(known)):
        raise ValueError(f"--override: unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(known)}")
    return changes


def sweep_changes(samplers: list[str] | None, cfg_scales: list[float] | None, override: dict) -> list[dict]:
    """The sampler-setting changes of every sampler x CFG scale (None: generation.json's), each with `override`;
    ValueError for a sampler the app does not offer."""
    from lab.generation import SAMPLERS

    if unknown := sorted(set(samplers or ()) - set(SAMPLERS)):
        raise ValueError(f"--sampler: unknown {', '.join(unknown)}; the samplers are {', '.join(SAMPLERS)}")
    return [{**override, "sampler_type": sampler, "cfg_scale": cfg}
            for sampler in samplers or [override.get("sampler_type")] for cfg in cfg_scales or [override.get("cfg_scale")]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptq-adherence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("eval", "held-out", "both", "ground-truth"), default="both",
                        help="prompt set (default both); ground-truth checks the corpus's own audio (no model)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="one prompt per line (blank and # lines skipped) instead of the eval/held-out sets")
    parser.add_argument("--model-config", help="a model's model_config.json (default: the embedded demo model)")
    parser.add_argument("--ckpt-path", help="its checkpoint (.safetensors or .ckpt), with --model-config")
    parser.add_argument("--seed", type=int, default=1000, help="clip i uses seed + i (default 1000)")
    parser.add_argument("--override", default="{}",
                        help='JSON object overriding generation.json, e.g. \'{"cfg_scale": 3, "steps": 20}\'')
    parser.add_argument("--sampler", nargs="+", metavar="NAME",
                        help="sampler(s) to sweep, e.g. v-ddim dpmpp-3m-sde (default: generation.json's); the "
                             "noise schedule is generation.json's (or --override's) for every one")
    parser.add_argument("--cfg", nargs="+", type=float, metavar="SCALE",
                        help="CFG scale(s) to sweep (default: generation.json's); every sampler x every scale")
    parser.add_argument("--json", metavar="FILE", help="write the per-clip results to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompts:
        try:
            sets = {"file": read_prompts(args.prompts)}
            for prompt in sets["file"]:
                corpus.parse_caption(prompt)  # before any clip is made
        except ValueError as err:
            parser.error(f"{args.prompts}: {err}")
        if not sets["file"]:
            parser.error(f"{args.prompts} has no prompts")
    else:
        sets = {"eval": evaluation_prompts(), "held-out": held_out_prompts()}
        if args.set in sets:
            sets = {args.set: sets[args.set]}
    loaded = None
    if args.set == "ground-truth":
        if args.sampler or args.cfg:
            parser.error("--sampler and --cfg need a model: ground-truth checks the corpus's own audio")
        runs = {"corpus": None}
    else:
        from lab.sat import ModelLoadError, load_model

        try:
            changes = sweep_changes(args.sampler, args.cfg, parse_override(args.override))  # before the model loads
            loaded = load_model(model_config=args.model_config, ckpt_path=args.ckpt_path)
        except (ValueError, ModelLoadError) as err:
            parser.error(str(err))
        settings = [loaded.sampling.replace(**change) for change in changes]  # generation.json, then the changes
        runs = {f"{s.sampler_type} CFG {s.cfg_scale:g}": s for s in settings}
        print(f"{loaded.model_id}: {'; '.join(str(s) for s in settings)}")
    all_results = {name: [] for name in sets}
    by_run = {name: {} for name in sets}
    for label, settings in runs.items():
        for name, prompts in sets.items():
            started = time.time()
            if loaded is None:
                clips = [corpus.synthesize(p, seed=args.seed + i) for i, p in enumerate(prompts)]
                sr, frame_rate = corpus.SAMPLE_RATE, FRAME_RATE_HZ
            else:
                clips = generate(loaded.model, prompts, seed=args.seed, settings=settings,
                                 sample_size=loaded.sample_size)
                # one DiT token per hop: a latent that repeats token after token repeats at this rate
                sr, frame_rate = loaded.sample_rate, loaded.sample_rate / int(loaded.model.min_input_length)
            results = evaluate_many(zip(prompts, clips), sr, frame_rate)
            if settings is not None:
                results = [{**r, "sampler_type": settings.sampler_type, "cfg_scale": settings.cfg_scale}
                           for r in results]
            by_run[name][label] = results
            all_results[name] += results
            print(f"\n== {name}, {label}: {len(prompts)} prompts, {time.time() - started:.0f} s")
            print(format_table(results))
    if len(runs) > 1:
        for name, results in by_run.items():
            print(f"\n{name}:\n\n{sweep_table(results)}")
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=1, default=str))


if __name__ == "__main__":
    main()
