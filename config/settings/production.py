"""Settings for a deployment: the default of manage.py, wsgi.py, the entry scripts and the image.

Everything required comes from the environment (DJANGO_SECRET_KEY has no default, and a placeholder or weak key
is refused; DEBUG must be off). HTTPS
is assumed: cookies are secure, HSTS is sent, and behind a proxy that terminates TLS, set
DJANGO_SECURE_PROXY_SSL_HEADER=true (the proxy must set X-Forwarded-Proto). Each can be turned off from the
environment for a deployment that is reached over plain HTTP on a private network.
"""

from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_int
from config.settings.base import *  # noqa: F403

# Values that ship somewhere (the local settings, old examples, tutorials): a key anyone can read signs anyone's
# sessions and password-reset links.
PLACEHOLDER_SECRET_KEYS = {"change-me", "changeme", "change_me", "secret", "local-development-only-not-secret"}
if DEBUG:  # noqa: F405
    raise ImproperlyConfigured(
        "DJANGO_DEBUG is on with the production settings (tracebacks and settings shown to anyone): turn it off, "
        "or use config.settings.local on a developer's machine."
    )
if (
    SECRET_KEY in PLACEHOLDER_SECRET_KEYS  # noqa: F405
    or SECRET_KEY.startswith("django-insecure-")  # noqa: F405
    or len(SECRET_KEY) < 50  # noqa: F405
    or len(set(SECRET_KEY)) < 5  # noqa: F405
):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is a placeholder or too weak for the production settings (at least 50 characters, "
        "5 different): generate one with "
        "python -c 'import secrets; print(secrets.token_urlsafe(50))'."
    )

SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", True)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31_536_000, min_value=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
