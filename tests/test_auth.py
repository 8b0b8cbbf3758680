"""The authentication backend: ModelBackend's rules, with the signed-in user read by one precompiled query."""

from unittest import mock

import pytest
from django.contrib.auth import BACKEND_SESSION_KEY, authenticate
from django.contrib.auth.backends import ModelBackend
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from config.auth import UserLookupBackend
from tests.support.factories import UserFactory

pytestmark = pytest.mark.django_db


def fields(user) -> dict:
    return {field.attname: getattr(user, field.attname) for field in type(user)._meta.concrete_fields}


def test_the_user_is_the_one_model_backend_gives():
    user = UserFactory(first_name="Ada", email="ada@example.org", is_staff=True)
    with CaptureQueriesContext(connection) as queries:
        ours = UserLookupBackend().get_user(user.pk)
    assert len(queries) == 1
    theirs = ModelBackend().get_user(user.pk)
    assert fields(ours) == fields(theirs)
    assert ours == user and not ours._state.adding and ours._state.db == "default"


def test_unknown_and_inactive_users_are_signed_out():
    inactive = UserFactory(is_active=False)
    assert UserLookupBackend().get_user(inactive.pk) is None
    assert UserLookupBackend().get_user(inactive.pk + 1000) is None


def test_a_signed_in_labeler_reaches_the_queue_and_a_password_change_signs_them_out(client):
    user = UserFactory()
    client.force_login(user)
    assert client.get(reverse("labeling:home")).status_code == 200
    user.set_password("a new password")
    user.save()
    response = client.get(reverse("labeling:home"))
    assert response.status_code == 302 and reverse("login") in response["Location"]


def test_a_session_signed_in_through_model_backend_stays_signed_in(client):
    """Sessions made before config.auth name ModelBackend; they must not be signed out by the switch."""
    user = UserFactory()
    client.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
    assert client.session[BACKEND_SESSION_KEY] == "django.contrib.auth.backends.ModelBackend"
    assert client.get(reverse("labeling:home")).status_code == 200


def test_a_wrong_password_is_checked_once(rf):
    user = UserFactory()
    user.set_password("right")
    user.save()
    request = rf.post(reverse("login"))
    with mock.patch.object(ModelBackend, "authenticate", autospec=True, side_effect=ModelBackend.authenticate) as spy:
        assert authenticate(request, username=user.username, password="wrong") is None
    assert spy.call_count == 1  # not again by ModelBackend, listed after UserLookupBackend for old sessions
    assert authenticate(request, username=user.username, password="right") == user


def test_repeated_wrong_passwords_lock_the_account_out_from_that_address(client, settings):
    """Issue 15, item 9: django-axes. After LOGIN_FAILURE_LIMIT failures, even the right password is refused
    (without hashing it) with a page that says why; another address is not locked out."""
    settings.AXES_FAILURE_LIMIT = 3
    user = UserFactory(username="target")
    user.set_password("right")
    user.save()
    url = reverse("login")
    for _ in range(2):
        assert client.post(url, {"username": "target", "password": "wrong"}).status_code == 200
    locked = client.post(url, {"username": "target", "password": "wrong"})
    assert locked.status_code == 429 and 'data-testid="locked-out"' in locked.content.decode()
    with mock.patch.object(ModelBackend, "authenticate", autospec=True) as spy:
        again = client.post(url, {"username": "target", "password": "right"})
    assert again.status_code == 429 and spy.call_count == 0 and "_auth_user_id" not in client.session
    elsewhere = client.post(url, {"username": "target", "password": "right"}, REMOTE_ADDR="10.1.2.3")
    assert elsewhere.status_code == 302


def _sign_in(client, password: str, **meta):
    return client.post(reverse("login"), {"username": "target", "password": password}, **meta)


@pytest.fixture
def target():
    user = UserFactory(username="target")
    user.set_password("right")
    user.save()
    return user


def test_behind_a_proxy_a_strangers_failures_lock_only_the_strangers_address(client, settings, target):
    """Every request comes from the proxy (REMOTE_ADDR); with TRUSTED_PROXY_COUNT=1 the client is the address the
    proxy appended to X-Forwarded-For, so a stranger's failures do not lock the account's owner out."""
    settings.AXES_FAILURE_LIMIT, settings.TRUSTED_PROXY_COUNT = 3, 1
    proxy = {"REMOTE_ADDR": "10.0.0.2"}
    for _ in range(3):
        _sign_in(client, "wrong", HTTP_X_FORWARDED_FOR="198.51.100.7", **proxy)
    assert _sign_in(client, "right", HTTP_X_FORWARDED_FOR="198.51.100.7", **proxy).status_code == 429
    owner = client.__class__()
    assert _sign_in(owner, "right", HTTP_X_FORWARDED_FOR="203.0.113.5", **proxy).status_code == 302


