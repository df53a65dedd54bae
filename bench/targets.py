"""The performance targets, each measured value against its threshold, and the speed-up ratios they read.

Speed-ups are ratios of seconds measured in the same run (fp32 and bf16 baselines), never absolute times
from another machine: the targets say how much faster, not how fast. A recipe row timed interleaved with fp32
forwards ("fp32_paired_s") is read at the fp32 row's pace: its seconds x fp32 row / fp32 paired, so that its
speed-up is the ratio measured alongside it, and ratios between recipes compare rows timed at different moments
of a shared machine as if at one. Weight-only rows computed in bf16 are timed beside the bf16 DiT instead
("bf16_paired_s") and read at the bf16 row's pace the same way.
"""
from __future__ import annotations

import math

from bench.config import METHODS

STATIC_PRESET = "w8a8-static-rot"       # the static W8A8 preset the held-out targets name
W4A8_PRESET = "w4a8-dynamic-gptq-g8"    # the 4-bit preset within 0.15x the fp32 bytes


def row_seconds(rows: dict, name: str) -> float | None:
    """Seconds of one DiT forward of row `name`: float rows' float time, recipes' integer-backend time (at the fp32
    or bf16 row's pace when it was timed interleaved with that float DiT, see the module docstring)."""
    speed = rows.get(name, {}).get("speed", {})
    if speed.get("float_s"):
        return speed["float_s"]
    seconds = speed.get("integer_s")
    for base in ("fp32", "bf16"):
        paired, pace = speed.get(f"{base}_paired_s"), rows.get(base, {}).get("speed", {}).get("float_s")
        if seconds and paired and pace:
            return seconds * pace / paired
    return seconds


def fastest_float_seconds(rows: dict) -> float | None:
    """The faster of the fp32 and bf16 rows: bf16 wins on CPUs with native bf16 (AMX, AVX512-BF16) and loses
    ~4x on those without, so "faster than bf16" alone would be the wrong yardstick."""
    measured = [s for s in (row_seconds(rows, "fp32"), row_seconds(rows, "bf16")) if s]
    return min(measured) if measured else None


def add_speedups(rows: dict[str, dict]) -> None:
    """Speed-ups against fp32, bf16 and the fastest float path, from the same run's seconds."""
    fp32, bf16, fastest = row_seconds(rows, "fp32"), row_seconds(rows, "bf16"), fastest_float_seconds(rows)
    for name, row in rows.items():
        speed = row.get("speed")
        if not speed or not fp32:
            continue
        own = row_seconds(rows, name)
        for key in ("float", "integer", "simulated"):
            if speed.get(f"{key}_s"):
                speed[f"{key}_x_fp32"] = fp32 / (own if key != "simulated" else speed["simulated_s"])
        if bf16 and own:
            speed["x_bf16"] = bf16 / own
        if fastest and own:
            speed["x_fastest_float"] = fastest / own


def linear_bound(rows: dict) -> dict | None:
    """What the fp32 forward's linear share (bench.shape.linear_time_share) allows: the best speed-up quantizing
    linears could give with free linears, 1 / (1 - share), and the speed-up of the linears themselves that
    W8A8 static's measured forward implies, share / (1 / speed-up - (1 - share))."""
    share = rows.get("fp32", {}).get("speed", {}).get("linear_share")
    static = rows.get("w8a8-static", {}).get("speed", {}).get("integer_x_fp32")
    if not share:
        return None
    implied = share / (1 / static - (1 - share)) if static and 1 / static > 1 - share else None
    return {"linear_share": share, "free_linears_x_fp32": 1 / (1 - share), "w8a8_static_linears_x_fp32": implied}


