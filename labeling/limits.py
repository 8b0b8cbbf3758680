"""Limits and shared errors of the labeling domain. It imports nothing of the app, so every module may use it."""

MAX_MESSAGE_CHARS = 20_000


MIN_CANDIDATES, MAX_CANDIDATES = 2, 9


MAX_TAGS, MAX_TAG_CHARS = 10, 48


class SubmissionRefused(Exception):
    """The submission cannot be accepted in the task's current state. The message says why, for the labeler."""


CONTENT_SKIP_REASON = "I'd rather not work on this content"


IMPORT_ERRORS_KEPT = 200
