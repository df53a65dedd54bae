"""memory_report at Stable Audio Open's DiT shape (built on the meta device: shapes only, no weights)."""
import pytest
import torch

import quant

SAO_DIT = dict(io_channels=64, embed_dim=1536, depth=24, num_heads=24, cond_token_dim=768,
               global_cond_dim=1536, project_cond_tokens=False, transformer_type="continuous_transformer")


def sao_shaped_dit():
    from stable_audio_tools.models.dit import DiffusionTransformer
    with torch.device("meta"):  # quantizing on meta runs every op for its shapes and dtypes only
        return DiffusionTransformer(**SAO_DIT)


def constant_stats(dit, n_timesteps=4):
    """Stand-in calibration statistics: memory does not depend on their values."""
    timesteps = [(i + 0.5) / n_timesteps for i in range(n_timesteps)]
    return quant.CalibrationStats(timesteps, {name: torch.ones(n_timesteps, layer.in_features)
                                              for name, layer in quant.linear_layers(dit).items()})


@pytest.fixture(scope="module")
def fp_report():
    return quant.memory_report(sao_shaped_dit())


def test_fp_model_report_matches_sao(fp_report):
    assert len(fp_report.layers) == 176
    assert 1.05e9 < fp_report.linear_fp32_bytes / 4 < 1.06e9  # 1.056 B parameters in linears
    assert fp_report.ratio_fp32 == pytest.approx(1.0)


@pytest.mark.parametrize("preset, limit", [("w8a8-dynamic", 0.26), ("w8a8-static", 0.26),
                                           ("w4a8-dynamic+lora", 0.15)])
def test_sao_shape_memory_targets(preset, limit):
    dit = sao_shaped_dit()
    recipe = quant.get_recipe(preset)
    quant.quantize_(dit, recipe, constant_stats(dit) if recipe.needs_calibration else None)
    report = quant.memory_report(dit)
    assert report.ratio_fp32 <= limit, report.to_markdown()
    assert report.by_kind["scales"] > 0 and (report.by_kind["lowrank"] > 0) == (recipe.lora_rank > 0)
    assert report.model_bytes < report.model_fp32_bytes * (limit + 0.01)
    assert "x fp32" in report.to_markdown(per_layer=True)


def test_timestep_groups_cost_one_weight_copy_each():
    dit = sao_shaped_dit()
    quant.quantize_(dit, quant.get_recipe("w8a8-sqd").replace(timestep_groups=2), constant_stats(dit))
    report = quant.memory_report(dit)
    assert 0.5 < report.ratio_fp32 < 0.52
