"""lab.study.raters and Studies.register: signed tokens, platform ids bound once, caps, per-client limits, and
design slots that survive dropouts (balance among the raters who finish)."""
import multiprocessing
import random
import threading
from collections import Counter

import pytest

from lab.study import raters
from lab.study.analysis import screened
from lab.study.assignment import design_slots, slot_rules, trials_for
from lab.study.raters import EXPIRED, QUESTIONNAIRE, RaterRefused, read_records
from lab.study.registry import Studies, completion_link
from tests.lab.study.crowd import Clock, rate_all, served_study

HOUR = 3600.0
PROLIFIC_ID = "5f3e9a1b2c3d4e5f60718293"  # Prolific's ids are 24 hex digits


@pytest.fixture
def clock():
    return Clock()


def studies_with(tmp_path, clock, **overrides):
    return served_study(tmp_path, **overrides), Studies(tmp_path, clock=clock, registrations_per_client=1000)


def test_a_link_id_is_not_a_login(tmp_path, clock):
    manifest, studies = studies_with(tmp_path, clock)
    victim = studies.register("fake", platform={"rater": "victim-7"}, client="10.0.0.1")
    assert victim.rater_id == victim.platform_id == "victim-7" and victim.token
    with pytest.raises(RaterRefused, match="already started this study"):  # ?rater=victim-7 from elsewhere
        studies.register("fake", platform={"rater": "victim-7"}, client="10.0.0.2")
    assert studies.resume("fake", victim.token) == victim
    other = studies.register("fake", platform={"PROLIFIC_PID": PROLIFIC_ID, "STUDY_ID": "s1", "SESSION_ID": "x9",
                                               "rater": "ignored-when-prolific"}, client="10.0.0.3")
    assert other.rater_id == PROLIFIC_ID and rater_record_of(manifest, PROLIFIC_ID)["platform"]["SESSION_ID"] == "x9"
    rater_part, _, signature = victim.token.partition(".")
    forged = [other.token.split(".")[0] + "." + signature, rater_part + "." + "0" * len(signature), "", "no-dot",
              "!!!." + signature]
    for token in forged:
        with pytest.raises(RaterRefused, match="not valid for you"):
            studies.resume("fake", token)
    anonymous = studies.register("fake", platform={}, client="10.0.0.4")
    assert anonymous.platform_id is None and anonymous.rater_id.startswith("anon-")
    assert [r["slot"] for r in read_records(manifest.study_dir).values()] == [0, 1, 2]


def rater_record_of(manifest, rater_id):
    return raters.rater_record(manifest.study_dir, rater_id)


def test_registrations_per_client_in_a_sliding_window(tmp_path, clock):
    manifest = served_study(tmp_path)
    studies = Studies(tmp_path, clock=clock, registrations_per_client=3, registration_window_s=600,
                      unfinished_per_client=None)
    for k in range(3):
        studies.register("fake", platform={"rater": f"bot-{k}"}, client="203.0.113.9")
        clock.advance(60)
    with pytest.raises(RaterRefused, match="Too many registrations"):
        studies.register("fake", platform={"rater": "bot-3"}, client="203.0.113.9")
    studies.register("fake", platform={"rater": "neighbour"}, client="203.0.113.10")  # other clients unaffected
    clock.advance(600 - 3 * 60 + 1)  # the first registration left the window
    studies.register("fake", platform={"rater": "bot-4"}, client="203.0.113.9")
    assert len(read_records(manifest.study_dir)) == 5


