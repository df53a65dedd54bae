"""Stable Audio Open at real scale: the lab end to end on a random-weight model of SAO 1.0's architecture.

    make sao-check        # = .venv/bin/python scripts/sao_check.py [--out runs/sao-check] [--memory-limit-gib 14]

Each step runs in its own process, so each peak RSS (`wait4`'s ru_maxrss) is that step's own:
  model      scripts/random_sao.py writes the model into runs/sao-random (once; 4.5 GiB)
  calibrate  `ptq-quantize calibrate` under the default plan -> statistics file
  quantize   `ptq-quantize quantize --preset w8a8-smoothquant --stats-in ...` -> quantized-model file
  app        `ptq-lab --quantized FILE` (no statistics): time to the first page, then /generate for a 3 s clip at
             8 steps with the served calibrated recipe, then with w8a8-dynamic and w4a8-dynamic (each built by the
             app; the quantized-model budget holds one W8A8 DiT, so each makes room for the next); the app must
             not calibrate
  identity   the CLI's file loaded, saved and reloaded bit-identically; the app's cache, given the same statistics,
             builds the same tensors as the CLI
A watchdog kills a step whose RSS passes --memory-limit-gib (the machine is shared). Writes OUT/sao-check.json,
prints the figures, exits 1 when a check fails. Not part of `make test`: ~15 min on 2 CPU cores.
"""
import argparse
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CALIBRATED = "w8a8-smoothquant"
BUILT_BY_APP = ("w8a8-dynamic", "w4a8-dynamic")  # need no statistics: the app quantizes them itself
REQUEST = dict(prompt="soft sine tone at A4", negative="", seconds=3.0, steps=8, cfg=7.0, sampler="dpmpp-3m-sde",
               seed="1", layer="transformer.layers.12.ff.ff.2")
TARGET_APP_PEAK_GIB = 8.0  # FP model (4.5 GiB) + quantized DiTs within APP_QUANTIZED_MEMORY_GIB + working set
APP_QUANTIZED_MEMORY_GIB = 1.5  # the app's budget for quantized models (LAB_QUANTIZED_MEMORY_GIB): one W8A8 DiT
TARGET_QUANTIZED_OVER_FP = 0.45  # a comparison's quantized clip time over its full-precision one (a figure, not a check)
SUMMARY_TIMES = re.compile(r"\*\*Full precision:\*\* ([\d.]+) s .*?\*\*Quantized\*\* .*?: ([\d.]+) s"
                           r"(?: \(sampling; each clip's shared autoencoder decode: ([\d.]+) s / ([\d.]+) s\))?")
TARGET_CALIBRATION_EXTRA_GIB = 2.0  # calibration's peak RSS above the FP model's bytes
GIB = 2**30


def status_kib(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM) in KiB; 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def watch_memory(process: subprocess.Popen, limit_gib: float, log) -> threading.Thread:
    """Kill `process` if its RSS passes the limit: other work shares this machine's memory."""
    def watch():
        while process.poll() is None:
            if status_kib(process.pid, "VmRSS") > limit_gib * GIB / 1024:
                log.write(f"\nsao-check: RSS above {limit_gib} GiB, killed\n")
                process.kill()
                return
            time.sleep(1)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def finish(process: subprocess.Popen) -> tuple[int, float]:
    """(exit code, peak RSS in GiB) of a child, from wait4."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024 / GIB


def run_step(name: str, command: list[str], out: Path, limit_gib: float, env=None) -> dict:
    """Run one step to completion; its log goes to OUT/NAME.log."""
    log_path = out / f"{name}.log"
    print(f"[{name}] {' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        watch_memory(process, limit_gib, log)
        code, peak = finish(process)
    result = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(peak, 2), "exit": code}
    print(f"[{name}] {result}", flush=True)
    if code != 0:
        raise RuntimeError(f"step {name} failed (exit {code}): see {log_path}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clip_times(summary: str) -> dict:
    """Both clips' sampling seconds from a comparison's summary, their ratio, and each clip's decode seconds."""
    match = SUMMARY_TIMES.search(summary)
    if match is None:
        return {}
    full_precision, quantized, *decode = (None if value is None else float(value) for value in match.groups())
    times = {"full_precision_s": full_precision, "quantized_s": quantized,
             "quantized_over_full_precision": round(quantized / full_precision, 3)}
    return {**times, "decode_s": decode} if None not in decode else times


