"""Limits and shared errors of the labeling domain. It imports nothing of the app, so every module may use it."""

MAX_MESSAGE_CHARS = 20_000


MIN_CANDIDATES, MAX_CANDIDATES = 2, 9


MAX_TAGS, MAX_TAG_CHARS = 10, 48


class SubmissionRefused(Exception):
    """The submission cannot be accepted in the task's current state. The message says why, for the labeler."""


CONTENT_SKIP_REASON = "I'd rather not work on this content"


IMPORT_ERRORS_KEPT = 200

# A reply that started from a model draft counts as submitted unedited when the labeler changed at most this share
# of its words (labeling.services.draft_edit_ratio): the quality page shows each labeler's share of such replies,
# and TRAINING_SFT_UNEDITED_DRAFTS=drop leaves them out of SFT.
UNEDITED_DRAFT_MAX_EDIT_RATIO = 0.02
