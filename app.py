"""Audio DiT PTQ Lab: listen to what post-training quantization does to an audio diffusion transformer.

Gradio 6 layout and event wiring only; the work happens in `lab/` (see lab/comparison.py).
Run: `python app.py [--model REPO | --model-config JSON --ckpt-path CKPT] [--share] [--port N]`.
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import uuid

# OpenMP threads busy-wait between parallel regions; on a shared or oversubscribed CPU (a Space's vCPUs, a
# machine running other jobs) that made generation ~20x slower here (2 threads: 22 s vs 1.1 s for the same
# clip). Passive waiting costs little when the cores are free. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The imports below load torch: they come after the OpenMP setting.
import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lab.comparison import APP_VERSION, Lab  # noqa: E402
from lab.generation import CFG_RANGE, SAMPLERS, STEPS_RANGE, GenerationRequest  # noqa: E402
from lab.models import load_model  # noqa: E402
from lab.mos import mos_from_csv  # noqa: E402
from lab.quantized import METHODS, PRECISIONS, QuantizedModels, read_prompts, recipe_name  # noqa: E402
from lab.ratings import ACR_LABELS, RatingsStore  # noqa: E402
from lab.settings import Settings  # noqa: E402

try:  # Hugging Face ZeroGPU: borrow a GPU for the duration of a generation; a no-op everywhere else
    import spaces

    on_gpu = spaces.GPU(duration=120)
except ImportError:
    def on_gpu(fn):
        return fn

DEFAULT_RECIPE = dict(precision="W8A8", method="sqd")
SCORE_CHOICES = [f"{score} - {label}" for score, label in sorted(ACR_LABELS.items(), reverse=True)]
PREFERENCE_CHOICES = [("A", "A"), ("B", "B"), ("No preference", "")]


def user_errors(fn):
    """Turn the engine's ValueErrors (bad input, missing model file, unknown recipe) into UI messages."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise gr.Error(str(err)) from err
    return wrapper


