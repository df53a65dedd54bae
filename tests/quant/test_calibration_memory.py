"""Calibration streams its statistics: every linear's input is reduced into per-layer tensors allocated once, and
the statistics equal a direct computation over every row the layers saw."""
import torch

import quant
from quant.estimators import histogram
from quant.model import find_dit, linear_layers
from quant.observers import SAMPLE_DTYPE, SAMPLE_SEED, _Recorder
from quant.timestep import TimestepTracker
from tests.tiny_models import calibration_loop, dit_inputs, dit_timestep_loop, tiny_diffusion_cond, tiny_dit


def record_everything(model, forward_loop):
    """Every input row of every DiT linear per timestep, and the priority keys calibration's generator gives
    them (the same draws in the same order: one per row, layer by layer, call by call)."""
    dit = find_dit(model)
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    seen: dict[str, dict[float, list]] = {}
    with TimestepTracker(dit) as tracker:
        def hook_for(name):
            def keep(module, args):
                rows = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
                keys = torch.rand(rows.shape[0], generator=generator)
                t = round(tracker.t, 6)
                seen.setdefault(name, {}).setdefault(t, []).append((rows, keys))
            return keep
        handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in linear_layers(dit).items()]
        with torch.no_grad():
            forward_loop()
        for handle in handles:
            handle.remove()
    return seen


def assert_stats_equal_direct_computation(stats, seen, sample_rows):
    timesteps = sorted({t for per_t in seen.values() for t in per_t})
    assert stats.timesteps == timesteps and set(stats.absmax) == set(seen)
    for name, per_t in seen.items():
        for i, t in enumerate(timesteps):
            rows = torch.cat([r for r, _ in per_t[t]])
            keys = torch.cat([k for _, k in per_t[t]])
            assert torch.equal(stats.absmax[name][i], rows.abs().amax(dim=0)), (name, t)
            assert torch.equal(stats.histograms[name][i], histogram(rows)), (name, t)
            n = min(sample_rows, rows.shape[0])
            assert int(stats.sample_counts[name][i]) == n
            expected = rows[torch.topk(keys, n, largest=False).indices].to(SAMPLE_DTYPE)
            kept = stats.samples[name][i, :n]
            # the same rows (the recorder keeps them in another order): compare them sorted by a projection
            direction = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(1))
            by_projection = [m[torch.argsort(m.float() @ direction)] for m in (expected, kept)]
            assert torch.equal(*by_projection), (name, t)
            assert not stats.samples[name][i, n:].any()


def test_streamed_statistics_equal_a_direct_computation_over_every_row():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs(batch=3)
    timesteps = (0.1, 0.4, 0.4, 0.7, 0.95)  # 0.4 twice: two calls merge into one timestep's statistics
    loop = dit_timestep_loop(dit, x, kwargs, timesteps)
    stats = quant.calibrate(dit, loop, progress=False, sample_rows=5)
    assert_stats_equal_direct_computation(stats, record_everything(dit, loop), 5)


def test_streamed_statistics_under_the_sampler_with_more_timesteps_than_first_allocated(monkeypatch):
    monkeypatch.setattr(_Recorder, "INITIAL_SLOTS", 2)  # the banks grow twice (2 -> 4 -> 8 slots)
    model = tiny_diffusion_cond()
    loop = calibration_loop(model, steps=6, seeds=(0, 1))
    stats = quant.calibrate(model, loop, progress=False, sample_rows=4)
    assert len(stats.timesteps) > 4
    assert_stats_equal_direct_computation(stats, record_everything(model, loop), 4)


def test_recording_keeps_no_tensor_per_forward():
    """What calibration holds between calls is a fixed set of tensors per layer: a forward at a timestep
    already seen, or at a new one within the allocated slots, adds none and moves none."""
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    layers = linear_layers(dit)
    with TimestepTracker(dit) as tracker:
        recorder = _Recorder(tracker, sample_rows=4)
        handles = [layer.register_forward_pre_hook(recorder.hook_for(name)) for name, layer in layers.items()]
        with torch.no_grad():
            dit_timestep_loop(dit, x, kwargs, (0.2,))()
            held = [(t.data_ptr(), t.shape) for t in recorder.held_tensors()]
            dit_timestep_loop(dit, x, kwargs, (0.2, 0.5, 0.8, 0.5))()
        for handle in handles:
            handle.remove()
    assert [(t.data_ptr(), t.shape) for t in recorder.held_tensors()] == held
    assert len(held) == 6 * len(layers)
    assert recorder.stats().timesteps == [0.2, 0.5, 0.8]
