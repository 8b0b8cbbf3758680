"""Every conversation belongs to one data split, fixed when it is created:

- train: used for SFT, reward-model and PPO training, and sampled for ranking tasks;
- validation: used for validation loss and reward-model accuracy, never trained on;
- holdout: reserved for the evaluation gate (the candidate policy against the active one); never trained on,
  never used for validation, never sampled for ranking.

The split of an imported conversation follows from its content hash, so the same data splits the same way in
every database; a conversation started in the product draws its split once, at random, and keeps it.
"""

import hashlib
import random

from django.conf import settings

TRAIN, VALIDATION, HOLDOUT = "train", "validation", "holdout"
CHOICES = [(TRAIN, "Train"), (VALIDATION, "Validation"), (HOLDOUT, "Held out for evaluation")]


def split_for_fraction(fraction: float) -> str:
    if fraction < settings.DATA_HOLDOUT_FRACTION:
        return HOLDOUT
    if fraction < settings.DATA_HOLDOUT_FRACTION + settings.DATA_VALIDATION_FRACTION:
        return VALIDATION
    return TRAIN


def split_for_key(key: str) -> str:
    """The split of a conversation identified by `key` (e.g. its content hash)."""
    fraction = int(hashlib.sha256(f"split:{key}".encode()).hexdigest()[:12], 16) / float(16**12)
    return split_for_fraction(fraction)


def random_split() -> str:
    return split_for_fraction(random.random())
