"""The whole server (console at /admin, listening test at /) on a free local port, over a tiny model and three
small built studies. Built once for the package's tests."""
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

import app
from lab.comparison import build_lab
from lab.settings import Settings
from lab.study import StudyDefinition
from lab.study.registry import Studies

PASSWORD = "test-password"
SEED = 918273  # unusual on purpose: no rater-visible response may contain it
STUDIES = {
    "acr": dict(test_type="acr", conditions=("w8a8-dynamic", "w4a8-dynamic")),
    "mushra": dict(test_type="mushra", conditions=("w8a8-dynamic", "w4a8-dynamic")),
    "ab": dict(test_type="ab", conditions=("w8a8-dynamic",)),
    "one-page": dict(test_type="acr", conditions=("w8a8-dynamic",), trials_per_rater=1),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(lab, studies, password=PASSWORD):
    """Run app.build_server under uvicorn in a thread; yields the base URL (ending in /)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app.build_server(lab, studies, admin_password=password),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def build_studies(lab, root, prompts=("white noise", "sine tone at a4"), steps=4, seconds=0.5) -> Studies:
    studies = Studies(root)
    for name, spec in STUDIES.items():
        definition = StudyDefinition(study_id=f"test-{name}", title=f"Test {name}", prompts=prompts, seeds=(SEED,),
                                     steps=steps, seconds=seconds, **spec)
        studies.build(definition, lab.loaded, lab.quantized, progress=False)
    return studies


@pytest.fixture(scope="package")
def served(tiny_audio_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "prompts.txt").write_text("sine tone at a4\nwhite noise\n")
    settings = Settings(cache_dir=root / "cache", output_dir=root / "out", calibration_prompts=root / "prompts.txt",
                        calibration_steps=4, max_quantized_models=2, studies_dir=root / "studies")
    config_path, ckpt_path = tiny_audio_files
    lab = build_lab(settings, model_config=config_path, ckpt_path=ckpt_path)
    studies = build_studies(lab, settings.studies_dir)
    with serving(lab, studies) as url:
        yield url, lab, studies


def finish_study(url: str, study_id: str, rater_id: str, choice=3, sliders=None) -> str:
    """A rater through gradio_client from the link to the thank-you page; returns its text."""
    from gradio_client import Client

    from lab.ui.rater import MAX_CLIPS

    sliders = sliders or [50] * MAX_CLIPS
    client = Client(url, verbose=False)
    client.predict(study_id, rater_id, api_name="/open_study")
    client.predict(api_name="/start")
    outputs = client.predict(api_name="/trials")
    while "Page" in outputs[0]:
        clips = [o for o in outputs if isinstance(o, dict) and str(o.get("label", "")).startswith("Clip ")
                 and o.get("value")]
        for index in range(len(clips)):
            client.predict(api_name=f"/play_{index + 1}")
        if any(isinstance(o, dict) and o.get("visible") and str(o.get("value", "")).endswith(".wav")
               and o.get("label") is None for o in outputs[2:3]):
            client.predict(api_name="/play_reference")
        outputs = client.predict(choice, "", *sliders, api_name="/submit")
    return outputs[-2]
