"""The rater's pages: a study link opens instructions, a familiarisation page, the trials and a thank-you page.

Everything that decides what a rater hears stays on the server: the session state (`gr.State`, never sent
to the browser) holds the study, the rater id, the page on screen, when it was shown and how often each clip
was played; the browser receives prompts, blind labels and opaque stimulus files only. The rater id lives in
the browser's local storage (or comes from the link's `rater=` parameter), so a reload resumes where the
rater stopped, and the store refuses a second rating of a page.
"""
from __future__ import annotations

import functools
import logging
import random
import time
import uuid
from pathlib import Path

import gradio as gr
from gradio.data_classes import _StaticFiles

from lab.study import RatingsStore, Trial, rater_view, trials_for
from lab.study.manifest import Manifest
from lab.study.registry import Studies

log = logging.getLogger(__name__)
MAX_CLIPS = 12  # clips one page can show (MUSHRA: conditions + hidden reference + anchor)
MAX_EXAMPLES = 8  # clips on the familiarisation page
NO_STUDY = ("## Listening test\n\nOpen the study link you were given (it ends in `?study=...`). "
            "Experimenters: the console is at [/admin](admin/).")
TYPE_NAMES = {"acr": "Rate each clip", "ab": "Compare two clips", "mushra": "Rate clips against a reference"}


def serve_in_place(stimuli_dir) -> None:
    """Serve a study's stimuli from their folder, not from copies in Gradio's cache: Gradio touches a cached
    copy each time it hands it out, and the modification times behind ETag / Last-Modified would then order
    a page's files. In place, every file keeps the study's one build time and the same size."""
    if Path(stimuli_dir).resolve() not in _StaticFiles.all_paths:
        gr.set_static_paths([stimuli_dir])


def _page(name: str) -> list:
    """Visibility updates of the four pages, showing `name`."""
    return [gr.Column(visible=name == page) for page in ("welcome", "training", "trial", "done")]


def _played_note(trial: Trial, plays: dict) -> str:
    """How many of the page's clips the server has seen played (the reference counts as one)."""
    total = len(trial.stimuli)
    played = sum(1 for stimulus in trial.stimuli if plays.get(stimulus.label))
    if played == total:
        return "Every clip played: rate them and continue."
    return f"Played {played} of {total} clips: play each one before you rate."


def _blank_trial() -> list:
    """Updates that empty the trial widgets (after the last page)."""
    updates = ["", "", gr.Audio(value=None, visible=False)]
    for _ in range(MAX_CLIPS):
        updates += [gr.Row(visible=False), gr.Audio(value=None), gr.Slider(value=0, visible=False)]
    return updates + [gr.Radio(value=None, visible=False), gr.Textbox(value=""), ""]


