"""lab.study.assignment: balanced Latin-square designs, per-rater determinism, and what a rater may see."""
import dataclasses
import threading
from collections import Counter

import pytest

import quant
from lab.study.assignment import rater_view, trials_for
from lab.study.manifest import Manifest
from lab.study.raters import read_raters, read_records
from lab.study.schema import GOLD
from tests.lab.study.crowd import enroll, listing
from tests.lab.study.fakes import fake_manifest


def rated_conditions(trials, skip_reference=False):
    return [s.condition for t in trials if not t.is_attention_check for s in t.rated
            if not (skip_reference and s.condition == "reference")]


@pytest.mark.parametrize("overrides", [
    dict(test_type="acr"),  # n = 6 items, C = 3
    dict(test_type="acr", anchor="lowpass-7k", seeds=[1]),  # n = 2 < C = 4: raters cannot hear every condition
    dict(test_type="acr", trials_per_rater=4, conditions=["w8a8-dynamic", "w4a16", "w8a16"]),  # subset, C = 4
    dict(test_type="ab", anchor="lowpass-3.5k", trials_per_rater=5),
])
def test_every_condition_equally_often_for_every_number_of_raters(tmp_path, overrides):
    manifest = fake_manifest(tmp_path, **overrides)
    n = manifest.definition.n_items
    counts, cells = Counter(), Counter()
    for k in range(24):
        trials = listing(manifest, f"rater-{k}")
        items = [t.item for t in trials]
        assert len(set(items)) == len(items)  # nobody hears an item twice
        for t in trials:
            condition = [s.condition for s in t.rated if s.condition != "reference" or t.test_type == "acr"]
            counts.update(condition)
            cells[(t.item, condition[0])] += 1
        conditions = {c for c in manifest.definition.stimulus_keys if c != "reference" or overrides["test_type"] == "acr"}
        assert set(counts) <= conditions
        totals = [counts[c] for c in conditions]
        assert max(totals) - min(totals) <= 1, (k, counts)
    assert len(cells) == n * len(conditions)  # every (item, condition) cell gets rated


def test_full_latin_square_covers_each_cell_once_per_cycle(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="acr")  # 6 items x 3 conditions: 3 raters make one cycle
    cells = Counter((t.item, t.stimuli[0].condition) for k in range(3) for t in listing(manifest, f"r{k}"))
    assert len(cells) == 18 and set(cells.values()) == {1}
    for k in range(3):  # ... and every rater hears every condition twice
        assert set(Counter(rated_conditions(listing(manifest, f"r{k}"))).values()) == {2}


def test_same_rater_same_list_after_reload(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="mushra", attention_checks=2)
    first = listing(manifest, "alice")
    listing(manifest, "bob")
    reloaded = Manifest(**{f.name: getattr(manifest, f.name) for f in dataclasses.fields(Manifest)})
    assert trials_for(reloaded, "alice") == first
    assert read_raters(manifest.study_dir) == ["alice", "bob"]
    ids = [t.trial_id for t in first]
    assert len(set(ids)) == len(ids) and all(len(i) == 16 for i in ids)
    assert not set(ids) & {t.trial_id for t in listing(manifest, "bob")}


def test_orders_are_shuffled_per_rater(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="mushra", seeds=list(range(1, 7)))  # 12 items
    lists = [listing(manifest, f"r{k}") for k in range(6)]
    assert len({tuple(t.item for t in trials) for trials in lists}) > 1  # trial order
    pages = {tuple(s.condition for s in trial.stimuli) for trials in lists for trial in trials}
    assert len(pages) > 5  # stimulus order on the page
    for trials in lists:
        for trial in trials:
            assert [s.label for s in trial.stimuli] == ["Reference", "1", "2", "3", "4"]
            assert trial.stimuli[0].condition == "reference" and not trial.stimuli[0].rated
            assert sorted(s.condition for s in trial.rated) == sorted(
                ["hidden-reference", "w8a8-dynamic", "w4a16", "anchor"])
    assert sorted(Counter(t.item for trials in lists for t in trials).values()) == [6] * 12


def test_ab_sides_are_randomized_and_balanced(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="ab", seeds=list(range(1, 6)))  # 10 trials per rater
    patterns = set()
    for k in range(8):
        trials = listing(manifest, f"r{k}")
        sides = tuple(t.stimuli[0].condition == "reference" for t in trials)  # reference on A?
        assert sum(sides) == 5  # half of each rater's trials
        patterns.add(sides)
        for t in trials:
            assert [s.label for s in t.stimuli] == ["A", "B"]
            assert sum(s.condition == "reference" for s in t.stimuli) == 1
    assert len(patterns) > 4


