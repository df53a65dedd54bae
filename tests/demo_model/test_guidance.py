"""The two measurements behind the frame-rate buzz diagnosis (demo_model.guidance)."""
import numpy as np
import torch

from demo_model import adherence, corpus, guidance
from demo_model.mdct import mdct


def test_a_latent_that_repeats_every_frame_is_all_frame_constant_and_decodes_to_a_buzz(demo_model):
    generator = torch.Generator().manual_seed(0)
    repeated = torch.randn(256, 1, generator=generator).expand(256, 128)
    independent = torch.randn(256, 128, generator=generator)
    assert guidance.frame_constant_share(repeated) > 0.99
    assert guidance.frame_constant_share(independent) < 3 / 124  # about 1 / frames
    clip = mdct(torch.from_numpy(corpus.synthesize("sine tone at C4"))[None, None])[0]
    assert guidance.frame_constant_share(clip) < 1e-3
    assert guidance.frame_constant_share(guidance.without_frame_constant(repeated + independent)) < 1e-6
    with torch.no_grad():
        audio = demo_model.model.pretransform.decode(repeated.contiguous()[None])[0, 0].numpy()
    assert adherence.evaluate("sine tone at C4", audio, corpus.SAMPLE_RATE)["buzz"]


def test_guidance_gains_of_a_barely_noised_clip_are_about_one_and_cfg_combines_them(demo_model):
    prompts = ["sine tone at C4", "loud square tone at E3"]
    gains = guidance.guidance_gains(demo_model.model, prompts, t=0.1, cfg_scale=3.0, seed=0)
    assert 0.9 < gains["cond"] < 1.1 and 0.9 < gains["uncond"] < 1.1
    assert np.isclose(gains["cfg"], gains["uncond"] + 3.0 * (gains["cond"] - gains["uncond"]))
    assert np.isclose(guidance.guidance_gains(demo_model.model, prompts, t=0.1, cfg_scale=1.0, seed=0)["cfg"],
                      gains["cond"])
