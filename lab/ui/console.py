"""The experimenter's console (behind a password): explore one comparison, build studies, read their results.

Raters never reach this Blocks: it is mounted under /admin with its own login, so its components, events
and files (labelled comparison clips, ratings CSVs) are not in the rater page's API, and Gradio's file route
under /admin answers only a logged-in browser. Every rule lives in the engine: `Console`'s handlers map widget
values to one engine call each and show the engine's ValueError as the message; each tab has one builder that
lays out its widgets and wires them to the handlers.
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
from lab.methods import METHODS, PRECISIONS, WEIGHT_ONLY, describe, recipe_name
from lab.requests import unknown_words_refusal
from lab.study import StudyDefinition, analyse
from lab.study.build import estimate_build, shared_items
from lab.study.health import check_study
from lab.study.registry import Studies

log = logging.getLogger(__name__)
DECODED_STEPS = 25  # estimates decoded per clip when the per-step log-mel distance is asked for
CONFIRM_LARGE = "Build a large study (estimated over 30 min)"


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
    """One row per built study, its files verified now: a damaged study names its missing or changed files."""
    rows = []
    for study_id in studies.ids():
        health = check_study(studies.root, study_id)
        manifest = health.manifest
        if manifest is None or not health.ok:
            rows.append({"study": study_id, "test": manifest.definition.test_type if manifest else "",
                         "items": len(manifest.items) if manifest else 0, "conditions": "", "raters": 0,
                         "ratings": 0, "rater link": f"damaged: {health.problem}"})
            continue
        _, store = studies.get(study_id)
        ratings = store.read()
        rows.append({"study": study_id, "test": manifest.definition.test_type, "items": len(manifest.items),
                     "conditions": ", ".join(manifest.definition.conditions),
                     "raters": len({row["rater_id"] for row in ratings}), "ratings": len(ratings),
                     "rater link": f"/?study={study_id}"})
    return pd.DataFrame(rows, columns=["study", "test", "items", "conditions", "raters", "ratings", "rater link"])


class Console:
    """The handlers of the console's events, over the engine (`Lab` for comparisons, `Studies` for studies)."""

    def __init__(self, lab: Lab, studies: Studies):
        self.lab = lab
        self.studies = studies

    def calibration_status(self, precision, method, lora) -> str:
        return self.lab.calibration_status(recipe_name(precision, method, lora))

    def calibrate(self, precision, method, lora, progress=gr.Progress(track_tqdm=True)) -> str:
        done = self.lab.calibrate()
        return f"{done}\n\n{self.calibration_status(precision, method, lora)}"

    def prompt_note(self, prompt, negative) -> str:
        """What the engine would refuse about the prompts' words, shown while typing."""
        return unknown_words_refusal(self.lab.loaded, *filter(str.strip, (str(prompt or ""), str(negative or ""))))

    def compare(self, prompt, negative, seconds, steps, cfg, sampler, seed, precision, method, lora, layer,
                decode_steps=False, progress=gr.Progress(track_tqdm=True)):
        request = GenerationRequest.from_ui(prompt=prompt, negative_prompt=negative, seconds=seconds, steps=steps,
                                            cfg_scale=cfg, sampler=sampler, seed=seed,
                                            defaults=self.lab.loaded.sampling)
        view = self.lab.compare(request, recipe_name(precision, method, lora), layer or None,
                                on_clip=lambda name: progress(0, desc=f"Generating: {name}"),
                                decode_steps=DECODED_STEPS if decode_steps else 0)
        return (str(view.full_precision_wav), str(view.quantized_wav), view.summary, view.spectrograms,
                view.step_metrics, view.activation_heatmap, view.activation_steps, view.channel_outliers)

    def estimate(self, text) -> str:
        """The build's cost, or what is wrong with the definition, while it is edited."""
        try:
            definition = StudyDefinition.from_json(str(text or ""))
            return "**Estimate:** " + estimate_build(definition, self.lab.loaded, self.lab.quantized).describe()
        except ValueError as err:
            return f"**Not buildable:** {err}"

    def build(self, text, confirmed=False, progress=gr.Progress(track_tqdm=True)):
        definition = StudyDefinition.from_json(str(text or ""))
        estimate_build(definition, self.lab.loaded, self.lab.quantized).check_confirmed(
            bool(confirmed), f"tick '{CONFIRM_LARGE}'")
        manifest = self.studies.build(definition, self.lab.loaded, self.lab.quantized)
        stimuli = sum(len(item.stimuli) for item in manifest.items)
        warnings = "".join(f"\n\n**Warning:** {warning}" for warning in shared_items(self.studies.root, manifest))
        return (f"Built **{manifest.study_id}**: {len(manifest.items)} items, {stimuli} stimuli. Rater link: "
                f"`/?study={manifest.study_id}` (add `&rater=ID` to fix a participant id).{warnings}",
                studies_table(self.studies), gr.Dropdown(choices=self.studies.ids(), value=manifest.study_id))

    def analyse(self, study_id):
        if not study_id:
            raise ValueError("Pick a study to analyse.")
        health = check_study(self.studies.root, study_id)
        if not health.ok:
            raise ValueError(health.problem)
        _, store = self.studies.get(study_id)
        if not store.path.exists():
            raise ValueError(f"Study {study_id!r} has no ratings yet.")
        result = analyse(store.path, health.manifest.study_dir / "analysis")
        return result.markdown, result.figure, [str(store.path), str(result.report_path)]

    def refresh(self):
        return studies_table(self.studies), gr.Dropdown(choices=self.studies.ids())


