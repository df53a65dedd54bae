"""The experimenter's console at /admin through gradio_client: login required, Compare, study building and
results, and the messages bad input gets."""
from pathlib import Path

import numpy as np
import pytest
import soundfile
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from lab.audio import integrated_loudness
from tests.app.conftest import PASSWORD, finish_study
from tests.tiny_audio import write_tiny_audio_model

LAYER = "transformer.layers.1.ff.ff.2"
# prompt, negative, seconds, steps, cfg, sampler, seed
REQUEST = ["sine tone at a4", "", 1.0, 4, 5.0, "dpmpp-3m-sde", "3"]


def console(url) -> Client:
    return Client(url + "admin/", auth=(app.ADMIN_USER, PASSWORD), verbose=False)


def test_the_console_needs_the_password(served):
    url, *_ = served
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types for a 401
        Client(url + "admin/", verbose=False)
    with pytest.raises(Exception):  # noqa: B017
        Client(url + "admin/", auth=(app.ADMIN_USER, "wrong"), verbose=False)
    endpoints = console(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/generate", "/build_study", "/analyse"} <= set(endpoints)


def test_generate_returns_a_loudness_matched_pair_and_figures(served):
    url, *_ = served
    fp_wav, q_wav, summary, *plots = console(url).predict(*REQUEST, "W8A8", "dynamic", False, LAYER,
                                                          api_name="/generate")
    fp, sr = soundfile.read(fp_wav, dtype="float32")
    q, _ = soundfile.read(q_wav, dtype="float32")
    assert sr == 16000 and fp.shape == q.shape == (16000,)
    assert not np.array_equal(fp, q)
    assert abs(integrated_loudness(fp[None], sr) - integrated_loudness(q[None], sr)) < 0.2
    assert "Full precision" in summary and "Seed 3" in summary and "w8a8-dynamic" in summary
    assert "waveform SNR" in summary
    assert len(plots) == 5 and all(plot is not None for plot in plots)


@pytest.mark.parametrize("change, message", [
    ({0: ""}, "prompt is empty"),
    ({0: "x" * 600}, "at most 500"),
    ({1: "y" * 600}, "negative prompt"),
    ({6: "abc"}, "Seed must be a whole number"),
    ({6: "-3"}, "Seed must be a whole number"),
    ({3: 2.5}, "Steps must be a whole number"),
])
def test_bad_generation_inputs_get_messages(served, change, message):
    url, *_ = served
    request = [change.get(i, value) for i, value in enumerate(REQUEST)]
    with pytest.raises(AppError, match=message):
        console(url).predict(*request, "W8A8", "dynamic", False, LAYER, api_name="/generate")


def test_a_bad_request_on_an_uncached_calibrating_recipe_calibrates_nothing(served):
    url, lab, _ = served
    request = ["", *REQUEST[1:]]
    with pytest.raises(AppError, match="prompt is empty"):
        console(url).predict(*request, "W4A8", "smoothquant", True, LAYER, api_name="/generate")
    assert "w4a8-smoothquant+lora" not in lab.quantized.cached_names


@pytest.mark.parametrize("precision, method", [("W2A2", "sqd"), ("W8A8", "gptq")])
def test_unknown_recipe_choices_are_refused(served, precision, method):
    url, *_ = served
    with pytest.raises(AppError) as error:
        console(url).predict(*REQUEST, precision, method, False, LAYER, api_name="/generate")
    assert precision in str(error.value) if precision == "W2A2" else method in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"study_id": "x1", "title": "t", "test_type": "acr", "prompts": ["white noise"], "seeds": [1], '
     '"conditions": []}', "condition"),
    ('{"study_id": "x2", "title": "t", "test_type": "acr", "prompts": ["white noise"], "seeds": [1], '
     '"conditions": ["w9a9-magic"]}', "w9a9-magic"),
])
def test_bad_study_definitions_are_refused_and_build_nothing(served, text, message):
    url, _, studies = served
    before = studies.ids()
    with pytest.raises(AppError, match=message):
        console(url).predict(text, api_name="/build_study")
    assert studies.ids() == before


def test_analysis_of_a_rated_study_and_of_no_study(served):
    url, _, studies = served
    with pytest.raises(AppError, match="Pick a study"):
        console(url).predict(None, api_name="/analyse")
    manifest, store = studies.get("test-acr")
    assert "completion code" in finish_study(url, "test-acr", "console-test-rater")
    report, plot, files = console(url).predict("test-acr", api_name="/analyse")
    rated = {row["condition"] for row in store.read()}
    assert "MOS" in report and all(f"| {condition} |" in report for condition in rated) and plot is not None
    assert sorted(Path(f).name for f in files) == ["ratings.csv", "report.md"]


def test_missing_or_corrupt_checkpoint_stops_the_cli_with_a_message(tmp_path, capsys):
    config_path, ckpt_path = write_tiny_audio_model(tmp_path)
    ckpt_path.write_bytes(b"not a checkpoint")
    for ckpt in (ckpt_path, tmp_path / "missing.safetensors"):
        with pytest.raises(SystemExit) as stop:
            app.main(["--model-config", str(config_path), "--ckpt-path", str(ckpt),
                      "--studies-dir", str(tmp_path / "studies")])
        message = str(stop.value)
        assert "unreadable" in message or "not found" in message


def test_help_answers_before_torch_loads():
    import subprocess
    import sys
    code = "import sys, app\ntry:\n    app.parse_args(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--admin-password" in out and "--host" in out and out.strip().endswith("False")
