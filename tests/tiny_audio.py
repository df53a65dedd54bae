"""A tiny text-to-audio SAT model on disk, laid out like assets/demo_model, for engine and app tests.

16 kHz mono, no pretransform, DiT patch 64 (so 1 s = 250 tokens), a `lut` prompt conditioner with a
word-level tokenizer saved next to the config (loads offline), `seconds_total` as in SAO. Weights are
random but live (SAT zero-initialises residual outputs), so quantization changes the output.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lab import sat as models

WORDS = ["sine", "square", "tone", "at", "a4", "c4", "white", "pink", "noise", "kick", "drum", "bpm", "120"]

TINY_AUDIO_CONFIG = {
    "model_type": "diffusion_cond",
    "sample_rate": 16000,
    "sample_size": 32768,  # ~2 s
    "audio_channels": 1,
    "model": {
        "io_channels": 1,
        "conditioning": {
            "cond_dim": 32,
            "configs": [
                {"id": "prompt", "type": "lut", "config": {"tokenizer_name": "tokenizer", "max_length": 8}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 8}},
            ],
        },
        "diffusion": {
            "type": "dit",
            "diffusion_objective": "v",
            "cross_attention_cond_ids": ["prompt", "seconds_total"],
            "global_cond_ids": ["seconds_total"],
            "config": {"io_channels": 1, "patch_size": 64, "embed_dim": 64, "depth": 2, "num_heads": 2,
                       "cond_token_dim": 32, "global_cond_dim": 32, "project_cond_tokens": False,
                       "transformer_type": "continuous_transformer"},
        },
    },
}


def save_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer that `AutoTokenizer.from_pretrained(folder)` loads without network."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)


def write_tiny_audio_model(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write model_config.json, model.safetensors and tokenizer/ into `folder`; returns (config, ckpt)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_word_tokenizer(folder / "tokenizer")
    config_path, ckpt_path = folder / "model_config.json", folder / "model.safetensors"
    config_path.write_text(json.dumps(TINY_AUDIO_CONFIG, indent=1))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = models.build_model(models.read_config(config_path))
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                module.reset_parameters()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt_path)
    return config_path, ckpt_path
