"""TimestepTracker: t reaches quantized layers through the DiT forward, positional or keyword."""
import copy

import torch

import quant
from quant.timestep import group_index
from tests.tiny_models import dit_inputs, dit_timestep_loop, tiny_dit


def test_tracker_reads_t_positionally_and_by_keyword():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    with quant.TimestepTracker(dit) as tracker, torch.no_grad():
        assert tracker.t is None
        dit(x, torch.full((2,), 0.25), **kwargs)
        assert tracker.t == 0.25 and tracker.calls == 1
        dit(x, t=torch.full((2,), 0.75), **kwargs)
        assert tracker.t == 0.75 and tracker.calls == 2
    dit(x, torch.full((2,), 0.5), **kwargs)  # removed: no longer follows
    assert tracker.t == 0.75


def test_group_index_orders_groups_by_t():
    boundaries = [0.3, 0.6]
    assert [group_index(t, boundaries) for t in (0.0, 0.29, 0.31, 0.6, 0.99)] == [0, 0, 1, 2, 2]


def test_a_deep_copy_of_an_sqd_model_follows_its_own_timesteps():
    dit = tiny_dit()
    x, _, kwargs = dit_inputs()
    stats = quant.calibrate(dit, dit_timestep_loop(dit, x, kwargs, (0.1, 0.4, 0.7, 0.9)), progress=False)
    recipe = quant.get_recipe("w8a8-sqd-pergroup").replace(timestep_groups=2)
    original = quant.quantize_(copy.deepcopy(dit), recipe, stats)
    clone = copy.deepcopy(original)
    with torch.no_grad():
        original(x, torch.full((2,), 0.1), **kwargs)
        clone(x, torch.full((2,), 0.9), **kwargs)
    def layer(m):
        return m.transformer.layers[0].self_attn.to_qkv
    assert layer(original).group_for() == 0 and layer(clone).group_for() == 1