def app_step(model_args: list[str], quantized: Path, out: Path, limit_gib: float) -> dict:
    """Serve the model with the CLI's file as `ptq-lab` does, time the first page, compare two recipes."""
    from gradio_client import Client

    port, password = free_port(), secrets.token_urlsafe(9)
    env = {**os.environ, "LAB_CACHE_DIR": str(out / "app-cache"), "LAB_OUTPUT_DIR": str(out / "app-outputs"),
           "LAB_STUDIES_DIR": str(out / "app-studies"), "LAB_ADMIN_PASSWORD": password,
           "LAB_QUANTIZED_MEMORY_GIB": str(APP_QUANTIZED_MEMORY_GIB), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [PYTHON, "-m", "app", *model_args, "--quantized", str(quantized), "--port", str(port)]
    print(f"[app] {' '.join(command)}", flush=True)
    log_path = out / "app.log"
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        watch_memory(process, limit_gib, log)
        result: dict = {}
        try:
            url = f"http://127.0.0.1:{port}/"
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the app stopped before serving: see {log_path}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            result["first_page_seconds"] = round(time.perf_counter() - started, 1)
            print(f"[app] first page after {result['first_page_seconds']} s", flush=True)
            client = Client(url + "admin/", auth=("admin", password), verbose=False)
            result["comparisons"] = {}
            for recipe in (CALIBRATED, *BUILT_BY_APP):
                precision, method = recipe.split("-")
                began = time.perf_counter()
                outputs = client.predict(**{**REQUEST, "precision": precision.upper(), "method": method,
                                            "lora": False}, api_name="/generate")
                seconds = round(time.perf_counter() - began, 1)
                result["comparisons"][recipe] = {"seconds": seconds, **clip_times(outputs[2]),
                                                 "summary": outputs[2].split("\n\n")}
                print(f"[app] {recipe}: {seconds} s | {outputs[2].splitlines()[0]}", flush=True)
            result["peak_rss_gib"] = round(status_kib(process.pid, "VmHWM") * 1024 / GIB, 2)
        finally:
            process.terminate()
            code, peak = finish(process)
    result["peak_rss_gib"] = max(result.get("peak_rss_gib", 0.0), round(peak, 2))
    log_text = log_path.read_text()
    result["calibrated_in_app"] = "calibrating" in log_text or any((out / "app-cache").rglob("calibration-*"))
    print(f"[app] peak RSS {result['peak_rss_gib']} GiB, exit {code}", flush=True)
    return result


def identity_step(config: Path, checkpoint: Path, quantized: Path, stats: Path, out: Path) -> None:
    """Run in its own process (--identity): file round trip and CLI-vs-app build, bit for bit, holding one
    quantized model at a time."""
    import gc

    import torch
    from safetensors import safe_open

    import quant
    from lab import sat
    from lab.quantized import QuantizedModels
    from lab.quantized_files import load_quantized, save_quantized

    loaded = sat.load_model(model_config=config, ckpt_path=checkpoint)

    def matches_file(model, path: Path) -> bool:
        state = quant.find_dit(model).state_dict()
        with safe_open(str(path), framework="pt") as file:
            return set(file.keys()) == set(state) and all(torch.equal(file.get_tensor(k), state[k]) for k in state)

    def generate(model) -> torch.Tensor:
        return sat.sample(model, ["white noise"], settings=loaded.sampling.replace(steps=2), seed=0, seconds=1.0,
                          sample_size=loaded.sample_length(1.0), return_latents=True)

    model, recipe = load_quantized(loaded, quantized)
    save_quantized(model, recipe, out / "resaved.safetensors")
    result = {"recipe": recipe.name, "reload_state_bit_identical": matches_file(model, out / "resaved.safetensors")}
    first = generate(model)
    memory = quant.memory_report(quant.find_dit(model))  # after a generation: the kernels' weights are prepared
    result["resident_mib"], result["stored_mib"] = (round(b / 2**20, 1) for b in (memory.resident_linear_bytes,
                                                                                   memory.linear_bytes))
    result["state_bit_identical_after_generating"] = matches_file(model, out / "resaved.safetensors")
    del model
    gc.collect()
    model, _ = load_quantized(loaded, out / "resaved.safetensors")
    result["reload_output_bit_identical"] = torch.equal(first, generate(model))
    del model
    gc.collect()
    app = QuantizedModels(loaded, cache_dir=out / "identity-cache", calibration_prompts=["unused"],
                          calibration_stats=stats, max_models=1)
    result["app_build_equals_cli_file"] = matches_file(app.get(recipe.name)[0], quantized)
    result["parameters"] = {"model": sum(p.numel() for p in loaded.model.parameters()),
                            "dit": sum(p.numel() for p in quant.find_dit(loaded.model).parameters())}
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sao-check")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "sao-random")
    parser.add_argument("--memory-limit-gib", type=float, default=14.0)
    parser.add_argument("--identity", nargs=4, type=Path, metavar=("CONFIG", "CKPT", "QUANTIZED", "STATS"),
                        help=argparse.SUPPRESS)  # the identity step's own process
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.identity:
        return identity_step(*args.identity, args.out)

    config, checkpoint = args.model_dir / "model_config.json", args.model_dir / "model.safetensors"
    stats, quantized = args.out / "stats.safetensors", args.out / f"{CALIBRATED}.safetensors"
    model_args = ["--model-config", str(config), "--ckpt-path", str(checkpoint)]
    limit = args.memory_limit_gib
    report: dict = {"command": "make sao-check", "memory_limit_gib": limit, "cpus": os.cpu_count(),
                    "load_average_start": os.getloadavg()[0]}
    if not checkpoint.exists():
        report["model"] = run_step("model", [PYTHON, "scripts/random_sao.py", str(args.model_dir)], args.out, limit)
    report["model_file_gib"] = round(checkpoint.stat().st_size / GIB, 2)
    report["calibrate"] = run_step("calibrate", [PYTHON, "-m", "lab.quantize_cli", "calibrate", *model_args,
                                                 "--out", str(stats)], args.out, limit)
    calibrate_log = (args.out / "calibrate.log").read_text()
    report["calibrate"]["plan"] = re.search(r"calibrating on (.*)", calibrate_log).group(1)
    report["calibrate"]["calibration_seconds"] = float(re.search(r"calibrated in ([\d.]+) s", calibrate_log).group(1))
    report["quantize"] = run_step("quantize", [PYTHON, "-m", "lab.quantize_cli", "quantize", *model_args, "--preset",
                                               CALIBRATED, "--stats-in", str(stats), "--out", str(quantized)],
                                  args.out, limit)
    report["quantize"]["file_gib"] = round(quantized.stat().st_size / GIB, 2)
    report["app"] = app_step(model_args, quantized, args.out, limit)
    identity = run_step("identity", [PYTHON, "scripts/sao_check.py", "--out", str(args.out), "--identity", str(config),
                                     str(checkpoint), str(quantized), str(stats)], args.out, limit)
    identity.update(json.loads((args.out / "identity.log").read_text().strip().splitlines()[-1]))
    report["identity"] = identity
    report["checks"] = {
        "app served the CLI file without calibrating": not report["app"]["calibrated_in_app"],
        f"app peak RSS <= {TARGET_APP_PEAK_GIB} GiB": report["app"]["peak_rss_gib"] <= TARGET_APP_PEAK_GIB,
        "save/load bit-identical": identity["reload_state_bit_identical"] and identity["reload_output_bit_identical"]
        and identity["state_bit_identical_after_generating"],
        f"calibration peak RSS <= FP model + {TARGET_CALIBRATION_EXTRA_GIB} GiB":
            report["calibrate"]["peak_rss_gib"] <= report["model_file_gib"] + TARGET_CALIBRATION_EXTRA_GIB,
        "W8A8 DiT resident at its stored size (one weight copy)": identity["resident_mib"] == identity["stored_mib"],
        "app build == CLI file": identity["app_build_equals_cli_file"],
    }
    report["load_average_end"] = os.getloadavg()[0]
    report["passed"] = all(report["checks"].values())
    (args.out / "sao-check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'sao-check.json'}")
    if not report["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
