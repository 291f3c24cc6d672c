"""A stand-in for confluent_kafka.Message: what the supervisor's routers read of one."""

from __future__ import annotations


class FakeError:
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code


class FakeMessage:
    """What the routers read of a confluent_kafka.Message (`headers()` builds a new list
    per call, as confluent-kafka does)."""

    def __init__(self, topic, part, off, key, value, headers, ts, error=None):
        self._t, self._p, self._o = topic, part, off
        self._k, self._v, self._h, self._ts, self._e = key, value, headers, ts, error

    def error(self):
        return self._e

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return self._k

    def value(self):
        return self._v

    def headers(self):
        return None if self._h is None else list(self._h)

    def timestamp(self):
        return (1, self._ts)
