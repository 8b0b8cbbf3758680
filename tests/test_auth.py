"""The authentication backend: ModelBackend's rules, with the signed-in user read by one precompiled query."""

import pytest
from django.contrib.auth.backends import ModelBackend
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from config.auth import UserLookupBackend
from tests.factories import UserFactory

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
