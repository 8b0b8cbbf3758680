"""Helpers shared by the tests."""

from rest_framework.test import APIClient

_KEYS: dict[int, str] = {}  # user id -> the key made for it (the database keeps only its SHA-256)


def api(user=None) -> APIClient:
    from labeling.models import ApiToken
    from labeling.services import api_token_rotate

    client = APIClient()
    if user is not None:
        key = _KEYS.get(user.pk)
        if key is None or not ApiToken.objects.filter(user=user, digest=ApiToken.digest_of(key)).exists():
            key = _KEYS[user.pk] = api_token_rotate(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client
