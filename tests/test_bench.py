"""The benchmark: `python -m lab.bench --quick` end to end (structure and invariants of its outputs, never
timings), SAO-shape memory targets on the meta device, and the sensitivity / mixed-precision building blocks."""
import csv
import json
import math

import pytest
import torch
from torch import nn

import quant
from lab import bench, sensitivity
from lab.ratings import COLUMNS
from tests.tiny_models import dit_inputs, tiny_dit


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench.main(["--quick", "--out", str(out), "--no-progress"])
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_row_and_section(quick):
    out, results = quick
    rows = results["rows"]
    assert list(rows) == ["fp32", "bf16", *bench.QUICK_RECIPES]
    for name, row in rows.items():
        assert {"memory_sao", "memory_model", "speed", "fidelity", "e2e"} <= set(row), name
    assert results["meta"]["machine"]["torch"] == torch.__version__
    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown and all(f"| {name} |" in markdown for name in rows)
    assert (out / "chart.html").stat().st_size > 1000


def test_quick_memory_orders_precisions(quick):
    rows = quick[1]["rows"]
    for where in ("memory_sao", "memory_model"):
        ratio = {name: row[where]["linear_ratio_fp32"] for name, row in rows.items()}
        assert ratio["fp32"] == pytest.approx(1.0) and ratio["bf16"] == pytest.approx(0.5)
        for method in ("static", "dynamic", "sqd+lora"):
            assert ratio[f"w4a8-{method}"] < ratio[f"w8a8-{method}"], (where, method)
        assert ratio["w8a8-static"] < ratio["bf16"]
        # sqd holds one weight copy per timestep group: more bytes than plain dynamic
        assert ratio["w8a8-sqd+lora"] > ratio["w8a8-dynamic"]


def test_quick_fidelity_pairs_the_noise_and_orders_bits(quick):
    rows = quick[1]["rows"]
    fp = rows["fp32"]["fidelity"]
    # the FP row is generated again with the same prompts and seed: identical audio and trajectory
    assert fp["snr_db"] == 120.0 and fp["trajectory_rel_error"] == 0.0
    steps = len(fp["trajectory_rel_error_per_step"])
    for name in bench.QUICK_RECIPES:
        fidelity = rows[name]["fidelity"]
        assert math.isfinite(fidelity["snr_db"]) and fidelity["snr_db"] < 120.0, name
        assert fidelity["logmel_db"] >= 0 and len(fidelity["trajectory_rel_error_per_step"]) == steps
        assert 0 <= fidelity["adherence"] <= 100
    assert rows["w8a8-dynamic"]["fidelity"]["snr_db"] > rows["w4a8-dynamic"]["fidelity"]["snr_db"]
    # bf16 compute from the same (fp32) noise stays close to fp32: the pairing survives autocast
    assert rows["bf16"]["fidelity"]["snr_db"] > 20


def test_quick_speed_ratios_are_positive(quick):
    rows = quick[1]["rows"]
    assert rows["fp32"]["speed"]["float_x_fp32"] == pytest.approx(1.0)
    for name, row in rows.items():
        speed = row["speed"]
        key = "float_x_fp32" if name in bench.FLOAT_ROWS else "integer_x_fp32"
        assert speed[key] > 0 and math.isfinite(speed[key]), name
        assert row["e2e"]["seconds_per_clip"] > 0
    assert rows["w8a8-static"]["speed"]["simulated_x_fp32"] > 0      # simulated timed where activations are quantized
    assert "simulated_s" not in rows["w4a16"]["speed"]


def test_quick_targets_and_studies(quick):
    results = quick[1]
    assert {t["result"] for t in results["targets"]} <= {"pass", "miss", "not measured"}
    measured = {t["target"] for t in results["targets"] if t["result"] != "not measured"}
    assert "W8A8 static integer DiT forward, speed-up vs fp32" in measured

    layers = results["sensitivity"]["layers"]
    snrs = [entry["snr_db"] for entry in layers]
    assert snrs == sorted(snrs) and all(math.isfinite(s) for s in snrs)
    assert {e["name"] for e in layers if e["default_skip"]} >= {"transformer.project_in", "transformer.project_out"}

    uniform, mixed, lora = results["mixed_precision"]["variants"]
    assert uniform["linear_bytes"] < mixed["linear_bytes"]
    assert len(results["mixed_precision"]["high_layers"]) == 1  # quick mode: k = 1
    assert lora["linear_bytes"] > uniform["linear_bytes"]

    sweep = results["sqd_sweep"]
    assert [s["groups"] for s in sweep] == sorted(s["groups"] for s in sweep) and sweep[-1]["all_steps"]
    for smaller, larger in zip(sweep, sweep[1:]):
        assert smaller["linear_bytes"] < larger["linear_bytes"]
        assert smaller["sao_linear_ratio_fp32"] < larger["sao_linear_ratio_fp32"]
    assert results["clap"]["status"].startswith("not run")


def test_sao_shape_memory_targets():
    memory = bench.memory_at_shape(bench.SAO_DIT, ["fp32", "w8a8-static", "w4a8-dynamic+lora"], progress=False)
    assert memory["fp32"]["linear_bytes"] > 4.0e9  # 1.056 B parameters in SAO's DiT linears
    assert memory["w8a8-static"]["linear_ratio_fp32"] <= 0.26
    assert memory["w4a8-dynamic+lora"]["linear_ratio_fp32"] <= 0.15


