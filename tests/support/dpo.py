"""Helpers shared by the tests."""

import random

from ml.reward import Ranked

WORDS = ["river", "mountain", "window", "garden", "letter", "table", "orange", "pencil", "music", "paper", "cloud"]


def synthetic_rankings(n: int, seed: int) -> list[Ranked]:
    """A preference a tiny model can learn: replies in words rank above replies in digits, whatever the context.
    Two to four candidates, one or two of each kind, tied within a kind (no pair); every fifth ranking is all tied
    (it must be dropped)."""
    rng = random.Random(seed)
    rankings = []
    for index in range(n):
        context = [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}."}]
        words = [" ".join(rng.choices(WORDS, k=rng.randint(2, 4))) for _ in range(rng.randint(1, 2))]
        digits = [" ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(1, 2))]
        candidates = [(text, 1) for text in words] + [(text, 2) for text in digits]
        rng.shuffle(candidates)
        ranks = [1] * len(candidates) if index % 5 == 4 else [rank for _, rank in candidates]
        rankings.append(Ranked(context, [text for text, _ in candidates], ranks))
    return rankings
