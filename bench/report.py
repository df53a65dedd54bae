"""The run's outputs: results.json (every number), results.md (the table, targets, studies, notes) and
chart.html (memory vs fidelity, speed-ups, per-step error). Written after every section, so an interrupted
run keeps what it measured."""
from __future__ import annotations

import json
import math
from pathlib import Path

from bench.config import FLOAT_ROWS
from bench.targets import int8_limits, linear_bound, profile_name
from bench.torchao import torchao_markdown

NOTES = [
    "Memory: bytes held as counted by quant.memory_report (integer codes, every timestep-group weight copy, scales, "
    "smoothing vectors, low-rank branches, biases); 'SAO' = SAO's DiT shape built on the meta device; 'model' = the "
    "evaluated model's DiT. The simulated backend additionally caches one dequantized float weight per layer.",
    "Speed at SAO shape: random N(0, 0.02) weights, calibrated on 4 short forwards; fp32 and bf16 are timed at "
    "the start and at the end of the section and the faster is the baseline (conservative speed-ups); +lora rows get random branch "
    "factors of the right shape instead of an SVD (run time and bytes depend on shape only; the SVD would cost "
    "minutes per recipe on 2 cores). Fidelity rows always use quant's real SVD.",
    "Fidelity: every prompt of a row is generated in one batch from one seed, so full precision and each recipe "
    "start from identical noise; quantized rows run the recipes' integer backend (the default of every preset). "
    "SNR and log-mel distance compare final audio; 'traj err' = mean over steps of |x_q - x_fp| / |x_fp| for the "
    "sampler state x. Adherence = % of clips demo_model.adherence judges correct (one clip = 100 / n_prompts points).",
    "bf16 fidelity row: the fp32 model with its DiT under torch.autocast(bfloat16) (matmuls in bf16), so the "
    "sampler state, its noise and the pretransform stay fp32, as in the quantized rows; a bf16 model would make "
    "SAT draw its noise in bf16, a different sample. Its memory columns are those of a bf16 copy.",
    "Calibration uses prompts of assets/calibration_prompts.txt, stratified over the caption grammar (family, then "
    "level and sound word), with the same sampler settings and other seeds; the fidelity prompts are held out "
    "(assets/fidelity_prompts.txt: other pitches, levels and words, no calibration prompt). 'cal-like' generates "
    "some calibration prompts at the evaluation seed; 'gap' = cal-like SNR minus held-out SNR.",
]


