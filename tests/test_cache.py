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


class _Boom:
    """Unpickling this runs code: what a forged cache value would do."""

    ran = []

    def __reduce__(self):
        return (_Boom.ran.append, ("unpickled",))


def test_a_value_written_to_redis_without_the_key_is_never_unpickled():
    import pickle

    client = cache._cache.get_client(write=True)
    key = cache.make_key("test-cache-forged")
    client.set(key, pickle.dumps(_Boom()))
    assert cache.get("test-cache-forged") is None and _Boom.ran == []
    client.set(key, b"s1:" + b"\x00" * 32 + pickle.dumps(_Boom()))  # a made-up signature
    assert cache.get("test-cache-forged") is None and _Boom.ran == []
    cache.set("test-cache-forged", {"kept": [1, 2]}, 30)
    assert cache.get("test-cache-forged") == {"kept": [1, 2]}, "values written through the cache still read back"
    cache.set("test-cache-forged", 7, 30)
    assert cache.incr("test-cache-forged") == 8, "integers stay raw, for incr"
    cache.delete("test-cache-forged")


def test_a_session_forged_in_redis_signs_nobody_in(client, admin_user):
    """Sessions are cached_db: with Redis writable, an attacker could write a session naming the admin. It is read
    as a miss, then from the database, which has no such session."""
    import pickle

    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY

    forged = {
        SESSION_KEY: str(admin_user.pk),
        BACKEND_SESSION_KEY: "config.auth.UserLookupBackend",
        HASH_SESSION_KEY: admin_user.get_session_auth_hash(),
    }
    session_key = "forgedsession0123456789abcdefghij"
    redis_key = cache.make_key("django.contrib.sessions.cached_db" + session_key)
    cache._cache.get_client(write=True).set(redis_key, pickle.dumps(forged))
    client.cookies["sessionid"] = session_key
    assert client.get("/ops/").status_code == 302, "redirected to sign in, not the admin's overview"
    cache._cache.get_client(write=True).delete(redis_key)
