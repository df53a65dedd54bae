"""Session-wide fixtures: the models several test packages share are built or loaded once per run."""
import pytest

from tests.tiny_audio import write_tiny_audio_model


@pytest.fixture(scope="session")
def tiny_audio_files(tmp_path_factory):
    """(model_config.json, model.safetensors) of the tiny text-to-audio SAT model, written once."""
    return write_tiny_audio_model(tmp_path_factory.mktemp("tiny-audio-model"))


@pytest.fixture(scope="session")
def tiny_audio(tiny_audio_files):
    """The tiny text-to-audio model loaded through lab.sat (read-only: quantize `fresh_copy()`s of it)."""
    from lab.sat import load_model

    config_path, ckpt_path = tiny_audio_files
    return load_model(model_config=config_path, ckpt_path=ckpt_path)


@pytest.fixture(scope="session")
def demo_model():
    """The shipped demo model (assets/demo_model), loaded once (read-only: quantize `fresh_copy()`s of it)."""
    from lab.sat import load_model

    return load_model()
