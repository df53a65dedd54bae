"""demo_model.train and its parts: what the DiT is trained on must be what the shipped pretransform encodes."""
import numpy as np
import pytest
import torch

from demo_model import config, corpus, mdct, stream, train
from lab.sat import SamplerSettings, load_model


def error_db(latents: torch.Tensor, expected: torch.Tensor) -> float:
    return 10 * torch.log10((latents - expected).pow(2).sum() / expected.pow(2).sum()).item()


@pytest.fixture(scope="module")
def audio() -> torch.Tensor:
    clips = [corpus.synthesize(p, seed=3) for p in ("soft sine tone at A4", "kick drum at 120 bpm", "pink noise")]
    return torch.from_numpy(np.stack(clips))[:, None]


def test_training_latents_are_the_pretransforms_even_under_bf16_autocast(demo_model, audio):
    """Training encodes its clips with `mdct` inside the step's bf16 autocast region: the latents must still be
    the fp32 encoding of the shipped pretransform (not bit-exact: it adds 64 before each ELU, its weights are fp16)."""
    pretransform = demo_model.model.pretransform
    with torch.no_grad():
        expected = pretransform.encode(audio)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents = mdct.mdct(audio) / pretransform.scale
    assert expected.dtype == torch.float32
    assert latents.dtype == torch.float32 and latents.shape == expected.shape == (3, config.HOP, 128)
    assert error_db(latents, expected) < -50


def test_the_written_autoencoder_is_the_mdct_and_inverts_it():
    x = torch.from_numpy(corpus.synthesize("square tone at A4", seed=1))[None, None]
    autoencoder = mdct.mdct_autoencoder()
    with torch.no_grad():
        latents = autoencoder.encode(x)
        y = autoencoder.decode(latents)
    assert error_db(latents, mdct.mdct(x)) < -80
    inner = slice(config.HOP, -config.HOP)  # the first and last half frame have one frame only
    assert error_db(y[..., inner], x[..., inner]) < -60


def test_clip_stream_resumes_mid_stream():
    inline = stream.ClipStream(5, 3, 0, workers=0)
    first, second = inline.get(), inline.get()
    resumed = stream.ClipStream(5, 3, 1, workers=0).get()
    assert resumed[1] == second[1] and np.array_equal(resumed[0], second[0])
    assert first[1] != second[1] and first[0].shape == (3, 1, corpus.CLIP_SAMPLES)
    assert inline.next_chunk == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pooled_clip_stream_is_the_inline_one_and_fails_instead_of_hanging():
    from concurrent.futures.process import BrokenProcessPool

    inline = stream.ClipStream(5, 2, 0, workers=0)
    inline.get()
    second, third = inline.get(), inline.get()
    with stream.ClipStream(5, 2, 1, workers=1, timeout_s=0.001) as pooled:
        with pytest.raises(RuntimeError, match="no chunk from the clip workers"):
            pooled.get()  # the spawned worker is still starting
        pooled.timeout_s = 240
        got = [pooled.get(), pooled.get()]  # the chunk that timed out is still the next one
        assert [g[1] for g in got] == [second[1], third[1]]
        assert all(np.array_equal(g[0], want[0]) for g, want in zip(got, (second, third)))
        assert pooled.next_chunk == 3
        for process in list(pooled.pool._processes.values()):
            process.kill()
        with pytest.raises(BrokenProcessPool):
            for _ in range(2 * pooled.depth + 1):
                pooled.get()
    assert pooled.pool is None


def test_latent_bank_keeps_the_newest_clips_with_their_captions():
    bank = train.LatentBank(4, (2, 3), "cpu")
    for start in (0, 3):  # 6 clips into 4 slots: clips 0 and 1 are overwritten
        latents = torch.arange(start, start + 3, dtype=torch.float32)[:, None, None].expand(3, 2, 3)
        bank.add(latents, [f"clip {i}" for i in range(start, start + 3)])
    latents, captions = bank.sample(64, torch.Generator().manual_seed(0))
    assert bank.filled == 4 and set(captions) == {"clip 2", "clip 3", "clip 4", "clip 5"}
    assert all(latent[0, 0].item() == int(caption.split()[1]) for latent, caption in zip(latents, captions))


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    peak = 1e-3
    assert train.learning_rate(0, 0.0, peak) < 0.01 * peak
    assert train.learning_rate(train.WARMUP_STEPS, 0.0, peak) == peak
    assert train.learning_rate(10_000, 1.0, peak) == train.learning_rate(10_000, 2.0, peak) == 0.1 * peak


def test_training_t_is_uniform_on_0_1():
    t = train.noise_levels(torch.quasirandom.SobolEngine(1, scramble=True, seed=3), 256)
    assert t.shape == (256,) and 0 <= t.min() and t.max() < 1
    assert torch.histc(t, bins=4, min=0, max=1).tolist() == [64.0] * 4  # Sobol: evenly spread


def test_the_bank_needs_workers(capsys):
    with pytest.raises(SystemExit):
        train.main(["--bank", "32"])
    assert "--bank needs --workers" in capsys.readouterr().err


def test_a_tiny_run_trains_resumes_and_exports_a_loadable_model(tmp_path):
    run, target = tmp_path / "run", tmp_path / "export"
    tiny = ["--out", str(run), "--width", "64", "--depth", "1", "--batch", "2"]
    train.main([*tiny, "--steps", "2"])
    train.main([*tiny, "--steps", "3", "--resume", "--workers", "1", "--bank", "4"])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["chunk"] > 2  # the bank took whole chunks after the inline steps
    moved = [k for k, v in state["ema"].items() if k.endswith("to_out.weight") and v.abs().max() > 0]
    assert moved  # zero-initialised in SAT: the steps changed them
    train.main([*tiny, "--export", str(target)])
    loaded = load_model(model_config=target / "model_config.json", ckpt_path=target / "model.safetensors")
    assert loaded.sampling == SamplerSettings(**config.GENERATION_DEFAULTS)
    transformer = loaded.model.model.model.transformer
    assert transformer.layers[0].self_attn.to_out.weight.shape == (64, 64)
    assert transformer.use_sinusoidal_emb and transformer.rotary_pos_emb is not None  # both kinds of position
    audio, _ = stream.synthesize_chunk(11, 0, 64)
    with torch.no_grad():
        latents = loaded.model.pretransform.encode(torch.from_numpy(audio))
    assert 0.7 < latents.std() < 1.3  # the config's scale brings the DiT's latents to unit std
