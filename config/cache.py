"""Django's Redis cache, keeping one Redis client per connection pool.

Django's RedisCacheClient builds a new `redis.Redis` object for every cache call. Building one sets up its
table of response callbacks, which cost more CPU than the call itself: every signed-in request reads its session
from this cache, so it showed as about 8% of the web process's CPU on the queue's hot path (bench/queue_load.py).
A `redis.Redis` object is safe to share between threads (each command takes a connection from the pool), and
the pool itself reconnects after a fork.
"""

from django.core.cache.backends import redis as django_redis


class RedisCacheClient(django_redis.RedisCacheClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients = {}  # pool -> its client

    def get_client(self, key=None, *, write=False):
        pool = self._get_connection_pool(write)
        client = self._clients.get(pool)
        if client is None:
            # setdefault is atomic: two threads racing here end up sharing one client.
            client = self._clients.setdefault(pool, self._client(connection_pool=pool))
        return client


class RedisCache(django_redis.RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = RedisCacheClient