def _fmt(value, spec: str = ".2f", dash: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return dash
    return format(value, spec)


def _int8_limit_lines(rows: dict, machine: dict) -> list[str]:
    """The int8 limit this run's CPU profile implies (bench.targets.int8_limits) and how close each recipe comes."""
    limits = int8_limits(rows, profile_name(machine))
    if not limits:
        return []
    base, passes = limits["base"], limits["eight_bit_weight_passes"]
    eight_bit = (f" Exact products of 8-bit weights take {passes} passes of the int8 GEMM on this kind (4-bit weights "
                 f"one): W8A8 linears peak at {limits['peak'] / passes:.0f}x {base}." if passes > 1 else "")
    lines = ["", f"Int8 limit on this processor kind ({limits['profile']}: int8 peak {limits['peak']:.0f}x {base} "
                 f"per cycle). In the {base} forward, linears take {limits['linear_share']:.1%} and attention's own "
                 f"computation {limits['attention_share']:.1%}: int8 linears at peak allow "
                 f"{limits['linears_at_peak']:.2f}x {base} (free linears {limits['linears_free']:.2f}x); with "
                 f"attention's matmuls in int8 too, {limits['linears_attention_at_peak']:.2f}x (both free "
                 f"{limits['linears_attention_free']:.2f}x).{eight_bit}", "",
             f"| recipe | x {base} | of the int8-linears limit |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['x_base']:.2f} | {r['of_limit']:.0%} |" for name, r in limits["recipes"].items()]
    return lines


def markdown_report(results: dict) -> str:
    meta, rows = results["meta"], results["rows"]
    machine = meta["machine"]
    lines = [
        f"# Benchmark results{' (quick mode: tiny models, not the real table)' if meta['quick'] else ''}",
        "",
        f"Command: `{meta['command']}` · started {meta['started_utc']} · {meta.get('duration_s', 0):.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['section_seconds'].items())})",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['torch_threads']} torch "
        f"threads), {machine['memory_gib']} GiB, ISA {', '.join(machine['isa']) or '–'}; torch {machine['torch']}, "
        f"Python {machine['python']}; int8 kernel: {machine.get('int8_kernel', '–')}. Load average (1/5/15 min) at start {meta['load_average_start']}, "
        f"at end {meta.get('load_average_end')} (the machine is shared: other processes slow every row alike)",
        f"Speed: one DiT forward at shape {_shape_text(meta['config'])}, median of {meta['config']['reps']} "
        f"(simulated: {meta['config']['simulated_reps']}). Fidelity: {meta.get('fidelity_model', '–')}.",
        "",
        "| row | SAO linear MiB | SAO linear x fp32 | SAO DiT x fp32 | model linear x fp32 | fwd int (s) | "
        "x fp32 | x fastest float | fwd sim (s) | sim x fp32 | e2e s/clip | e2e x FP | SNR dB | log-mel dB | traj err | "
        "adherence % (Δ) | MOS |",
        "|---|" + "---:|" * 16,
    ]
    for name, row in rows.items():
        mem, model_mem = row.get("memory_sao", {}), row.get("memory_model", {})
        speed, e2e, fid, mos = row.get("speed", {}), row.get("e2e", {}), row.get("fidelity", {}), row.get("mos")
        fwd = speed.get("integer_s", speed.get("float_s"))
        adherence = fid.get("adherence")
        adherence_text = "–" if adherence is None else (
            f"{adherence:.0f}" + ("" if name == "fp32" else f" ({fid['adherence_delta']:+.0f})"))
        snr = "ref" if name == "fp32" and fid else _fmt(fid.get("snr_db"), ".1f")
        mos_text = "–" if not mos else f"{mos['mos']:.2f} ± {_fmt((mos['ci_high'] - mos['ci_low']) / 2, '.2f', '?')} (n={mos['n']})"
        if row.get("error"):
            snr = f"error: {row['error'][:60]}"
        lines.append(
            f"| {name} | {_fmt(mem['linear_bytes'] / 2**20 if mem else None, '.0f')} | "
            f"{_fmt(mem.get('linear_ratio_fp32'), '.3f')} | {_fmt(mem.get('dit_ratio_fp32'), '.3f')} | "
            f"{_fmt(model_mem.get('linear_ratio_fp32'), '.3f')} | {_fmt(fwd, '.3f')} | "
            f"{_fmt(speed.get('integer_x_fp32', speed.get('float_x_fp32')), '.2f')} | {_fmt(speed.get('x_fastest_float'), '.2f')} | "
            f"{_fmt(speed.get('simulated_s'), '.3f')} | {_fmt(speed.get('simulated_x_fp32'), '.2f')} | "
            f"{_fmt(e2e.get('seconds_per_clip'), '.3f')} | {_fmt(e2e.get('speedup_vs_fp'), '.2f')} | {snr} | "
            f"{'ref' if name == 'fp32' and fid else _fmt(fid.get('logmel_db'), '.2f')} | "
            f"{'ref' if name == 'fp32' and fid else _fmt(fid.get('trajectory_rel_error'), '.4f')} | {adherence_text} | {mos_text} |")
    bound = linear_bound(rows)
    if bound:
        lines += ["", f"The linear layers the presets quantize take {bound['linear_share']:.1%} of the fp32 forward "
                      f"(forward hooks, median of {meta['config']['reps']}): with linears that cost nothing a forward "
                      f"would reach {bound['free_linears_x_fp32']:.2f}x fp32 at most; W8A8 static's forward implies "
                      f"linears at {_fmt(bound['w8a8_static_linears_x_fp32'], '.2f')}x fp32."]
    lines += _int8_limit_lines(rows, machine)
    lines += ["", "## Targets", "", "| target | measured | threshold | result |", "|---|---:|---:|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {t['op']} {t['threshold']} | "
                     f"{'**miss**' if t['result'] == 'miss' else t['result']} |")
    if "torchao" in results:
        lines += torchao_markdown(results["torchao"])
    lines += _fidelity_detail_markdown(rows)
    lines += _studies_markdown(results)
    lines += ["", "## CLAP / FAD", "", results.get("clap", {}).get("status", "not run")]
    if results.get("clap", {}).get("rows"):
        lines += ["", "| row | CLAP score | FAD vs FP (CLAP embeddings) |", "|---|---:|---:|"]
        lines += [f"| {row} | {v['clap_score']:.2f} | {_fmt(v['fad_vs_fp'], '.4f')} |"
                  for row, v in results["clap"]["rows"].items()]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


