"""One check of what the model is asked to generate (lab.requests), whichever door the request comes through: the
Compare tab's engine (`Lab.compare`), a study build (library and `python -m lab.study build`) and calibration
(`ptq-quantize`): each refuses the same request with the same message."""
import dataclasses

import pytest

from lab.comparison import Lab
from lab.generation import GenerationRequest
from lab.quantize_cli import main as quantize_main
from lab.quantized import QuantizedModels
from lab.requests import unknown_words_refusal, validate_request
from lab.sat import ModelGuide
from lab.study.__main__ import main as study_main
from lab.study.build import build_study
from lab.study.definition import StudyDefinition

STUDY = StudyDefinition(study_id="doors", title="Doors", test_type="acr", prompts=["white noise"], seeds=[1],
                        conditions=["w8a8-dynamic"], steps=4, seconds=0.5, cfg_scale=3.0, sampler_type="v-ddim")


def compare_request(definition: StudyDefinition) -> GenerationRequest:
    """The Compare tab's request for the study's first item, with the study's sampler settings."""
    return GenerationRequest(prompt=definition.prompts[0], seconds=definition.seconds, steps=definition.steps,
                             cfg_scale=definition.cfg_scale, seed=definition.seeds[0], sampler=definition.sampler_type)


def refusals(loaded, definition: StudyDefinition, tmp_path) -> tuple[str, str]:
    """(Compare's message, the study build's message) for the same prompt and settings; nothing is generated."""
    models = QuantizedModels(loaded, cache_dir=tmp_path / "cache", calibration_prompts=["white noise"])
    with pytest.raises(ValueError) as compare:
        Lab(loaded, models, tmp_path / "out").compare(compare_request(definition), "w8a8-dynamic")
    with pytest.raises(ValueError) as build:
        build_study(definition, loaded, models, tmp_path / "studies", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "studies").exists()
    return str(compare.value), str(build.value)


@pytest.mark.parametrize("change, message", [
    (dict(prompts=["banjo solo"]), "does not know 'banjo', 'solo' (in 'banjo solo')"),
    (dict(steps=1), "Steps must be an integer between 2 and 250"),
    (dict(seconds=30.0), "Seconds must be between 0.5 and 2.048"),
    (dict(sampler_type="euler"), "Unknown sampler 'euler'"),
    (dict(cfg_scale=40.0), "CFG scale must be between 0 and 25"),
])
def test_compare_and_a_study_build_refuse_the_same_request_alike(tiny_audio, tmp_path, change, message):
    compare, build = refusals(tiny_audio, dataclasses.replace(STUDY, **change), tmp_path)
    assert compare == build and message in compare


def test_settings_the_model_is_not_validated_for_are_refused_alike(tiny_audio, tmp_path):
    guided = dataclasses.replace(tiny_audio, guide=ModelGuide(validated=(("v-ddim", 1.0, 2.0),)))
    compare, build = refusals(guided, STUDY, tmp_path)
    assert compare == build == "This model is validated with v-ddim at CFG 1-2 only (generation.json), not 3."


def test_every_prompt_of_a_study_is_checked_and_every_unknown_word_named(tiny_audio, tmp_path):
    definition = dataclasses.replace(STUDY, prompts=["white noise", "banjo solo", "kazoo noise"])
    models = QuantizedModels(tiny_audio, cache_dir=tmp_path / "cache", calibration_prompts=["white noise"])
    with pytest.raises(ValueError) as error:
        build_study(definition, tiny_audio, models, tmp_path, progress=False)
    assert str(error.value) == unknown_words_refusal(tiny_audio, "banjo solo", "kazoo noise")
    assert "'banjo', 'solo' (in 'banjo solo'); 'kazoo' (in 'kazoo noise')" in str(error.value)
    validate_request(tiny_audio, compare_request(STUDY))  # known words at validated settings pass


def test_the_command_lines_refuse_unknown_words_with_the_same_message(tiny_audio, tiny_audio_files, tmp_path):
    config, ckpt = tiny_audio_files
    expected = unknown_words_refusal(tiny_audio, "banjo solo")
    definition = tmp_path / "definition.json"
    definition.write_text(dataclasses.replace(STUDY, prompts=["banjo solo"]).to_json())
    with pytest.raises(SystemExit) as stop:
        study_main(["build", str(definition), "--model-config", str(config), "--ckpt-path", str(ckpt),
                    "--root", str(tmp_path / "studies"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert str(stop.value) == f"error: {expected}" and not (tmp_path / "studies").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("banjo solo\n")
    with pytest.raises(SystemExit) as stop:
        quantize_main(["calibrate", "--model-config", str(config), "--ckpt-path", str(ckpt), "--calib-prompts",
                       str(prompts), "--out", str(tmp_path / "stats.safetensors")])
    assert str(stop.value) == f"error: {expected}" and not (tmp_path / "stats.safetensors").exists()
