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
from lab.comparison import Lab
from lab.quantized import QuantizedModels
from lab.study.registry import Studies
from lab.ui.console import Console, studies_table
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
    ({0: "sine " * 120}, "at most 500"),  # known words: the length is what is wrong
    ({1: "noise " * 100}, "negative prompt"),
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


def test_a_calibrated_recipe_waits_for_an_explicit_calibration(served):
    url, lab, _ = served
    client = console(url)
    with pytest.raises(AppError, match=r"needs calibration statistics first: .*DiT forwards.*Calibrate"):
        client.predict(*REQUEST, "W8A8", "smoothquant", False, LAYER, api_name="/generate")
    assert not lab.quantized.stats_ready and "w8a8-smoothquant" not in lab.quantized.cached_names
    note = client.predict("W8A8", "smoothquant", False, api_name="/calibrate")
    assert "Calibrated in" in note and "`w8a8-smoothquant`: calibration statistics are ready" in note
    summary = client.predict(*REQUEST, "W8A8", "smoothquant", False, LAYER, api_name="/generate")[2]
    assert "w8a8-smoothquant" in summary


def test_calibration_has_a_queue_of_its_own_and_the_default_recipe_calibrates_nothing(tiny_audio, tmp_path):
    from lab.comparison import Lab
    from lab.quantized import QuantizedModels
    from lab.study.registry import Studies
    from lab.ui.console import build_console

    models = QuantizedModels(tiny_audio, cache_dir=tmp_path / "cache", calibration_prompts=["white noise"])
    blocks = build_console(Lab(tiny_audio, models, tmp_path / "out"), Studies(tmp_path / "studies"))
    queues = {fn.api_name: fn.concurrency_id for fn in blocks.fns.values()}
    assert queues["calibrate"] != queues["generate"] == queues["build_study"]
    values = {getattr(block, "label", None): getattr(block, "value", None) for block in blocks.blocks.values()}
    assert (values["Precision"], values["Method"]) == ("W8A8", "dynamic")


def test_unknown_words_are_refused_before_anything_is_generated(served):
    url, lab, _ = served
    before = sorted(lab.output_dir.rglob("*"))
    with pytest.raises(AppError, match=r"does not know 'a', 'dog', 'barking'"):
        console(url).predict("a dog barking", *REQUEST[1:], "W8A8", "dynamic", False, LAYER, api_name="/generate")
    with pytest.raises(AppError, match=r"does not know 'violin'"):
        console(url).predict(REQUEST[0], "violin", *REQUEST[2:], "W8A8", "dynamic", False, LAYER,
                             api_name="/generate")
    assert sorted(lab.output_dir.rglob("*")) == before


def test_the_prompt_note_names_only_the_words_a_word_level_tokenizer_lacks(tiny_audio, tmp_path):
    console = Console(Lab(tiny_audio, QuantizedModels(tiny_audio, cache_dir=tmp_path / "cache",
                                                      calibration_prompts=["white noise"]), tmp_path / "out"),
                      Studies(tmp_path / "studies"))
    assert console.prompt_note("sine tone at a4", "white noise") == ""
    message = console.prompt_note("sine tone at a4 please", "a dog")
    assert "'please' (in 'sine tone at a4 please'); 'a', 'dog' (in 'a dog')" in message and "examples" in message


def test_the_sampler_choices_are_those_generation_json_validates(tiny_audio_files, tmp_path):
    """A model whose generation.json has a `validated` entry is offered only those samplers, in the span of their
    CFG ranges, with the grammar's examples under the prompt; a model without one (SAO) is offered every sampler."""
    import json
    import shutil

    from lab.comparison import Lab
    from lab.generation import CFG_RANGE, SAMPLERS
    from lab.quantized import QuantizedModels
    from lab.sat import ModelGuide, load_model
    from lab.study.registry import Studies
    from lab.ui.console import build_console, sampler_choices

    assert sampler_choices(ModelGuide()) == (list(SAMPLERS), CFG_RANGE, "")
    config_path, ckpt_path = tiny_audio_files
    folder = tmp_path / "model"
    shutil.copytree(config_path.parent, folder)
    (folder / "generation.json").write_text(json.dumps({
        "steps": 4, "cfg_scale": 2.0, "sampler_type": "v-ddim",
        "validated": {"samplers": {"v-ddim": [1.5, 5], "dpmpp-3m-sde": [1.5, 1.5]}, "command": "ptq-adherence"},
        "example_prompts": ["sine tone at a4", "white noise"]}))
    loaded = load_model(model_config=folder / config_path.name, ckpt_path=folder / ckpt_path.name)
    assert loaded.guide == ModelGuide(validated=(("v-ddim", 1.5, 5.0), ("dpmpp-3m-sde", 1.5, 1.5)),
                                      validated_by="ptq-adherence", example_prompts=("sine tone at a4", "white noise"))
    assert loaded.guide.refusal("v-ddim", 5.0) == "" and "at CFG 1.5 only" in loaded.guide.refusal("dpmpp-3m-sde", 3)
    assert "v-ddim, dpmpp-3m-sde only" in loaded.guide.refusal("k-heun", 1.5)
    models = QuantizedModels(loaded, cache_dir=tmp_path / "cache", calibration_prompts=["white noise"])
    blocks = build_console(Lab(loaded, models, tmp_path / "out"), Studies(tmp_path / "studies"))
    widgets = {getattr(block, "label", None): block for block in blocks.blocks.values()}
    assert [value for _, value in widgets["Sampler"].choices] == ["dpmpp-3m-sde", "v-ddim"]  # the app's order
    assert widgets["Sampler"].info == ("Validated for this model (generation.json): dpmpp-3m-sde at CFG 1.5, "
                                       "v-ddim at CFG 1.5-5")
    assert (widgets["CFG scale"].minimum, widgets["CFG scale"].maximum) == (1.5, 5.0)
    examples = next(block for block in blocks.blocks.values() if type(block).__name__ == "Dataset")
    assert [row[0] for row in examples.samples] == ["sine tone at a4", "white noise"]


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


