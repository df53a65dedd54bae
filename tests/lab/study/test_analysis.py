"""lab.study.analysis and report: numbers checked by hand, post-screening that drops careless raters and keeps good
ones (each with the reason), an exclusion table always written, a plot that opens offline."""
import ast
import csv
import math
import random
import statistics
import time

import pytest
from scipy import stats

import lab.study.analysis
from lab.study.analysis import holm, mean_ci
from lab.study.raters import record_questionnaire
from lab.study.report import analyse
from lab.study.schema import ATTENTION, COLUMNS
from lab.study.store import RatingsStore
from tests.lab.study.crowd import Clock, enroll, listing, rate, rate_all, served_study
from tests.lab.study.fakes import fake_manifest

CONDITIONS = ("hidden-reference", "w8a8-dynamic", "w4a16", "anchor")
GOOD = {  # rater -> item -> scores in CONDITIONS order (no hidden reference below 90)
    "r1": {0: (100, 90, 70, 20), 1: (95, 85, 60, 25)},
    "r2": {0: (100, 80, 75, 30), 1: (100, 92, 55, 15)},
    "r3": {0: (90, 88, 50, 10), 1: (98, 99, 65, 20)},
}
CARELESS = {"c1": {0: (40, 77, 12, 90), 1: (60, 3, 88, 55)}}
INATTENTIVE = {"a1": {0: (100, 10, 10, 10), 1: (100, 10, 10, 10)}}


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in COLUMNS})
    return path


def mushra_rows(raters, test_type="mushra"):
    rows = []
    for rater, items in raters.items():
        for item, scores in items.items():
            for condition, score in zip(CONDITIONS, scores):
                rows.append(dict(study_id="hand", rater_id=rater, trial_id=f"{rater}-{item}", test_type=test_type,
                                 item=item, prompt=f"prompt {item}", condition=condition, score=score))
    return rows


def test_mushra_numbers_match_a_hand_computation(tmp_path):
    attention = [dict(study_id="hand", rater_id=rater, trial_id=f"{rater}-check", test_type="mushra", item=0,
                      condition=condition, score=score, check=ATTENTION, attention_target=40, attention_answer=score,
                      attention_passed=str(passed).lower())
                 for rater, score, passed in (("r1", 40, True), ("a1", 80, False)) for condition in CONDITIONS]
    rows = mushra_rows({**GOOD, **CARELESS, **INATTENTIVE}) + attention
    written = analyse(write_csv(tmp_path / "ratings.csv", rows), tmp_path / "out")
    report = written.results

    assert report.raters == 5 and report.kept == ("r1", "r2", "r3")
    reasons = {e.rater_id: e.reasons for e in report.exclusions}
    assert reasons == {"a1": ("failed 1 of 1 attention checks",),
                       "c1": ("rated the hidden reference below 90 in 2 of 2 trials (100% > 15%)",)}

    def scores(index):
        return [GOOD[r][i][index] for r in GOOD for i in (0, 1)]

    for index, condition in enumerate(CONDITIONS):
        values = scores(index)
        mean = sum(values) / 6
        half = stats.t.ppf(0.975, 5) * statistics.stdev(values) / math.sqrt(6)
        result = report.condition(condition)
        assert (result.n, result.mean, result.ci_low, result.ci_high) == pytest.approx((6, mean, mean - half, mean + half))
    assert report.condition("w8a8-dynamic").mean == pytest.approx(534 / 6)

    # Wilcoxon on (rater, item) differences against the hidden reference, Holm over the two quantized conditions
    w8 = [90 - 100, 85 - 95, 80 - 100, 92 - 100, 88 - 90, 99 - 98]
    w4 = [70 - 100, 60 - 95, 75 - 100, 55 - 100, 50 - 90, 65 - 98]
    p8, p4 = stats.wilcoxon(w8).pvalue, stats.wilcoxon(w4).pvalue
    assert p4 < p8  # w4a16 is always worse than the reference: the smaller p, multiplied by m = 2
    assert report.condition("w8a8-dynamic").p_value == pytest.approx(p8)
    assert report.condition("w4a16").p_value == pytest.approx(p4)
    assert report.condition("w4a16").p_holm == pytest.approx(min(1, 2 * p4))
    assert report.condition("w8a8-dynamic").p_holm == pytest.approx(min(1, max(2 * p4, p8)))
    assert report.condition("w8a8-dynamic").pairs == 6
    assert report.condition("anchor").p_value is None and report.condition("hidden-reference").p_value is None
    assert [c.condition for c in report.conditions] == ["hidden-reference", "w4a16", "w8a8-dynamic", "anchor"]

    item0 = report.items[0]
    assert item0.prompt == "prompt 0" and item0.means["w4a16"] == pytest.approx((70 + 75 + 50) / 3)
    assert item0.counts["w4a16"] == 3
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown == written.markdown and "failed 1 of 1 attention checks" in markdown and "| w8a8-dynamic | 6 |" in markdown
    assert "plotly" in (tmp_path / "out" / "scores.html").read_text()[:100000].lower()


