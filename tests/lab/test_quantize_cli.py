"""The `ptq-quantize` CLI on a tiny SAT model written to disk (config + safetensors checkpoint)."""
import json

import pytest
import torch
from safetensors.torch import save_file

import quant
from lab.quantize_cli import main
from tests.tiny_models import TINY_CONFIG, generate, tiny_diffusion_cond


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "model_config.json").write_text(json.dumps(TINY_CONFIG))
    save_file({k: v.contiguous() for k, v in tiny_diffusion_cond(seed=7).state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "prompts.txt").write_text("a kick drum\n\nrain on a tin roof\n")
    return folder


def test_presets_lists_every_preset(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert all(name in out for name in quant.PRESETS)


def test_quantize_calibrates_saves_and_reports(model_files, capsys):
    out = model_files / "q.safetensors"
    main(["quantize", "--model-config", str(model_files / "model_config.json"),
          "--ckpt-path", str(model_files / "model.safetensors"), "--preset", "w8a8-sqd",
          "--calib-prompts", str(model_files / "prompts.txt"), "--steps", "8", "--seconds", "1",
          "--stats-out", str(model_files / "stats.safetensors"), "--out", str(out)])
    assert "x fp32" in capsys.readouterr().out
    stats = quant.CalibrationStats.load(model_files / "stats.safetensors")
    assert stats.forwards == 8  # 2 prompts in one batch x 8 steps
    fresh = tiny_diffusion_cond(seed=0)
    assert quant.load(fresh, out).name == "w8a8-sqd"
    assert torch.isfinite(generate(fresh, steps=3)).all()


def test_quantize_without_prompts_for_a_calibrated_preset_says_what_is_missing(model_files):
    with pytest.raises(SystemExit, match="--calib-prompts"):
        main(["quantize", "--model-config", str(model_files / "model_config.json"), "--preset", "w8a8-static",
              "--ckpt-path", str(model_files / "model.safetensors"), "--out", str(model_files / "x.safetensors")])


def test_unknown_preset_and_missing_file_are_argparse_errors(model_files, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--model-config", str(model_files / "model_config.json"), "--preset", "w3a8",
              "--out", "x"])
    with pytest.raises(SystemExit):
        main(["memory", "--model-config", str(model_files / "missing.json")])
    assert "no such file" in capsys.readouterr().err


def test_memory_of_a_config_for_every_preset(model_files, capsys):
    main(["memory", "--model-config", str(model_files / "model_config.json")])
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in quant.PRESETS)
