"""Settings for a deployment: the default of manage.py, wsgi.py, the entry scripts and the image.

Everything required comes from the environment (DJANGO_SECRET_KEY has no default; DEBUG is off unless set). HTTPS
is assumed: cookies are secure, HSTS is sent, and behind a proxy that terminates TLS, set
DJANGO_SECURE_PROXY_SSL_HEADER=true (the proxy must set X-Forwarded-Proto). Each can be turned off from the
environment for a deployment that is reached over plain HTTP on a private network.
"""

from config.env import env_bool, env_int
from config.settings.base import *  # noqa: F403

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