CURVE_POINTS = 10  # sampler steps shown per row in the per-step error table (the JSON keeps every step)


def _fidelity_detail_markdown(rows: dict) -> list[str]:
    """SNR per caption family, and the relative error of x along the sampler's steps, for every row measured."""
    measured = {name: row["fidelity"] for name, row in rows.items()
                if name != "fp32" and row.get("fidelity", {}).get("per_family")}
    if not measured:
        return []
    families = list(dict.fromkeys(f for fid in measured.values() for f in fid["per_family"]))
    lines = ["", "## Fidelity per caption family (held-out prompts: audio SNR vs FP, dB; mean over the family's "
                 "clips), and the calibration-like gap", "",
             "| row | " + " | ".join(families) + " | worst | held-out | cal-like | gap |",
             "|---|" + "---:|" * (len(families) + 4)]
    for name, fid in measured.items():
        snrs = [fid["per_family"].get(f, {}).get("snr_db") for f in families]
        finite = [v for v in snrs if v is not None and math.isfinite(v)]
        cal_like = fid.get("calibration_like", {}).get("snr_db")
        lines.append(f"| {name} | " + " | ".join(_fmt(v, ".1f") for v in snrs)
                     + f" | {_fmt(min(finite) if finite else None, '.1f')} | {_fmt(fid.get('snr_db'), '.1f')}"
                     f" | {_fmt(cal_like, '.1f')} | {_fmt(fid.get('held_out_gap_db'), '.1f')} |")
    steps = max(len(fid.get("trajectory_rel_error_per_step", [])) for fid in measured.values())
    if steps:
        shown = sorted({round(i * (steps - 1) / (CURVE_POINTS - 1)) for i in range(min(CURVE_POINTS, steps))})
        lines += ["", "## Per-step error (relative error |x_q - x_fp| / |x_fp| of the sampler state; step 1 = "
                      "noisiest; every step in results.json and the chart)", "",
                  "| row | " + " | ".join(str(i + 1) for i in shown) + " |", "|---|" + "---:|" * len(shown)]
        for name, fid in measured.items():
            curve = fid.get("trajectory_rel_error_per_step", [])
            lines.append(f"| {name} | " + " | ".join(_fmt(curve[i] if i < len(curve) else None, ".4f")
                                                       for i in shown) + " |")
    return lines


def _shape_text(config: dict) -> str:
    s = config["dit_shape"]
    return (f"embed {s['embed_dim']}, depth {s['depth']}, heads {s['num_heads']}, {config['latent_tokens']} latent + "
            f"{config['cond_tokens']} cross-attention tokens, CFG batch 2")


