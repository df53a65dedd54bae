"""The GPU check's CUDA-only parts, run on the CPU: weight-only presets computing in bf16 (as on a GPU) agree with
their simulated twins under the check's autocast, and the app comparison runs end to end."""
import json

import pytest

from bench import gpu_check
from quant import kernels
from tests.tiny_models import TINY_DIT


def test_weight_only_presets_in_bf16_agree_under_autocast(monkeypatch):
    monkeypatch.setenv(kernels.WEIGHT_ONLY_ENV, "resident")  # CUDA's weight-only path
    args = gpu_check.parse_args(["--out", "unused.json", "--latent-tokens", "16", "--cond-tokens", "3", "--reps", "1",
                                 "--presets", "w8a16", "w4a16", "w8a8-dynamic"])
    with kernels.using_cpu_profile("vnni-bf16"):  # native bf16, as a CUDA device reports
        result = gpu_check.run(args, device="cpu", shape=dict(TINY_DIT))
    assert not result["errors"], result["errors"]
    rows = result["presets"]
    assert rows["w8a16"]["compute_dtype"] == rows["w4a16"]["compute_dtype"] == "bfloat16"
    assert rows["w8a8-dynamic"]["compute_dtype"] == "float32"
    assert result["all_agree"], {name: row["sqnr_integer_vs_simulated_db"] for name, row in rows.items()}
    json.dumps(result)


def test_app_comparison_runs_on_the_apps_engine(tiny_audio_files, tmp_path):
    from lab.comparison import build_lab
    from lab.settings import Settings

    (tmp_path / "prompts.txt").write_text("sine tone at a4\n")
    settings = Settings(cache_dir=tmp_path / "cache", output_dir=tmp_path / "out",
                        calibration_prompts=tmp_path / "prompts.txt", calibration_steps=2, studies_dir=tmp_path / "s")
    config_path, ckpt_path = tiny_audio_files
    lab = build_lab(settings, model_config=config_path, ckpt_path=ckpt_path)
    result = gpu_check.app_comparison(lab, "w8a8-dynamic", steps=3, prompt="sine tone at a4")  # its tokenizer's words
    assert result["recipe"] == "w8a8-dynamic" and result["steps"] == 3
    assert result["full_precision_s"] > 0 and result["quantized_s"] > 0
    assert result["quantized_over_full_precision"] == pytest.approx(result["quantized_s"] / result["full_precision_s"])
    assert "Full precision" in result["summary"]
    assert len(list((tmp_path / "out").glob("*.wav"))) == 2  # Lab.compare wrote both clips
    json.dumps(result)