# Per CPU profile (quant.kernels.PROFILES): the int8 GEMM's peak multiply-adds per cycle over those of the fastest
# float GEMM of that kind of processor, and which float that is. VNNI's vpdpbusd does 64 int8 multiply-adds per
# 512-bit instruction, an fp32 FMA 16 and AVX512-BF16's vdpbf16ps 32; AMX's int8 tiles do twice its bf16 tiles'.
# AVX2 without VNNI: vpmaddubsw and vpmaddwd do twice an fp32 FMA's multiply-adds per cycle. A processor without
# an int8 dot product ("generic") has no int8 limit above its float one to state.
INT8_PEAK = {"avx2": (2.0, "fp32"), "vnni": (4.0, "fp32"), "vnni-bf16": (2.0, "bf16"), "amx": (2.0, "bf16")}
# Where 8-bit weights' exact products take more than one pass of that GEMM (quant.kernels._qlinear: AVX2's pairs
# saturate beyond weights of +-64, so 8-bit weights go in twice and 4-bit ones once): their linears reach peak / passes.
EIGHT_BIT_WEIGHT_PASSES = {"avx2": 2}


def profile_name(machine: dict) -> str:
    """The CPU profile's name from bench.machine's "cpu_profile" ("vnni-bf16, detected: VNNI yes, ...")."""
    return machine.get("cpu_profile", "").split(",")[0].split(":")[0].strip()


def int8_limits(rows: dict, profile: str) -> dict | None:
    """The speed-up over the profile's fastest float forward that int8 can reach, from that forward's shares
    (bench.shape.time_shares): with int8 linears at the profile's int8 peak (INT8_PEAK), and with attention's
    matmuls in int8 as well, each also with those parts free; and per recipe timed, its speed-up over that float
    row and the share of the linears-at-peak limit it reaches. None where the profile has no int8 peak or the
    float row has no shares."""
    if profile not in INT8_PEAK:
        return None
    peak, base = INT8_PEAK[profile]
    speed = rows.get(base, {}).get("speed", {})
    linear, attention, base_seconds = speed.get("linear_share"), speed.get("attention_share"), row_seconds(rows, base)
    if linear is None or attention is None or not base_seconds:
        return None

    def bound(share, factor):
        return 1 / ((1 - share) + share / factor)

    limits = {"profile": profile, "peak": peak, "base": base, "linear_share": linear, "attention_share": attention,
              "eight_bit_weight_passes": EIGHT_BIT_WEIGHT_PASSES.get(profile, 1),
              "linears_at_peak": bound(linear, peak), "linears_free": bound(linear, math.inf),
              "linears_attention_at_peak": bound(linear + attention, peak),
              "linears_attention_free": bound(linear + attention, math.inf)}
    recipes = {}
    for name, row in rows.items():
        seconds = row.get("speed", {}).get("integer_s") and row_seconds(rows, name)
        if seconds:
            recipes[name] = {"x_base": base_seconds / seconds,
                             "of_limit": base_seconds / seconds / limits["linears_at_peak"]}
    return {**limits, "recipes": recipes}


# W8A8 static's speed-up targets that hold on one processor kind only (profile -> the kind's name, the float row
# they read, threshold): its fastest float path is the base. Every kind is also held to 1.2x its fastest float path;
# on AVX2 8-bit weights cannot reach it (int8_limits: two passes), which the limit paragraph of the report states.
KIND_SPEED_TARGETS = {"vnni": ("VNNI without native bf16", "fp32", 3.5),
                      "vnni-bf16": ("VNNI + AVX512-BF16", "the fastest float path", 1.8)}
OTHER_KIND = "other kind"


