"""Checks of labeler-written text, shared by the services, the forms and the importers."""

from django.core.exceptions import ValidationError

from labeling.limits import MAX_MESSAGE_CHARS


def unstorable_text(text: str) -> str:
    """Why PostgreSQL cannot store `text` (a NUL character, or a lone surrogate that is not Unicode), or ""."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}), which is not valid Unicode"
    return ""


def validate_text(text, *, field: str = "text", allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise ValidationError({field: "The text must be a string."})
    problem = unstorable_text(text)
    if problem:
        raise ValidationError({field: f"The text {problem}."})
    if not allow_empty and not text.strip():
        raise ValidationError({field: "The text is empty."})
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValidationError(
            {field: f"The text is {len(text):,} characters long; the limit is {MAX_MESSAGE_CHARS:,}."}
        )
    return text