def test_holm_against_its_definition():
    p = [0.01, 0.04, 0.03, 0.2]
    # sorted: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> max(0.09, 0.08)=0.09, 0.2*1 -> 0.2
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_mean_ci_edge_cases():
    assert mean_ci([3, 4, 5]) == pytest.approx((4, 4 - stats.t.ppf(0.975, 2) / math.sqrt(3),
                                                4 + stats.t.ppf(0.975, 2) / math.sqrt(3)))
    single = mean_ci([2])
    assert single[0] == 2 and math.isnan(single[1])
    with pytest.raises(ValueError):
        mean_ci([])


def test_ab_cmos_is_the_mean_of_the_condition_rows(tmp_path):
    rows = []
    scores = {"w8a8-dynamic": [0, -1, 1, 0, -1, -1], "w4a16": [-2, -3, -1, -2, -2, -3]}
    for condition, values in scores.items():
        for i, score in enumerate(values):
            rater, item = f"r{i % 3}", i // 3
            trial = f"{rater}-{item}-{condition}"
            rows += [dict(study_id="ab", rater_id=rater, trial_id=trial, test_type="ab", item=item, condition=condition,
                          score=score, label="B"),
                     dict(study_id="ab", rater_id=rater, trial_id=trial, test_type="ab", item=item, condition="reference",
                          score=-score, label="A")]
    report = analyse(write_csv(tmp_path / "ab.csv", rows), tmp_path / "out").results
    assert [c.condition for c in report.conditions] == ["w4a16", "w8a8-dynamic"]  # no "reference" row of its own
    for condition, values in scores.items():
        result = report.condition(condition)
        assert result.mean == pytest.approx(sum(values) / 6) and result.pairs == 6
        assert result.p_value == pytest.approx(stats.wilcoxon(values).pvalue)


def test_acr_pairs_are_per_rater(tmp_path):
    rows = []
    table = {"r1": {"reference": [5, 4], "w4a16": [3]}, "r2": {"reference": [4], "w4a16": [2, 3]},
             "r3": {"reference": [5], "w4a16": [5]}, "r4": {"w4a16": [1]}}
    for rater, conditions in table.items():
        for condition, values in conditions.items():
            for k, score in enumerate(values):
                rows.append(dict(study_id="acr", rater_id=rater, trial_id=f"{rater}{condition}{k}", test_type="acr",
                                 item=k, condition=condition, score=score))
    report = analyse(write_csv(tmp_path / "acr.csv", rows), tmp_path / "out").results
    differences = [3 - 4.5, 2.5 - 4, 5 - 5]  # r4 never rated the reference
    result = report.condition("w4a16")
    assert result.pairs == 3 and result.p_value == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert result.mean == pytest.approx(14 / 5) and report.condition("reference").n == 4


def test_empty_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no rater has submitted"):
        analyse(tmp_path / "none.csv", tmp_path / "out")
    (tmp_path / "empty.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no ratings yet"):
        analyse(tmp_path / "empty.csv", tmp_path / "out")
    write_csv(tmp_path / "edited.csv", [dict(rater_id="r", trial_id="t", test_type="acr", item=0, score="five")])
    with pytest.raises(ValueError, match="line 2: score 'five'"):
        analyse(tmp_path / "edited.csv", tmp_path / "out")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a study ratings file"):
        analyse(tmp_path / "other.csv", tmp_path / "out")


def test_simulated_careless_rater_is_excluded_and_good_raters_kept(tmp_path):
    manifest = fake_manifest(tmp_path, study_id="sim", test_type="mushra", seeds=list(range(6)))  # 12 items
    store = RatingsStore(manifest)
    rng = random.Random(0)
    means = {"hidden-reference": 97, "w8a8-dynamic": 85, "w4a16": 60, "anchor": 20}
    for k in range(9):
        rater = f"good-{k}" if k < 8 else "careless"
        for index, trial in enumerate(listing(manifest, rater)):
            if rater == "careless":
                scores = {s.label: rng.uniform(0, 100) for s in trial.rated}
            else:
                scores = {s.label: min(100, max(0, rng.gauss(means[s.condition], 3))) for s in trial.rated}
                slip = k == 0 and index == 0  # one good rater slips once: 1 of 12 trials (8 %) is tolerated
                for s in trial.rated:
                    if s.condition == "hidden-reference":
                        scores[s.label] = 80 if slip else max(90, scores[s.label])
            scores[max(scores, key=scores.get)] = 100  # BS.1534: one clip at the top of the scale
            rate(store, trial, rater, time.time, scores=scores)
    report = analyse(store.path, tmp_path / "out").results
    assert [e.rater_id for e in report.exclusions] == ["careless"]
    assert "hidden reference below 90" in report.exclusions[0].reasons[0]
    assert report.kept == tuple(f"good-{k}" for k in range(8))
    assert report.condition("w4a16").n == 96 and report.condition("w4a16").mean == pytest.approx(60, abs=2)
    assert report.condition("w4a16").p_holm < 0.001 and report.condition("anchor").mean < 30