def _studies_markdown(results: dict) -> list[str]:
    lines = []
    study = results.get("sensitivity")
    if study:
        lines += ["", f"## Per-layer sensitivity ({study['recipe']}, one layer at a time, DiT output SNR on "
                      f"{study['dit_calls']} recorded sampler calls; lowest = most sensitive)", "",
                  "| rank | layer | SNR dB | params | default skip |", "|---:|---|---:|---:|---|"]
        for rank, s in enumerate(study["layers"], 1):
            if rank <= 10 or s["default_skip"]:
                lines.append(f"| {rank} | {s['name']} | {s['snr_db']:.1f} | {s['parameters']} | "
                             f"{'yes' if s['default_skip'] else ''} |")
        ff_out = [rank for rank, s in enumerate(study["layers"], 1) if s["name"].endswith("ff.ff.2")]
        lines += ["", f"Feed-forward output projections (`*.ff.ff.2`) rank {ff_out} of {len(study['layers'])}.", "",
                  "| block | SNR dB |", "|---|---:|"]
        lines += [f"| {s['name']} | {s['snr_db']:.1f} |" for s in study["blocks"]]
    mixed = results.get("mixed_precision")
    if mixed:
        lines += ["", f"## Mixed precision: {mixed['base']} with the {len(mixed['high_layers'])} most sensitive "
                      f"layers at {mixed['high']} ({', '.join(mixed['high_layers'])})", "",
                  "| variant | model linear x fp32 | SNR dB | log-mel dB | traj err |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {v['name']} | {v['linear_ratio_fp32']:.4f} | {_fmt(v['snr_db'], '.2f')} | "
                  f"{_fmt(v['logmel_db'], '.2f')} | {_fmt(v['trajectory_rel_error'], '.4f')} |" for v in mixed["variants"]]
    sweep = results.get("sqd_sweep")
    if sweep:
        lines += ["", "## sqd timestep groups (w4a8-sqd-pergroup, the paper's SQD: one weight copy per group): "
                      "fidelity vs memory", "",
                  "| groups | SAO linear x fp32 | model linear x fp32 | SNR dB | log-mel dB | traj err |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['groups']}{' (all steps)' if s['all_steps'] else ''} | {s['sao_linear_ratio_fp32']:.3f} | "
                  f"{s['linear_ratio_fp32']:.3f} | {_fmt(s['snr_db'], '.2f')} | {_fmt(s['logmel_db'], '.2f')} | "
                  f"{_fmt(s['trajectory_rel_error'], '.4f')} |" for s in sweep]
    return lines


def write_chart(results: dict, path: Path) -> None:
    """Plotly HTML: memory vs fidelity, DiT forward speed-ups, per-step trajectory error."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = results["rows"]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "Memory at SAO shape vs audio SNR", "DiT forward speed-up vs fp32 (SAO shape)", "Relative error of x per step"))
    quantized = [n for n in rows if n not in FLOAT_ROWS and rows[n].get("memory_sao") and rows[n].get("fidelity")]
    fig.add_trace(go.Scatter(x=[rows[n]["memory_sao"]["linear_ratio_fp32"] for n in quantized],
                             y=[rows[n]["fidelity"].get("snr_db") for n in quantized], text=quantized,
                             mode="markers+text", textposition="top center", textfont=dict(size=9),
                             marker=dict(color=["#1f77b4" if n.startswith("w8") else "#d62728" for n in quantized]),
                             name="recipes"), row=1, col=1)
    timed = [n for n in rows if rows[n].get("speed")]
    for key, label, color in (("integer_x_fp32", "integer (float rows: float)", "#2ca02c"),
                              ("simulated_x_fp32", "simulated", "#9467bd")):
        speed_ups = [rows[n]["speed"].get(key, rows[n]["speed"].get("float_x_fp32") if key.startswith("integer")
                                          else None) for n in timed]
        fig.add_trace(go.Bar(x=timed, y=speed_ups, name=label, marker_color=color), row=1, col=2)
    for n in rows:
        per_step = rows[n].get("fidelity", {}).get("trajectory_rel_error_per_step")
        if per_step and n != "fp32":
            fig.add_trace(go.Scatter(y=per_step, mode="lines", name=n, showlegend=False), row=1, col=3)
    fig.update_xaxes(title_text="linear bytes / fp32", row=1, col=1)
    fig.update_yaxes(title_text="SNR vs FP (dB)", row=1, col=1)
    fig.update_yaxes(title_text="x fp32", row=1, col=2)
    fig.update_xaxes(title_text="sampler step", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_layout(height=480, width=1500, title=f"Audio DiT PTQ benchmark ({results['meta']['started_utc']})")
    fig.write_html(path, include_plotlyjs="cdn")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(results: dict, out: Path, *, chart: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    (out / "results.md").write_text(markdown_report(results))
    if chart:
        write_chart(results, out / "chart.html")

