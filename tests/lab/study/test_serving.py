"""lab.study.serving's table of issued URL tokens stays bounded: the least recently issued token is forgotten
first (it then answers like an unknown one), and issuing a token again keeps it."""
from lab.study.serving import AudioServer, Clip
from tests.lab.study.fakes import fake_manifest


def test_issued_tokens_are_bounded_least_recently_issued_first(tmp_path):
    manifest = fake_manifest(tmp_path)
    audio = AudioServer(max_issued=2)
    clips = [Clip(manifest.study_id, "rita", "page-1", label, "condition", file="x.wav") for label in "ABC"]
    first, second = audio.issue(manifest, clips[0]), audio.issue(manifest, clips[1])
    assert audio.issue(manifest, clips[0]) == first  # issued again: now the most recent
    third = audio.issue(manifest, clips[2])
    assert audio.clip(manifest.study_id, "rita", second) is None  # forgotten
    assert audio.clip(manifest.study_id, "rita", first) == clips[0]
    assert audio.clip(manifest.study_id, "rita", third) == clips[2]
    assert audio.clip(manifest.study_id, "someone-else", third) is None