class RaterPages:
    """The handlers behind the rater's pages, over the studies of one app."""

    def __init__(self, studies: Studies):
        self.studies = studies

    # ---- session -----------------------------------------------------------------------------------

    def open(self, study_id: str, rater_id: str, session_id: str = "") -> dict:
        """A new session for `rater_id` in `study_id` (StudyError / ValueError with a rater-facing message)."""
        manifest, store = self.studies.get(study_id)
        trials_for(manifest, rater_id)  # registers the rater, validates the id
        serve_in_place(manifest.stimuli_dir)
        return {"study": manifest.study_id, "rater": rater_id, "session": session_id or uuid.uuid4().hex[:12],
                "trial": None, "shown": None, "plays": {}}

    def _study(self, session: dict) -> tuple[Manifest, RatingsStore]:
        if not session:
            raise ValueError("Open the study link you were given to start.")
        return self.studies.get(session["study"])

    def current_trial(self, session: dict) -> Trial | None:
        """The first page the rater has not rated yet (None when the study is complete)."""
        manifest, store = self._study(session)
        remaining = store.progress(session["rater"]).remaining
        return remaining[0] if remaining else None

    def examples(self, session: dict) -> list:
        """Familiarisation clips: every stimulus of the first item but the hidden reference, shuffled per rater."""
        manifest, _ = self._study(session)
        stimuli = [s for s in manifest.items[0].stimuli if s.condition != "hidden-reference"]
        random.Random(f"{session['study']}/{session['rater']}").shuffle(stimuli)
        return [manifest.path(s) for s in stimuli[:MAX_EXAMPLES]]

    # ---- views -------------------------------------------------------------------------------------

    def welcome(self, session: dict) -> str:
        manifest, store = self._study(session)
        definition = manifest.definition
        progress = store.progress(session["rater"])
        resume = (f"\n\nWelcome back: you have rated {len(progress.done)} of {progress.total} pages and will "
                  "continue where you stopped." if progress.done else "")
        return (f"## {definition.title}\n\n{TYPE_NAMES[definition.test_type]}. "
                f"{definition.instructions or 'Listen carefully, with headphones if you can.'}\n\n"
                f"There are {progress.total} pages. Each clip must be played before you rate it. "
                f"Your participant id: `{session['rater']}`.{resume}")

    def show_trial(self, session: dict) -> tuple[dict, list, str]:
        """(session, updates of the trial widgets, thank-you text) for the next unrated page; the thank-you
        page when none is left."""
        trial = self.current_trial(session)
        if trial is None:
            manifest, _ = self._study(session)
            code = self.studies.completion_code(manifest, session["rater"])
            return session, [*_page("done"), *_blank_trial()], (
                f"## Thank you!\n\nYou have rated every page. Your completion code is **{code}**.")
        session = {**session, "trial": trial.trial_id, "shown": time.time(), "plays": {}}
        view = rater_view(trial)
        clips = list(view.stimuli)
        anchors = " · ".join(f"{value} {words}" for value, words in sorted(view.scale.labels))
        prompt = f" · Prompt: *{view.prompt}*" if view.prompt else ""
        updates = [*_page("trial"), f"**Page {view.number} of {view.total}**{prompt}", view.instructions,
                   gr.Audio(value=str(view.reference) if view.reference else None, visible=view.reference is not None)]
        for index in range(MAX_CLIPS):
            shown = index < len(clips)
            label, path = clips[index] if shown else ("", None)
            updates += [gr.Row(visible=shown),
                        gr.Audio(value=str(path) if shown else None, label=f"Clip {label}" if shown else "Clip"),
                        gr.Slider(value=0, label=f"Clip {label}" if shown else "Clip", info=anchors,
                                  visible=shown and trial.test_type == "mushra")]
        choices = [(f"{value} - {words}", value) for value, words in view.scale.labels]
        updates += [gr.Radio(choices=choices, value=None, label=view.scale.question,
                             visible=trial.test_type != "mushra"), gr.Textbox(value=""), _played_note(trial, {})]
        return session, updates, ""

    def mark_played(self, session: dict, index: int | None) -> tuple[dict, str]:
        """Count one play of clip `index` on the current page (None: the open reference); return the session
        and the page's played note, which tells the rater (and a browser test) that the server has the play."""
        if not session or not session.get("trial"):
            return session, ""
        trial = self._trial(session)
        rated = trial.rated
        if index is None:
            label = next((s.label for s in trial.stimuli if not s.rated), None)
        else:
            label = rated[index].label if index < len(rated) else None
        if label is None:
            return session, _played_note(trial, session["plays"])
        plays = dict(session["plays"])
        plays[label] = plays.get(label, 0) + 1
        return {**session, "plays": plays}, _played_note(trial, plays)

    def _trial(self, session: dict) -> Trial:
        manifest, _ = self._study(session)
        for trial in trials_for(manifest, session["rater"]):
            if trial.trial_id == session.get("trial"):
                return trial
        raise ValueError("This page is not in your list: reload the study to continue where you left off.")

    def submit(self, session: dict, choice, sliders: list, comment: str) -> str:
        """Store the page's ratings (ValueError with a rater-facing message, nothing written, otherwise)."""
        manifest, store = self._study(session)
        trial = self._trial(session)
        if trial.test_type == "mushra":
            scores = {stimulus.label: sliders[index] for index, stimulus in enumerate(trial.rated)}
        else:
            if choice is None:
                raise ValueError("Choose a rating before continuing.")
            scores = choice
        submission = store.submit(trial, session["rater"], scores, session["plays"], presented_at=session["shown"],
                                  session_id=session["session"], comment=comment)
        return submission.message or ""


