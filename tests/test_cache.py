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
