"""The ratings CSV's columns, defined once: the store writes them and the analysis reads them.

One row per (rater, page, rated clip). `check` says what a page was for: "" a regular page (analysed),
"attention" an instructed answer, "gold" a page whose answer is known (the anchor below the reference);
check pages only decide who is kept. `time_on_page_s`, `play_count` (what the page reported) and
`stream_count` (complete transfers the server counted) show how each rating was listened to.
"""
from __future__ import annotations

REGULAR, ATTENTION, GOLD = "", "attention", "gold"  # values of the `check` column

COLUMNS = (
    "study_id", "rater_id", "session_id", "trial_id", "trial_index", "test_type", "check", "item", "prompt",
    "condition", "stimulus_id", "label", "score", "time_on_page_s", "listening_s", "play_count", "stream_count",
    "presented_at", "submitted_at", "attention_target", "attention_answer", "attention_passed", "comment",
    "app_version",
)
# What the analysis needs in a file; the others describe the rating (the analysis summarises them when present).
ANALYSED = ("rater_id", "trial_id", "test_type", "item", "condition", "score")
NUMBERS = ("score", "time_on_page_s", "listening_s", "play_count", "stream_count")  # read back as floats