def check_targets(rows: dict[str, dict], profile: str | None = None) -> list[dict]:
    """Every performance target: {"target", "value", "op", "threshold", "result"}, where result is "pass",
    "miss", "not measured" (value None: the row or section was not run, or the value is NaN) or "other kind" (a
    target of another processor kind than `profile`, the run's CPU profile; None: every target applies)."""
    def value(row, section, key):
        v = rows.get(row, {}).get(section, {}).get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    def ratio(a, b):
        return a / b if a is not None and b else None

    targets = []

    def add(name, measured, op, threshold, kind=None):
        passed = None if measured is None else (measured >= threshold if op == ">=" else measured <= threshold)
        result = "not measured" if passed is None else "pass" if passed else "miss"
        targets.append({"target": name, "value": measured, "op": op, "threshold": threshold,
                        "result": OTHER_KIND if kind and profile and kind != profile else result})

    def seconds(name):
        return row_seconds(rows, name) if rows.get(name, {}).get("speed", {}).get("integer_s") else None

    static8 = seconds("w8a8-static")
    base_seconds = {"fp32": row_seconds(rows, "fp32"), "the fastest float path": fastest_float_seconds(rows)}
    for kind, (kind_name, base, threshold) in KIND_SPEED_TARGETS.items():
        add(f"W8A8 static integer DiT forward, speed-up vs {base} ({kind_name})",
            ratio(base_seconds[base], static8), ">=", threshold, kind)
    add("W8A8 static integer DiT forward, speed-up vs the fastest float path",
        ratio(base_seconds["the fastest float path"], static8), ">=", 1.2)
    for bits in (8, 4):
        for method in ("dynamic", "sqd"):
            add(f"W{bits}A8 {method} time / W{bits}A8 static time (integer)",
                ratio(seconds(f"w{bits}a8-{method}"), seconds(f"w{bits}a8-static")), "<=", 1.1)
    for method in METHODS:
        add(f"W4A8 {method} time / W8A8 {method} time (integer)",
            ratio(seconds(f"w4a8-{method}"), seconds(f"w8a8-{method}")), "<=", 1.1)
    for name in ("w8a16", "w4a16"):
        add(f"{name} time / the fastest float path's time", ratio(seconds(name), fastest_float_seconds(rows)), "<=", 1.0)
    add("quantized demo clip time / full-precision clip time (w8a8-dynamic, end to end)",
        ratio(1.0, value("w8a8-dynamic", "e2e", "speedup_vs_fp")), "<=", 1.0)
    for method in METHODS:
        add(f"memory at SAO shape, W8A8 {method} (linear bytes x fp32)",
            value(f"w8a8-{method}", "memory_sao", "linear_ratio_fp32"), "<=", 0.26)
    for method in METHODS:
        add(f"memory at SAO shape, W4A8 {method}+lora (linear bytes x fp32)",
            value(f"w4a8-{method}+lora", "memory_sao", "linear_ratio_fp32"), "<=", 0.15)
    for method in METHODS:
        for lora in ("", "+lora"):
            add(f"SNR vs FP, W8A8 {method}{lora} (dB)", value(f"w8a8-{method}{lora}", "fidelity", "snr_db"), ">=", 25.0)
    sqd, static4 = value("w4a8-sqd+lora", "fidelity", "snr_db"), value("w4a8-static", "fidelity", "snr_db")
    add("SNR of W4A8 sqd+lora minus W4A8 static (dB)", None if None in (sqd, static4) else sqd - static4, ">=", 6.0)
    # the held-out prompts' targets (docs/fidelity.md): the rotated static preset, the 4-bit preset within 0.15x
    add("SNR vs FP, W8A8 static-rot (dB)", value(STATIC_PRESET, "fidelity", "snr_db"), ">=", 25.0)
    add("calibration-like minus held-out SNR, W8A8 static-rot (dB)",
        value(STATIC_PRESET, "fidelity", "held_out_gap_db"), "<=", 3.0)
    w4 = value(W4A8_PRESET, "fidelity", "snr_db")
    add(f"SNR vs FP, {W4A8_PRESET} (dB)", w4, ">=", 20.0)
    add(f"memory at SAO shape, {W4A8_PRESET} (linear bytes x fp32)",
        value(W4A8_PRESET, "memory_sao", "linear_ratio_fp32"), "<=", 0.15)
    add(f"SNR of {W4A8_PRESET} minus W4A8 static (dB)", None if None in (w4, static4) else w4 - static4, ">=", 6.0)
    add(f"{W4A8_PRESET} time / W8A8 dynamic time (integer)",
        ratio(seconds(W4A8_PRESET), seconds("w8a8-dynamic")), "<=", 1.1)
    for method in ("dynamic", "sqd"):
        add(f"worst caption family, W8A8 {method} (dB)", value(f"w8a8-{method}", "fidelity", "worst_family_snr_db"),
            ">=", 15.0)
    for method in METHODS:
        for lora in ("", "+lora"):
            delta = value(f"w8a8-{method}{lora}", "fidelity", "adherence_delta")
            add(f"|adherence - FP|, W8A8 {method}{lora} (points)", None if delta is None else abs(delta), "<=", 2.0)
    return targets
