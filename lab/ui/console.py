"""The experimenter's console (behind a password): explore one comparison, build studies, read their results.

Raters never reach this Blocks: it is mounted under /admin with its own login, so its components, events
and files (labelled comparison clips, ratings CSVs) are not in the rater page's config or API.
"""
from __future__ import annotations

import functools
import json
import logging

import gradio as gr
import pandas as pd

from lab import sat
from lab.comparison import Lab
from lab.generation import CFG_RANGE, SAMPLERS, STEPS_RANGE, GenerationRequest
from lab.quantized import METHODS, PRECISIONS, WEIGHT_ONLY, describe, recipe_name
from lab.study import StudyDefinition, analyse
from lab.study.registry import Studies

log = logging.getLogger(__name__)
DECODED_STEPS = 25  # estimates decoded per clip when the per-step log-mel distance is asked for


def user_errors(fn):
    """An engine ValueError (bad input, unknown recipe, damaged study) becomes a one-line message in the UI and
    one line in the log, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            log.info("request refused: %s", err)
            raise gr.Error(str(err), print_exception=False) from None
    return wrapper


def unknown_words_message(model, prompt: str, negative_prompt: str = "") -> str:
    """'' when the model's tokenizer knows every word of both prompts; else what a user needs to know before
    generating: a word-level tokenizer reads each unknown word as one meaningless token."""
    unknown = sat.unknown_words(model, f"{prompt} {negative_prompt}")
    if not unknown:
        return ""
    return (f"This model does not know {', '.join(repr(word) for word in unknown)}: its tokenizer reads each as one "
            f"unknown token, so the clip would not follow the prompt. Use the words of its prompt grammar "
            f"(the examples under the prompt).")


def sampler_choices(guide: sat.ModelGuide) -> tuple[list[str], tuple[float, float], str]:
    """(samplers, CFG slider range, what to tell the user): the samplers generation.json validates the model for
    and the span of their CFG ranges, else every sampler and the full range (SAO, any model without a
    `validated` entry)."""
    if not guide.validated:
        return list(SAMPLERS), CFG_RANGE, ""
    ranges = {name: guide.cfg_range(name) for name in SAMPLERS if name in guide.samplers}
    span = (min(low for low, _ in ranges.values()), max(high for _, high in ranges.values()))
    return list(ranges), span, "Validated for this model (generation.json): " + ", ".join(
        f"{name} at CFG {low:g}-{high:g}" if low != high else f"{name} at CFG {low:g}"
        for name, (low, high) in ranges.items())


def template_definition() -> str:
    """A MUSHRA study over two prompts, as a starting point the experimenter edits."""
    definition = StudyDefinition(
        study_id="mushra-w8a8-vs-w4a8", title="Quantized audio quality", test_type="mushra",
        prompts=("sine tone at A4", "white noise"), seeds=(1,), conditions=("w8a8-dynamic", "w4a8-dynamic"),
        instructions="Rate each clip against the reference on the 0-100 scale; one of them is the reference itself.")
    return json.dumps(definition.to_dict(), indent=1)


def studies_table(studies: Studies) -> pd.DataFrame:
    rows = []
    for study_id in studies.ids():
        try:
            manifest, store = studies.get(study_id)
        except ValueError as err:
            rows.append({"study": study_id, "test": "", "items": 0, "conditions": "", "raters": 0,
                         "ratings": 0, "rater link": f"damaged: {err}"})
            continue
        ratings = store.read()
        rows.append({"study": study_id, "test": manifest.definition.test_type, "items": len(manifest.items),
                     "conditions": ", ".join(manifest.definition.conditions),
                     "raters": len({row["rater_id"] for row in ratings}), "ratings": len(ratings),
                     "rater link": f"/?study={study_id}"})
    return pd.DataFrame(rows, columns=["study", "test", "items", "conditions", "raters", "ratings", "rater link"])


def build_console(lab: Lab, studies: Studies, *, concurrency_limit: int = 1, on_gpu=lambda fn: fn) -> gr.Blocks:
    loaded = lab.loaded
    sampling = loaded.sampling  # the model's own defaults (generation.json next to its config)
    first = lab.default_recipe()  # never one that would calibrate on the first click
    samplers, cfg_range, validated = sampler_choices(loaded.guide)
    # delete_cache: Gradio's copies of served WAVs older than an hour go, checked hourly
    with gr.Blocks(title="Audio DiT PTQ Lab · experimenter", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Audio DiT PTQ Lab <small>v{lab.version}</small>\nSame prompt, same seed, same initial "
                    f"noise: full precision vs quantized. Model: `{loaded.model_id}` · {loaded.sample_rate} Hz · up "
                    f"to {lab.max_seconds:g} s.")
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value="sine tone at A4", scale=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", scale=2)
            prompt_note = gr.Markdown(elem_id="prompt-note")
            if loaded.guide.example_prompts:
                gr.Examples([[text] for text in loaded.guide.example_prompts], inputs=[prompt],
                            label="Prompt grammar: one example per family (from generation.json)")
            with gr.Row():
                seconds = gr.Slider(0.5, lab.max_seconds, value=min(sampling.seconds or 2.0, lab.max_seconds),
                                    step=0.1, label="Seconds")
                steps = gr.Slider(*STEPS_RANGE, value=sampling.steps, step=1, label="Steps")
                cfg = gr.Slider(*cfg_range, value=sampling.cfg_scale, step=0.5, label="CFG scale")
                sampler = gr.Dropdown(samplers, value=sampling.sampler_type, label="Sampler", info=validated or None)
                seed = gr.Textbox(label="Seed (blank = random)", elem_id="seed")
            with gr.Row():
                precision = gr.Dropdown(list(PRECISIONS), value=describe(first)[0], label="Precision",
                                        info="W8A16/W4A16 are weight-only: no activation method")
                method = gr.Dropdown(list(METHODS), value=first.method if first.method in METHODS else "dynamic",
                                     label="Method", interactive=first.method in METHODS)
                lora = gr.Checkbox(value=bool(first.lora_rank), label="+ LoRA (low-rank branch on the weight error)")
                layer = gr.Dropdown(lab.layers, value=lab.default_layer(), label="Layer for activation statistics")
            with gr.Row():
                calibration_note = gr.Markdown(lab.calibration_status(first.name), elem_id="calibration-note")
                calibrate = gr.Button("Calibrate", scale=0, elem_id="calibrate")
                decode_steps = gr.Checkbox(label="Decode per-step estimates (per-step log-mel distance: two decodes "
                                                 "per step, slower)", elem_id="decode-steps")
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

        with gr.Tab("Studies"):
            gr.Markdown("Define a study (JSON: prompts × seeds × conditions; full precision is the reference), "
                        "build its stimuli, then send raters the link. Building resumes after an interruption; "
                        "for large studies use `torchrun --nproc-per-node N -m lab.study build DEFINITION.json`.")
            definition = gr.Code(template_definition(), language="json", label="Study definition",
                                 elem_id="definition")
            build = gr.Button("Build study", variant="primary", elem_id="build")
            build_status = gr.Markdown(elem_id="build-status")
            table = gr.Dataframe(studies_table(studies), label="Built studies", interactive=False)

        with gr.Tab("Results"):
            with gr.Row():
                study_choice = gr.Dropdown(studies.ids(), label="Study", elem_id="study-choice")
                analyse_button = gr.Button("Analyse", variant="primary", elem_id="analyse")
            report = gr.Markdown(elem_id="report")
            scores_plot = gr.Plot(label="Scores per condition")
            downloads = gr.File(label="Ratings CSV and report", file_count="multiple")

        # ---- events ---------------------------------------------------------------------------------------
        precision.change(lambda p: gr.Dropdown(interactive=p not in WEIGHT_ONLY), inputs=precision, outputs=method,
                         api_visibility="private")

        @user_errors
        def show_calibration_status(precision, method, lora):
            return lab.calibration_status(recipe_name(precision, method, lora))

        for choice in (precision, method, lora):
            choice.change(show_calibration_status, inputs=[precision, method, lora], outputs=calibration_note,
                          api_visibility="private")

        @on_gpu
        @user_errors
        def run_calibrate(precision, method, lora, progress=gr.Progress(track_tqdm=True)):
            done = lab.calibrate()
            return f"{done}\n\n{lab.calibration_status(recipe_name(precision, method, lora))}"

        # its own queue: a long calibration never holds the slot generations wait for
        calibrate.click(run_calibrate, inputs=[precision, method, lora], outputs=calibration_note, api_name="calibrate",
                        concurrency_limit=1, concurrency_id="calibration")

        for box in (prompt, negative):
            box.change(lambda text, negative_text: unknown_words_message(loaded.model, text, negative_text),
                       inputs=[prompt, negative], outputs=prompt_note, api_visibility="private")

        @on_gpu
        @user_errors
        def run_compare(prompt, negative, seconds, steps, cfg, sampler, seed, precision, method, lora, layer,
                        decode_steps=False, progress=gr.Progress(track_tqdm=True)):
            if message := unknown_words_message(loaded.model, str(prompt or ""), str(negative or "")):
                raise ValueError(message)
            request = GenerationRequest.from_ui(prompt=prompt, negative_prompt=negative, seconds=seconds,
                                                steps=steps, cfg_scale=cfg, sampler=sampler, seed=seed,
                                                defaults=sampling)
            if message := loaded.guide.refusal(request.sampler, request.cfg_scale):
                raise ValueError(message)
            view = lab.compare(request, recipe_name(precision, method, lora), layer or None,
                               on_clip=lambda name: progress(0, desc=f"Generating: {name}"),
                               decode_steps=DECODED_STEPS if decode_steps else 0)
            return (str(view.full_precision_wav), str(view.quantized_wav), view.summary, view.spectrograms,
                    view.step_metrics, view.activation_heatmap, view.activation_steps, view.channel_outliers)

        generate.click(run_compare, inputs=[prompt, negative, seconds, steps, cfg, sampler, seed, precision, method,
                                            lora, layer, decode_steps],
                       outputs=[fp_audio, q_audio, summary, spectrograms, step_metrics, activation_heatmap,
                                activation_steps, channel_outliers],
                       api_name="generate", concurrency_limit=concurrency_limit, concurrency_id="generation")

        @on_gpu
        @user_errors
        def run_build(text, progress=gr.Progress(track_tqdm=True)):
            try:
                parsed = StudyDefinition.from_json(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"The study definition is not valid JSON: {err}") from None
            manifest = studies.build(parsed, lab.loaded, lab.quantized)
            stimuli = sum(len(item.stimuli) for item in manifest.items)
            return (f"Built **{manifest.study_id}**: {len(manifest.items)} items, {stimuli} stimuli. Rater link: "
                    f"`/?study={manifest.study_id}` (add `&rater=ID` to fix a participant id).",
                    studies_table(studies), gr.Dropdown(choices=studies.ids(), value=manifest.study_id))

        build.click(run_build, inputs=[definition], outputs=[build_status, table, study_choice], api_name="build_study",
                    concurrency_limit=concurrency_limit, concurrency_id="generation")

        @user_errors
        def run_analysis(study_id):
            if not study_id:
                raise ValueError("Pick a study to analyse.")
            manifest, store = studies.get(study_id)
            if not store.path.exists():
                raise ValueError(f"Study {study_id!r} has no ratings yet.")
            result = analyse(store.path, manifest.study_dir / "analysis")
            return result.markdown, result.figure, [str(store.path), str(result.report_path)]

        analyse_button.click(run_analysis, inputs=[study_choice], outputs=[report, scores_plot, downloads],
                             api_name="analyse")
        demo.load(lambda: (studies_table(studies), gr.Dropdown(choices=studies.ids())), outputs=[table, study_choice],
                  api_visibility="private")
    return demo
