"""The demo model's stable-audio-tools config: what `model_config.json` and `generation.json` say.

A 12.6 M-parameter DiT with SAO's block structure (self-attention, cross-attention to the caption tokens,
SwiGLU feed-forward) over the latents of an autoencoder pretransform, as SAO's DiT runs over its VAE's
latents. The autoencoder is SAT's Oobleck with one 256x stride whose weights are set, not learnt, to a
sine-window MDCT (`demo_model.mdct`): 256 coefficients per 256 samples, frames overlapping by half, so
16 kHz mono becomes 128 tokens of 256 channels per 2.048 s clip and the decoder overlap-adds neighbouring
frames. A fixed transform rather than raw-audio patches or a learnt codec: 256-sample DiT patches of the
waveform leave a comb at multiples of the 62.5 Hz patch rate that pYIN takes for the pitch, and an Oobleck
trained here for 8 min (L1 + STFT loss) still reconstructed at about 0 dB SNR.
"""
from __future__ import annotations

import json
from pathlib import Path

from demo_model import corpus, vocab

HOP = 256
LATENT_DIM = HOP
ENCODER_WIDTH = 2  # channels at audio rate: the signal + a constant that cancels the ELUs' offsets
AUTOENCODER = {
    "encoder": {"type": "oobleck", "config": {
        "in_channels": 1, "channels": ENCODER_WIDTH, "c_mults": [HOP // ENCODER_WIDTH], "strides": [HOP],
        "latent_dim": HOP}},
    "decoder": {"type": "oobleck", "config": {
        "out_channels": 1, "channels": ENCODER_WIDTH, "c_mults": [2 * HOP // ENCODER_WIDTH], "strides": [HOP],
        "latent_dim": HOP, "final_tanh": False}},
    "latent_dim": HOP, "downsampling_ratio": HOP, "io_channels": 1,
}

COND_DIM = 256  # width of the caption token embeddings (the lut table)
# The shipped DiT: wider than the 256 MDCT channels it denoises, as SAO's 1536 is wider than its 64 latent
# channels; the timestep enters as a prepended token, as in SAO.
DIT_DEFAULTS = {"width": 384, "depth": 4, "timestep_cond": "prepend", "positions": "rope+sinusoid"}

# Sampler defaults shipped next to the model (generation.json), chosen on the 24 calibration prompts (never
# on the evaluation or held-out sets): v-ddim CFG 1.5 passed 12/24, CFG 3 and 6 10/24, dpmpp-3m-sde (sigma_max
# 80) CFG 5 9/24. v-ddim steps uniformly in t from 1 (it ignores sigma_min and clamps sigma_max to 1).
# sigma: SAO's range, for the k-diffusion samplers. "validated" is added after training, from a sweep
# (`ptq-adherence --sampler ... --cfg ...`): it is a measurement of the trained weights, not a setting.
GENERATION_DEFAULTS = {"steps": 50, "cfg_scale": 1.5, "sampler_type": "v-ddim",
                       "sigma_min": 0.03, "sigma_max": 500.0, "seconds": corpus.CLIP_SECONDS}
# One caption per family of the grammar, offered as examples in the app (generation.json's "example_prompts").
EXAMPLE_PROMPTS = ["sine tone at A4", "soft sawtooth major chord on C4", "plucked string playing E4", "pink noise",
                   "kick drum at 120 bpm", "loud rising sine sweep"]


def dit_config(width: int, depth: int, timestep_cond: str, positions: str) -> dict:
    """SAT DiffusionTransformer settings: SAO's block structure, heads of 64, caption tokens projected to `width`.

    `positions`: "rope" is SAO's rotary embedding alone (relative positions); "rope+sinusoid" also adds
    SAT's ContinuousTransformer `use_sinusoidal_emb` (absolute positions, no parameters but a scale)."""
    config = {"io_channels": LATENT_DIM, "patch_size": 1, "embed_dim": width, "depth": depth, "num_heads": width // 64,
              "cond_token_dim": COND_DIM, "project_cond_tokens": width != COND_DIM,
              "transformer_type": "continuous_transformer", "global_cond_type": timestep_cond}
    if positions == "rope+sinusoid":
        config["use_sinusoidal_emb"] = True
    return config


def model_config(latent_scale: float, dit: dict | None = None) -> dict:
    """The demo model's SAT config; `latent_scale` (`demo_model.mdct.latent_scale`) sets the std of the DiT's
    latents."""
    return {
        "model_type": "diffusion_cond",
        "sample_size": corpus.CLIP_SAMPLES,
        "sample_rate": corpus.SAMPLE_RATE,
        "audio_channels": 1,
        "model": {
            "io_channels": LATENT_DIM,
            "pretransform": {"type": "autoencoder", "config": AUTOENCODER, "scale": round(latent_scale, 4)},
            "conditioning": {
                "configs": [{"id": "prompt", "type": "lut", "config": {"tokenizer_name": "tokenizer", "max_length": 8}}],
                "cond_dim": COND_DIM,
            },
            "diffusion": {
                "cross_attention_cond_ids": ["prompt"],
                "type": "dit",
                "diffusion_objective": "v",
                "config": dit or dit_config(**DIT_DEFAULTS),
            },
        },
    }


def write_model_files(directory: Path, latent_scale: float, dit: dict | None = None) -> Path:
    """model_config.json + tokenizer/ + generation.json in `directory` (the layout of assets/demo_model)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_config.json").write_text(json.dumps(model_config(latent_scale, dit), indent=2) + "\n")
    generation = {**GENERATION_DEFAULTS, "example_prompts": EXAMPLE_PROMPTS}
    (directory / "generation.json").write_text(json.dumps(generation, indent=2) + "\n")
    vocab.save_tokenizer(directory / "tokenizer")
    return directory / "model_config.json"
