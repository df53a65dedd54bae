"""The benchmark's parts that need no full run: SAO-shape memory targets on the meta device, paired sampling
with the per-step record, the target checks, the command line, MOS and CLAP."""
import csv

import numpy as np
import pytest
import torch

import quant
from bench import external, fidelity, run, sampling, shape, targets, torchao
from bench.config import QUICK_DIT as QUICK_SHAPE
from bench.random_models import random_dit
from lab import sat
from lab.study import COLUMNS


def test_sao_shape_memory_targets():
    memory = shape.memory_at_shape(sat.SAO_DIT, ["fp32", "w8a8-static", "w4a8-dynamic+lora"], progress=False)
    assert memory["fp32"]["linear_bytes"] > 4.0e9  # 1.056 B parameters in SAO's DiT linears
    assert memory["w8a8-static"]["linear_ratio_fp32"] <= 0.26
    assert memory["w4a8-dynamic+lora"]["linear_ratio_fp32"] <= 0.15


def test_generate_batch_records_x_per_step_and_pairs_the_noise():
    loaded = fidelity.quick_model()
    settings = loaded.sampling.replace(steps=3, seconds=0.5)
    prompts = ["sine tone at A4", "white noise"]
    first = sampling.generate_batch(loaded.model, loaded, prompts, seed=5, settings=settings)
    again = sampling.generate_batch(loaded.model, loaded, prompts, seed=5, settings=settings)
    assert first.audio.shape == (2, 1, 8000) and first.audio.dtype == np.float32
    assert len(first.trajectory) == 3 and first.trajectory[0].shape[0] == 2 and first.seconds > 0
    np.testing.assert_array_equal(first.audio, again.audio)
    dit = loaded.model.model
    bf16 = sampling.generate_batch(loaded.model, loaded, prompts, seed=5, settings=settings,
                                   compute_dtype=torch.bfloat16)
    assert loaded.model.model is dit  # the autocast wrapper is removed again
    assert np.isfinite(bf16.audio).all() and not np.array_equal(bf16.audio, first.audio)
    other_seed = sampling.generate_batch(loaded.model, loaded, prompts, seed=6, settings=settings)
    assert not np.array_equal(other_seed.audio, first.audio)


def _target(checked: list[dict], name: str) -> dict:
    return next(t for t in checked if t["target"] == name)


def test_check_targets_compares_each_value_with_its_threshold():
    rows = {"fp32": {"speed": {"float_s": 8.0}}, "bf16": {"speed": {"float_s": 2.0}},
            "w8a8-static": {"speed": {"integer_s": 2.0}, "memory_sao": {"linear_ratio_fp32": 0.3},
                            "fidelity": {"snr_db": 30.0, "adherence_delta": -2.5}},
            "w8a8-dynamic": {"speed": {"integer_s": 2.4}, "fidelity": {"snr_db": float("nan")}}}
    checked = targets.check_targets(rows)
    vnni = "W8A8 static integer DiT forward, speed-up vs fp32 (VNNI without native bf16)"
    assert _target(checked, vnni) == {"target": vnni, "value": 4.0, "op": ">=", "threshold": 3.5, "result": "pass"}
    fastest = _target(checked, "W8A8 static integer DiT forward, speed-up vs the fastest float path")
    assert fastest["value"] == 1.0 and fastest["result"] == "miss"  # bf16 (2 s) is the fastest float path here
    assert _target(checked, "W8A8 dynamic time / W8A8 static time (integer)")["result"] == "miss"  # 1.2 > 1.1
    assert _target(checked, "memory at SAO shape, W8A8 static (linear bytes x fp32)")["result"] == "miss"
    assert _target(checked, "SNR vs FP, W8A8 static (dB)")["result"] == "pass"
    assert _target(checked, "SNR vs FP, W8A8 dynamic (dB)")["result"] == "not measured"  # NaN
    adherence = _target(checked, "|adherence - FP|, W8A8 static (points)")
    assert adherence["value"] == 2.5 and adherence["result"] == "miss"
    assert _target(checked, "SNR vs FP, W8A8 sqd (dB)")["result"] == "not measured"  # row absent
    targets.add_speedups(rows)
    assert rows["w8a8-static"]["speed"]["integer_x_fp32"] == 4.0 and rows["w8a8-static"]["speed"]["x_bf16"] == 1.0
    assert rows["w8a8-static"]["speed"]["x_fastest_float"] == 1.0 and rows["fp32"]["speed"]["x_fastest_float"] == 0.25


