"""The one check of what the model is asked to generate, for every entry point: the Compare tab, a study build
(every prompt of the definition, with the study's sampler settings) and calibration (`ptq-quantize`, the app's
cache, `python -m lab.study build`).

Unknown words are refused everywhere, never accepted with a warning: a word-level text conditioner (the demo
model's `lut`) reads each as one meaningless token, so the clip would not follow its prompt, and a listening study
or a calibration set built on such prompts measures something else than it says.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from lab import sat
from lab.generation import GenerationRequest
from lab.sat import LoadedModel


def unknown_words_refusal(loaded: LoadedModel, *texts: str) -> str:
    """'' when the model's tokenizer knows every word of `texts`; else what the user needs to know (each prompt
    with words the model does not know, and those words)."""
    problems = []
    for text in texts:
        if unknown := sat.unknown_words(loaded.model, text):
            problems.append(f"{', '.join(repr(word) for word in unknown)} (in {text!r})")
    if not problems:
        return ""
    return (f"This model does not know {'; '.join(problems)}: its tokenizer reads each unknown word as one "
            f"meaningless token, so the clip would not follow the prompt. Use the words of its prompt grammar "
            f"(the examples under the prompt in the console, `example_prompts` in its generation.json).")


def validate_request(loaded: LoadedModel, request: GenerationRequest) -> None:
    """Raise ValueError, in words the user can act on, unless `loaded` can serve `request`: sizes (prompt length,
    seconds within the model's clip, steps, CFG, seed, a known sampler), sampler settings the model's
    generation.json validates, and prompt words the model knows."""
    validate_prompts(loaded, request, [request.prompt])


def validate_prompts(loaded: LoadedModel, request: GenerationRequest, prompts: Iterable[str]) -> None:
    """`validate_request` of `request` with each of `prompts` in place of its own (a study's prompts with the
    study's settings), every unknown word of every prompt named in one message."""
    prompts = list(prompts)
    for prompt in prompts:
        dataclasses.replace(request, prompt=prompt).validate(max_seconds=loaded.sample_size / loaded.sample_rate)
    if refusal := loaded.guide.refusal(request.sampler, request.cfg_scale):
        raise ValueError(refusal)
    if refusal := unknown_words_refusal(loaded, *filter(str.strip, (*prompts, request.negative_prompt))):
        raise ValueError(refusal)


def check_prompt_words(loaded: LoadedModel, prompts: Iterable[str]) -> None:
    """Refuse prompts with words the model does not know, for prompt sets that are not generation requests of
    their own (calibration: its clip length and steps follow the calibration plan, not the Compare tab's limits)."""
    if refusal := unknown_words_refusal(loaded, *prompts):
        raise ValueError(refusal)
