"""Number formats for the ops pages: a missing figure shows as a dash."""

from django import template

register = template.Library()
MISSING = "–"


def _number(value) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@register.filter
def percent(value, digits=0) -> str:
    """0.734 -> '73%'."""
    number = _number(value)
    return MISSING if number is None else f"{number:.{int(digits)}%}"


@register.filter
def signed(value, digits=3) -> str:
    """0.1234 -> '+0.123', -0.05 -> '−0.050' (a true minus sign, so the column lines up)."""
    number = _number(value)
    return MISSING if number is None else f"{number:+.{int(digits)}f}".replace("-", "−")


@register.filter
def fixed(value, digits=2) -> str:
    """3.14159 -> '3.14'."""
    number = _number(value)
    return MISSING if number is None else f"{number:.{int(digits)}f}".replace("-", "−")


@register.filter
def metric(value) -> str:
    """A model metric as read: floats to four significant digits, integers with thousands separators."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1000:  # a count stored as a float (134515008.0 parameters)
            return f"{int(value):,}"
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, dict)):
        text = str(value)
        return text if len(text) <= 80 else text[:79] + "…"
    return str(value)


@register.filter
def words(key) -> str:
    """'val_loss' -> 'val loss': a metric's key as a label."""
    return str(key).replace("_", " ")