def test_cap_counts_live_slots_and_abandoned_slots_go_to_the_next_arrival(tmp_path, clock):
    manifest, studies = studies_with(tmp_path, clock, max_raters=2, abandon_minutes=30)
    _, store = studies.get("fake")
    first = studies.register("fake", platform={"rater": "first"}, client="a")
    second = studies.register("fake", platform={"rater": "second"}, client="b")
    with pytest.raises(RaterRefused, match="study is full"):
        studies.register("fake", platform={"rater": "third"}, client="c")
    rate_all(store, "second", clock)  # finishes: the slot is theirs for good
    clock.advance(31 * 60)
    with pytest.raises(RaterRefused, match="expired"):
        studies.resume("fake", first.token)
    assert studies.resume("fake", second.token).rater_id == "second"  # finished raters never expire
    third = studies.register("fake", platform={"rater": "third"}, client="c")
    records = read_records(manifest.study_dir)
    assert records["third"]["slot"] == records["first"]["slot"] == 0 and records["first"]["released"]
    assert trials_for(manifest, "third", now=clock())[0].item in range(manifest.definition.n_items)
    with pytest.raises(RaterRefused, match="expired"):
        trials_for(manifest, "first", now=clock())
    with pytest.raises(RaterRefused, match="expired"):  # coming back through the link again
        studies.register("fake", platform={"rater": "first"}, client="a")
    with pytest.raises(RaterRefused, match="study is full"):
        studies.register("fake", platform={"rater": "fourth"}, client="d")
    assert studies.resume("fake", third.token).rater_id == "third"


def _drift_without_reassignment(definition, abandoned: set[int], raters: int) -> int:
    counts = Counter(condition for number in range(raters) if number not in abandoned
                     for _, _, condition in design_slots(definition, number))
    return max(counts.values()) - min(counts.values())


