"""The app on a free local port, driven through its named API endpoints with gradio_client."""
import concurrent.futures
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from lab.audio import integrated_loudness
from lab.ratings import COLUMNS, read_ratings
from lab.settings import Settings
from tests.tiny_audio import write_tiny_audio_model

LAYER = "transformer.layers.1.ff.ff.2"
# prompt, negative, seconds, steps, cfg, sampler, seed
REQUEST = ["sine tone at a4", "", 1.0, 4, 5.0, "dpmpp-3m-sde", "3"]
QUICK = ["white noise", "", 0.5, 2, 5.0, "dpmpp-3m-sde", ""]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    config_path, ckpt_path = write_tiny_audio_model(root / "model")
    (root / "prompts.txt").write_text("sine tone at a4\nwhite noise\n")
    settings = Settings(model=None, model_config=None, ckpt_path=None, ratings_csv=root / "ratings.csv",
                        ratings_dataset=None, ratings_push_minutes=5, cache_dir=root / "cache",
                        output_dir=root / "out", calibration_prompts=root / "prompts.txt", calibration_steps=4,
                        max_quantized_models=2, concurrency_limit=1)
    lab = app.build_lab(settings, model_config=config_path, ckpt_path=ckpt_path)
    demo = app.build_demo(lab)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_port=port, quiet=True, show_error=True)
    yield f"http://127.0.0.1:{port}/", lab
    demo.close()


def client(url) -> Client:
    return Client(url, verbose=False)


def rows(lab):
    return read_ratings(lab.store.path)


def test_named_endpoints(served):
    url, _ = served
    endpoints = client(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/generate", "/new_pair", "/played_a", "/played_b", "/rate", "/mos"} <= set(endpoints)


def test_generate_returns_a_loudness_matched_pair_and_figures(served):
    url, _ = served
    fp_wav, q_wav, summary, *plots = client(url).predict(*REQUEST, "W8A8", "dynamic", False, LAYER,
                                                         api_name="/generate")
    fp, sr = soundfile.read(fp_wav, dtype="float32")
    q, _ = soundfile.read(q_wav, dtype="float32")
    assert sr == 16000 and fp.shape == q.shape == (16000,)
    assert not np.array_equal(fp, q)
    assert abs(integrated_loudness(fp[None], sr) - integrated_loudness(q[None], sr)) < 0.2
    assert "Full precision" in summary and "Seed 3" in summary and "w8a8-dynamic" in summary
    assert len(plots) == 5 and all(plot is not None for plot in plots)


def _new_pair(c: Client, request=REQUEST, attention=False):
    return c.predict(*request, "W8A8", "dynamic", False, attention, api_name="/new_pair")


def test_rate_appends_exactly_one_row_per_clip(served):
    url, lab = served
    c = client(url)
    wav_a, wav_b, shown_prompt, *_ = _new_pair(c)
    assert "sine tone at a4" in shown_prompt
    assert Path(wav_a).name.endswith("_A.wav") and "quantized" not in wav_a + wav_b  # names stay blind
    before = len(rows(lab))
    with pytest.raises(AppError, match="Play both clips"):
        c.predict("rater-1", "4 - Good", "2 - Poor", "", None, api_name="/rate")
    c.predict(api_name="/played_a")
    with pytest.raises(AppError, match="not played yet: B"):
        c.predict("rater-1", "4 - Good", "2 - Poor", "", None, api_name="/rate")
    c.predict(api_name="/played_b")
    with pytest.raises(AppError, match="Rate clip B"):
        c.predict("rater-1", "4 - Good", None, "", None, api_name="/rate")
    assert len(rows(lab)) == before
    status = c.predict("rater-1", "4 - Good", "2 - Poor", "A", None, api_name="/rate")
    assert "Saved 2 ratings" in status
    new = rows(lab)[before:]
    assert len(new) == 2 and {r["clip_label"] for r in new} == {"A", "B"}
    assert {r["system"] for r in new} == {"full precision", "quantized"}
    by_label = {r["clip_label"]: r for r in new}
    assert (by_label["A"]["score"], by_label["B"]["score"]) == ("4", "2")
    assert by_label["A"]["preference"] == by_label["A"]["system"]  # "A" unblinded to the system behind it
    assert by_label["A"]["a_system"] == by_label["A"]["system"]
    assert new[0]["rater_id"] == "rater-1" and new[0]["recipe"] == "w8a8-dynamic"
    with pytest.raises(AppError, match="no pair to rate"):  # a trial is rated once
        c.predict("rater-1", "4 - Good", "2 - Poor", "", None, api_name="/rate")


def test_attention_check_is_recorded(served):
    url, lab = served
    c = client(url)
    _new_pair(c, QUICK, attention=True)
    c.predict(api_name="/played_a")
    c.predict(api_name="/played_b")
    c.predict("rater-2", "3 - Fair", "3 - Fair", "", "1 - Bad", api_name="/rate")
    assert rows(lab)[-1]["attention_check"] in ("passed", "failed")


def test_fifty_concurrent_submissions_all_land(served):
    url, lab = served
    def ready_session(_):
        c = client(url)
        _new_pair(c, QUICK)
        c.predict(api_name="/played_a")
        c.predict(api_name="/played_b")
        return c

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        clients = list(pool.map(ready_session, range(50)))
    before = len(rows(lab))

    def rate(i):
        return clients[i].predict(f"rater-{i}", app.SCORE_CHOICES[i % 5], "5 - Excellent", "", None,
                                  api_name="/rate")

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(rate, range(50)))
    assert all("Saved 2 ratings" in status for status in statuses)
    new = rows(lab)[before:]
    assert len(new) == 100 and all(len(r) == len(COLUMNS) and None not in r for r in new)
    assert sorted(r["rater_id"] for r in new) == sorted(f"rater-{i}" for i in range(50) for _ in range(2))
    assert len({r["trial_id"] for r in new}) == 50


