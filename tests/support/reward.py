"""Helpers shared by the tests."""

import random

from ml.reward import Ranked

WORDS = [
    "river",
    "mountain",
    "window",
    "garden",
    "letter",
    "table",
    "orange",
    "pencil",
    "music",
    "paper",
    "yellow",
    "cloud",
]


def synthetic_rankings(n: int, seed: int) -> list[Ranked]:
    """Rankings whose rule is visible: a reply that says "banana" beats one that does not."""
    rng = random.Random(seed)
    rankings = []
    for _ in range(n):
        context = [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}."}]
        plain = [" ".join(rng.choices(WORDS, k=6)) for _ in range(2)]
        liked = " ".join(rng.choices(WORDS, k=3) + ["banana"] + rng.choices(WORDS, k=2))
        candidates = [liked, *plain]
        rng.shuffle(candidates)
        ranks = [1 if "banana" in c else 2 for c in candidates]
        rankings.append(Ranked(context, candidates, ranks))
    return rankings
