"""A per-user, per-minute limit for the expensive pages (the API has DRF's throttles): fixed one-minute windows
counted in the cache (Redis), so every web process shares them. Beyond the limit the view is not run: a 429
whose text says when to try again (htmx requests get the same text to show in place)."""

import functools
import time

from django.conf import settings
from django.core.cache import cache
from django.http import HttpResponse
from django.shortcuts import render


def per_user_per_minute(name: str, setting: str, methods=("POST",)):
    """Decorate a view of signed-in users: at most `settings.<setting>` calls (of `methods`) a minute per user."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(request, *args, **kwargs):
            if request.method not in methods:
                return view(request, *args, **kwargs)
            limit = getattr(settings, setting)
            window = int(time.time() // 60)
            key = f"page-rate:{name}:{request.user.pk}:{window}"
            if cache.add(key, 1, timeout=90):
                count = 1
            else:
                try:
                    count = cache.incr(key)
                except ValueError:  # expired between add and incr
                    cache.add(key, 1, timeout=90)
                    count = 1
            if count > limit:
                wait = 60 - int(time.time() % 60)
                text = f"Too many requests: at most {limit} a minute here. Try again in {wait} s."
                if getattr(request, "htmx", False) or "application/json" in request.headers.get("Accept", ""):
                    response = HttpResponse(text, status=429, content_type="text/plain; charset=utf-8")
                else:
                    response = render(request, "429.html", {"text": text}, status=429)
                response["Retry-After"] = str(wait)
                return response
            return view(request, *args, **kwargs)

        return wrapped

    return decorate