def test_cli_rejects_unknown_recipe_and_missing_ratings(tmp_path):
    with pytest.raises(SystemExit, match="valid presets"):
        bench.main(["--quick", "--recipes", "w9a9-magic", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        bench.main(["--quick", "--ratings", str(tmp_path / "absent.csv"), "--out", str(tmp_path)])


def test_mos_rows_from_ratings_csv(tmp_path):
    path = tmp_path / "ratings.csv"
    scores = {("FP32", "none"): [5, 4, 5], ("W8A8", "sqd+lora"): [4, 4, 3, 5], ("W4A8", "static"): [2]}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for (precision, method), values in scores.items():
            for score in values:
                writer.writerow({"precision": precision, "method": method, "score": score})
    mos = bench.mos_rows(path, ["fp32", "bf16", "w8a8-sqd+lora", "w4a8-static", "w4a8-sqd"])
    assert set(mos) == {"fp32", "w8a8-sqd+lora", "w4a8-static"}
    assert mos["w8a8-sqd+lora"]["mos"] == pytest.approx(4.0) and mos["w8a8-sqd+lora"]["n"] == 4
    assert mos["fp32"]["ci_low"] < mos["fp32"]["mos"] < mos["fp32"]["ci_high"]


def test_clap_says_why_it_did_not_run(tmp_path):
    assert "not run" in bench.clap_metrics(None, "HTSAT-tiny", [], {}, 16000)["status"]
    assert "not found" in bench.clap_metrics(tmp_path / "clap.pt", "HTSAT-tiny", ["x"], {"fp32": None}, 16000)["status"]


# ---- lab.sensitivity on a tiny random SAT DiT --------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_and_calls():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    calls = sensitivity.record_dit_calls(dit, lambda: [dit(x, torch.full((2,), t), **kwargs) for t in (0.2, 0.5, 0.8)],
                                         keep=2)
    return dit, calls


def test_record_dit_calls_keeps_evenly_spread_calls(dit_and_calls):
    _, calls = dit_and_calls
    assert [float(call.args[1][0]) for call in calls] == pytest.approx([0.2, 0.8])


def test_layer_sensitivity_quantizes_one_layer_at_a_time(dit_and_calls):
    dit, calls = dit_and_calls
    recipe = quant.get_recipe("w4a8-dynamic")
    ranking = sensitivity.layer_sensitivity(dit, recipe, calls, progress=False)
    assert {s.name for s in ranking} == set(quant.linear_layers(dit))
    assert [s.snr_db for s in ranking] == sorted(s.snr_db for s in ranking)
    assert all(math.isfinite(s.snr_db) and s.snr_db < 120 for s in ranking)
    one = sensitivity.quantize_only(dit, recipe, {ranking[0].name})
    assert list(quant.quantized_layers(one)) == [ranking[0].name]
    blocks = sensitivity.block_sensitivity(dit, recipe, calls, progress=False)
    assert sorted(b.name for b in blocks) == ["transformer.layers.0", "transformer.layers.1"]


def test_mixed_precision_keeps_chosen_layers_at_8_bit():
    model = tiny_dit()
    high = ["transformer.layers.0.ff.ff.2", "transformer.layers.1.self_attn.to_qkv"]
    sensitivity.mixed_precision_(model, quant.get_recipe("w4a8-dynamic"), quant.get_recipe("w8a8-dynamic"), high)
    bits = {name: layer.recipe.w_bits for name, layer in quant.quantized_layers(model).items()}
    assert {name for name, b in bits.items() if b == 8} == set(high)
    assert set(bits) == set(quant.quantization_targets(tiny_dit(), quant.get_recipe("w4a8-dynamic")))
    assert isinstance(model.get_submodule("transformer.project_in"), nn.Linear)  # default skip stays float
    x, t, kwargs = dit_inputs()
    assert torch.isfinite(model(x, t, **kwargs)).all()


def test_mixed_precision_rejects_bad_input():
    w4, static = quant.get_recipe("w4a8-dynamic"), quant.get_recipe("w8a8-static")
    with pytest.raises(ValueError, match="no calibration"):
        sensitivity.mixed_precision_(tiny_dit(), w4, static, ["transformer.layers.0.ff.ff.2"])
    with pytest.raises(ValueError, match="no linear layers named"):
        sensitivity.mixed_precision_(tiny_dit(), w4, quant.get_recipe("w8a8-dynamic"), ["transformer.nope"])


def test_equal_memory_lora_rank_spends_the_same_bytes():
    base = quant.get_recipe("w4a8-dynamic")
    uniform = quant.quantize_(tiny_dit(), base)
    mixed = sensitivity.mixed_precision_(tiny_dit(), base, quant.get_recipe("w8a8-dynamic"),
                                         ["transformer.layers.0.ff.ff.0.proj", "transformer.layers.1.ff.ff.0.proj"])
    extra = quant.memory_report(mixed).linear_bytes - quant.memory_report(uniform).linear_bytes
    rank = sensitivity.equal_memory_lora_rank(tiny_dit(), base, extra)
    lora = quant.quantize_(tiny_dit(), base.replace(lora_rank=rank))
    lora_extra = quant.memory_report(lora).linear_bytes - quant.memory_report(uniform).linear_bytes
    per_rank = lora_extra / rank
    assert abs(lora_extra - extra) <= per_rank / 2 + 1
