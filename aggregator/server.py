"""The read-only HTTP API: view documents, key listing, health, readiness, metrics.

Starlette on uvicorn (uvloop event loop, h11 HTTP parser: bounded request heads). The server
reads the shards directly and read-only (query.py) and the shared counters at scrape time
(metrics.py); it needs nothing from the workers and never writes.

Endpoints (``GET``; also ``HEAD``):

======================  =====================================================================
``/views/{view}/{key}`` the document, its version and freshness; 404 for an unknown view/key
``/views/{view}``       keys, ``?limit=`` (1..1000, default 100) and ``?cursor=`` pagination
``/healthz``            liveness: the process answers (never needs the token)
``/readyz``             readiness (never needs the token): 200 when the supervisor's status
                        is fresh, every partition's lag is at most ``service.ready_max_lag``
                        and no worker is blocked by its data disk, else 503 with the reasons
``/metrics``            Prometheus text format
``/openapi.json``       OpenAPI 3.1 description of this API
======================  =====================================================================

Guards, applied before routing: a URL longer than ``MAX_URL_BYTES`` gets 414, a
``Content-Length`` above ``http.max_request_bytes`` gets 413, a body of unknown length
(chunked) gets 411 (no endpoint takes a body); request heads beyond ``MAX_HEAD_BYTES`` are
refused (400, connections.py). With ``http.token`` set, every path except the probes
(``/healthz``, ``/readyz``) needs ``Authorization: Bearer <token>`` (compared in constant
time), else 401. Query parameters are parsed strictly: unknown or repeated ones, a ``limit``
that is not 1-4 ASCII digits, a ``cursor`` that is not url-safe base64 get 400.

Connections (connections.py): a deadline on each request, bounds per client address and in
total; ``/healthz`` is answered over the total bound too. No redirects (a trailing slash is
another path: 404).

Processes: :func:`serve` runs the server in the calling process until SIGTERM (or SIGINT);
:func:`start_server_process` spawns it as a child of the supervisor and returns once it is
listening.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import multiprocessing
import re
import resource
import signal
import socket
import time
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import logs
from .config import Config
from .connections import ConnectionLimits, protocol_factory
from .metrics import make_registry, read_status, readiness, storage_blocked
from .query import BadCursor, QueryError, UnknownView, Views
from .runtime import set_parent_death_signal

log = logging.getLogger(__name__)

MAX_URL_BYTES = 8 * 1024  # path + query string; longer: 414
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (connections.py); longer: 400
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
LIMIT_RE = re.compile(r"[0-9]{1,4}")  # ASCII only: str.isdigit() takes "²", int() does not
CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,2048}")  # url-safe base64, as encode_cursor makes
LIST_PARAMS = ("limit", "cursor")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # the probes: a pod spec cannot hold secrets
FD_SLACK = 256  # descriptors besides connections: shards, logs, refused connections
START_TIMEOUT_S = 30.0
BIND_FAILED_EXIT = 3


class ServerStartError(RuntimeError):
    """The HTTP server process could not start (bind failure, bad config...)."""


# ---- responses ---------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()  # msgpack bin values in documents
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"),
                          default=_json_default).encode()


def _error(status: int, error: str, message: str, headers: dict | None = None) -> JSON:
    return JSON({"error": error, "message": message}, status_code=status, headers=headers)


# ---- guards (pure ASGI, before routing) ---------------------------------------------------


class Guard:
    """Size limits and the bearer token, checked before any route runs."""

    def __init__(self, app, *, max_request_bytes: int, token: str):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._check(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope) -> Response | None:
        url_bytes = len(scope.get("raw_path") or scope["path"].encode()) + len(
            scope.get("query_string", b""))
        if url_bytes > MAX_URL_BYTES:
            return _error(414, "uri_too_long", f"URL longer than {MAX_URL_BYTES} bytes")
        length = chunked = None
        auth = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value
            elif name == b"authorization":
                auth = value
        if chunked is not None:
            return _error(411, "length_required", "request bodies of unknown length are "
                          "not accepted")
        if length is not None:
            if not length.isdigit():
                return _error(400, "bad_request", "invalid Content-Length")
            if int(length) > self.max_request_bytes:
                return _error(413, "request_too_large",
                              f"request body over {self.max_request_bytes} bytes")
        if self.token and scope["path"] not in OPEN_PATHS:
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(),
                                                                       self.token):
                return _error(401, "unauthorized", "missing or wrong bearer token",
                              {"WWW-Authenticate": 'Bearer realm="aggregator"'})
        return None


# ---- the application ----------------------------------------------------------------------


def create_app(config: Config) -> Starlette:
    """The ASGI application for ``config`` (opens nothing until the first request)."""
    views = Views.from_config(config)
    registry = make_registry(config, views)
    max_lag = config.service.ready_max_lag
    data_dir = config.service.data_dir

    async def get_document(request: Request) -> Response:
        view, key = request.path_params["view"], request.path_params["key"]
        doc = views.get(view, key)  # one point lookup: microseconds, no thread hop
        if doc is None:
            return _error(404, "not_found", f"no document {key!r} in view {view!r}")
        return JSON(doc)

    async def list_keys(request: Request) -> Response:
        view = request.path_params["view"]
        limit, cursor = list_query(request.query_params)
        keys, nxt = await run_in_threadpool(views.list_keys, view, limit, cursor)
        return JSON({"view": view, "keys": keys, "next_cursor": nxt})

    async def healthz(request: Request) -> Response:
        return JSON({"status": "ok"})

    async def readyz(request: Request) -> Response:
        status = read_status(data_dir)
        ready, reasons = readiness(status, max_lag, blocked=storage_blocked(config))
        age = None if status is None else round(time.time() - float(status.get("time") or 0), 3)
        body = {"ready": ready, "reasons": reasons, "max_lag": max_lag, "status_age_s": age}
        if status is not None and "unowned" in status:  # cluster mode: informational
            body["tasks_unowned"] = status["unowned"]
        return JSON(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        text = await run_in_threadpool(generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSON(openapi_document(config))

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, _slug(exc.status_code), exc.detail, exc.headers)

    async def on_unknown_view(request: Request, exc: UnknownView) -> Response:
        return _error(404, "unknown_view", str(exc))

    async def on_query_error(request: Request, exc: QueryError) -> Response:
        return _error(400, "bad_cursor" if isinstance(exc, BadCursor) else "bad_request",
                      str(exc))

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "internal_error", "internal error (see the server log)")

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            views.close()

    routes = [
        Route("/views/{view}/{key:path}", get_document, methods=["GET"]),
        Route("/views/{view}", list_keys, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        HTTPException: on_http_error,
        UnknownView: on_unknown_view,
        QueryError: on_query_error,
        Exception: on_crash,
    })
    app.router.redirect_slashes = False  # a redirect would be built from the Host header
    app.add_middleware(Guard, max_request_bytes=config.http.max_request_bytes,
                       token=config.http.token.get_secret_value())
    app.state.views = views
    return app


def list_query(query) -> tuple[int, str | None]:
    """``(limit, cursor)`` of a key listing from its query parameters, strictly: raises
    :class:`QueryError` (400) for an unknown or repeated parameter or a malformed value."""
    for name in query:
        if name not in LIST_PARAMS:
            raise QueryError(f"unknown query parameter {name[:64]!r} (known: limit, cursor)")
        if len(query.getlist(name)) > 1:
            raise QueryError(f"query parameter {name!r} given more than once")
    raw = query.get("limit")
    limit = DEFAULT_LIST_LIMIT if raw is None else (
        int(raw) if LIMIT_RE.fullmatch(raw) else 0)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise QueryError(f"limit must be an integer 1..{MAX_LIST_LIMIT}")
    cursor = query.get("cursor") or None
    if cursor is not None and not CURSOR_RE.fullmatch(cursor):
        raise BadCursor("invalid cursor")
    return limit, cursor


def _slug(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def openapi_document(config: Config) -> dict:
    """The OpenAPI 3.1 description of the API (views listed as the enum of ``view``)."""
    err = {"$ref": "#/components/responses/Error"}
    view_param = {"name": "view", "in": "path", "required": True,
                  "schema": {"type": "string", "enum": list(config.views)}}
    secured = [{"bearer": []}] if config.http.token.get_secret_value() else []
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "aggregator read API", "version": _version(),
                 "description": "Read-only access to the view documents, served from the "
                                "LMDB shards."},
        "paths": {
            "/views/{view}/{key}": {"get": {
                "summary": "One view document",
                "operationId": "getDocument",
                "parameters": [view_param, {"name": "key", "in": "path", "required": True,
                                            "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "The document",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Document"}}}},
                    "404": err, "401": err},
            }},
            "/views/{view}": {"get": {
                "summary": "Keys of a view, one page at a time",
                "description": "Order: shard, then slot, then key bytes: stable, not "
                               "alphabetical. Pass next_cursor back as cursor for the next "
                               "page; null means there is no more.",
                "operationId": "listKeys",
                "parameters": [
                    view_param,
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT,
                                "default": DEFAULT_LIST_LIMIT}},
                    {"name": "cursor", "in": "query", "required": False,
                     "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "A page of keys",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/KeyPage"}}}},
                    "400": err, "404": err, "401": err},
            }},
            "/healthz": {"get": {
                "summary": "Liveness", "operationId": "healthz", "security": [],
                "responses": {"200": {"description": "The server answers"}}}},
            "/readyz": {"get": {
                "summary": "Readiness: status fresh and lag within service.ready_max_lag",
                "operationId": "readyz", "security": [],
                "responses": {"200": {"description": "Ready"},
                              "503": {"description": "Not ready; reasons listed"}}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics", "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {
                "summary": "This document", "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
        "components": {
            "schemas": {
                "Document": {"type": "object", "required": [
                    "view", "key", "version", "document", "freshness"], "properties": {
                    "view": {"type": "string"},
                    "key": {"type": "string"},
                    "version": {"type": "integer",
                                "description": "Number of updates applied to the document"},
                    "document": {"type": "object"},
                    "freshness": {
                        "type": "object",
                        "description": "Per CloudEvents source: the last applied event's "
                                       "sequence and time",
                        "additionalProperties": {"type": "object", "properties": {
                            "sequence": {"type": ["integer", "null"]},
                            "time": {"type": ["string", "null"]}}}},
                }},
                "KeyPage": {"type": "object", "required": ["view", "keys", "next_cursor"],
                            "properties": {
                                "view": {"type": "string"},
                                "keys": {"type": "array", "items": {"type": "string"}},
                                "next_cursor": {"type": ["string", "null"]}}},
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string"}, "message": {"type": "string"}}},
            },
            "responses": {"Error": {"description": "An error", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": secured,
    }
    return doc


def _version() -> str:
    from . import __version__

    return __version__


# ---- running it ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling: SIGTERM stops it gracefully; SIGINT too,
    unless it is ignored (as a child of the supervisor, which coordinates shutdown)."""

    def __init__(self, config: uvicorn.Config, handle_sigint: bool):
        super().__init__(config)
        self.handle_sigint = handle_sigint

    @contextlib.contextmanager
    def capture_signals(self):
        def stop(signum, frame):
            self.should_exit = True

        old = {signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
        old[signal.SIGINT] = signal.signal(
            signal.SIGINT, stop if self.handle_sigint else signal.SIG_IGN)
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def serve(config: Config, *, handle_sigint: bool = True, _report=None) -> int:
    """Run the HTTP API in this process until SIGTERM (or SIGINT); returns 0, or
    ``BIND_FAILED_EXIT`` when it cannot listen on ``http.host:http.port``."""
    http = config.http
    try:
        sock = bind(http.host, http.port)
    except OSError as e:
        msg = f"HTTP API cannot listen on {http.host}:{http.port}: {e.strerror or e}"
        log.error("%s", msg)
        if _report is not None:
            _report.send(("error", msg))
        return BIND_FAILED_EXIT
    host, port = sock.getsockname()[:2]
    log.info("HTTP API listening on http://%s:%d (%s)", _url_host(host), port,
             "bearer token required" if http.token.get_secret_value() else "no token")
    _raise_fd_limit(2 * http.max_connections + FD_SLACK)
    if _report is not None:
        _report.send(("ok", port))
    limits = ConnectionLimits(http.max_connections, http.max_connections_per_client)
    server = _Server(uvicorn.Config(
        create_app(config),
        loop="uvloop",
        http=protocol_factory(limits, head_timeout_s=http.head_timeout_ms / 1000,
                              max_head_bytes=MAX_HEAD_BYTES),
        ws="none",  # an upgrade would hand the connection to a protocol that is not bounded
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        limit_concurrency=None,  # it answers 503 to /healthz too; connections.py bounds
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    ), handle_sigint)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    log.info("HTTP API stopped")
    return 0


def _raise_fd_limit(want: int) -> None:
    """Raise this process's soft limit of open files to ``want`` (at most the hard limit):
    every connection holds a descriptor, also those served /healthz only over
    ``http.max_connections``. Beyond the limit, connections are closed at accept (libuv)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open files limit is %d, below the %d that 2 x http.max_connections "
                        "need: connections beyond it are closed at accept, /healthz too "
                        "(raise LimitNOFILE or ulimit -n)", new, want)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_main(config: Config, log_level: int, report, log_format: str = "text") -> None:
    """Entry point of the server process (spawned by :func:`start_server_process`)."""
    set_parent_death_signal(signal.SIGTERM)  # a graceful stop when the supervisor dies
    logs.setup(log_level, log_format, "http")
    logging.getLogger("uvicorn.error").setLevel(max(log_level, logging.WARNING))
    try:
        code = serve(config, handle_sigint=False, _report=report)
    except Exception as e:  # noqa: BLE001 - report any start failure to the parent
        log.exception("HTTP API failed")
        try:
            report.send(("error", f"HTTP API failed: {e}"))
        except OSError:
            pass
        code = 1
    finally:
        report.close()
    raise SystemExit(code)


def start_server_process(config: Config, *, log_level: int = logging.INFO, log_format: str = "text",
                         timeout: float = START_TIMEOUT_S) -> multiprocessing.Process | None:
    """Spawn the HTTP API as a child process and wait until it listens.

    Returns the process (stop it with ``terminate()`` then ``join()``: SIGTERM is a graceful
    stop), or None when ``http.enabled`` is false. Raises :class:`ServerStartError` when the
    child cannot listen (port taken...) or does not report within ``timeout`` seconds.
    The child ignores SIGINT and gets SIGTERM if its parent dies.
    """
    if not config.http.enabled:
        log.info("HTTP API disabled (http.enabled = false)")
        return None
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_server_main, name="aggregator-http",
                       args=(config, log_level, theirs, log_format), daemon=False)
    proc.start()
    theirs.close()
    try:
        if not ours.poll(timeout):
            proc.kill()
            proc.join(5)
            raise ServerStartError(f"HTTP API did not start within {timeout:g} s")
        try:
            kind, detail = ours.recv()
        except EOFError:
            proc.join(5)
            raise ServerStartError(f"HTTP API process exited with code {proc.exitcode} "
                                   "before it listened") from None
    finally:
        ours.close()
    if kind != "ok":
        proc.join(5)
        raise ServerStartError(detail)
    proc.port = detail  # the bound port (http.port may be 0: any free port)
    return proc
