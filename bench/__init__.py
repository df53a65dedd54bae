"""The benchmark: the paper's table on what runs here, plus speed and memory at Stable Audio Open's scale.

Run it with `python -m bench` (or `ptq-bench`; options and examples in `bench.run`).

One row per configuration: fp32, bf16, and each quant preset (W8A8 / W4A8 x static, dynamic, smoothquant,
sqd, each with and without the rank-32 low-rank branch, plus weight-only W8A16 / W4A16). One module per part:

- `bench.config`: the rows, recipes, seeds and sizes of a run (`BenchConfig`);
- `bench.random_models`: random SAT models with live branches, to measure at a shape without trained weights
  (also used by the scripts and the tests);
- `bench.shape`: memory and speed of one DiT forward at SAO's DiT shape (random weights; memory on the meta
  device, exactly, in a second);
- `bench.sampling` and `bench.fidelity`: the evaluated model (default: the embedded demo model) sampled with the
  same prompts, seeds and therefore initial noise as full precision: SNR and log-mel distance of the audio,
  relative error of the sampler's state x per step, prompt adherence, generation time;
- `bench.studies` (on `bench.sensitivity`): per-layer / per-block sensitivity at W4A8, mixed precision against
  uniform W4A8 at equal memory, the sqd timestep-group sweep;
- `bench.external`: MOS from the app's ratings CSV, CLAP score / FAD when a LAION-CLAP checkpoint is given;
- `bench.targets` and `bench.report`: measured values against the performance targets; results.json,
  results.md and chart.html;
- `bench.run`: the command line and the order of the sections; `bench.machine`: what the machine is.

`bench.app_timing` times one comparison of the app (`python -m bench.app_timing`); `bench.attention` times
float against int8 attention and the parts of an eager int8 attention (`python -m bench.attention`).
"""
