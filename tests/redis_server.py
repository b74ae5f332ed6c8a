"""The tests' Redis: a real redis-server on loopback (``kvstore.local_redis``); a missing
redis-server fails the tests, it never skips them."""

from kvstore.local_redis import start_redis, stop_redis

__all__ = ["start_redis", "stop_redis"]
