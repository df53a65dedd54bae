"""The shipped demo model loads through stable-audio-tools' own path and generates real audio."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from demo_model import corpus
from lab.resources import EMBEDDED_DIR
from lab.sat import SamplerSettings, load_model, sample


def test_shipped_files_are_complete_and_small():
    names = {p.name for p in EMBEDDED_DIR.iterdir()}
    assert {"model_config.json", "model.safetensors", "generation.json", "tokenizer"} <= names
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 2**20
    config = json.loads((EMBEDDED_DIR / "model_config.json").read_text())
    assert config["model_type"] == "diffusion_cond"
    assert config["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] == "tokenizer"  # relative
    defaults = json.loads((EMBEDDED_DIR / "generation.json").read_text())
    assert {"steps", "cfg_scale", "sampler_type", "sigma_min", "sigma_max", "seconds"} <= set(defaults)


def test_demo_model_generates_finite_non_silent_audio(demo_model):
    from stable_audio_tools.models.dit import DiffusionTransformer

    assert demo_model.model_id == "embedded:demo_model"
    assert (demo_model.sample_rate, demo_model.sample_size) == (corpus.SAMPLE_RATE, corpus.CLIP_SAMPLES)
    assert isinstance(demo_model.model.model.model, DiffusionTransformer)
    defaults = json.loads((EMBEDDED_DIR / "generation.json").read_text())
    assert demo_model.sampling == SamplerSettings(**{k: v for k, v in defaults.items() if k in SamplerSettings.__dataclass_fields__})
    audio = sample(demo_model.model, ["sine tone at A4"], settings=demo_model.sampling.replace(steps=8),
                   sample_size=demo_model.sample_size, seed=0)
    y = audio[0, 0].numpy()
    assert audio.shape == (1, 1, corpus.CLIP_SAMPLES) and np.isfinite(y).all()
    assert 0.01 < y.std() < 10


def test_generation_json_says_what_the_model_is_validated_for_and_how_to_prompt_it(demo_model):
    """The app offers generation.json's validated samplers and CFG range, and its example prompts: its defaults
    must lie inside them, and the examples must be one caption of the grammar per family, every word known."""
    from lab.generation import SAMPLERS
    from lab.sat import unknown_words

    guide, defaults = demo_model.guide, demo_model.sampling
    assert set(guide.samplers) <= set(SAMPLERS) and {"v-ddim", "k-dpm-2"} <= set(guide.samplers)
    assert guide.refusal(defaults.sampler_type, defaults.cfg_scale) == "" and "ptq-adherence" in guide.validated_by
    assert (defaults.sigma_min, defaults.sigma_max) == (0.03, 500.0)  # SAO's range, for the k-diffusion samplers
    families = [corpus.parse_caption(prompt).family for prompt in guide.example_prompts]
    assert sorted(families) == sorted(corpus.FAMILIES)
    assert all(unknown_words(demo_model.model, prompt) == [] for prompt in guide.example_prompts)


def test_words_outside_the_vocabulary_are_found_as_typed(demo_model):
    from lab.sat import unknown_words

    assert unknown_words(demo_model.model, "Loud Sine tone at A4") == []  # the tokenizer lower-cases
    assert unknown_words(demo_model.model, "a dog barking at 125 bpm, dog") == ["a", "dog", "barking", "125", "bpm,"]


@pytest.mark.parametrize("sampler", ["v-ddim", "k-dpm-2", "dpmpp-3m-sde"])
def test_few_step_generation_is_finite_non_silent_and_does_not_buzz(demo_model, sampler):
    """A tone and noise at CFG 1.5, SAO's sigma range for the k-diffusion samplers: v-ddim and k-dpm-2 are
    validated, dpmpp-3m-sde is not (it buzzes on plucks and drum patterns, docs/demo_model.md "Samplers"), but
    for none may the strongest spectral line of a tone or of noise sit on a multiple of the 62.5 Hz frame rate."""
    from demo_model import adherence

    settings = demo_model.sampling.replace(sampler_type=sampler, cfg_scale=1.5, steps=12)
    for prompt in ("sine tone at C4", "white noise"):
        y = sample(demo_model.model, [prompt], settings=settings, sample_size=demo_model.sample_size, seed=0)[0, 0]
        assert np.isfinite(y.numpy()).all() and y.std() > 0.03, prompt
        verdict = adherence.evaluate(prompt, y, corpus.SAMPLE_RATE)
        assert not verdict["buzz"], (prompt, verdict["peak_hz"])


def test_pretransform_round_trip_keeps_pitch_and_tempo(demo_model):
    """The trained autoencoder is the ceiling of every generated clip: its round trip must pass the evaluator."""
    from stable_audio_tools.models.pretransforms import AutoencoderPretransform

    from demo_model import adherence

    pretransform = demo_model.model.pretransform
    assert isinstance(pretransform, AutoencoderPretransform) and pretransform.downsampling_ratio == 256
    for prompt in ("square tone at A4", "plucked string playing C4", "kick drum at 120 bpm"):
        x = torch.from_numpy(corpus.synthesize(prompt, seed=5))[None, None]
        with torch.no_grad():
            latents = pretransform.encode(x)
            y = pretransform.decode(latents)[0, 0].numpy()
        assert latents.shape == (1, pretransform.encoded_channels, corpus.CLIP_SAMPLES // 256)
        error = x[0, 0].numpy() - y
        assert 10 * np.log10((x.numpy() ** 2).sum() / (error ** 2).sum()) > 25, prompt  # dB (edges: one frame)
        assert adherence.evaluate(prompt, y, corpus.SAMPLE_RATE)["ok"], prompt


def test_a_copy_of_the_demo_model_quantizes_and_generates(demo_model):
    """Every quantized variant in the app starts from `fresh_copy()`: the autoencoder must survive deepcopy."""
    import quant

    model = quant.quantize_(demo_model.fresh_copy(), quant.get_recipe("w8a8-dynamic"))
    audio = sample(model, ["white noise"], settings=demo_model.sampling.replace(steps=4, cfg_scale=3.0),
                   sample_size=demo_model.sample_size, seed=0)
    assert np.isfinite(audio.numpy()).all() and audio.std() > 0.01


def test_weights_are_trained_not_random():
    """The output projections start at zero in SAT; a trained model has moved all of them."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(EMBEDDED_DIR) / "model.safetensors"))
    zero_init = [k for k in weights if k.endswith(("to_out.weight", "ff.ff.2.weight", "postprocess_conv.weight"))]
    assert zero_init and all(weights[k].float().abs().max() > 0 for k in zero_init)


def test_bench_bf16_row_casts_the_dit_but_not_the_autoencoder():
    """bf16 keeps 0.5 of resolution at the MDCT autoencoder's +64 ELU offset: only the DiT may run in bf16."""
    from bench.sampling import generate_batch

    loaded = load_model()
    model = loaded.model
    dit = model.model
    dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes.setdefault(name, output.dtype)
        return hook

    hooks = [next(m for m in dit.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(record("dit")),
             model.pretransform.model.decoder.layers[-1].register_forward_hook(record("decoder"))]
    settings = loaded.sampling.replace(steps=2, seconds=0.512)
    try:
        batch = generate_batch(model, loaded, ["white noise"], seed=0, settings=settings,
                               compute_dtype=torch.bfloat16)
    finally:
        for hook in hooks:
            hook.remove()
    assert dtypes == {"dit": torch.bfloat16, "decoder": torch.float32}
    assert model.model is dit and np.isfinite(batch.audio).all()
