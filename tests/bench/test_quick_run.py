"""`python -m bench --quick` end to end: structure and invariants of its outputs, never timings.

One quick run (~25 s on 2 loaded cores, tiny random models) is shared by every test of this module."""
import json
import math

import pytest
import torch

from bench import config, run
from bench import targets as bench_targets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run.main(["--quick", "--out", str(out), "--no-progress"])
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_row_and_section(quick):
    out, results = quick
    rows = results["rows"]
    assert list(rows) == ["fp32", "bf16", *config.QUICK_RECIPES]
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
    results = quick[1]
    rows = results["rows"]
    fp = rows["fp32"]["fidelity"]
    # the FP row is generated again with the same prompts and seed: identical audio and trajectory
    assert fp["snr_db"] == 120.0 and fp["trajectory_rel_error"] == 0.0
    assert fp["adherence_delta"] == 0.0
    steps = len(fp["trajectory_rel_error_per_step"])
    n_prompts = len(results["meta"]["fidelity_prompts"])
    assert n_prompts == 2  # quick mode: max_prompts
    for name in rows:
        fidelity = rows[name]["fidelity"]
        if name in config.QUICK_RECIPES:
            assert math.isfinite(fidelity["snr_db"]) and fidelity["snr_db"] < 120.0, name
        assert fidelity["logmel_db"] >= 0 and len(fidelity["trajectory_rel_error_per_step"]) == steps
        # adherence is the share of clips judged correct: one clip = 100 / n_prompts points
        per_prompt = fidelity["adherence_per_prompt"]
        assert len(per_prompt) == n_prompts and all(isinstance(ok, bool) for ok in per_prompt), name
        assert fidelity["adherence"] == pytest.approx(100.0 * sum(per_prompt) / n_prompts), name
        assert fidelity["adherence_delta"] == pytest.approx(fidelity["adherence"] - fp["adherence"]), name
    assert rows["w8a8-dynamic"]["fidelity"]["snr_db"] > rows["w4a8-dynamic"]["fidelity"]["snr_db"]
    # bf16 compute from the same (fp32) noise stays close to fp32: the pairing survives autocast
    assert rows["bf16"]["fidelity"]["snr_db"] > 20


def test_quick_speed_ratios_are_positive(quick):
    rows = quick[1]["rows"]
    assert rows["fp32"]["speed"]["float_x_fp32"] == pytest.approx(1.0)
    assert 0 < rows["fp32"]["speed"]["linear_share"] < 1
    assert "## What you would use instead: torchao" in (quick[0] / "results.md").read_text()
    for name, row in rows.items():
        speed = row["speed"]
        key = "float_x_fp32" if name in config.FLOAT_ROWS else "integer_x_fp32"
        assert speed[key] > 0 and math.isfinite(speed[key]), name
        assert row["e2e"]["seconds_per_clip"] > 0
    assert rows["w8a8-static"]["speed"]["simulated_x_fp32"] > 0      # simulated timed where activations are quantized
    assert "simulated_s" not in rows["w4a16"]["speed"]


def test_quick_targets_follow_the_measured_rows(quick):
    results = quick[1]
    rows, targets = results["rows"], {t["target"]: t for t in results["targets"]}
    assert len(targets) == len(results["targets"])  # names are unique
    profile = bench_targets.profile_name(results["meta"]["machine"])
    for t in results["targets"]:
        kind = next((k for k, (name, *_) in bench_targets.KIND_SPEED_TARGETS.items()
                     if t["target"].endswith(f"({name})")), None)
        if kind not in (None, profile):  # a target of another processor kind than the run's
            assert t["result"] == "other kind", t
        elif t["value"] is None:
            assert t["result"] == "not measured", t
        else:
            passed = t["value"] >= t["threshold"] if t["op"] == ">=" else t["value"] <= t["threshold"]
            assert t["result"] == ("pass" if passed else "miss"), t
    assert sum(t["result"] == "other kind" for t in results["targets"]) == len(bench_targets.KIND_SPEED_TARGETS) - (
        profile in bench_targets.KIND_SPEED_TARGETS)
    # measured values are the rows' own numbers; targets on rows the quick run lacks are not measured
    speedup = targets["W8A8 static integer DiT forward, speed-up vs fp32 (VNNI without native bf16)"]["value"]
    static = rows["w8a8-static"]["speed"]
    assert speedup == pytest.approx(static["fp32_paired_s"] / static["integer_s"])  # fp32 timed alongside it
    assert static["integer_x_fp32"] == pytest.approx(speedup)
    assert (targets["memory at SAO shape, W8A8 static (linear bytes x fp32)"]["value"]
            == rows["w8a8-static"]["memory_sao"]["linear_ratio_fp32"])
    assert targets["SNR vs FP, W8A8 sqd+lora (dB)"]["value"] == rows["w8a8-sqd+lora"]["fidelity"]["snr_db"]
    gain = targets["SNR of W4A8 sqd+lora minus W4A8 static (dB)"]["value"]
    assert gain == pytest.approx(rows["w4a8-sqd+lora"]["fidelity"]["snr_db"] - rows["w4a8-static"]["fidelity"]["snr_db"])
    assert targets["SNR vs FP, W8A8 smoothquant (dB)"]["result"] == "not measured"
    assert targets["W8A8 sqd time / W8A8 static time (integer)"]["result"] == "not measured"


def test_quick_studies(quick):
    results = quick[1]
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
