"""What the machine is and how long a call takes on it: every timing in the results is read next to these."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from quant.kernels import cpu_profile, kernel_name, weight_only_kernel_name


def machine_info() -> dict:
    """CPU model, cores, instruction-set flags that matter for int8/bf16 kernels, torch version, and the CPU
    profile the kernels were chosen by (detected, or forced: then the timings are not this CPU's best)."""
    cpu, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}),
            "memory_gib": memory_gib, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_profile": f"{cpu_profile().describe()}: {cpu_profile().features()}",
            "int8_kernel": kernel_name(torch.device("cpu")),
            "weight_only_kernel": weight_only_kernel_name(torch.device("cpu"))}


def load_average() -> list[float]:
    """1/5/15-minute load average: the machine may be shared, and other processes slow every row alike."""
    return [round(v, 2) for v in os.getloadavg()]


@torch.no_grad()
def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def interleaved_median_seconds(fns: dict, reps: int) -> dict[str, float]:
    """Median wall time of each `fns[name]()` over `reps` rounds of one call each (warm-ups are the caller's):
    on a shared machine a busy moment then slows the calls of one round alike, and their ratio holds."""
    times = {name: [] for name in fns}
    for _ in range(max(1, reps)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
