from collections import Counter

from emotion_models.splits import speaker_split


def _data(n_speakers=40, per=25):
    groups, labels = [], []
    for s in range(n_speakers):
        for i in range(per):
            groups.append(f"c:{s}")
            labels.append(["a", "b", "c", "d"][(s + i) % 4])
    return groups, labels


def test_disjoint_and_close_to_80_10_10():
    groups, labels = _data()
    splits = speaker_split(groups, labels, seed=3)
    seen = {}
    for g, s in zip(groups, splits):
        assert seen.setdefault(g, s) == s
    counts = Counter(splits)
    n = len(groups)
    assert abs(counts["train"] / n - 0.8) < 0.03
    assert abs(counts["val"] / n - 0.1) < 0.03 and abs(counts["test"] / n - 0.1) < 0.03
    # stratified: every label in every split
    for s in ("train", "val", "test"):
        assert {lab for lab, sp in zip(labels, splits) if sp == s} == {"a", "b", "c", "d"}


def test_deterministic_from_seed():
    groups, labels = _data()
    assert speaker_split(groups, labels, seed=1) == speaker_split(groups, labels, seed=1)
    assert speaker_split(groups, labels, seed=1) != speaker_split(groups, labels, seed=2)


def test_unknown_speakers_are_their_own_groups():
    from emotion_models.splits import group_key

    assert group_key("", "a.wav") != group_key("", "b.wav")
    assert group_key("tess:OAF", "a.wav") == group_key("tess:OAF", "b.wav")
