"""How much energy does a model put where its caption asks for none? The demo model's failure mode, measured.

    python scripts/noise_floor.py                                   # embedded model, calibration prompts
    python scripts/noise_floor.py --model-config C --ckpt-path W    # any demo-grammar model

For each prompt: the corpus clip for that caption marks its MDCT channels with energy (within 30 dB of the
strongest); the generated clip's energy outside those channels, relative to inside, is its floor in dB.
Corpus clips sit at -20 to -40 dB; a floor near 0 dB buries a tone's pitch and fills the gaps of a rhythm.
The same floor of the sampler's denoised estimate at a few steps shows when during sampling it appears.
"""
import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lab import corpus, generation  # noqa: E402
from lab.models import load_model  # noqa: E402
from lab.quantized import read_prompts  # noqa: E402
from lab.settings import REPO_ROOT  # noqa: E402
from train_demo_model import mdct_autoencoder  # noqa: E402

SUPPORT_DB = 30.0
TRACE_STEPS = (5, 15, 25, 35, 45)  # of 50: t = 0.9, 0.7, 0.5, 0.3, 0.1 for v-ddim


def channel_energy(mdct: torch.nn.Module, audio) -> torch.Tensor:
    with torch.no_grad():
        return mdct.encode(torch.as_tensor(audio, dtype=torch.float32)[None, None])[0].pow(2).mean(1)


def floor_db(energy: torch.Tensor, support: torch.Tensor) -> float:
    return 10 * torch.log10(energy[~support].sum() / energy[support].sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(REPO_ROOT / "assets" / "calibration_prompts.txt"))
    parser.add_argument("--model-config")
    parser.add_argument("--ckpt-path")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--override", default="{}", help='JSON overriding generation.json, e.g. \'{"cfg_scale": 1}\'')
    args = parser.parse_args()

    loaded = load_model(model_config=args.model_config, ckpt_path=args.ckpt_path)
    prompts = read_prompts(Path(args.prompts))
    settings = {**asdict(loaded.sampling), **json.loads(args.override)}
    print(f"{loaded.model_id}: {json.dumps(settings)}")
    mdct = mdct_autoencoder()
    floors: dict[str, dict[str, list[float]]] = {}
    to_audio = generation.decoder(loaded.model)
    for i, prompt in enumerate(tqdm(prompts, desc="generating", ascii=True)):
        request = generation.GenerationRequest(
            prompt=prompt, seconds=settings["seconds"], steps=settings["steps"], cfg_scale=settings["cfg_scale"],
            seed=args.seed + i, sampler=settings["sampler_type"], sigma_min=settings["sigma_min"],
            sigma_max=settings["sigma_max"])
        with torch.no_grad():
            clip = generation.generate_clip(loaded.model, loaded, request)
        reference = channel_energy(mdct, corpus.synthesize(prompt, seed=args.seed + i))
        support = reference > reference.max() * 10 ** (-SUPPORT_DB / 10)
        family = floors.setdefault(corpus.parse_caption(prompt).family, {})
        for step in (s for s in TRACE_STEPS if s < len(clip.denoised)):
            estimate = to_audio(clip.denoised[step])[0]
            family.setdefault(f"step {step}", []).append(floor_db(channel_energy(mdct, estimate), support))
        family.setdefault("final", []).append(floor_db(channel_energy(mdct, clip.audio[0]), support))
        family.setdefault("corpus", []).append(floor_db(reference, support))
    columns = list(next(iter(floors.values())))
    print("\nmedian floor (dB) of the denoised estimate per step, of the final clip and of the corpus clip")
    print(f"{'family':8s}" + "".join(f"{c:>10s}" for c in columns))
    for name, family in floors.items():
        print(f"{name:8s}" + "".join(f"{statistics.median(family[c]):10.1f}" for c in columns))


if __name__ == "__main__":
    main()