def test_a_client_cannot_pick_its_address_in_x_forwarded_for(client, settings, target):
    """Entries left of the trusted proxies' are the client's own to write: changing them does not escape a lockout;
    without trusted proxies the header is ignored altogether."""
    from config.auth import client_ip

    settings.AXES_FAILURE_LIMIT, settings.TRUSTED_PROXY_COUNT = 3, 1
    proxy = {"REMOTE_ADDR": "10.0.0.2"}
    for i in range(3):
        _sign_in(client, "wrong", HTTP_X_FORWARDED_FOR=f"192.0.2.{i}, 198.51.100.7", **proxy)
    assert _sign_in(client, "right", HTTP_X_FORWARDED_FOR="192.0.2.99, 198.51.100.7", **proxy).status_code == 429

    class Request:
        META = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "192.0.2.1, 198.51.100.7"}

    assert client_ip(Request) == "198.51.100.7"
    settings.TRUSTED_PROXY_COUNT = 0
    assert client_ip(Request) == "10.0.0.2"
    settings.TRUSTED_PROXY_COUNT = 2
    assert client_ip(Request) == "192.0.2.1"
    Request.META["HTTP_X_FORWARDED_FOR"] = "not-an-address, 198.51.100.7"
    assert client_ip(Request) == "10.0.0.2", "a malformed entry falls back to the proxy's address"


def test_failures_from_many_addresses_slow_the_username_down_without_locking_it(client, settings, target):
    """Strangers at many addresses fail for a known username: each address is locked for it, and the username is
    slowed (a growing wait before its password is checked), but its owner still signs in."""
    settings.AXES_FAILURE_LIMIT, settings.LOGIN_SLOWDOWN_MAX_S = 3, 2.0
    waits = []
    with mock.patch("config.auth.time.sleep", side_effect=waits.append):
        for i in range(8):
            _sign_in(client.__class__(), "wrong", REMOTE_ADDR=f"192.0.2.{i}")
        assert _sign_in(client, "right", REMOTE_ADDR="203.0.113.5").status_code == 302
    assert waits and waits[-1] == pytest.approx(1.25) and max(waits) <= 2.0


def test_failures_stay_on_record_for_admins_after_a_success_resets_the_count(client, settings, target):
    """A walk found admin's Axes pages empty after six wrong passwords and a right one: the success reset the
    count (as it should) and took the only record with it. Each failure is now kept in the access-failure log."""
    from axes.models import AccessAttempt, AccessFailureLog

    for _ in range(3):
        assert _sign_in(client, "wrong").status_code == 200
    assert _sign_in(client, "right").status_code == 302
    assert not AccessAttempt.objects.filter(username="target").exists(), "the count is reset"
    assert AccessFailureLog.objects.filter(username="target").count() == 3


def test_ops_powers_come_from_the_ops_group_not_from_staff_status(client):
    """Issue 28, item 15: staff status lets someone into Django admin (for what their model permissions allow); the
    ops pages and the admin API need the operate_loop permission, which the Ops group (made after every migrate)
    holds."""
    from django.contrib.auth.models import Group

    from tests.support.api import api

    staff = UserFactory(username="staff-only", is_staff=True)
    client.force_login(staff)
    assert client.get(reverse("ops:overview")).status_code == 403
    assert api(staff).get("/api/v1/exports/card/").status_code == 403
    staff.groups.add(Group.objects.get(name="Ops"))
    staff = type(staff).objects.get(pk=staff.pk)  # permissions are cached on the user object
    client.force_login(staff)
    assert client.get(reverse("ops:overview")).status_code == 200
    assert api(staff).get("/api/v1/exports/card/").status_code == 200


def test_one_slowed_sign_in_waits_at_a_time_and_the_others_are_refused_unchecked(settings, target):
    """Slowed attempts in parallel would hold every web thread asleep: while one waits, the others fail at once,
    without their password being checked."""
    from django.core.cache import cache
    from django.core.exceptions import PermissionDenied

    from config import auth

    settings.AXES_FAILURE_LIMIT = 3
    cache.set(auth._failures_key("target"), 9, 60)
    assert auth._SLOWED.acquire(blocking=False)  # another request is waiting
    try:
        with pytest.raises(PermissionDenied), mock.patch("config.auth.time.sleep") as sleep:
            auth.slow_down("target")
        assert sleep.call_count == 0
    finally:
        auth._SLOWED.release()
    with mock.patch("config.auth.time.sleep") as sleep:
        assert auth.slow_down("target") == pytest.approx(1.5)
    assert sleep.call_count == 1
