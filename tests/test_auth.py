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
