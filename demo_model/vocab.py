"""The demo model's word-level tokenizer: one id per word of the caption grammar, saved for offline use.

stable-audio-tools' `lut` conditioner loads any `AutoTokenizer` directory and looks each token id up in a
learned embedding table, so a tokenizer whose vocabulary is exactly the corpus's words needs no download.
Words are split on whitespace only, so `C#4`, `hi-hat` and `120` stay single tokens; unknown words map
to [UNK].

    python -m demo_model.vocab assets/demo_model/tokenizer
"""
from __future__ import annotations

import sys
from pathlib import Path

from demo_model import corpus

PAD, UNK = "[PAD]", "[UNK]"


def caption_words() -> list[str]:
    """Every word of every caption (lower-cased, as the tokenizer's normaliser sees them), sorted."""
    return sorted({w for c in corpus.all_captions() for w in c.text.lower().split()})


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over the caption vocabulary (ids: [PAD]=0, [UNK]=1, words sorted)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([PAD, UNK, *caption_words()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD)


def save_tokenizer(directory: str | Path) -> Path:
    directory = Path(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m demo_model.vocab OUTPUT_DIR")
    print(f"saved {len(caption_words())} words to {save_tokenizer(sys.argv[1])}")
