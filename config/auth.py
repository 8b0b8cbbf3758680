"""The authentication backend: Django's ModelBackend, with a cheaper lookup of the signed-in user.

Every signed-in request loads its user. ModelBackend does it with `User.objects.get(pk=...)`, and building and
compiling that query took about a quarter of the web process's CPU on the queue's hot path (bench/queue_load.py),
more than the query itself. Here the SQL is written once per process and the row becomes a user with
`Model.from_db`, after the fields' own conversions from the database, as the ORM would make it. The rules are
ModelBackend's: an unknown id or an inactive user gives None (the visitor is signed out).

settings.AUTHENTICATION_BACKENDS lists ModelBackend after this backend only so that sessions signed in before it
(which name ModelBackend) stay signed in; a wrong password is refused here, so that it is not checked twice.
"""

import functools
import hashlib
import ipaddress
import threading
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from django.db import connections, router


@functools.cache
def _user_query() -> tuple[type, str, str, list[str], list[tuple[int, list, object]]]:
    # Django makes a new backend object at every request (auth.load_backend), hence a module-level cache.
    model = get_user_model()
    database = router.db_for_read(model)
    connection = connections[database]
    quote = connection.ops.quote_name
    fields = model._meta.concrete_fields
    sql = "SELECT {} FROM {} WHERE {} = %s".format(
        ", ".join(quote(field.column) for field in fields),
        quote(model._meta.db_table),
        quote(model._meta.pk.column),
    )
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(model._meta.db_table)
        functions = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        if functions:
            converters.append((index, functions, column))
    return model, database, sql, [field.attname for field in fields], converters


def client_ip(request) -> str:
    """The client's address (django-axes keys its lockouts on it): REMOTE_ADDR, or behind TRUSTED_PROXY_COUNT
    proxies the X-Forwarded-For entry that many places from the right, the one the outermost trusted proxy saw.
    Entries further left are the client's own to write and are never used."""
    remote = request.META.get("REMOTE_ADDR", "")
    count = settings.TRUSTED_PROXY_COUNT
    if count:
        chain = [entry.strip() for entry in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if entry.strip()]
        if len(chain) >= count:
            try:
                return str(ipaddress.ip_address(chain[-count]))
            except ValueError:
                pass
    return remote


def _failures_key(username: str) -> str:
    return "login-failures:" + hashlib.sha256(username.strip().lower().encode()).hexdigest()


def count_failed_sign_in(sender, credentials, request=None, **kwargs) -> None:
    """user_login_failed: one more failure of this username, from any address, within the lockout period."""
    from django.core.cache import cache

    username = (credentials or {}).get("username")
    if not username:
        return
    key = _failures_key(username)
    cache.add(key, 0, timeout=int(settings.AXES_COOLOFF_TIME.total_seconds()))
    try:
        cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=int(settings.AXES_COOLOFF_TIME.total_seconds()))


_SLOWED = threading.BoundedSemaphore(1)  # one slowed sign-in waits at a time in a process, so waits never hold
# every web thread


def slow_down(username: str) -> float:
    """Wait before checking a password for a username that failed more than LOGIN_FAILURE_LIMIT times from any
    addresses: a quarter second per failure beyond, at most LOGIN_SLOWDOWN_MAX_S. While another slowed sign-in
    waits in this process, this one is refused unchecked (PermissionDenied, a failed sign-in), so that strangers
    cannot tie up the web threads nor guess faster by asking in parallel. Returns the wait."""
    from django.core.cache import cache

    failures = cache.get(_failures_key(username)) or 0
    wait = min(settings.LOGIN_SLOWDOWN_MAX_S, 0.25 * max(0, failures - settings.AXES_FAILURE_LIMIT))
    if wait > 0:
        if not _SLOWED.acquire(blocking=False):
            raise PermissionDenied
        try:
            time.sleep(wait)
        finally:
            _SLOWED.release()
    return wait


class UserLookupBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if username and password is not None:
            slow_down(username)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None and password is not None:
            raise PermissionDenied  # stops here: ModelBackend, listed next for old sessions, would check it again
        return user

    def get_user(self, user_id):
        model, database, sql, attnames, converters = _user_query()
        # user_id comes from django.contrib.auth.get_user(), already converted with the primary key's to_python().
        with connections[database].cursor() as cursor:
            cursor.execute(sql, [user_id])
            row = cursor.fetchone()
        if row is None:
            return None
        if converters:
            row = list(row)
            for index, functions, column in converters:
                for function in functions:
                    row[index] = function(row[index], column, connections[database])
        user = model.from_db(database, attnames, row)
        return user if self.user_can_authenticate(user) else None


def _connect() -> None:
    from django.contrib.auth.signals import user_login_failed

    user_login_failed.connect(count_failed_sign_in, dispatch_uid="config.auth.count_failed_sign_in")


_connect()


class HashedTokenAuthentication:
    """DRF authentication by `Authorization: Token <key>`, as DRF's TokenAuthentication, against the key's SHA-256
    (labeling.models.ApiToken): the database holds no usable key."""

    keyword = "Token"

    def authenticate(self, request):
        from rest_framework import exceptions
        from rest_framework.authentication import get_authorization_header

        from labeling.models import ApiToken

        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("Invalid token header: give one token, without spaces.")
        try:
            key = parts[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid token header: the token has invalid characters.") from None
        token = ApiToken.objects.select_related("user").filter(digest=ApiToken.digest_of(key)).first()
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid token, or its user is inactive.")
        return token.user, token

    def authenticate_header(self, request):
        return self.keyword


def _describe_in_the_schema() -> None:
    """The OpenAPI schema names this scheme as it named DRF's: tokenAuth, `Authorization: Token <key>`."""
    from drf_spectacular.extensions import OpenApiAuthenticationExtension
    from drf_spectacular.plumbing import build_bearer_security_scheme_object

    class HashedTokenScheme(OpenApiAuthenticationExtension):
        target_class = HashedTokenAuthentication
        name = "tokenAuth"

        def get_security_definition(self, auto_schema):
            return build_bearer_security_scheme_object(header_name="Authorization", token_prefix="Token")


_describe_in_the_schema()
