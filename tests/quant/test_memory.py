"""memory_report at Stable Audio Open's DiT shape (built on the meta device: shapes only, no weights)."""
import pytest
import torch

import quant
from lab import sat


def sao_shaped_dit():
    """Quantizing on the meta device runs every op for its shapes and dtypes only."""
    return sat.build_dit(sat.SAO_DIT, device="meta")


def constant_stats(dit, n_timesteps=4):
    """Stand-in calibration statistics: memory does not depend on their values."""
    return quant.CalibrationStats.placeholder(dit, n_timesteps)


@pytest.fixture(scope="module")
def fp_report():
    return quant.memory_report(sao_shaped_dit())


def test_fp_model_report_matches_sao(fp_report):
    assert len(fp_report.layers) == 176
    assert 1.05e9 < fp_report.linear_fp32_bytes / 4 < 1.06e9  # 1.056 B parameters in linears
    assert fp_report.ratio_fp32 == pytest.approx(1.0)


@pytest.mark.parametrize("preset, limit", [("w8a8-dynamic", 0.26), ("w8a8-static", 0.26),
                                           ("w4a8-dynamic+lora", 0.15), ("w8a8-sqd", 0.27), ("w4a8-sqd+lora", 0.15)])
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
    quant.quantize_(dit, quant.get_recipe("w8a8-sqd-pergroup").replace(timestep_groups=2), constant_stats(dit))
    report = quant.memory_report(dit)
    assert 0.5 < report.ratio_fp32 < 0.52


def test_the_report_names_what_each_part_of_a_sat_model_holds():
    from tests.tiny_models import tiny_diffusion_cond

    model = tiny_diffusion_cond()
    quant.quantize_(model, quant.get_recipe("w8a8-dynamic"))
    report = quant.memory_report(model)
    assert set(report.parts) == {name for name, _ in model.named_children()} and "model" in report.parts
    assert sum(report.parts.values()) == report.model_bytes  # the parts add up to the whole
    assert report.parts["model"] > report.linear_bytes  # the DiT holds its linears and more
    assert "Parts of the module: model" in report.to_markdown()


def test_run_time_weight_copies_count_as_resident_not_stored():
    from tests.tiny_models import dit_inputs, tiny_dit

    dit = tiny_dit()
    quant.quantize_(dit, quant.get_recipe("w4a8-dynamic"))
    before = quant.memory_report(dit)
    x, t, kwargs = dit_inputs()
    with torch.no_grad():
        dit(x, t, **kwargs)  # int4 weights get an int8 (or prepacked) copy on the first forward
    after = quant.memory_report(dit)
    assert (after.linear_bytes, after.ratio_fp32, after.model_bytes) == (before.linear_bytes, before.ratio_fp32,
                                                                          before.model_bytes)
    assert after.resident_linear_bytes > before.resident_linear_bytes == before.linear_bytes
    assert "resident" in after.to_markdown()
