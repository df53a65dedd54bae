"""What a benchmark run covers: its rows, recipes, seeds and sizes (`BenchConfig`), in one place so that every
section and the command line agree on them, plus the two helpers every section walks its rows with."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import quant
from lab.resources import ROOT
from lab.sat import SAO_DIT

# One forward of SAO's DiT sees SAO_LATENT_TOKENS latent frames (~12 s of audio) and the T5 prompt (128 tokens)
# + seconds_start + seconds_total as cross-attention tokens.
SAO_LATENT_TOKENS, SAO_COND_TOKENS, SAO_CFG_SCALE = 256, 130, 7.0
QUICK_DIT = dict(SAO_DIT, embed_dim=128, depth=2, num_heads=2, cond_token_dim=64, global_cond_dim=128)

FLOAT_ROWS = ("fp32", "bf16")
METHODS = quant.ACTIVATION_METHODS
PAPER_RECIPES = tuple(quant.preset_name(w, 8, method, lora) for w in (8, 4) for method in METHODS
                      for lora in (False, True)) + ("w8a16", "w4a16")
# The fidelity options next to the paper's methods (docs/fidelity.md): static scales per timestep group with an
# MSE-clipped range, Hadamard rotation (static per group, dynamic), GPTQ rounding, and the paper's
# per-group-copy SQD that the single-copy "sqd" presets replace, and 4-bit weights in progressive groups.
OPTION_RECIPES = ("w8a8-static-mse", "w8a8-static-rot", "w8a8-dynamic-rot", "w8a8-sqd-pergroup",
                  "w8a8-sqd-pergroup+lora", "w4a8-static-rot", "w4a8-dynamic-rot+lora", "w4a8-sqd-pergroup",
                  "w4a8-sqd-pergroup+lora", "w4a8-dynamic-gptq+lora", "w4a16-gptq", "w4a8-dynamic-gptq-g8")
BENCH_RECIPES = PAPER_RECIPES + OPTION_RECIPES
QUICK_RECIPES = ("w8a8-static", "w8a8-dynamic", "w8a8-sqd+lora", "w4a8-static", "w4a8-dynamic", "w4a8-sqd+lora",
                 "w4a16", "w8a8-static-rot")
SQD_SWEEP_RECIPE = "w4a8-sqd-pergroup"  # the timestep-group sweep varies the per-group-copy SQD's groups
SENSITIVITY_RECIPE, MIXED_HIGH_RECIPE = "w4a8-dynamic", "w8a8-dynamic"
# evaluation and sensitivity-recording seeds; calibration runs lab.calibration.calibrate, whose one batch has seed 0
EVAL_SEED, RECORD_SEED = 1234, 77


@dataclass
class BenchConfig:
    quick: bool = False
    out: Path = ROOT / "results"
    recipes: tuple[str, ...] = BENCH_RECIPES
    dit_shape: dict = field(default_factory=lambda: dict(SAO_DIT))
    latent_tokens: int = SAO_LATENT_TOKENS
    cond_tokens: int = SAO_COND_TOKENS
    reps: int = 3                      # timed DiT forwards per row (after one warm-up), median reported
    simulated_reps: int = 1            # the simulated backend is the paper's reference path, not a speed path
    prompts_per_family: int = 2        # held-out fidelity prompts (assets/fidelity_prompts.txt) per caption family:
    #                                    2 x 6 families, both sweep directions and both drum patterns
    calibration_like_per_family: int = 1  # calibration prompts generated again at the evaluation seed (the gap)
    max_prompts: int | None = None     # cap on each prompt set (quick mode)
    calibration_prompts: int = 18      # stratified over assets/calibration_prompts.txt (families, levels, words)
    steps: int | None = None           # sampler steps; None = the model's generation.json
    seconds: float | None = None       # clip length; None = the model's generation.json
    sensitivity_calls: int = 4         # DiT calls (of a 2-prompt sampling run) replayed per layer in the study
    mixed_k: int = 4                   # layers kept at 8 bit in the mixed-precision recipe
    sweep_groups: tuple = (1, 2, 4, "all")
    model: str | None = None           # lab.sat.load_model spec (None = embedded demo model)
    model_config: str | None = None
    ckpt_path: str | None = None
    ratings: Path | None = None
    clap: Path | None = None
    clap_amodel: str = "HTSAT-tiny"
    skip_speed: bool = False
    skip_fidelity: bool = False
    skip_studies: bool = False
    progress: bool = True

    @classmethod
    def quick_defaults(cls, **overrides) -> BenchConfig:
        """Tiny random DiT instead of SAO's, a tiny random model instead of the embedded one (unless --model... is
        given), 2 prompts x 5 steps, a few recipes: about a minute, not fifteen."""
        settings = dict(quick=True, out=ROOT / "runs" / "bench-quick", recipes=QUICK_RECIPES,
                        dit_shape=dict(QUICK_DIT), latent_tokens=32, cond_tokens=8, reps=1, prompts_per_family=1,
                        max_prompts=2, calibration_prompts=2, steps=5, seconds=0.5, sensitivity_calls=2, mixed_k=1,
                        sweep_groups=(1, "all"))
        return cls(**{**settings, **overrides})

    @property
    def rows(self) -> tuple[str, ...]:
        return FLOAT_ROWS + self.recipes


def as_recipe(row: str | quant.Recipe) -> quant.Recipe:
    """A row name (a preset) or a recipe -> the recipe."""
    return row if isinstance(row, quant.Recipe) else quant.get_recipe(row)


def with_progress(items, desc: str, enabled: bool, **kwargs):
    """`items`, behind a tqdm bar when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, **kwargs)