def test_a_processor_kinds_own_speed_targets_read_other_kind_elsewhere():
    rows = {"fp32": {"speed": {"float_s": 8.0}}, "bf16": {"speed": {"float_s": 2.0}},
            "w8a8-static": {"speed": {"integer_s": 1.0}}}
    vnni = "W8A8 static integer DiT forward, speed-up vs fp32 (VNNI without native bf16)"
    bf16 = "W8A8 static integer DiT forward, speed-up vs the fastest float path (VNNI + AVX512-BF16)"
    general = "W8A8 static integer DiT forward, speed-up vs the fastest float path"
    on_bf16_kind = targets.check_targets(rows, "vnni-bf16")
    assert _target(on_bf16_kind, bf16)["result"] == "pass"  # 2x the fastest float path (bf16)
    assert _target(on_bf16_kind, vnni) == {"target": vnni, "value": 8.0, "op": ">=", "threshold": 3.5,
                                           "result": "other kind"}
    on_vnni = targets.check_targets(rows, "vnni")
    assert _target(on_vnni, vnni)["result"] == "pass" and _target(on_vnni, bf16)["result"] == "other kind"
    rows["w8a8-static"]["speed"]["integer_s"] = 1.8  # 1.11x bf16: the bf16 kind's 1.8x missed, 1.2x too
    on_avx2 = targets.check_targets(rows, "avx2")
    assert {_target(on_avx2, name)["result"] for name in (vnni, bf16)} == {"other kind"}
    assert _target(on_avx2, general)["result"] == "miss"
    assert _target(targets.check_targets(rows, "vnni-bf16"), bf16)["result"] == "miss"
    assert _target(targets.check_targets(rows), bf16)["result"] == "miss"  # no profile: every target applies
    del rows["w8a8-static"]
    assert _target(targets.check_targets(rows, "vnni"), vnni)["result"] == "not measured"


def test_held_out_targets_read_the_presets_they_name():
    rows = {"w4a8-static": {"fidelity": {"snr_db": 3.0}},
            targets.STATIC_PRESET: {"fidelity": {"snr_db": 26.0, "held_out_gap_db": 3.5}},
            targets.W4A8_PRESET: {"fidelity": {"snr_db": 20.5}, "memory_sao": {"linear_ratio_fp32": 0.149},
                                  "speed": {"integer_s": 2.1}},
            "w8a8-dynamic": {"fidelity": {"snr_db": 30.0, "worst_family_snr_db": 14.0}, "speed": {"integer_s": 2.0}}}
    checked = targets.check_targets(rows)
    assert _target(checked, "SNR vs FP, W8A8 static-rot (dB)")["result"] == "pass"
    assert _target(checked, "calibration-like minus held-out SNR, W8A8 static-rot (dB)")["result"] == "miss"
    assert _target(checked, f"SNR of {targets.W4A8_PRESET} minus W4A8 static (dB)")["value"] == 17.5
    assert _target(checked, f"memory at SAO shape, {targets.W4A8_PRESET} (linear bytes x fp32)")["result"] == "pass"
    assert _target(checked, f"{targets.W4A8_PRESET} time / W8A8 dynamic time (integer)")["value"] == pytest.approx(1.05)
    assert _target(checked, "worst caption family, W8A8 dynamic (dB)")["result"] == "miss"
    assert _target(checked, "worst caption family, W8A8 sqd (dB)")["result"] == "not measured"
    assert targets.W4A8_PRESET in quant.PRESETS and targets.STATIC_PRESET in quant.PRESETS


def test_rows_timed_alongside_fp32_are_read_at_the_fp32_rows_pace():
    # w8a8-static ran while the machine was busy (fp32 alongside it took 12 s, not 8): its speed-up is 12 / 3
    rows = {"fp32": {"speed": {"float_s": 8.0}}, "bf16": {"speed": {"float_s": 32.0}},
            "w8a8-static": {"speed": {"integer_s": 3.0, "fp32_paired_s": 12.0}},
            "w8a8-dynamic": {"speed": {"integer_s": 2.2, "fp32_paired_s": 8.0}}}
    assert targets.row_seconds(rows, "w8a8-static") == 2.0
    targets.add_speedups(rows)
    assert rows["w8a8-static"]["speed"]["integer_x_fp32"] == 4.0
    assert rows["w8a8-static"]["speed"]["x_fastest_float"] == 4.0 and rows["w8a8-static"]["speed"]["x_bf16"] == 16.0
    checked = targets.check_targets(rows)
    assert _target(checked, "W8A8 static integer DiT forward, speed-up vs fp32 (VNNI without native bf16)")["value"] == 4.0
    assert _target(checked, "W8A8 dynamic time / W8A8 static time (integer)")["value"] == pytest.approx(1.1)


def test_weight_only_rows_timed_alongside_bf16_are_read_at_the_bf16_rows_pace():
    # w8a16 ran beside the bf16 DiT (4.4 s there against the bf16 row's 4.0): at the bf16 row's pace, 4.0 x 4.2 / 4.4
    rows = {"fp32": {"speed": {"float_s": 8.0}}, "bf16": {"speed": {"float_s": 4.0}},
            "w8a16": {"speed": {"integer_s": 4.2, "bf16_paired_s": 4.4}}}
    assert targets.row_seconds(rows, "w8a16") == pytest.approx(4.2 * 4.0 / 4.4)
    targets.add_speedups(rows)
    assert rows["w8a16"]["speed"]["x_fastest_float"] == pytest.approx(4.4 / 4.2)