def test_fifty_concurrent_raters_with_dropouts_stay_balanced(tmp_path, clock):
    """30 % of arrivals abandon after a page or two; after `abandon_minutes` their slots go to new arrivals,
    until 50 raters have finished: every condition within one among them, and no row lost."""
    manifest, studies = studies_with(tmp_path, clock, trials_per_rater=4, seeds=[1, 2, 3, 4, 5],  # 10 items, 3 conds
                                     headphone_check=False)
    _, store = studies.get("fake")
    pages_rated, finished, abandoned_tokens, errors = Counter(), [], [], []
    lock = threading.Lock()

    def arrive(index, abandons):
        try:
            registration = studies.register("fake", platform={"rater": f"p-{index:03d}"}, client=f"10.1.0.{index}")
            rated = rate_all(store, registration.rater_id, clock, pages=index % 3 if abandons else None)
            with lock:
                pages_rated[registration.rater_id] = rated
                (abandoned_tokens if abandons else finished).append(registration)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    arrivals, wave = 50, 0
    while arrivals:
        first = sum(len(w) for w in (finished, abandoned_tokens))
        threads = [threading.Thread(target=arrive, args=(first + k, (first + k) % 10 < 3)) for k in range(arrivals)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        arrivals = 50 - len(finished)  # the abandoned slots, given to the next wave once they expire
        clock.advance(manifest.definition.abandon_minutes * 60 + 1)
        wave += 1
    assert wave > 1 and len(abandoned_tokens) >= 15
    records = read_records(manifest.study_dir)
    assert sorted(records[r.rater_id]["slot"] for r in finished) == list(range(50))
    rows = store.read()
    assert len(rows) == sum(pages_rated.values()) and len({(r["rater_id"], r["trial_id"]) for r in rows}) == len(rows)
    counts = Counter(row["condition"] for row in rows if row["rater_id"] in {r.rater_id for r in finished})
    assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 1
    for registration in abandoned_tokens:
        with pytest.raises(RaterRefused, match=EXPIRED[:30]):
            studies.resume("fake", registration.token)
    _, _, exclusions, kept = screened(store.path)  # the analysis leaves the abandoned raters' pages out
    assert {e.rater_id for e in exclusions} == {r.rater_id for r in abandoned_tokens if pages_rated[r.rater_id]}
    assert all("did not finish" in e.reasons[0] for e in exclusions) and len(kept) == 50 * 4
    # 15 of 50 dropping out without reassignment: the finishers' conditions drift apart
    assert _drift_without_reassignment(manifest.definition, set(random.Random(0).sample(range(50), 15)), 50) == 4


def _register_in_process(study_dir, secret, rules, index, now):
    for k in range(5):
        raters.register(study_dir, secret, {"rater": f"proc-{index}-{k}"}, rules, now)


def test_processes_registering_at_once_get_distinct_slots(tmp_path, clock):
    manifest = served_study(tmp_path)
    context = multiprocessing.get_context("fork")
    args = (manifest.study_dir, manifest.secret(), slot_rules(manifest.definition))
    processes = [context.Process(target=_register_in_process, args=(*args, index, clock())) for index in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert all(process.exitcode == 0 for process in processes)
    assert sorted(record["slot"] for record in read_records(manifest.study_dir).values()) == list(range(20))


def test_questionnaire_is_optional_and_checked(tmp_path, clock):
    manifest, studies = studies_with(tmp_path, clock)
    rater = studies.register("fake", platform={"rater": "quinn"}, client="q").rater_id
    raters.record_questionnaire(manifest.study_dir, rater, {"device": "headphones", "hearing": "",
                                                            "experience": QUESTIONNAIRE["experience"][1]})
    record = raters.rater_record(manifest.study_dir, rater)
    assert record["questionnaire"] == {"device": "headphones", "experience": QUESTIONNAIRE["experience"][1]}
    assert record["registered_at"] == clock() and record["platform_id"] == "quinn"
    with pytest.raises(ValueError, match="offered answers for device: headphones"):
        raters.record_questionnaire(manifest.study_dir, rater, {"device": "a hat"})
    with pytest.raises(ValueError, match="Unknown questions: age"):
        raters.record_questionnaire(manifest.study_dir, rater, {"age": "30"})
    with pytest.raises(RaterRefused):
        raters.record_questionnaire(manifest.study_dir, "nobody", {})


def test_completion_code_and_platform_link(tmp_path, clock):
    manifest, studies = studies_with(tmp_path, clock, completion_url="https://app.prolific.com/submissions/complete")
    _, store = studies.get("fake")
    rater = studies.register("fake", platform={"PROLIFIC_PID": PROLIFIC_ID}, client="x").rater_id
    with pytest.raises(RaterRefused, match="not finished"):
        studies.completion("fake", rater)
    rate_all(store, rater, clock)
    done = studies.completion("fake", rater)
    assert done.code == Studies.completion_code(manifest, rater) and len(done.code) == 10
    assert done.redirect_url == f"https://app.prolific.com/submissions/complete?cc={done.code}"
    assert completion_link("https://x.org/done?s=1", "C0DE") == "https://x.org/done?s=1&cc=C0DE"
    assert completion_link("https://x.org/{code}/done", "C0DE") == "https://x.org/C0DE/done"
    assert completion_link(None, "C0DE") is None
    assert read_records(manifest.study_dir)[rater]["finished_at"] == clock()


@pytest.mark.parametrize("twin", ["bob", "BOB", "\uff22ob", " Bob "])
def test_a_platform_id_in_another_case_or_width_is_the_same_participant(tmp_path, clock, twin):
    manifest, studies = studies_with(tmp_path, clock)
    studies.register("fake", platform={"rater": "Bob"}, client="10.0.0.1")
    with pytest.raises(RaterRefused, match="already started this study"):
        studies.register("fake", platform={"rater": twin}, client="10.0.0.2")
    assert list(read_records(manifest.study_dir)) == ["Bob"]


def test_invisible_characters_and_malformed_prolific_ids_are_refused(tmp_path, clock):
    manifest, studies = studies_with(tmp_path, clock)
    for hidden in ("Bob\u200b", "B\u200dob", "Bob\u202e", "Bob\x07", "Bob\u034f", "Bob\ufe0f", "Bob\U000e0100",
                   "Bob\u3164", "\u115fBob", "Bob\u2800", "Bob\uffa0"):
        with pytest.raises(ValueError, match="invisible or control characters"):
            studies.register("fake", platform={"rater": hidden}, client="10.0.0.1")
    for pid in ("abc", PROLIFIC_ID + "0", PROLIFIC_ID[:-1] + "g"):
        with pytest.raises(ValueError, match="Prolific id should be 24"):
            studies.register("fake", platform={"PROLIFIC_PID": pid}, client="10.0.0.1")
    assert read_records(manifest.study_dir) == {}
    studies.register("fake", platform={"rater": "Bob"}, client="10.0.0.1")
    cyrillic = studies.register("fake", platform={"rater": "B\u043eb"}, client="10.0.0.2")  # the documented limit:
    assert cyrillic.rater_id == "B\u043eb"  # a look-alike letter of another script is another id


def test_one_address_holds_at_most_two_unfinished_places(tmp_path, clock):
    manifest, _ = studies_with(tmp_path, clock, headphone_check=False)
    studies = Studies(tmp_path, clock=clock)  # the defaults ptq-lab serves with
    _, store = studies.get("fake")
    first = studies.register("fake", platform={}, client="198.51.100.7")
    studies.register("fake", platform={"rater": "second"}, client="198.51.100.7")
    with pytest.raises(RaterRefused, match="unfinished places"):
        studies.register("fake", platform={"rater": "third"}, client="198.51.100.7")
    studies.register("fake", platform={"rater": "neighbour"}, client="198.51.100.8")  # another address
    rate_all(store, first.rater_id, clock)  # a finished rater no longer counts
    studies.register("fake", platform={"rater": "third"}, client="198.51.100.7")
    with pytest.raises(RaterRefused, match="unfinished places"):
        studies.register("fake", platform={"rater": "fourth"}, client="198.51.100.7")
    clock.advance(manifest.definition.abandon_minutes * 60 + 1)  # abandoned places expire and stop counting
    studies.register("fake", platform={"rater": "fourth"}, client="198.51.100.7")
    assert "198.51.100.7" not in (tmp_path / "fake" / "raters.json").read_text()  # kept as a keyed hash only


def test_the_registration_window_forgets_quiet_clients(tmp_path, clock, monkeypatch):
    monkeypatch.setattr("lab.study.registry.MAX_TRACKED_CLIENTS", 5)
    _, studies = studies_with(tmp_path, clock)
    studies.unfinished_per_client = None
    for index in range(20):
        studies.register("fake", platform={}, client=f"10.2.0.{index}")
    assert len(studies._recent) == 5 and "10.2.0.19" in studies._recent  # the most recent kept
    clock.advance(studies.registration_window_s + 1)
    studies.register("fake", platform={}, client="10.2.1.1")
    assert list(studies._recent) == ["10.2.1.1"]


def test_the_experimenter_releases_a_squatted_id(tmp_path, clock, capsys):
    from lab.study.__main__ import main

    manifest, studies = studies_with(tmp_path, clock, max_raters=1, headphone_check=False)
    _, store = studies.get("fake")
    squatter = studies.register("fake", platform={"rater": "carol"}, client="10.0.0.1")
    rate_all(store, "carol", clock)  # finished under carol's id, before carol arrived
    with pytest.raises(RaterRefused, match="already started"):
        studies.register("fake", platform={"rater": "carol"}, client="10.0.0.2")
    main(["release", str(manifest.study_dir), "carol"])
    assert "released carol" in capsys.readouterr().out
    with pytest.raises(RaterRefused, match="expired"):
        studies.resume("fake", squatter.token)
    with pytest.raises(RaterRefused, match="released by the researcher"):  # the squatter, back first
        studies.register("fake", platform={"rater": "CAROL"}, client="10.0.0.1")
    carol = studies.register("fake", platform={"rater": "Carol"}, client="10.0.0.2")  # the id, and the only slot
    assert carol.rater_id == "Carol~2" and carol.platform_id == "Carol"
    records = read_records(manifest.study_dir)
    assert records["Carol~2"]["slot"] == records["carol"]["slot"] == 0 and not store.progress("Carol~2").done
    rate_all(store, "Carol~2", clock)
    _, _, exclusions, kept = screened(store.path)
    assert [(e.rater_id, e.reasons) for e in exclusions] == [("carol", ("released by the experimenter",))]
    assert {row["rater_id"] for row in kept} == {"Carol~2"}
    with pytest.raises(SystemExit, match="already released"):
        main(["release", str(manifest.study_dir), "carol"])
    with pytest.raises(SystemExit, match="No rater 'dave'"):
        main(["release", str(manifest.study_dir), "dave"])


def test_the_questionnaire_is_answered_once(tmp_path, clock):
    manifest, studies = studies_with(tmp_path, clock)
    rater = studies.register("fake", platform={"rater": "quentin"}, client="q").rater_id
    raters.record_questionnaire(manifest.study_dir, rater, {"device": "headphones"})
    with pytest.raises(ValueError, match="already answered"):
        raters.record_questionnaire(manifest.study_dir, rater, {"device": "loudspeakers"})
    assert raters.rater_record(manifest.study_dir, rater)["questionnaire"] == {"device": "headphones"}
