"""The `ptq-quantize` CLI on a tiny SAT model written to disk (config + safetensors checkpoint): it calibrates under
the app's plan and writes the app's file format, so either one's files serve in the other."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quant
from lab import calibration, sat
from lab.calibration import CalibrationPlan, spread
from lab.quantize_cli import main
from lab.quantized import QuantizedModels
from lab.resources import CALIBRATION_PROMPTS, read_prompts
from tests.tiny_models import TINY_CONFIG, tiny_diffusion_cond


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "model_config.json").write_text(json.dumps(TINY_CONFIG))
    save_file({k: v.contiguous() for k, v in tiny_diffusion_cond(seed=7).state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def model_args(folder) -> list[str]:
    return ["--model-config", str(folder / "model_config.json"), "--ckpt-path", str(folder / "model.safetensors")]


def load(folder) -> sat.LoadedModel:
    return sat.load_model(model_config=folder / "model_config.json", ckpt_path=folder / "model.safetensors")


def test_presets_lists_every_preset(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert all(name in out for name in quant.PRESETS)


def test_sample_rows_fill_the_row_budget_between_quants_default_and_the_cap(model_files, monkeypatch):
    loaded = load(model_files)
    plan = CalibrationPlan.default(loaded, ["x"], steps=6)
    widths = sum(layer.in_features for layer in quant.linear_layers(quant.find_dit(loaded.model)).values())
    per_row = 2 * widths * sat.dit_forwards(plan.sampling.sampler_type, 6)  # bfloat16, every timestep
    monkeypatch.setattr(calibration, "CALIBRATION_ROW_BYTES", 20 * per_row)
    assert plan.sample_rows(loaded.model) == 20
    monkeypatch.setattr(calibration, "CALIBRATION_ROW_BYTES", per_row)
    assert plan.sample_rows(loaded.model) == quant.SAMPLE_ROWS  # never fewer than quant's default
    monkeypatch.setattr(calibration, "CALIBRATION_ROW_BYTES", 10 ** 6 * per_row)
    assert plan.sample_rows(loaded.model) == calibration.CALIBRATION_MAX_ROWS


def test_cli_and_app_files_are_the_same_and_load_in_both(model_files, tmp_path, capsys):
    stats, cli_file = tmp_path / "stats.safetensors", tmp_path / "cli.safetensors"
    main(["calibrate", *model_args(model_files), "--steps", "6", "--out", str(stats)])
    assert "/6" in capsys.readouterr().err  # the progress bar's total: 4 prompts in one batch x 6 steps
    meta = quant.CalibrationStats.load(stats).meta
    assert meta["prompts"] == spread(read_prompts(CALIBRATION_PROMPTS), 4) and meta["steps"] == 6  # the app's plan
    rows = quant.CalibrationStats.load(stats).samples
    assert meta["sample_rows"] == calibration.CALIBRATION_MAX_ROWS  # a tiny model: the cap
    assert max(r.shape[1] for r in rows.values()) == meta["sample_rows"]
    main(["quantize", *model_args(model_files), "--preset", "w8a8-sqd", "--stats-in", str(stats),
          "--out", str(cli_file)])
    assert "x fp32" in capsys.readouterr().out
    loaded = load(model_files)
    app = QuantizedModels(loaded, cache_dir=tmp_path / "cache", calibration_prompts=read_prompts(CALIBRATION_PROMPTS),
                          calibration_steps=6)
    app.get("w8a8-sqd")  # the app calibrates itself under the same plan and caches the same file
    (app_file,) = app.cache_dir.glob("w8a8-sqd-*.safetensors")
    cli_tensors, app_tensors = load_file(cli_file), load_file(app_file)
    assert cli_tensors.keys() == app_tensors.keys()
    assert all(torch.equal(cli_tensors[key], app_tensors[key]) for key in cli_tensors)
    served = QuantizedModels(loaded, cache_dir=tmp_path / "served", calibration_prompts=["x"])
    assert served.add_saved(cli_file).name == "w8a8-sqd" and served.ready("w8a8-sqd") and not served.stats_ready
    main(["check", *model_args(model_files), str(cli_file), str(app_file)])
    assert capsys.readouterr().out.count("w8a8-sqd, fits local:") == 2


def test_check_and_quantize_name_what_does_not_fit(model_files, tiny_audio, tmp_path):
    other = tiny_audio.fresh_copy()  # another DiT (1 channel, patch 64)
    quant.quantize_(other, "w8a8-dynamic")
    quant.save(quant.find_dit(other), "w8a8-dynamic", tmp_path / "other.safetensors")
    quant.calibrate(tiny_audio.model, lambda: sat.sample(
        tiny_audio.model, ["white noise"], settings=tiny_audio.sampling.replace(steps=2), seed=0,
        sample_size=tiny_audio.sample_length(0.5)), progress=False).save(tmp_path / "stats.safetensors")
    with pytest.raises(SystemExit, match="does not fit this model"):
        main(["check", *model_args(model_files), str(tmp_path / "other.safetensors")])
    with pytest.raises(SystemExit, match="calibration statistics .* do not fit this model"):
        main(["quantize", *model_args(model_files), "--preset", "w8a8-static", "--out", str(tmp_path / "q"),
              "--stats-in", str(tmp_path / "stats.safetensors")])


def test_unknown_preset_and_missing_file_are_argparse_errors(model_files, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", *model_args(model_files), "--preset", "w3a8", "--out", "x"])
    with pytest.raises(SystemExit):
        main(["memory", "--model-config", str(model_files / "missing.json")])
    assert "no such file" in capsys.readouterr().err


def test_memory_of_a_config_for_every_preset(model_files, capsys):
    main(["memory", "--model-config", str(model_files / "model_config.json")])
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in quant.PRESETS)
