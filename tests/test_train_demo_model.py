"""scripts/train_demo_model.py: what the DiT is trained on must be what the shipped pretransform encodes."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_demo_model as train  # noqa: E402

from lab import corpus  # noqa: E402
from lab.models import load_model  # noqa: E402


def error_db(latents: torch.Tensor, expected: torch.Tensor) -> float:
    """Not bit-exact: the autoencoder adds 64 before each ELU, and the shipped weights are fp16."""
    return 10 * torch.log10((latents - expected).pow(2).sum() / expected.pow(2).sum()).item()


def test_training_latents_are_the_pretransforms_even_under_bf16_autocast():
    """The models shipped before 2026-11-30 were trained on latents encoded under bf16 autocast: ~99 % zeros."""
    pretransform = load_model().model.pretransform
    audio = torch.from_numpy(np.stack([corpus.synthesize(p, seed=3) for p in
                                       ("soft sine tone at A4", "kick drum at 120 bpm", "pink noise")]))[:, None]
    with torch.no_grad():
        expected = pretransform.encode(audio)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents = train.mdct(audio) / pretransform.scale
            old = pretransform.encode(audio)  # the old training path: what the bug looked like
    assert latents.dtype == torch.float32 and latents.shape == expected.shape
    assert error_db(latents, expected) < -50
    assert (old == 0).float().mean() > 0.9


def test_clip_stream_is_the_same_with_or_without_workers_and_resumes_mid_stream():
    inline, pooled = train.ClipStream(5, 3, 0, workers=0), train.ClipStream(5, 3, 1, workers=2)
    try:
        first, second = inline.get(), inline.get()
        resumed = pooled.get()
        assert resumed[1] == second[1] and np.array_equal(resumed[0], second[0])
        assert first[1] != second[1] and first[0].shape == (3, 1, corpus.CLIP_SAMPLES)
        assert (inline.next_chunk, pooled.next_chunk) == (2, 2)
    finally:
        pooled.close()


def test_clip_stream_workers_make_clips_of_the_asked_families_only():
    stream = train.ClipStream(5, 4, 0, workers=1, families=("rhythm",))
    try:
        _, captions = stream.get()
        assert all(corpus.parse_caption(c).family == "rhythm" for c in captions)
    finally:
        stream.close()


def test_noise_levels_move_the_asked_fraction_of_a_batch_near_pure_noise():
    plain = train.noise_levels(torch.quasirandom.SobolEngine(1, scramble=True, seed=3), 16)
    mixed = train.noise_levels(torch.quasirandom.SobolEngine(1, scramble=True, seed=3), 16, 0.5)
    assert (plain < train.HIGH_T).sum() > 8  # U(0, 1): most below
    assert (mixed[:8] >= train.HIGH_T).all() and torch.equal(mixed[8:], plain[8:])
    assert torch.allclose(mixed[:8], train.HIGH_T + (1 - train.HIGH_T) * plain[:8])


def test_latent_bank_keeps_the_newest_clips_with_their_captions():
    bank = train.LatentBank(4, (2, 3), "cpu")
    for start in (0, 3):  # 6 clips into 4 slots: clips 0 and 1 are overwritten
        latents = torch.arange(start, start + 3, dtype=torch.float32)[:, None, None].expand(3, 2, 3)
        bank.add(latents, [f"clip {i}" for i in range(start, start + 3)])
    latents, captions = bank.sample(64, torch.Generator().manual_seed(0))
    assert bank.filled == 4 and set(captions) == {"clip 2", "clip 3", "clip 4", "clip 5"}
    assert all(latent[0, 0].item() == int(caption.split()[1]) for latent, caption in zip(latents, captions))


def test_clip_weights_count_relative_error_and_cap_near_silent_clips():
    energies = torch.tensor([4.0, 1.0, 0.25, 1e-4])  # a loud tone ... a nearly silent clip
    latents = energies.sqrt()[:, None, None] * torch.ones(4, 3, 5)
    weights = train.clip_weights(latents)
    assert torch.allclose(weights[:3] * energies[:3], torch.ones(3))  # weight x energy: the same for each
    assert weights[3] == 1 / train.ENERGY_FLOOR


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    peak = 1e-3
    assert train.learning_rate(0, 0.0, peak) < 0.01 * peak
    assert train.learning_rate(train.WARMUP_STEPS, 0.0, peak) == peak
    assert train.learning_rate(10_000, 1.0, peak) == train.learning_rate(10_000, 2.0, peak) == 0.1 * peak


def test_a_tiny_run_trains_resumes_and_exports_a_loadable_model(tmp_path, monkeypatch):
    run, target = tmp_path / "run", tmp_path / "export"
    tiny = ["--out", str(run), "--width", "64", "--depth", "1", "--batch", "2", "--positions", "rope+sinusoid",
            "--position-scale", "0.75", "--loss-weighting", "relative"]
    for extra in (["--steps", "2"], ["--steps", "3", "--resume", "--workers", "1", "--bank", "4",
                                     "--families", "rhythm", "noise", "--high-t-fraction", "0.5"],
                  ["--export", str(target)]):
        monkeypatch.setattr(sys, "argv", ["train_demo_model.py", *tiny, *extra])
        train.main()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["chunk"] > 2  # the bank took whole chunks after the inline steps
    scale = "model.model.transformer.pos_emb.scale"
    assert state["model"][scale].item() == state["ema"][scale].item() == 0.75  # held (SAT: learnt, init 64^-0.5)
    moved = [k for k, v in state["ema"].items() if k.endswith("to_out.weight") and v.abs().max() > 0]
    assert moved  # zero-initialised in SAT: the steps changed them
    loaded = load_model(model_config=target / "model_config.json", ckpt_path=target / "model.safetensors")
    transformer = loaded.model.model.model.transformer
    assert transformer.layers[0].self_attn.to_out.weight.shape == (64, 64)
    assert transformer.use_sinusoidal_emb and transformer.rotary_pos_emb is not None  # both kinds of position
    audio, _ = corpus.training_batch(corpus.CaptionSampler(seed=11), 64, np.random.default_rng(11))
    with torch.no_grad():
        latents = loaded.model.pretransform.encode(torch.from_numpy(audio))
    assert 0.7 < latents.std() < 1.3  # the config's scale brings the DiT's latents to unit std
