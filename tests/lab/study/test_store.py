"""lab.study.store: validated, whole, formula-proof rows under concurrency; nothing written for a bad page; a page
counts only when the server streamed every clip and the rater spent the clips' playing time on it."""
import csv
import dataclasses
import multiprocessing
import threading
import time

import pytest

from lab.study import store as store_module
from lab.study.assignment import trials_for
from lab.study.raters import read_records
from lab.study.schema import COLUMNS
from lab.study.store import RatingsStore
from tests.lab.study.crowd import answer, enroll, listing
from tests.lab.study.fakes import fake_manifest


def plays_for(trial, count=1):
    return {s.label: count for s in trial.stimuli}


def submit(store, trial, rater, **kwargs):
    kwargs.setdefault("presented_at", time.time() - kwargs.pop("shown_ago", 12.5))
    kwargs.setdefault("streamed", plays_for(trial))
    return store.submit(trial, rater, kwargs.pop("scores", answer(trial)), kwargs.pop("plays", plays_for(trial)),
                        **kwargs)


def test_acr_rows_and_progress(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="acr", attention_checks=1)
    store = RatingsStore(manifest)
    trials = listing(manifest, "alice")
    assert store.progress("alice").remaining == tuple(trials)
    result = submit(store, trials[0], "alice", session_id="s-1", scores=trials[0].attention_target or 3)
    assert result.rows == 1 and result.message is None
    progress = store.progress("alice")
    assert progress.done == {trials[0].trial_id} and progress.remaining == tuple(trials[1:]) and progress.total == 7
    row = store.read()[0]
    assert list(row) == list(COLUMNS)
    assert row["rater_id"] == "alice" and row["session_id"] == "s-1" and row["trial_id"] == trials[0].trial_id
    assert row["condition"] == trials[0].stimuli[0].condition and row["stimulus_id"] == trials[0].stimuli[0].file
    assert row["test_type"] == "acr" and row["trial_index"] == "0" and row["play_count"] == "1"
    assert 12 < float(row["time_on_page_s"]) < 14 and row["submitted_at"].endswith("+00:00")
    for trial in trials[1:]:
        submit(store, trial, "alice")
    assert store.progress("alice").complete and len(store.read()) == 7
    checks = [r for r in store.read() if r["attention_target"]]
    assert len(checks) == 1 and checks[0]["attention_passed"] == "true"


def test_ab_rows_mirror_the_one_answer(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="ab")
    store = RatingsStore(manifest)
    trial = listing(manifest, "bob")[0]
    submit(store, trial, "bob", scores=-2)
    rows = {r["label"]: r for r in store.read()}
    assert rows["A"]["score"] == "2" and rows["B"]["score"] == "-2"  # negative numbers stay numbers
    assert {rows["A"]["condition"], rows["B"]["condition"]} == {s.condition for s in trial.stimuli}


def test_mushra_rows_one_per_rated_clip(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="mushra", attention_checks=1)
    store = RatingsStore(manifest)
    trials = listing(manifest, "carol")
    check = next(t for t in trials if t.is_attention_check)
    submit(store, check, "carol", scores={s.label: check.attention_target + 3 for s in check.rated})
    regular = next(t for t in trials if not t.is_attention_check)
    scores = {s.label: 10.0 * i for i, s in enumerate(regular.rated)}
    scores[regular.rated[0].label] = 33.25
    scores[regular.rated[-1].label] = 100
    submit(store, regular, "carol", scores=scores)
    rows = store.read()
    assert len(rows) == 2 * len(regular.rated)  # the open reference is heard, not rated
    assert all(r["attention_passed"] == "true" for r in rows[:4]) and rows[4]["attention_passed"] == ""
    assert [float(r["score"]) for r in rows[4:]] == list(scores.values())
    assert "reference" not in {r["condition"] for r in rows}


def test_failed_attention_check_is_recorded(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="acr", attention_checks=1)
    store = RatingsStore(manifest)
    check = next(t for t in listing(manifest, "dave") if t.is_attention_check)
    wrong = 1 if check.attention_target != 1 else 2
    submit(store, check, "dave", scores=wrong)
    row = store.read()[0]
    assert (row["attention_target"], row["attention_answer"], row["attention_passed"]) == (
        str(check.attention_target), str(wrong), "false")