def test_a_large_study_is_estimated_and_built_only_when_confirmed(served):
    url, _, studies = served
    text = ('{"study_id": "huge", "title": "t", "test_type": "acr", "prompts": ["white noise"], '
            '"seeds": ' + str(list(range(100_000))) + ', "conditions": ["w8a8-dynamic"], "steps": 4}')
    with pytest.raises(AppError, match=r"This study is large: 100000 items x 2 clips.*MiB on disk.*Confirm it"):
        console(url).predict(text, False, api_name="/build_study")
    assert "huge" not in studies.ids() and not (studies.root / "huge").exists()


def test_a_damaged_study_is_named_with_its_files_in_studies_and_results(served, tmp_path):
    """The rater's link only says 'not valid'; the experimenter's views say which file changed."""
    import shutil

    from lab.study.manifest import load_manifest

    _, lab, studies = served
    shutil.copytree(studies.root / "test-ab", tmp_path / "test-ab")
    manifest = load_manifest(tmp_path / "test-ab")
    damaged = manifest.items[0].stimuli[1]
    data = bytearray(manifest.path(damaged).read_bytes())
    data[-1] ^= 1  # one bit of the last sample
    manifest.path(damaged).write_bytes(bytes(data))
    console = Console(lab, Studies(tmp_path))
    (link,) = studies_table(console.studies)["rater link"]
    assert link.startswith("damaged: ") and damaged.file in link and "sha256 differs" in link
    with pytest.raises(ValueError, match=damaged.file):
        console.analyse("test-ab")


def test_console_downloads_need_the_login(served):
    """A file a console event returned (here a Compare clip; ratings CSVs go the same way) is served to the logged-in
    browser, and to nobody without the login: not under /admin, not at the server's root."""
    import json

    import httpx

    url, *_ = served
    with httpx.Client(base_url=url, timeout=120) as browser:
        assert browser.post("admin/login", data={"username": app.ADMIN_USER, "password": PASSWORD}).is_success
        event = browser.post("admin/gradio_api/call/generate",
                             json={"data": [*REQUEST, "W8A8", "dynamic", False, LAYER, False]}).json()["event_id"]
        stream = browser.get(f"admin/gradio_api/call/generate/{event}").text
        result = json.loads(stream.split("event: complete\ndata: ", 1)[1].splitlines()[0])
        file_url = result[0]["url"]
        assert "/admin/gradio_api/file=" in file_url and browser.get(file_url).is_success
    cached_path = file_url.split("file=", 1)[1]
    for anonymous_url in (file_url, f"{url}gradio_api/file={cached_path}", f"{url}file={cached_path}"):
        assert httpx.get(anonymous_url, timeout=30).status_code in (401, 403, 404), anonymous_url


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


def test_a_space_serves_files_and_statistics_named_in_its_environment(monkeypatch):
    from lab.settings import Settings

    monkeypatch.setenv("LAB_QUANTIZED", "a.safetensors:b.safetensors")
    monkeypatch.setenv("LAB_CALIBRATION_STATS", "stats.safetensors")
    monkeypatch.setenv("LAB_CALIBRATION_SECONDS", "3")
    settings = Settings.from_env()
    args = app.parse_args([], settings)
    assert args.quantized == ["a.safetensors", "b.safetensors"] and str(args.calibration_stats) == "stats.safetensors"
    assert settings.calibration_seconds == 3.0 and settings.calibration_steps is None
    monkeypatch.setenv("LAB_CALIBRATION_STEPS", "many")
    with pytest.raises(ValueError, match="LAB_CALIBRATION_STEPS must be an integer"):
        Settings.from_env()


def test_help_answers_before_torch_loads():
    import subprocess
    import sys
    code = "import sys, app\ntry:\n    app.parse_args(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--admin-password" in out and "--host" in out and out.strip().endswith("False")
