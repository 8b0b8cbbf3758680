"""The Redis cache keeps one client per connection pool, shared by threads."""

import threading

from django.core.cache import cache


def test_one_client_serves_every_call():
    client = cache._cache.get_client("a", write=False)
    assert cache._cache.get_client("b", write=True) is client


def test_threads_share_the_client_safely():
    errors = []

    def work(index):
        try:
            for round_ in range(50):
                cache.set(f"test-cache-{index}", (index, round_), 30)
                assert cache.get(f"test-cache-{index}") == (index, round_)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    cache.delete_many([f"test-cache-{i}" for i in range(8)])


def test_a_session_survives_the_loss_of_the_cache(client, alice, db):
    """Issue 15, item 17: Redis keeps nothing on disk, so a restart empties it. Sessions are written through to
    PostgreSQL (cached_db): a labeler mid-task stays signed in."""
    from importlib import import_module

    from django.conf import settings
    from django.urls import reverse

    client.force_login(alice)
    assert client.get(reverse("labeling:home")).status_code == 200
    store = import_module(settings.SESSION_ENGINE).SessionStore(client.session.session_key)
    assert cache.get(store.cache_key) is not None, "the session is cached"
    cache.delete(store.cache_key)  # what a Redis restart does to it
    response = client.get(reverse("labeling:home"))
    assert response.status_code == 200 and "alice" in response.content.decode()
