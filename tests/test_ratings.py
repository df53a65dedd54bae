"""lab.ratings and lab.mos: rows that are never lost or corrupted, and MOS with a t-distribution CI."""
import csv
import math
import multiprocessing
import threading

import pytest
from scipy import stats

from lab.mos import mean_ci, mos_from_csv, mos_table
from lab.ratings import COLUMNS, RatingsStore, Trial, read_ratings


def make_trial(a_system="quantized", **overrides) -> Trial:
    fields = dict(trial_id="t1", session_id="s1", prompt="sine tone at A4", negative_prompt="", seed=7, steps=50,
                  cfg=6.0, sampler="dpmpp-3m-sde", model_id="embedded:demo_model", recipe="w8a8-sqd+lora",
                  recipe_hash="abc123", precision="W8A8", method="sqd+lora", a_system=a_system, presented_at=100.0)
    return Trial(**{**fields, **overrides})


def test_trial_rows_unblind_the_labels():
    rows = make_trial("quantized").rows(rater_id="r1", scores={"A": 2, "B": 5}, preference="B", now=112.5)
    assert [(r["clip_label"], r["system"], r["precision"], r["method"], r["score"]) for r in rows] == [
        ("A", "quantized", "W8A8", "sqd+lora", 2), ("B", "full precision", "FP32", "none", 5)]
    assert all(r["preference"] == "full precision" and r["time_to_rate_s"] == 12.5 for r in rows)
    assert rows[0]["presentation_order"] == "quantized;full precision"
    flipped = make_trial("full precision").rows(rater_id="r1", scores={"A": 2, "B": 5}, now=101.0)
    assert [(r["clip_label"], r["system"]) for r in flipped] == [("A", "full precision"), ("B", "quantized")]
    assert flipped[0]["preference"] == ""


@pytest.mark.parametrize("scores, preference", [
    ({"A": 0, "B": 3}, ""), ({"A": 6, "B": 3}, ""), ({"A": 3}, ""), ({"A": 3, "B": 3.5}, ""),
    ({"A": 3, "B": 3}, "C")])
def test_trial_rejects_bad_scores(scores, preference):
    with pytest.raises(ValueError):
        make_trial().rows(rater_id="r", scores=scores, preference=preference, now=0.0)


def test_store_writes_header_once_and_every_column(tmp_path):
    store = RatingsStore(tmp_path / "deep" / "ratings.csv")
    for i in range(3):
        assert store.append(make_trial(trial_id=f"t{i}").rows(rater_id="r", scores={"A": 3, "B": 4}, now=1e3)) == 2
    lines = (tmp_path / "deep" / "ratings.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and sum(line == lines[0] for line in lines) == 1
    rows = store.read()
    assert len(rows) == 6 and rows[4]["trial_id"] == "t2" and rows[4]["score"] == "3"


def test_free_text_is_bounded_and_formula_proof(tmp_path):
    store = RatingsStore(tmp_path / "r.csv")
    trial = make_trial(prompt="=HYPERLINK(\"http://evil\")\nsecond line" + "x" * 1000, negative_prompt="@SUM(A1)")
    store.append(trial.rows(rater_id="+1-555 " + "r" * 200, scores={"A": 1, "B": 5}, now=1e3))
    row = store.read()[0]
    assert row["prompt"].startswith("'=HYPERLINK") and "\n" not in row["prompt"] and len(row["prompt"]) <= 501
    assert row["negative_prompt"] == "'@SUM(A1)"
    assert row["rater_id"].startswith("'+1-555") and len(row["rater_id"]) <= 65
    assert row["score"] == "1"  # numbers are not touched


def test_unknown_columns_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown rating columns"):
        RatingsStore(tmp_path / "r.csv").append([{"scor": 3}])


def test_concurrent_submissions_all_land_intact(tmp_path):
    store = RatingsStore(tmp_path / "r.csv")
    barrier = threading.Barrier(50)

    def submit(i):
        rows = make_trial(trial_id=f"t{i:02d}", prompt=f"prompt {i} " + "y" * 300).rows(
            rater_id=f"rater{i}", scores={"A": 1 + i % 5, "B": 5 - i % 5}, now=1e3)
        barrier.wait()
        store.append(rows)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = read_ratings(tmp_path / "r.csv")
    assert len(rows) == 100
    assert sorted({r["trial_id"] for r in rows}) == [f"t{i:02d}" for i in range(50)]
    for r in rows:  # each row whole: its own trial's prompt and rater
        i = int(r["trial_id"][1:])
        assert r["prompt"] == f"prompt {i} " + "y" * 300 and r["rater_id"] == f"rater{i}"
        assert None not in r and len(r) == len(COLUMNS)


def _append_from_process(path, i):
    RatingsStore(path).append(make_trial(trial_id=f"p{i}").rows(rater_id="r", scores={"A": 3, "B": 3}, now=1e3))


def test_separate_processes_share_the_file_safely(tmp_path):
    path = tmp_path / "r.csv"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_append_from_process, args=(path, i)) for i in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    with open(path, newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines.count(list(COLUMNS)) == 1 and len(lines) == 1 + 16


def test_mean_ci_matches_the_t_distribution():
    mean, low, high = mean_ci([3, 4, 5])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of 3,4,5 is 1
    assert (mean, low, high) == pytest.approx((4.0, 4.0 - half, 4.0 + half))
    single = mean_ci([2])
    assert single[0] == 2 and math.isnan(single[1]) and math.isnan(single[2])
    with pytest.raises(ValueError):
        mean_ci([])


def test_mos_per_condition_from_csv(tmp_path):
    store = RatingsStore(tmp_path / "r.csv")
    for i, (q, fp) in enumerate([(2, 5), (3, 4), (4, 5)]):
        store.append(make_trial(trial_id=f"t{i}").rows(rater_id="r", scores={"A": q, "B": fp}, now=1e3))
    store.append(make_trial(trial_id="w4", recipe="w4a8-static", precision="W4A8", method="static").rows(
        rater_id="r", scores={"A": 1, "B": 5}, now=1e3))
    store.append(make_trial(trial_id="bad").rows(rater_id="careless", scores={"A": 5, "B": 1}, now=1e3,
                                                 attention_check="failed"))
    table = mos_from_csv(tmp_path / "r.csv")
    assert [(r.precision, r.method, r.n) for r in table] == [
        ("FP32", "none", 4), ("W8A8", "sqd+lora", 3), ("W4A8", "static", 1)]
    assert table[0].mos == pytest.approx(19 / 4) and table[1].mos == pytest.approx(3.0)
    assert table[1].ci_half_width == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    with_failed = mos_table(read_ratings(tmp_path / "r.csv"), exclude_failed_attention=False)
    assert sum(r.n for r in with_failed) == 10


def test_mos_of_missing_file_is_empty(tmp_path):
    assert mos_from_csv(tmp_path / "none.csv") == []