def test_every_rater_excluded_still_writes_the_exclusion_table(tmp_path):
    rows = mushra_rows(CARELESS)
    written = analyse(write_csv(tmp_path / "ratings.csv", rows), tmp_path / "out")
    assert written.results.kept == () and written.results.conditions == ()
    assert "Every rater was excluded" in written.markdown and "| c1 | rated the hidden reference" in written.markdown
    assert written.report_path.read_text() == written.markdown
    with open(written.exclusions_path, newline="") as handle:
        assert list(csv.reader(handle)) == [["rater_id", "reasons"],
                                            ["c1", "rated the hidden reference below 90 in 2 of 2 trials (100% > 15%)"]]
    assert written.plot_path.is_file()
    kept = analyse(write_csv(tmp_path / "good.csv", mushra_rows(GOOD)), tmp_path / "good")
    assert kept.exclusions_path.read_text().splitlines() == ["rater_id,reasons"]  # written, empty, when nobody is out


def test_the_plot_opens_offline(tmp_path):
    written = analyse(write_csv(tmp_path / "ratings.csv", mushra_rows(GOOD)), tmp_path / "out")
    html = written.plot_path.read_text()
    sources = [node for node in html.split("<script")[1:]]
    assert sources and not any('src="http' in tag.split(">")[0] or "src='http" in tag.split(">")[0] for tag in sources)
    assert 'src="plotly.min.js"' in html
    script = written.plot_path.with_name("plotly.min.js")
    assert script.stat().st_size > 1_000_000 and b"plotly" in script.read_bytes()[:2000].lower()


def test_analysis_does_not_import_the_report():
    tree = ast.parse(open(lab.study.analysis.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "lab.study.report" not in imported and "lab.study" not in imported


def test_crowd_quality_rules_end_to_end(tmp_path):
    """A real study flow: gold pages, questionnaire, a careless rater caught by the gold rule only."""
    clock = Clock()
    manifest = served_study(tmp_path, test_type="acr", anchor="lowpass-3.5k", gold_pages=1, trials_per_rater=4,
                            headphone_check=False)
    store = RatingsStore(manifest, clock=clock)
    for rater, device in (("careful-1", "headphones"), ("careful-2", "earbuds"), ("careless", "")):
        enroll(manifest, rater, now=clock())
        record_questionnaire(manifest.study_dir, rater, {"device": device})
        if rater != "careless":
            rate_all(store, rater, clock)
            continue
        for trial in listing(manifest, rater):
            rate(store, trial, rater, clock, scores=5)  # everything excellent: the anchor too
    written = analyse(store.path, tmp_path / "out")
    results = written.results
    assert [(e.rater_id, e.reasons) for e in results.exclusions] == [
        ("careless", ("rated the low-pass anchor not clearly below the reference on 1 of 1 gold checks",))]
    assert results.kept == ("careful-1", "careful-2")
    assert sum(c.n for c in results.conditions) == 2 * 4  # gold pages are not analysed
    assert results.questionnaire["device"] == {"headphones": 1, "earbuds": 1, "not answered": 1}
    assert results.listening.pages == 8 and results.listening.listening_s == 1.0
    assert results.listening.time_on_page_s == 2.0 and results.listening.streams_per_clip == 1.0
    assert "| device | headphones: 1, earbuds: 1, not answered: 1 |" in written.markdown
    assert "## Listening" in written.markdown and "gold check" in written.markdown


def test_raters_who_only_wait_out_the_listening_time_are_flagged_not_excluded(tmp_path):
    clock = Clock()
    manifest = served_study(tmp_path, test_type="acr", trials_per_rater=3, headphone_check=False)
    store = RatingsStore(manifest, clock=clock)
    for rater, margins in (("listener", (0.5, 2.0, 1.05)), ("waiter", (0.02, 0.05, 0.09))):
        enroll(manifest, rater, now=clock())
        for trial, margin in zip(listing(manifest, rater), margins):
            listening = store.listening_seconds(trial)
            rate(store, trial, rater, clock, presented_at=clock() - listening * (1 + margin))
    written = analyse(store.path, tmp_path / "out")
    pacing = {p.rater_id: p for p in written.results.pacing}
    assert pacing["waiter"].flagged and not pacing["listener"].flagged
    assert pacing["listener"].median_ratio == pytest.approx(2.05, abs=0.01) and pacing["listener"].min_ratio == pytest.approx(1.5, abs=0.01)
    assert set(written.results.kept) == {"listener", "waiter"}  # flagged only: the experimenter decides
    assert "| waiter | 3 | 1.05 | 1.02 | yes |" in written.markdown