@pytest.mark.parametrize("test_type, change, message", [
    ("acr", dict(streamed={}), "not played yet: A"),
    ("acr", dict(streamed=None, plays={"A": 3}), "not played yet: A"),  # the page's own count proves nothing
    ("mushra", dict(streamed={"1": 1, "2": 2, "3": 1, "4": 1}), "not played yet: Reference"),
    ("mushra", dict(shown_ago=4.5), "take 5 s to play"),  # 5 clips of 1 s, the reference once
    ("acr", dict(shown_ago=0.5), "take 1 s to play"),
    ("mushra", dict(scores={"1": 0, "2": 0, "3": 0, "4": 0}), "Rate at least one clip 100"),
    ("mushra", dict(scores={"1": 100, "2": None, "3": 50, "4": None}), "not moved yet: 2, 4"),
    ("mushra", dict(scores={"1": 100, "2": "50", "3": 50, "4": 50}), "numbers from 0 to 100; check clip 2 "
                                                                      "\\(got the text '50', not a number\\)"),
    ("acr", dict(scores="4"), "whole number from 1 to 5 \\(got the text '4', not a number\\)"),
    ("ab", dict(scores=[1]), "from -3 to 3 \\(got list, not a number\\)"),
    ("acr", dict(scores=6), "whole number from 1 to 5"),
    ("acr", dict(scores=3.5), "whole number from 1 to 5"),
    ("acr", dict(scores=True), "whole number from 1 to 5"),
    ("acr", dict(scores={"A": 3}), "Choose one rating"),
    ("ab", dict(scores=-4), "from -3 to 3"),
    ("mushra", dict(scores={"1": 100, "2": 50, "3": 50}), "not moved yet: 4"),
    ("mushra", dict(scores={"1": 100, "2": 50, "3": 50, "4": 101}), "from 0 to 100; check clip 4"),
    ("mushra", dict(scores={"1": 50, "2": 50, "3": 50, "4": 50, "9": 1}), "not on this page"),
    ("mushra", dict(scores=50), "slider"),
    ("acr", dict(shown_ago=-3600), "presentation time"),
])
def test_bad_submissions_write_nothing(tmp_path, test_type, change, message):
    manifest = fake_manifest(tmp_path, test_type=test_type)
    store = RatingsStore(manifest)
    trial = listing(manifest, "erin")[0]
    with pytest.raises(ValueError, match=message):
        submit(store, trial, "erin", **change)
    assert not store.path.exists() and store.progress("erin").done == frozenset()


def test_foreign_and_repeated_trials_are_refused(tmp_path):
    manifest = fake_manifest(tmp_path)
    store = RatingsStore(manifest)
    mine, theirs = listing(manifest, "frank")[0], listing(manifest, "grace")[0]
    with pytest.raises(ValueError, match="not in your list"):
        submit(store, theirs, "frank")
    emptied = dataclasses.replace(mine, stimuli=())  # a client cannot shrink the page: the server's copy counts
    with pytest.raises(ValueError, match="not played yet: A"):
        store.submit(emptied, "frank", 3, {}, presented_at=time.time(), streamed={})
    submit(store, mine, "frank")
    before = store.path.read_bytes()
    with pytest.raises(ValueError, match="already rated"):
        submit(store, mine, "frank", scores=1)
    with pytest.raises(ValueError, match="already rated"):  # a second store (another app process) knows it too
        submit(RatingsStore(manifest), mine, "frank", scores=2)
    assert store.path.read_bytes() == before


def test_free_text_is_bounded_and_formula_proof(tmp_path):
    manifest = fake_manifest(tmp_path)
    store = RatingsStore(manifest)
    rater = "=HYPERLINK(1)"
    trial = listing(manifest, rater)[0]
    result = submit(store, trial, rater, session_id="+1-555", comment="@SUM(A1)\nsecond line " + "x" * 900)
    assert "cut to its first 500 characters" in result.message
    row = store.read()[0]
    assert row["rater_id"] == "'=HYPERLINK(1)" and row["session_id"] == "'+1-555"
    assert row["comment"].startswith("'@SUM(A1) second line") and len(row["comment"]) == 501
    assert store.progress(rater).done == {trial.trial_id}  # the neutralised id still finds its rows
    with pytest.raises(ValueError, match="already rated"):
        submit(store, trial, rater)


def _expected_rows(manifest, rater):
    return sum(len(t.rated) for t in listing(manifest, rater))


