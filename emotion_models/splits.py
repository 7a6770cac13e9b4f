"""Speaker-disjoint, approximately stratified 80/10/10 splits, deterministic from the seed."""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


def group_key(corpus_speaker: str, path: str) -> str:
    """Clips of one speaker share a group; a clip with no known speaker is its own group."""
    return corpus_speaker if corpus_speaker else f"path:{path}"


def speaker_split(
    groups: Sequence[str],
    labels: Sequence[str],
    *,
    seed: int,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> list[str]:
    """Assign every clip a split so that no group spans two splits.

    Groups are placed greedily, largest first (ties in a seeded random order), each into the
    split where it most reduces the squared distance between the per-label counts and their
    targets (fraction x label total). That keeps both the 80/10/10 sizes and the label mix as
    close as the groups allow.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    label_totals = Counter(labels)
    targets = [{lab: f * n for lab, n in label_totals.items()} for f in fractions]
    counts: list[Counter] = [Counter() for _ in fractions]

    order = sorted(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: ties keep the seeded order

    assignment: dict[str, int] = {}
    for g in order:
        group_labels = Counter(labels[i] for i in members[g])
        best, best_gain = 0, None
        for s in range(len(fractions)):
            # change in squared error if the group goes to split s
            gain = sum(
                (counts[s][lab] + n - targets[s][lab]) ** 2 - (counts[s][lab] - targets[s][lab]) ** 2
                for lab, n in group_labels.items()
            )
            if best_gain is None or gain < best_gain:
                best, best_gain = s, gain
        assignment[g] = best
        counts[best].update(group_labels)
    return [SPLITS[assignment[g]] for g in groups]