def build_demo(lab: Lab, *, concurrency_limit: int = 1) -> gr.Blocks:
    loaded = lab.loaded
    sampling = loaded.sampling  # the model's own defaults (generation.json next to its config)
    # delete_cache: Gradio's copies of served WAVs older than an hour go, checked hourly
    with gr.Blocks(title="Audio DiT PTQ Lab", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Audio DiT PTQ Lab <small>v{APP_VERSION}</small>\nSame prompt, same seed, same initial "
                    f"noise: full precision vs quantized. Model: `{loaded.model_id}` · {loaded.sample_rate} Hz · up to "
                    f"{lab.max_seconds:g} s.")

        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value="sine tone at A4", scale=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", scale=2)
            with gr.Row():
                seconds = gr.Slider(0.5, lab.max_seconds, value=min(sampling.seconds or 2.0, lab.max_seconds),
                                    step=0.1, label="Seconds")
                steps = gr.Slider(*STEPS_RANGE, value=sampling.steps, step=1, label="Steps")
                cfg = gr.Slider(*CFG_RANGE, value=sampling.cfg_scale, step=0.5, label="CFG scale")
                sampler = gr.Dropdown(list(SAMPLERS), value=sampling.sampler_type, label="Sampler")
                seed = gr.Textbox(label="Seed (blank = random)", elem_id="seed")
            with gr.Row():
                precision = gr.Dropdown(list(PRECISIONS), value=DEFAULT_RECIPE["precision"], label="Precision",
                                        info="W8A16/W4A16 are weight-only: the method does not apply")
                method = gr.Dropdown(list(METHODS), value=DEFAULT_RECIPE["method"], label="Method")
                lora = gr.Checkbox(label="+ LoRA (low-rank branch on the weight error)")
                layer = gr.Dropdown(lab.layers, value=lab.default_layer(), label="Layer for activation statistics")
            generate = gr.Button("Generate both", variant="primary", elem_id="generate")
            summary = gr.Markdown(label="Summary", elem_id="summary")
            with gr.Row():
                fp_audio = gr.Audio(label="Full precision", type="filepath", interactive=False,
                                    buttons=["download"], elem_id="fp-audio")
                q_audio = gr.Audio(label="Quantized", type="filepath", interactive=False,
                                   buttons=["download"], elem_id="q-audio")
            spectrograms = gr.Plot(label="Log-mel spectrograms")
            step_metrics = gr.Plot(label="Per-step error")
            activation_heatmap = gr.Plot(label="Per-timestep input activations")
            activation_steps = gr.Plot(label="Activations, one step at a time")
            channel_outliers = gr.Plot(label="Outlier channels and smoothing")

        with gr.Tab("Listen & rate"):
            gr.Markdown(
                "Two clips for the prompt below, in random order. Play **both**, then rate each on the ITU-T "
                "P.800 scale (5 Excellent … 1 Bad). Which one is quantized is not shown.")
            with gr.Row():
                rater_id = gr.Textbox(label="Rater id", elem_id="rater-id")
                new_pair = gr.Button("New pair", variant="primary", elem_id="new-pair")
            with gr.Accordion("Experimenter options", open=False):
                attention_enabled = gr.Checkbox(label="Ask an attention-check question with each pair")
            trial_prompt = gr.Markdown(label="Prompt", elem_id="trial-prompt")
            with gr.Row():
                with gr.Column():
                    audio_a = gr.Audio(label="A", type="filepath", interactive=False, buttons=[], elem_id="audio-a")
                    score_a = gr.Radio(SCORE_CHOICES, label="Rating of A", elem_id="score-a")
                with gr.Column():
                    audio_b = gr.Audio(label="B", type="filepath", interactive=False, buttons=[], elem_id="audio-b")
                    score_b = gr.Radio(SCORE_CHOICES, label="Rating of B", elem_id="score-b")
            preference = gr.Radio(PREFERENCE_CHOICES, value="", label="Which do you prefer? (optional)")
            attention = gr.Radio(SCORE_CHOICES, visible=False, elem_id="attention")
            submit = gr.Button("Submit ratings", interactive=False, elem_id="submit")
            rate_status = gr.Markdown(label="Status", elem_id="rate-status")
            trial_state = gr.State(None)  # lab.ratings.Trial of the pair on screen (blind: never sent out)
            played_state = gr.State(frozenset())  # labels played since the pair appeared
            attention_target = gr.State("")  # the answer the attention check asks for ("" = not asked)

        with gr.Tab("Results"):
            mos_table = gr.Dataframe(label="Mean opinion score with 95 % confidence interval", interactive=False)
            with gr.Row():
                refresh = gr.Button("Refresh")
                csv_file = gr.File(label="Ratings CSV")

        # ---- events --------------------------------------------------------------------------------
        request_inputs = [prompt, negative, seconds, steps, cfg, sampler, seed]

        @on_gpu
        @user_errors
        def run_compare(prompt, negative, seconds, steps, cfg, sampler, seed, precision, method, lora, layer,
                        progress=gr.Progress(track_tqdm=True)):
            request = GenerationRequest.from_ui(prompt=prompt, negative_prompt=negative, seconds=seconds,
                                                steps=steps, cfg_scale=cfg, sampler=sampler, seed=seed,
                                                defaults=sampling)
            view = lab.compare(request, recipe_name(precision, method, lora), layer or None,
                               on_clip=lambda name: progress(0, desc=f"Generating: {name}"))
            return (str(view.full_precision_wav), str(view.quantized_wav), view.summary, view.spectrograms,
                    view.step_metrics, view.activation_heatmap, view.activation_steps, view.channel_outliers)

        generate.click(run_compare, inputs=[*request_inputs, precision, method, lora, layer],
                       outputs=[fp_audio, q_audio, summary, spectrograms, step_metrics, activation_heatmap,
                                activation_steps, channel_outliers],
                       api_name="generate", concurrency_limit=concurrency_limit, concurrency_id="generation")

        @on_gpu
        @user_errors
        def run_new_pair(prompt, negative, seconds, steps, cfg, sampler, seed, precision, method, lora,
                         ask_attention, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            # `progress` is never called here: its presence makes Gradio show the sampler's tqdm bar
            generation = GenerationRequest.from_ui(prompt=prompt, negative_prompt=negative, seconds=seconds,
                                                   steps=steps, cfg_scale=cfg, sampler=sampler, seed=seed,
                                                   defaults=sampling)
            pair = lab.blind_pair(generation, recipe_name(precision, method, lora),
                                  session_id=getattr(request, "session_hash", None) or "api")
            target = random.choice(SCORE_CHOICES) if ask_attention else ""
            attention_update = gr.Radio(visible=bool(target), value=None,
                                        label=f"Attention check: select “{target}” here" if target else "")
            return (str(pair.wav_a), str(pair.wav_b), f"**Prompt:** {generation.prompt}", pair.trial,
                    frozenset(), target, attention_update, None, None, "", gr.Button(interactive=False), "")

        new_pair.click(run_new_pair, inputs=[*request_inputs, precision, method, lora, attention_enabled],
                       outputs=[audio_a, audio_b, trial_prompt, trial_state, played_state, attention_target,
                                attention, score_a, score_b, preference, submit, rate_status],
                       api_name="new_pair", concurrency_limit=concurrency_limit, concurrency_id="generation")

        def mark_played(label, played, trial):
            played = frozenset(played) | {label} if trial is not None else frozenset()
            return played, gr.Button(interactive={"A", "B"} <= played)

        for label, player in (("A", audio_a), ("B", audio_b)):
            player.play(functools.partial(mark_played, label), inputs=[played_state, trial_state],
                        outputs=[played_state, submit], api_name=f"played_{label.lower()}",
                        concurrency_limit=None)

        @user_errors
        def run_rate(rater, score_a, score_b, preference, attention_answer, trial, played, target):
            check = "" if not target else ("passed" if attention_answer == target else "failed")
            written = lab.submit_rating(trial, played, rater_id=rater, score_a=score_a, score_b=score_b,
                                        preference=preference or "", attention_check=check)
            return (f"Saved {written} ratings. Thank you! Press **New pair** for another.", None, frozenset(),
                    gr.Button(interactive=False))

        submit.click(run_rate, inputs=[rater_id, score_a, score_b, preference, attention, trial_state,
                                       played_state, attention_target],
                     outputs=[rate_status, trial_state, played_state, submit], api_name="rate",
                     concurrency_limit=None)

        def results():
            rows = mos_from_csv(lab.store.path)
            table = pd.DataFrame([{"precision": r.precision, "method": r.method, "ratings": r.n,
                                   "MOS": round(r.mos, 2), "95% CI low": round(r.ci_low, 2),
                                   "95% CI high": round(r.ci_high, 2)} for r in rows],
                                 columns=["precision", "method", "ratings", "MOS", "95% CI low", "95% CI high"])
            return table, (str(lab.store.path) if lab.store.path.exists() else None)

        refresh.click(results, outputs=[mos_table, csv_file], api_name="mos")
        demo.load(results, outputs=[mos_table, csv_file], api_visibility="private")
        demo.load(lambda: f"rater-{uuid.uuid4().hex[:6]}", outputs=rater_id, api_visibility="private")
    return demo


def build_lab(settings: Settings, *, model=None, model_config=None, ckpt_path=None, ratings_csv=None,
              quantized_files=()) -> Lab:
    loaded = load_model(model, model_config=model_config, ckpt_path=ckpt_path,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    quantized = QuantizedModels(loaded, cache_dir=settings.cache_dir,
                                calibration_prompts=read_prompts(settings.calibration_prompts),
                                calibration_steps=settings.calibration_steps,
                                max_models=settings.max_quantized_models)
    for path in quantized_files:
        quantized.add_saved(path)
    store = RatingsStore(ratings_csv or settings.ratings_csv, dataset_repo=settings.ratings_dataset,
                         push_minutes=settings.ratings_push_minutes)
    lab = Lab(loaded, quantized, store, settings.output_dir)
    lab.warm_up()
    return lab


def main(argv=None) -> None:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=settings.model,
                        help="Hugging Face model repo, e.g. stabilityai/stable-audio-open-1.0 (needs HF_TOKEN); "
                             "default: the embedded demo model")
    parser.add_argument("--model-config", default=settings.model_config, help="local model_config.json")
    parser.add_argument("--ckpt-path", default=settings.ckpt_path, help="local .safetensors or .ckpt")
    parser.add_argument("--quantized", action="append", default=[], metavar="FILE",
                        help="a quant.save file to serve under its recipe name (repeatable)")
    parser.add_argument("--ratings-csv", default=str(settings.ratings_csv), help="where ratings are appended")
    parser.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, 7860)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--username", help="require this user name (with --password)")
    parser.add_argument("--password", help="password for --username")
    args = parser.parse_args(argv)
    if bool(args.username) != bool(args.password):
        parser.error("--username and --password go together")

    try:
        lab = build_lab(settings, model=args.model, model_config=args.model_config, ckpt_path=args.ckpt_path,
                        ratings_csv=args.ratings_csv, quantized_files=args.quantized)
    except ValueError as err:  # ModelLoadError included: a message, not a traceback
        parser.error(str(err))
    demo = build_demo(lab, concurrency_limit=settings.concurrency_limit)
    demo.queue(max_size=64).launch(
        share=args.share, server_port=args.port, show_error=True,
        auth=(args.username, args.password) if args.username else None,
        allowed_paths=[str(settings.output_dir), str(lab.store.path.parent)])


if __name__ == "__main__":
    main()