def build_rater_app(studies: Studies, *, browser_secret: str) -> gr.Blocks:
    """The Blocks a study link opens (mounted at the server's root)."""
    pages = RaterPages(studies)
    with gr.Blocks(title="Listening test") as demo:
        stored_id = gr.BrowserState("", storage_key="ptq-lab-rater-id", secret=browser_secret)
        session = gr.State(None)
        link_study, link_rater = gr.Textbox(visible=False), gr.Textbox(visible=False)  # inputs of /open_study
        opener = gr.Button(visible=False)
        with gr.Column(visible=True) as welcome_page:
            welcome = gr.Markdown("Loading the study…", elem_id="welcome")
            start = gr.Button("Start", variant="primary", visible=False, elem_id="start")
        with gr.Column(visible=False) as training_page:
            gr.Markdown("## Familiarisation\n\nThese clips show the range of quality you will hear. Listen to "
                        "them as often as you like; they are not rated.")
            examples = [gr.Audio(label=f"Example {i + 1}", type="filepath", interactive=False, buttons=[],
                                 visible=False) for i in range(MAX_EXAMPLES)]
            to_trials = gr.Button("Continue to the test", variant="primary", elem_id="to-trials")
        with gr.Column(visible=False) as trial_page:
            header = gr.Markdown(elem_id="trial-header")
            instructions = gr.Markdown(elem_id="trial-instructions")
            reference = gr.Audio(label="Reference", type="filepath", interactive=False, buttons=[], visible=False,
                                 elem_id="reference")
            rows, players, sliders = [], [], []
            for index in range(MAX_CLIPS):
                with gr.Row(visible=False) as row:
                    players.append(gr.Audio(type="filepath", interactive=False, buttons=[],
                                            elem_id=f"clip-{index}"))
                    sliders.append(gr.Slider(0, 100, value=0, step=1, visible=False, elem_id=f"score-{index}"))
                rows.append(row)
            choice = gr.Radio(visible=False, elem_id="choice")
            comment = gr.Textbox(label="Comment (optional)", max_lines=3, elem_id="comment")
            played = gr.Markdown(elem_id="played")
            submit = gr.Button("Submit and continue", variant="primary", elem_id="submit")
            status = gr.Markdown(elem_id="status")
        with gr.Column(visible=False) as done_page:
            done = gr.Markdown(elem_id="done")

        pages_out = [welcome_page, training_page, trial_page, done_page]
        trial_out = [*pages_out, header, instructions, reference,
                     *[component for trio in zip(rows, players, sliders) for component in trio], choice, comment,
                     played]

        def user_message(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except ValueError as err:  # a rater's mistake or a bad link: a message, not a traceback
                    log.info("rater request refused: %s", err)
                    raise gr.Error(str(err), print_exception=False) from None
            return wrapper

        def opened(study_id, rater_id, request: gr.Request):
            current = pages.open(study_id, rater_id, getattr(request, "session_hash", "") or "")
            return current, rater_id, pages.welcome(current), gr.Button(visible=True)

        def on_load(remembered, request: gr.Request):
            params = request.query_params
            if not params.get("study"):  # the bare address: say where to go, name no study
                return None, remembered, NO_STUDY, gr.Button(visible=False)
            rater_id = (params.get("rater") or remembered or f"r-{uuid.uuid4().hex[:10]}").strip()
            try:
                return opened(params.get("study", ""), rater_id, request)
            except ValueError as err:
                log.info("study link refused: %s", err)
                return None, remembered, str(err), gr.Button(visible=False)

        demo.load(on_load, inputs=[stored_id], outputs=[session, stored_id, welcome, start], api_visibility="private")
        opener.click(user_message(opened), inputs=[link_study, link_rater],
                     outputs=[session, stored_id, welcome, start], api_name="open_study")

        @user_message
        def begin(current):
            paths = pages.examples(current)
            return [*_page("training"), *[gr.Audio(value=str(paths[i]) if i < len(paths) else None,
                                                    visible=i < len(paths)) for i in range(MAX_EXAMPLES)]]

        start.click(begin, inputs=[session], outputs=[*pages_out, *examples], api_name="start")

        @user_message
        def first_trial(current):
            current, updates, thanks = pages.show_trial(current)
            return [current, *updates, thanks, ""]

        to_trials.click(first_trial, inputs=[session], outputs=[session, *trial_out, done, status], api_name="trials")

        reference.play(functools.partial(pages.mark_played, index=None), inputs=[session], outputs=[session, played],
                       api_name="play_reference", concurrency_limit=None)
        for index, player in enumerate(players):
            player.play(functools.partial(pages.mark_played, index=index), inputs=[session], outputs=[session, played],
                        api_name=f"play_{index + 1}", concurrency_limit=None)

        @user_message
        def rate(current, picked, comment_text, *slider_values):
            message = pages.submit(current, picked, list(slider_values), comment_text)
            current, updates, thanks = pages.show_trial(current)
            return [current, *updates, thanks, message]

        submit.click(rate, inputs=[session, choice, comment, *sliders], outputs=[session, *trial_out, done, status],
                     api_name="submit", concurrency_limit=None)
    return demo
