"""The HTTP connection layer: uvicorn's h11 protocol with the bounds a public port needs.

uvicorn reads request heads without a deadline, checks h11's head-size bound only while a
head is incomplete (a 60 KB head that arrives in one segment passes), and its
``limit_concurrency`` answers 503 to every path, ``/healthz`` too. :class:`BoundedH11Protocol`
keeps uvicorn's request handling and adds, per connection:

- **a request deadline**: from the moment the server waits for a request (the connection
  opened, or the previous response ended) the client has ``http.head_timeout_ms`` to send
  the head and any body. Past it the connection is closed, after a 408 when part of a
  request had arrived. Idle keep-alive connections still close after uvicorn's
  ``timeout_keep_alive``; time the application spends answering is not counted.
- **a head-size limit**: a request line plus headers longer than ``max_head_bytes`` gets 400,
  however it was segmented (:class:`HeadBoundedConnection`).
- **connection bounds** (:class:`ConnectionLimits`): a connection from a client address that
  already holds ``http.max_connections_per_client`` is answered 503 and closed at once,
  unread. One accepted while ``http.max_connections`` are open is served ``/healthz`` only
  (liveness: the process answers) and 503 for every other path.

Invariant: every accepted connection is counted once in :class:`ConnectionLimits` from
``connection_made`` to ``connection_lost``; refused ones are never counted.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import time
from collections import Counter
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

ALWAYS_ANSWERED = "/healthz"  # answered over the total bound too
REFUSAL_LOG_INTERVAL_S = 10.0


def _canned(status: int, error: str, message: str, *, retry: bool) -> bytes:
    """A whole JSON error response that closes the connection, sent before any request."""
    body = json.dumps({"error": error, "message": message}).encode()
    conn = h11.Connection(h11.SERVER)  # h11 lets a server answer before a request (408...)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               *([(b"retry-after", b"1")] if retry else []), (b"connection", b"close")]
    return b"".join(conn.send(e) for e in (
        h11.Response(status_code=status, headers=headers,
                     reason=HTTPStatus(status).phrase.encode()), h11.Data(data=body),
        h11.EndOfMessage()))


TOO_MANY_FROM_CLIENT = _canned(503, "too_many_connections",
                               "too many open connections from your address", retry=True)
TIMED_OUT = _canned(408, "request_timeout", "the request was not received in time",
                    retry=False)
OVERLOADED_BODY = json.dumps({"error": "overloaded", "message": "too many open connections; "
                              "only /healthz is answered, retry later"}).encode()


class HeadBoundedConnection(h11.Connection):
    """An h11 server connection that refuses request heads longer than ``max_head_bytes``.

    h11's own ``max_incomplete_event_size`` bounds only a head that is still incomplete;
    this bounds every head by the bytes its parse took from the receive buffer (h11
    internals: ``_extract_next_receive_event``, ``_receive_buffer``; pinned by
    tests/test_server_sockets.py, which fails if they change). The refusal is h11's own:
    their state becomes ERROR and uvicorn answers 400 and closes.
    """

    def __init__(self, max_head_bytes: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes

    def _extract_next_receive_event(self):
        if self.their_state is not h11.IDLE:
            return super()._extract_next_receive_event()
        before = len(self._receive_buffer)
        event = super()._extract_next_receive_event()
        if (isinstance(event, h11.Request)
                and before - len(self._receive_buffer) > self.max_head_bytes):
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


class Admission(enum.Enum):
    """What a new connection gets (:meth:`ConnectionLimits.admit`)."""

    SERVED = "served"
    HEALTHZ_ONLY = "served /healthz only: over http.max_connections"
    REFUSED = "refused: over http.max_connections_per_client"


class ConnectionLimits:
    """Open connections, in total and per client address, and the bounds on them.

    Bounds crossed are logged at most once per ``REFUSAL_LOG_INTERVAL_S`` with a count.
    """

    def __init__(self, max_total: int, max_per_client: int):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: Counter[str] = Counter()
        self._unserved: Counter[Admission] = Counter()  # since the last log line
        self._last_log = 0.0

    def admit(self, client: str) -> Admission:
        """The verdict on a new connection from ``client``; unless REFUSED it is counted
        and is released (:meth:`release`) when it closes."""
        if self.per_client[client] >= self.max_per_client:
            return self._note(Admission.REFUSED, client)
        self.per_client[client] += 1
        self.total += 1
        if self.total > self.max_total:
            return self._note(Admission.HEALTHZ_ONLY, client)
        return Admission.SERVED

    def release(self, client: str) -> None:
        """Uncount a connection that :meth:`admit` counted."""
        self.total -= 1
        self.per_client[client] -= 1
        if not self.per_client[client]:
            del self.per_client[client]

    def _note(self, verdict: Admission, client: str) -> Admission:
        self._unserved[verdict] += 1
        now = time.monotonic()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:
            for kind, n in self._unserved.items():
                log.warning("%s: %d connection(s), the latest from %s (%d open)",
                            kind.value, n, client, self.total)
            self._unserved.clear()
            self._last_log = now
        return verdict


def _healthz_only(app):
    """The application for connections accepted over the total bound."""
    async def overloaded(scope, receive, send):
        if scope["type"] != "http" or scope["path"] == ALWAYS_ANSWERED:
            return await app(scope, receive, send)
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", b"1"),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": OVERLOADED_BODY})
    return overloaded


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request deadline, a head-size limit and connection
    bounds (see the module docstring). Build it with :func:`protocol_factory`."""

    def __init__(self, *args, limits: ConnectionLimits, head_timeout_s: float,
                 max_head_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = HeadBoundedConnection(max_head_bytes)
        self.limits = limits
        self.head_timeout_s = head_timeout_s
        self.deadline: asyncio.TimerHandle | None = None  # while waiting for a request
        self.received = False  # bytes arrived since the deadline started
        self.peer: str | None = None  # set once admitted

    def connection_made(self, transport) -> None:
        addr = transport.get_extra_info("peername")
        peer = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        verdict = self.limits.admit(peer)
        if verdict is Admission.REFUSED:
            self.transport = transport
            transport.write(TOO_MANY_FROM_CLIENT)
            transport.close()
            return
        self.peer = peer
        if verdict is Admission.HEALTHZ_ONLY:
            self.app = _healthz_only(self.app)
        super().connection_made(transport)
        self._await_request()

    def connection_lost(self, exc) -> None:
        if self.peer is None:
            return  # refused in connection_made: never counted, never served
        self.limits.release(self.peer)
        self.peer = None
        self._stop_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.received = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._await_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_request()

    # ---- the request deadline ---------------------------------------------------------
    def _await_request(self) -> None:
        """Start the deadline when the server waits for (the rest of) a request, stop it
        once the request is in. Never restarted while it runs: trickled bytes gain nothing."""
        waiting = (self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
                   and not self.transport.is_closing())
        if waiting and self.deadline is None:
            self.received = False
            self.deadline = self.loop.call_later(self.head_timeout_s, self._timed_out)
        elif not waiting:
            self._stop_deadline()

    def _stop_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _timed_out(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if (self.received and self.conn.their_state is h11.IDLE
                and self.conn.our_state is h11.IDLE):
            self.transport.write(TIMED_OUT)  # part of a head arrived: say why
        self.transport.close()


def protocol_factory(limits: ConnectionLimits, *, head_timeout_s: float,
                     max_head_bytes: int):
    """What to pass as ``uvicorn.Config(http=...)``: uvicorn calls it once per connection."""
    return functools.partial(BoundedH11Protocol, limits=limits, head_timeout_s=head_timeout_s,
                             max_head_bytes=max_head_bytes)