def test_attention_checks_at_random_positions_with_a_target(tmp_path):
    manifest = fake_manifest(tmp_path, test_type="acr", attention_checks=2)
    positions = set()
    for k in range(6):
        trials = listing(manifest, f"r{k}")
        assert len(trials) == 8 and [t.index for t in trials] == list(range(8)) and {t.total for t in trials} == {8}
        checks = [t for t in trials if t.is_attention_check]
        assert len(checks) == 2
        for check in checks:
            assert 1 <= check.attention_target <= 5 and f"answer {check.attention_target}" in check.instructions
        positions.add(tuple(t.index for t in checks))
    assert len(positions) > 1
    ab = listing(fake_manifest(tmp_path / "ab", test_type="ab", attention_checks=1), "x")
    assert any(t.attention_target in (-3, -2, -1, 1, 2, 3) for t in ab)
    mushra = [t for t in listing(fake_manifest(tmp_path / "m", test_type="mushra", attention_checks=1), "x")
              if t.is_attention_check]
    assert mushra[0].attention_target in (20, 40, 60, 80) and "every slider" in mushra[0].instructions


def test_rater_view_hides_conditions_seeds_and_presets(tmp_path):
    for test_type in ("acr", "ab", "mushra"):
        manifest = fake_manifest(tmp_path / test_type, test_type=test_type, seeds=[987654], attention_checks=1)
        for trial in listing(manifest, "alice"):
            view = rater_view(trial)
            text = repr(view)
            assert "condition" not in text and "987654" not in text and "hidden" not in text and "anchor" not in text
            assert not any(name in text for name in quant.PRESETS)
            assert view.prompt == trial.prompt and view.trial_id == trial.trial_id and view.number == trial.index + 1
            assert [label for label, _ in view.stimuli] == [s.label for s in trial.rated]
            assert all(path.parent == manifest.stimuli_dir and len(path.stem) == 24 for _, path in view.stimuli)
            assert (view.reference is not None) == (test_type == "mushra")
            assert view.scale is trial.scale


def test_concurrent_arrivals_get_distinct_dense_slots(tmp_path):
    manifest = fake_manifest(tmp_path)
    barrier = threading.Barrier(50)

    def arrive(i):
        barrier.wait()
        enroll(manifest, f"rater-{i}")

    threads = [threading.Thread(target=arrive, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    slots = {rater: record["slot"] for rater, record in read_records(manifest.study_dir).items()}
    assert sorted(slots.values()) == list(range(50)) and len(slots) == 50
    assert read_raters(manifest.study_dir) == sorted(slots, key=slots.get)  # arrival order


def test_rater_ids_from_a_link(tmp_path):
    manifest = fake_manifest(tmp_path)
    with pytest.raises(ValueError, match="at most 64"):
        enroll(manifest, "x" * 65)
    for blank in ("", "   "):  # no id in the link: an anonymous rater
        assert enroll(manifest, blank).rater_id.startswith("anon-")
    assert enroll(manifest, "  two\nlines ").rater_id == "two lines"


@pytest.mark.parametrize("test_type, pages_per_check, conditions", [
    ("mushra", 1, {"hidden-reference", "w8a8-dynamic", "w4a16", "anchor"}),
    ("ab", 1, {"reference", "anchor"}),
    ("acr", 2, {"reference", "anchor"}),
])
def test_gold_pages_put_the_anchor_against_the_reference(tmp_path, test_type, pages_per_check, conditions):
    manifest = fake_manifest(tmp_path, test_type=test_type, anchor="lowpass-3.5k", gold_pages=2, trials_per_rater=3)
    trials = listing(manifest, "gail")
    gold = [t for t in trials if t.check == GOLD]
    assert len(trials) == 3 + 2 * pages_per_check and len(gold) == 2 * pages_per_check
    assert len({t.item for t in gold}) == 2  # one item per check ...
    assert not {t.item for t in gold} & {t.item for t in trials if t.check != GOLD}  # ... not rated otherwise
    for item in {t.item for t in gold}:
        assert {s.condition for t in gold if t.item == item for s in t.rated} == conditions
    assert not any(t.is_attention_check for t in gold) and {t.index for t in trials} == set(range(len(trials)))
    assert len({t.trial_id for t in trials}) == len(trials)
