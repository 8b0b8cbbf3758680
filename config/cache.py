"""Django's Redis cache, keeping one Redis client per connection pool.

Django's RedisCacheClient builds a new `redis.Redis` object for every cache call. Building one sets up its
table of response callbacks, which cost more CPU than the call itself: every signed-in request reads its session
from this cache, so it showed as about 8% of the web process's CPU on the queue's hot path (bench/queue_load.py).
A `redis.Redis` object is safe to share between threads (each command takes a connection from the pool), and
the pool itself reconnects after a fork. Values are signed (SignedSerializer): nothing written to Redis by someone
without SECRET_KEY is unpickled.
"""

import hmac
import logging
import pickle

from django.core.cache.backends import redis as django_redis
from django.utils.crypto import salted_hmac

logger = logging.getLogger(__name__)


class SignedSerializer(django_redis.RedisSerializer):
    """Django's serializer (integers raw, everything else pickled) with each pickle behind an HMAC-SHA256 keyed by
    SECRET_KEY: whoever can write to Redis but does not hold the key cannot have a value unpickled here (a forged
    session or settings object is read as a miss, and logged). Sessions, the queue's settings and the ops page's
    state live in this cache."""

    PREFIX = b"s1:"
    MAC_BYTES = 32

    @staticmethod
    def _mac(payload: bytes) -> bytes:
        return salted_hmac("config.cache.SignedSerializer", payload, algorithm="sha256").digest()

    def dumps(self, obj):
        data = super().dumps(obj)
        if isinstance(data, int):
            return data
        return self.PREFIX + self._mac(data) + data

    def loads(self, data):
        try:
            return int(data)
        except ValueError:
            pass
        start = len(self.PREFIX) + self.MAC_BYTES
        if data[: len(self.PREFIX)] == self.PREFIX and len(data) > start:
            mac, payload = data[len(self.PREFIX) : start], data[start:]
            if hmac.compare_digest(mac, self._mac(payload)):
                return pickle.loads(payload)
        logger.warning("a cache value without a valid signature was ignored (%d bytes)", len(data))
        return None


class RedisCacheClient(django_redis.RedisCacheClient):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("serializer", SignedSerializer)
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
