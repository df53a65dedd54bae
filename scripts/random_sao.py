"""Write a random-weight model of Stable Audio Open 1.0's architecture that the lab loads offline.

    .venv/bin/python scripts/random_sao.py runs/sao-random [--seed 0] [--depth 24]

SAO 1.0's model_config.json (stabilityai/stable-audio-open-1.0; stable-audio-tools does not ship it) with one
change: the T5 prompt conditioner (t5-base, a download) becomes SAT's offline `lut` conditioner at T5's width and
length (768 dims, 128 tokens) on the demo model's word tokenizer, so the DiT sees SAO's cross-attention shape.
Built by `create_model_from_config` (`lab.sat.build_model`), every Linear/Conv1d re-initialised live
(`bench.random_models.make_live`): 1.21 B parameters, 4.5 GiB in fp32. Writes model_config.json, model.safetensors and
tokenizer/ into the folder; loads with `--model-config FOLDER/model_config.json --ckpt-path FOLDER/model.safetensors`.
"""
import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from bench.random_models import make_live
from lab import sat
from lab.resources import EMBEDDED_DIR

OOBLECK = {"channels": 128, "c_mults": [1, 2, 4, 8, 16], "strides": [2, 4, 4, 8, 8], "use_snake": True}
SAO_CONFIG = {
    "model_type": "diffusion_cond",
    "sample_size": 2097152,
    "sample_rate": 44100,
    "audio_channels": 2,
    "model": {
        "pretransform": {
            "type": "autoencoder",
            "iterate_batch": True,
            "config": {
                "encoder": {"type": "oobleck", "config": {"in_channels": 2, "latent_dim": 128, **OOBLECK}},
                "decoder": {"type": "oobleck",
                            "config": {"out_channels": 2, "latent_dim": 64, "final_tanh": False, **OOBLECK}},
                "bottleneck": {"type": "vae"},
                "latent_dim": 64,
                "downsampling_ratio": 2048,
                "io_channels": 2,
            },
        },
        "conditioning": {
            "configs": [
                {"id": "prompt", "type": "t5", "config": {"t5_model_name": "t5-base", "max_length": 128}},
                {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}},
            ],
            "cond_dim": 768,
        },
        "diffusion": {
            "cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
            "global_cond_ids": ["seconds_start", "seconds_total"],
            "type": "dit",
            "config": {"io_channels": 64, "embed_dim": 1536, "depth": 24, "num_heads": 24, "cond_token_dim": 768,
                       "global_cond_dim": 1536, "project_cond_tokens": False,
                       "transformer_type": "continuous_transformer"},
        },
        "io_channels": 64,
    },
}
OFFLINE_PROMPT = {"id": "prompt", "type": "lut", "config": {"tokenizer_name": "tokenizer", "max_length": 128}}


def random_sao_config(depth: int | None = None) -> dict:
    """SAO 1.0's config with the `lut` prompt conditioner in place of T5 (and `depth` DiT blocks instead of 24:
    SAO's widths at a fraction of its size, for measurements a shared machine can afford)."""
    config = copy.deepcopy(SAO_CONFIG)
    if depth is not None:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive number of DiT blocks, got {depth!r}")
        config["model"]["diffusion"]["config"]["depth"] = depth
    conditioners = config["model"]["conditioning"]["configs"]
    conditioners[[c["id"] for c in conditioners].index("prompt")] = copy.deepcopy(OFFLINE_PROMPT)
    return config


def write_random_sao(folder: str | Path, seed: int = 0, depth: int | None = None) -> tuple[Path, Path]:
    """Write model_config.json, tokenizer/ and model.safetensors into `folder`; returns (config, checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EMBEDDED_DIR / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    config_path, ckpt_path = folder / "model_config.json", folder / "model.safetensors"
    config_path.write_text(json.dumps(random_sao_config(depth), indent=1))
    model = make_live(sat.build_model(sat.read_config(config_path)), seed)
    save_file(model.state_dict(), str(ckpt_path))
    return config_path, ckpt_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, help="DiT blocks (default: SAO's 24)")
    args = parser.parse_args(argv)
    config_path, ckpt_path = write_random_sao(args.folder, args.seed, args.depth)
    print(f"wrote {config_path} and {ckpt_path} ({ckpt_path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
