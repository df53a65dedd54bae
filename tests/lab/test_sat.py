"""lab.sat: the three loading routes and the errors a user can cause, on tiny models in a tmp dir."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lab import sat as models
from lab.sat import ModelLoadError, SamplerSettings, load_model
from tests.tiny_audio import write_tiny_audio_model


@pytest.fixture
def model_files(tmp_path):
    """A tiny text-conditioned model saved the way assets/demo_model is: config, safetensors, tokenizer/."""
    write_tiny_audio_model(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_local_files_load_with_their_weights_and_tokenizer(model_files, monkeypatch, tmp_path_factory):
    folder, state = model_files
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative tokenizer path must not depend on cwd
    loaded = load_model(model_config=folder / "model_config.json", ckpt_path=folder / "model.safetensors")
    assert loaded.model_id.startswith("local:")
    assert (loaded.sample_rate, loaded.channels) == (16000, 1)
    tokenizer_name = loaded.config["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"]
    assert tokenizer_name == str((folder / "tokenizer").resolve())
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    tokens = loaded.model.conditioner([{"prompt": "sine tone at A4", "seconds_total": 2}], "cpu")
    assert tokens["prompt"][0].shape == (1, 8, 32)


def test_embedded_dir_is_used_when_present(model_files, monkeypatch):
    folder, _ = model_files
    monkeypatch.setattr(models, "EMBEDDED_DIR", folder)
    loaded = load_model()
    assert loaded.model_id == "embedded:demo_model"


def test_missing_embedded_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_DIR", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="make train"):
        load_model()


def test_fresh_copy_is_independent(model_files):
    folder, _ = model_files
    loaded = load_model(model_config=folder / "model_config.json", ckpt_path=folder / "model.safetensors")
    copy_ = loaded.fresh_copy()
    next(copy_.parameters()).data.add_(1.0)
    assert not torch.equal(next(copy_.parameters()), next(loaded.model.parameters()))


@pytest.mark.parametrize("damage, message", [
    ("missing_ckpt", "Checkpoint not found"),
    ("corrupt_ckpt", "unreadable"),
    ("wrong_shapes", "does not match"),
    ("bad_json", "not valid JSON"),
    ("wrong_model_type", "not supported"),
    ("broken_config", "could not be built"),
    ("missing_config", "config not found"),
])
def test_bad_files_give_clear_errors(model_files, damage, message):
    folder, state = model_files
    config_path, ckpt = folder / "model_config.json", folder / "model.safetensors"
    config = json.loads(config_path.read_text())
    if damage == "missing_ckpt":
        ckpt.unlink()
    elif damage == "corrupt_ckpt":
        ckpt.write_bytes(b"\x00garbage" * 100)
    elif damage == "wrong_shapes":
        save_file({k: torch.zeros(3) for k in state}, ckpt)
    elif damage == "bad_json":
        config_path.write_text("{not json")
    elif damage == "wrong_model_type":
        config_path.write_text(json.dumps({**config, "model_type": "autoencoder"}))
    elif damage == "broken_config":
        del config["model"]["diffusion"]["type"]
        config_path.write_text(json.dumps(config))
    elif damage == "missing_config":
        config_path.unlink()
    with pytest.raises(ModelLoadError, match=message):
        load_model(model_config=config_path, ckpt_path=ckpt)


def test_local_route_needs_both_files(model_files):
    folder, _ = model_files
    with pytest.raises(ModelLoadError, match="both"):
        load_model(model_config=folder / "model_config.json")


def test_hub_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model("stabilityai/stable-audio-open-1.0")


def test_sampling_defaults_come_from_generation_json(model_files):
    folder, _ = model_files
    paths = dict(model_config=folder / "model_config.json", ckpt_path=folder / "model.safetensors")
    assert load_model(**paths).sampling == SamplerSettings()  # none shipped: SAO's recommendation
    (folder / "generation.json").write_text(json.dumps(
        {"steps": 50, "cfg_scale": 5.0, "sigma_min": 0.01, "sigma_max": 50.0, "seconds": 2.048, "note": "x"}))
    sampling = load_model(**paths).sampling
    assert (sampling.steps, sampling.cfg_scale, sampling.sigma_min, sampling.sigma_max, sampling.seconds) == (
        50, 5.0, 0.01, 50.0, 2.048)
    (folder / "generation.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="generation.json"):
        load_model(**paths)


def test_settings_replace_changes_only_given_fields():
    settings = SamplerSettings(steps=50, sampler_type="v-ddim")
    assert settings.replace(steps=8, cfg_scale=None) == SamplerSettings(steps=8, sampler_type="v-ddim")


def test_conditioning_fills_every_conditioner_of_the_model(tiny_audio):
    assert models.conditioning(tiny_audio.model, "white noise", 1.5) == {"prompt": "white noise",
                                                                        "seconds_total": 1.5}


def test_sample_is_seeded_batched_and_reports_each_step(tiny_audio):
    settings = tiny_audio.sampling.replace(steps=3, sampler_type="v-ddim", sigma_max=1.0)
    steps = []
    kwargs = dict(settings=settings, sample_size=tiny_audio.sample_length(0.5), seconds=0.5)
    first = models.sample(tiny_audio.model, ["white noise", "sine tone at a4"], seed=4,
                          callback=lambda info: steps.append(info["i"]), **kwargs)
    again = models.sample(tiny_audio.model, ["white noise", "sine tone at a4"], seed=4, **kwargs)
    other = models.sample(tiny_audio.model, ["white noise", "sine tone at a4"], seed=5, **kwargs)
    assert first.shape == (2, 1, 8000) and steps == [0, 1, 2]
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert not torch.allclose(first[0], first[1])  # the prompts differ, and so does each item's noise


def test_decoder_of_a_model_without_pretransform_is_the_identity_on_the_cpu(tiny_audio):
    x = torch.randn(1, 1, 64)
    assert torch.equal(models.decoder(tiny_audio.model)(x), x)


def test_a_dit_of_sao_shape_builds_on_the_meta_device_with_saos_parameter_count():
    dit = models.build_dit(models.SAO_DIT, device="meta")
    parameters = list(dit.parameters())
    assert all(p.is_meta for p in parameters) and 1.05e9 < sum(p.numel() for p in parameters) < 1.06e9