def test_fifty_concurrent_raters_lose_and_tear_nothing(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="mushra", attention_checks=1)
    store = RatingsStore(manifest)
    barrier = threading.Barrier(50)
    errors = []

    def rate(i):
        rater = f"rater-{i:02d} " + "y" * 40
        trials = listing(manifest, rater)
        barrier.wait()
        try:
            for trial in trials:
                submit(store, trial, rater, comment=f"comment of {i} " + "z" * 200)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=rate, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    rows = store.read()
    assert len(rows) == sum(_expected_rows(manifest, f"rater-{i:02d} " + "y" * 40) for i in range(50)) == 50 * 7 * 4
    for row in rows:  # each row whole: its own rater's comment
        assert None not in row.values() and row["comment"] == f"comment of {int(row['rater_id'][6:8])} " + "z" * 200
    assert len({(r["rater_id"], r["trial_id"], r["label"]) for r in rows}) == len(rows)


def _rate_in_process(manifest, i):
    store = RatingsStore(manifest)
    rater = f"proc-{i:02d}"
    for trial in listing(manifest, rater):
        submit(store, trial, rater)


def _same_trial_in_process(manifest, trial, results):
    try:
        submit(RatingsStore(manifest), trial, "shared")
        results.put("ok")
    except ValueError:
        results.put("refused")


def test_fifty_processes_share_the_file_safely(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="ab")
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_rate_in_process, args=(manifest, i)) for i in range(50)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert all(process.exitcode == 0 for process in processes)
    with open(manifest.study_dir / "ratings.csv", newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines.count(list(COLUMNS)) == 1 and len(lines) == 1 + 50 * 6 * 2
    assert all(len(line) == len(COLUMNS) for line in lines)
    assert sorted({line[1] for line in lines[1:]}) == [f"proc-{i:02d}" for i in range(50)]
    # ten processes submitting the same page at once: exactly one is stored
    trial = listing(manifest, "shared")[0]
    results = context.Queue()
    racers = [context.Process(target=_same_trial_in_process, args=(manifest, trial, results)) for _ in range(10)]
    for process in racers:
        process.start()
    for process in racers:
        process.join()
    assert sorted(results.get() for _ in range(10)) == ["ok"] + ["refused"] * 9
    assert sum(r["rater_id"] == "shared" for r in RatingsStore(manifest).read()) == 2


def test_rows_record_how_the_page_was_heard_and_the_last_page_finishes_the_rater(tmp_path, monkeypatch):
    manifest = fake_manifest(tmp_path, test_type="mushra", trials_per_rater=2)
    store = RatingsStore(manifest)
    trials = listing(manifest, "lena")
    assignments = []
    monkeypatch.setattr(store_module, "trials_for", lambda *a, **k: assignments.append(a) or trials_for(*a, **k))
    submit(store, trials[0], "lena", plays={"Reference": 3, "1": 2, "2": 1, "3": 1, "4": 1},
           streamed={"Reference": 2, "1": 1, "2": 1, "3": 1, "4": 1}, presented_at=time.time() - 9)
    assert len(assignments) == 1  # one assignment per submit, not one per check
    rows = {row["label"]: row for row in store.read()}
    assert (rows["1"]["play_count"], rows["1"]["stream_count"], rows["1"]["listening_s"]) == ("2", "1", "5.0")
    assert 9 <= float(rows["1"]["time_on_page_s"]) < 11 and rows["1"]["check"] == ""
    assert read_records(manifest.study_dir)["lena"]["finished_at"] is None
    submit(store, trials[1], "lena")
    assert read_records(manifest.study_dir)["lena"]["finished_at"] is not None


def test_an_expired_rater_can_no_longer_submit(tmp_path):
    manifest = fake_manifest(tmp_path, abandon_minutes=10)
    store = RatingsStore(manifest)
    enroll(manifest, "slow", now=time.time() - 11 * 60)
    trial = trials_for(manifest, "slow", now=time.time() - 10 * 60)[0]
    with pytest.raises(ValueError, match="This session has expired"):
        submit(store, trial, "slow")
    with pytest.raises(ValueError, match="not valid for you"):  # never registered
        submit(store, trial, "stranger")
    assert not store.path.exists()


def test_the_listening_time_in_the_message_rounds_up(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="acr")
    manifest = dataclasses.replace(manifest, items=tuple(
        dataclasses.replace(item, stimuli=tuple(dataclasses.replace(s, seconds=1.4) for s in item.stimuli))
        for item in manifest.items))
    store = RatingsStore(manifest)
    trial = listing(manifest, "brisk")[0]
    with pytest.raises(ValueError, match="take 2 s to play"):  # 1.4 s: waiting "1 s" would not be enough
        submit(store, trial, "brisk", shown_ago=0.5)
