from django import template
from django.utils.safestring import mark_safe

from labeling.markdown import render_markdown

register = template.Library()


@register.filter(name="markdown")
def markdown_filter(text: str) -> str:
    return mark_safe(render_markdown(text))


@register.filter
def letter(index: int) -> str:
    """0 -> A, 1 -> B, ...: how candidates are named on the ranking page."""
    return chr(ord("A") + int(index))


@register.filter
def get_item(mapping, key):
    return mapping.get(key) if mapping else None