def build_console(lab: Lab, studies: Studies, *, concurrency_limit: int = 1, on_gpu=lambda fn: fn) -> gr.Blocks:
    console = Console(lab, studies)
    generation_queue = dict(concurrency_limit=concurrency_limit, concurrency_id="generation")
    # delete_cache: Gradio's copies of served WAVs older than an hour go, checked hourly
    with gr.Blocks(title="Audio DiT PTQ Lab · experimenter", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Audio DiT PTQ Lab <small>v{lab.version}</small>\nSame prompt, same seed, same initial "
                    f"noise: full precision vs quantized. Model: `{lab.loaded.model_id}` · "
                    f"{lab.loaded.sample_rate} Hz · up to {lab.max_seconds:g} s.")
        # shown in Results, updated by a build in Studies and on every page load
        study_choice = gr.Dropdown(studies.ids(), label="Study", elem_id="study-choice", render=False)
        with gr.Tab("Compare"):
            compare_tab(console, on_gpu, generation_queue)
        with gr.Tab("Studies"):
            table = studies_tab(console, study_choice, on_gpu, generation_queue)
        with gr.Tab("Results"):
            results_tab(console, study_choice)
        demo.load(console.refresh, outputs=[table, study_choice], api_visibility="private")
    return demo


def compare_tab(console: Console, on_gpu, generation_queue: dict) -> None:
    lab, sampling = console.lab, console.lab.loaded.sampling  # the model's own defaults (generation.json)
    first = lab.default_recipe()  # never one that would calibrate on the first click
    samplers, cfg_range, validated = sampler_choices(lab.loaded.guide)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="sine tone at A4", scale=3, elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", scale=2)
    prompt_note = gr.Markdown(elem_id="prompt-note")
    if lab.loaded.guide.example_prompts:
        gr.Examples([[text] for text in lab.loaded.guide.example_prompts], inputs=[prompt],
                    label="Prompt grammar: one example per family (from generation.json)")
    with gr.Row():
        seconds = gr.Slider(0.5, lab.max_seconds, value=min(sampling.seconds or 2.0, lab.max_seconds), step=0.1,
                            label="Seconds")
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
        decode_steps = gr.Checkbox(label="Decode per-step estimates (per-step log-mel distance: two decodes per "
                                         "step, slower)", elem_id="decode-steps")
    generate = gr.Button("Generate both", variant="primary", elem_id="generate")
    summary = gr.Markdown(label="Summary", elem_id="summary")
    with gr.Row():
        fp_audio = gr.Audio(label="Full precision", type="filepath", interactive=False, buttons=["download"],
                            elem_id="fp-audio")
        q_audio = gr.Audio(label="Quantized", type="filepath", interactive=False, buttons=["download"],
                           elem_id="q-audio")
    figures = [gr.Plot(label=label) for label in ("Log-mel spectrograms", "Per-step error",
                                                  "Per-timestep input activations", "Activations, one step at a time",
                                                  "Outlier channels and smoothing")]

    recipe = [precision, method, lora]
    precision.change(lambda p: gr.Dropdown(interactive=p not in WEIGHT_ONLY), inputs=precision, outputs=method,
                     api_visibility="private")
    for choice in recipe:
        choice.change(user_errors(console.calibration_status), inputs=recipe, outputs=calibration_note,
                      api_visibility="private")
    # its own queue: a long calibration never holds the slot generations wait for
    calibrate.click(on_gpu(user_errors(console.calibrate)), inputs=recipe, outputs=calibration_note,
                    api_name="calibrate", concurrency_limit=1, concurrency_id="calibration")
    for box in (prompt, negative):
        box.change(console.prompt_note, inputs=[prompt, negative], outputs=prompt_note, api_visibility="private")
    generate.click(on_gpu(user_errors(console.compare)),
                   inputs=[prompt, negative, seconds, steps, cfg, sampler, seed, *recipe, layer, decode_steps],
                   outputs=[fp_audio, q_audio, summary, *figures], api_name="generate", **generation_queue)


def studies_tab(console: Console, study_choice: gr.Dropdown, on_gpu, generation_queue: dict) -> gr.Dataframe:
    """The Studies tab; returns its table of built studies (refreshed on load)."""
    gr.Markdown("Define a study (JSON: prompts × seeds × conditions; full precision is the reference), check its "
                "estimate, build its stimuli, then send raters the link. Building resumes after an interruption; "
                "for large studies use `torchrun --nproc-per-node N -m lab.study build DEFINITION.json`.")
    template = template_definition()
    definition = gr.Code(template, language="json", label="Study definition", elem_id="definition")
    estimate = gr.Markdown(console.estimate(template), elem_id="build-estimate")
    with gr.Row():
        confirmed = gr.Checkbox(label=CONFIRM_LARGE, elem_id="confirm-large")
        build = gr.Button("Build study", variant="primary", elem_id="build")
    build_status = gr.Markdown(elem_id="build-status")
    table = gr.Dataframe(studies_table(console.studies), label="Built studies", interactive=False)
    definition.change(console.estimate, inputs=definition, outputs=estimate, api_visibility="private")
    build.click(on_gpu(user_errors(console.build)), inputs=[definition, confirmed],
                outputs=[build_status, table, study_choice], api_name="build_study", **generation_queue)
    return table


def results_tab(console: Console, study_choice: gr.Dropdown) -> None:
    with gr.Row():
        study_choice.render()
        analyse_button = gr.Button("Analyse", variant="primary", elem_id="analyse")
    report = gr.Markdown(elem_id="report")
    scores_plot = gr.Plot(label="Scores per condition")
    downloads = gr.File(label="Ratings CSV and report", file_count="multiple")
    analyse_button.click(user_errors(console.analyse), inputs=[study_choice], outputs=[report, scores_plot, downloads],
                         api_name="analyse")
