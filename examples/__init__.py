"""Example midway hooks; each module's docstring shows how to run it.

Run them from the repository root, so that ``examples`` can be imported, e.g.
``python -m midway 127.0.0.1:6380 127.0.0.1:6379 --hook examples.redis_logger:RedisLogger``.
"""