def test_mos_endpoint(served):
    url, lab = served
    table, csv_path = client(url).predict(api_name="/mos")
    assert table["headers"][:4] == ["precision", "method", "ratings", "MOS"]
    methods = {(row[0], row[1]) for row in table["data"]}
    assert ("FP32", "none") in methods and ("W8A8", "dynamic") in methods
    assert Path(csv_path).read_text().splitlines()[0] == ",".join(COLUMNS)


@pytest.mark.parametrize("change, message", [
    ({0: ""}, "prompt is empty"),
    ({0: "x" * 600}, "at most 500"),
    ({1: "y" * 600}, "negative prompt"),
    ({6: "abc"}, "Seed must be a whole number"),
    ({6: "-3"}, "Seed must be a whole number"),
    ({3: 2.5}, "Steps must be a whole number"),
])
def test_bad_generation_inputs_get_messages(served, change, message):
    url, _ = served
    request = [change.get(i, value) for i, value in enumerate(REQUEST)]
    with pytest.raises(AppError, match=message):
        client(url).predict(*request, "W8A8", "dynamic", False, LAYER, api_name="/generate")


@pytest.mark.parametrize("index, value", [(2, 99.0), (2, 0.0), (3, 0), (3, 1000), (4, -1.0)])
def test_out_of_range_numbers_are_refused(served, index, value):
    url, _ = served
    request = [value if i == index else v for i, v in enumerate(REQUEST)]
    with pytest.raises(AppError) as error:
        client(url).predict(*request, "W8A8", "dynamic", False, LAYER, api_name="/generate")
    assert "between" in str(error.value) or "greater" in str(error.value) or "less" in str(error.value)


@pytest.mark.parametrize("precision, method", [("W2A2", "sqd"), ("W8A8", "gptq")])
def test_unknown_recipe_choices_are_refused(served, precision, method):
    url, _ = served
    with pytest.raises(AppError) as error:
        client(url).predict(*REQUEST, precision, method, False, LAYER, api_name="/generate")
    assert precision in str(error.value) if precision == "W2A2" else method in str(error.value)


def test_missing_or_corrupt_checkpoint_stops_the_cli_with_a_message(tmp_path, capsys):
    config_path, ckpt_path = write_tiny_audio_model(tmp_path)
    ckpt_path.write_bytes(b"not a checkpoint")
    for ckpt in (ckpt_path, tmp_path / "missing.safetensors"):
        with pytest.raises(SystemExit):
            app.main(["--model-config", str(config_path), "--ckpt-path", str(ckpt)])
        err = capsys.readouterr().err
        assert "unreadable" in err or "not found" in err
        assert "Traceback" not in err