def test_linear_bound_follows_the_share_and_the_static_speed_up():
    # linears are 80 % of the fp32 forward: free linears give 5x; a 2.5x forward means linears at 0.8 / 0.2 = 4x
    rows = {"fp32": {"speed": {"linear_share": 0.8}}, "w8a8-static": {"speed": {"integer_x_fp32": 2.5}}}
    bound = targets.linear_bound(rows)
    assert bound["free_linears_x_fp32"] == pytest.approx(5.0)
    assert bound["w8a8_static_linears_x_fp32"] == pytest.approx(4.0)
    rows["w8a8-static"]["speed"]["integer_x_fp32"] = 6.0  # faster than free linears allow: no implied speed
    assert targets.linear_bound(rows)["w8a8_static_linears_x_fp32"] is None
    assert targets.linear_bound({"fp32": {"speed": {}}}) is None


def test_linear_time_share_counts_the_quantized_linears_and_removes_its_hooks():
    dit = random_dit(QUICK_SHAPE)
    x, t, kwargs = shape.forward_inputs(QUICK_SHAPE, 16, 4)
    share = shape.linear_time_share(dit, lambda: dit(x, t, **kwargs), reps=2)
    assert 0 < share < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in dit.modules())


def test_torchao_section_says_why_it_did_not_run_or_lists_every_row():
    assert torchao.torchao_markdown({"status": "not run: torchao is not installed"})[-1].startswith("not run")
    rows = {"fp32": {"seconds": 4.0, "x_fp32": 1.0, "sqnr_vs_fp32_db": None},
            "w8a8-dynamic + torch.compile": {"seconds": 2.0, "x_fp32": 2.0, "sqnr_vs_fp32_db": 30.0}}
    lines = torchao.torchao_markdown({"status": "ok", "torchao": "0.18.0", "reps": 3, "rows": rows,
                                      "compile_s": {"w8a8-dynamic + torch.compile": 12.0}})
    assert "| w8a8-dynamic + torch.compile | 2.000 | 2.00 | 30.0 |" in lines and "| fp32 | 4.000 | 1.00 | ref |" in lines
    assert any("w8a8-dynamic + torch.compile 12 s" in line for line in lines)


def test_cli_rejects_unknown_recipe_and_missing_ratings(tmp_path):
    with pytest.raises(SystemExit, match="valid presets"):
        run.main(["--quick", "--recipes", "w9a9-magic", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        run.main(["--quick", "--ratings", str(tmp_path / "absent.csv"), "--out", str(tmp_path)])


def test_mos_rows_from_a_study_ratings_csv(tmp_path):
    path = tmp_path / "ratings.csv"
    scores = {"reference": [5, 4, 5], "w8a8-sqd+lora": [4, 4, 3, 5], "w4a8-static": [2]}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for condition, values in scores.items():
            for index, score in enumerate(values):
                writer.writerow({"rater_id": f"r{index}", "trial_id": f"{condition}-{index}", "test_type": "acr",
                                 "item": 0, "condition": condition, "score": score, "attention_target": "",
                                 "attention_passed": ""})
    mos = external.mos_rows(path, ["fp32", "bf16", "w8a8-sqd+lora", "w4a8-static", "w4a8-sqd"])
    assert set(mos) == {"fp32", "w8a8-sqd+lora", "w4a8-static"}
    assert mos["w8a8-sqd+lora"]["mos"] == pytest.approx(4.0) and mos["w8a8-sqd+lora"]["n"] == 4
    assert mos["fp32"]["ci_low"] < mos["fp32"]["mos"] < mos["fp32"]["ci_high"]


def test_clap_says_why_it_did_not_run(tmp_path):
    assert "not run" in external.clap_metrics(None, "HTSAT-tiny", [], {}, 16000)["status"]
    assert "not found" in external.clap_metrics(tmp_path / "clap.pt", "HTSAT-tiny", ["x"], {"fp32": None}, 16000)["status"]


def test_kernel_table_times_every_path_at_each_sao_shape():
    from bench import kernels as kernel_bench

    table = kernel_bench.kernel_table(tokens=4, reps=1)
    assert list(table) == [f"{k} x {n}" for k, n in kernel_bench.SAO_LINEAR_SHAPES]
    for timings in table.values():
        assert {"fp32 F.linear", "bf16 F.linear", "W8A8 int_mm dynamic", "W4A8 int_mm dynamic",
                "quantize per token (dynamic)"} <= set(timings)
        assert sum(name.startswith("rotate") for name in timings) == 2  # the presets' form and one matmul
        assert sum(name.startswith(("W8A16", "W4A16")) for name in timings) == 6  # 3 paths x 2 weight widths
        assert all(ms > 0 for ms in timings.values())
