"""Judgements from outside the benchmark's own metrics: listeners' scores from a listening study's ratings CSV, and CLAP
score / FAD from a LAION-CLAP checkpoint. Both are optional, and say so in the results when they do not run."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def mos_rows(path: Path, rows) -> dict[str, dict]:
    """Mean score with 95 % CI per row from a listening study's ratings CSV, after the study's own
    post-screening (`lab.study.analysis`): full precision is the study's reference, every other row its preset
    name. Rows the study does not rate are left out."""
    from lab.study.analysis import screened, summarise
    from lab.study.definition import REFERENCE

    _, test_type, _, kept = screened(path)
    by_condition = {result.condition: result for result in summarise(kept, test_type)}
    out = {}
    for row in rows:
        result = by_condition.get(REFERENCE if row == "fp32" else row)
        if result is not None:
            out[row] = {"mos": result.mean, "ci_low": result.ci_low, "ci_high": result.ci_high, "n": result.n,
                        "test_type": test_type}
    return out


def clap_metrics(checkpoint: Path | None, amodel: str, prompts: list[str], clips: dict[str, np.ndarray],
                 sample_rate: int) -> dict:
    """CLAP score (prompt-audio cosine x 100) per row and FAD of each row's CLAP embeddings against full
    precision's. Runs only when LAION-CLAP and its checkpoint are available; otherwise says why not."""
    if checkpoint is None:
        return {"status": "not run: pass --clap PATH to a LAION-CLAP checkpoint (e.g. 630k-audioset-best.pt); "
                          "CLAP weights cannot be downloaded on this machine"}
    if not Path(checkpoint).is_file():
        return {"status": f"not run: CLAP checkpoint {checkpoint} not found"}
    if not clips:
        return {"status": "not run: no generated clips (fidelity section skipped)"}
    try:
        import laion_clap
        import librosa

        model = laion_clap.CLAP_Module(enable_fusion=False, amodel=amodel)
        model.load_ckpt(str(checkpoint))
        text = model.get_text_embedding(prompts, use_tensor=False)  # (N, D), unit norm
    except Exception as error:  # missing package, tokenizer download refused offline, wrong checkpoint
        return {"status": f"not run: LAION-CLAP could not be loaded ({type(error).__name__}: {error})"}
    embeddings = {}
    for row, audio in clips.items():
        mono = librosa.resample(audio.mean(axis=1), orig_sr=sample_rate, target_sr=48000).astype(np.float32)
        embeddings[row] = model.get_audio_embedding_from_data(x=mono, use_tensor=False)  # (N, D)
    return {"status": "ok", "checkpoint": str(checkpoint), "rows": {
        row: {"clap_score": float(100 * np.mean(np.sum(e * text, axis=1))),
              "fad_vs_fp": frechet_distance(embeddings["fp32"], e) if "fp32" in embeddings else None}
        for row, e in embeddings.items()}}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two embedding sets (N, D) (FAD's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))
