"""The HTTP API's connection handling, over real sockets against the real server process
(``start_server_process``): slow and idle clients, connection floods, the request-head size
limit, hostile query strings, no redirects, the token-free probes, ``http.token_file``."""

from __future__ import annotations

import random
import resource
import socket
import time
import urllib.parse

import pytest

from aggregator.config import load_config
from aggregator.server import MAX_HEAD_BYTES, start_server_process

from .support.viewdata import record, write_docs

TOKEN = "s3cret-token"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
FLOOD = 2000
HEAD_TIMEOUT_MS = 1500


def config(data_dir, **http):
    overrides = {"service.data_dir": str(data_dir), "service.workers": 2, "http.port": 0}
    overrides.update({f"http.{k}": v for k, v in http.items()})
    return load_config(None, overrides, env={})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sockets") / "data"
    write_docs(d, 2, {("customer", f"c{i}"): record({"name": f"n{i}"}, i + 1)
                      for i in range(5)})
    return d


def serve(data_dir, **http):
    """The server process on any free port; stop it with ``proc.terminate()``."""
    return start_server_process(config(data_dir, **http))


@pytest.fixture(scope="module")
def server(data_dir):
    """A token, a short request deadline and bounds small enough to cross in a test."""
    proc = serve(data_dir, token=TOKEN, head_timeout_ms=HEAD_TIMEOUT_MS,
                 max_connections=300, max_connections_per_client=100)
    yield proc.port
    proc.terminate()
    proc.join(10)
    assert proc.exitcode == 0


def exchange(port: int, raw: bytes, *, src: str = "127.0.0.1", timeout: float = 5.0
             ) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` in one segment; read until the server closes. (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(src, 0)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(raw)
        data = read_to_close(s)
    return parse(data)


def read_to_close(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0] else 0
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return status, {k.lower(): v for k, v in headers.items()}, body


def get(port: int, target: str, headers: str = AUTH, **kw) -> tuple[int, dict, bytes]:
    raw = f"GET {target} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n"
    return exchange(port, raw.encode("latin-1"), **kw)


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def half_open(port: int, sources: list[str], n: int) -> list[socket.socket]:
    """``n`` connections, spread over ``sources``, each with a request head begun and never
    finished."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5,
                                     source_address=(sources[i % len(sources)], 0))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        socks.append(s)
    return socks


def answered(socks: list[socket.socket], wait: float) -> tuple[int, int, int]:
    """(still open and unanswered, closed with a 503, closed otherwise) after ``wait`` s."""
    time.sleep(wait)
    held = refused = other = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(65536)
        except BlockingIOError:
            held += 1
            continue
        except ConnectionResetError:
            data = b""
        if (data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
                and data.endswith(b'"error": "too_many_connections", "message": "too many open '
                                  b'connections from your address"}')):
            refused += 1
        else:
            other += 1
    return held, refused, other


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# ---- bug 1: slow and idle clients, connection floods -----------------------------------


def test_idle_and_trickling_clients_are_cut_at_the_request_deadline(server):
    idle = socket.create_connection(("127.0.0.1", server), timeout=10)
    slow = socket.create_connection(("127.0.0.1", server), timeout=10)
    t0 = time.monotonic()
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    answer = b""
    for byte in b"Host: t\r\nX-Slow: " + b"x" * 1000:  # one header byte every 50 ms
        try:
            slow.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.05)
        if time.monotonic() - t0 > HEAD_TIMEOUT_MS / 1000 + 2:
            break
    answer = read_to_close(slow)
    slow_closed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert parse(answer)[2] == (b'{"error": "request_timeout", "message": "the request was not '
                                b'received in time"}')
    assert read_to_close(idle) == b""  # closed without a word: nothing was asked
    idle_closed = time.monotonic() - t0
    for closed in (slow_closed, idle_closed):
        assert HEAD_TIMEOUT_MS / 1000 - 0.1 < closed < HEAD_TIMEOUT_MS / 1000 + 1.5
    idle.close()
    slow.close()
    # a keep-alive connection gets the same deadline for its next request
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(40):  # trickle for up to 4 s
            try:
                s.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        assert parse(read_to_close(s))[0] == 408
        assert time.monotonic() - t0 < HEAD_TIMEOUT_MS / 1000 + 1.5


def test_2000_half_open_connections_from_one_address(server):
    """One address holds at most max_connections_per_client; the rest get 503 at once;
    other clients are served meanwhile, and the held ones are cut at the deadline."""
    raise_fd_limit(FLOOD + 512)
    socks = half_open(server, ["127.0.0.2"], FLOOD)
    try:
        status, _, body = get(server, "/views/customer/c1", src="127.0.0.1", timeout=2)
        assert status == 200, body
        assert get(server, "/healthz", "", timeout=2)[0] == 200
        held, refused, other = answered(socks, 0.2)
        assert (held, refused, other) == (100, FLOOD - 100, 0)
        # the held ones get nothing more after the deadline than a close (and a 408)
        held, refused, other = answered(socks, HEAD_TIMEOUT_MS / 1000 + 0.5)
        assert held == 0
    finally:
        close_all(socks)


def test_2000_half_open_connections_from_many_addresses(server):
    """Over max_connections in total, /healthz is still answered, the rest gets 503; once
    the half-open ones are cut at the deadline, everything is served again."""
    raise_fd_limit(FLOOD + 512)
    sources = [f"127.0.0.{i}" for i in range(10, 30)]  # 20 addresses x 100
    socks = half_open(server, sources, FLOOD)
    try:
        t0 = time.monotonic()
        status, _, body = get(server, "/healthz", "", timeout=2)
        assert status == 200 and body == b'{"status":"ok"}'
        status, headers, body = get(server, "/views/customer/c1", timeout=2)
        assert status == 503 and b'"overloaded"' in body and headers["retry-after"] == "1"
        assert time.monotonic() - t0 < 1.0
        held, refused, other = answered(socks, HEAD_TIMEOUT_MS / 1000 + 0.5)
        assert held == 0
    finally:
        close_all(socks)
    assert get(server, "/views/customer/c1")[0] == 200


# ---- bug 6: request heads over 16 KiB -----------------------------------------------------


def test_request_heads_over_16_kib_get_400_however_they_arrive(server):
    big = f"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {'x' * 60_000}\r\n\r\n".encode()
    status, _, _ = exchange(server, big)  # one segment: parsed in one go
    assert status == 400
    head = "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Pad: ".encode()
    room = MAX_HEAD_BYTES - len(head) - 4
    assert exchange(server, head + b"x" * room + b"\r\n\r\n")[0] == 200  # exactly 16 KiB
    assert exchange(server, head + b"x" * (room + 1) + b"\r\n\r\n")[0] == 400
    # in small segments (h11's own bound on an incomplete head)
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ")
        for _ in range(30):
            try:
                s.sendall(b"x" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert parse(read_to_close(s))[0] == 400


def test_the_head_limit_is_per_request_not_per_segment(server):
    one = f"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {'x' * 5000}\r\n\r\n".encode()
    last = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
        s.sendall(one * 5 + last)  # 25 KB pipelined in one segment
        assert read_to_close(s).count(b"HTTP/1.1 200 OK") == 6


# ---- bug 2: query parameters ----------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "limit=%C2%B2", "limit=" + "9" * 5000, "limit=%D9%A1%D9%A2", "limit=%EF%BC%95",
    "limit=+5", "limit=-1", "limit=%205", "limit=5%20", "limit=1e3", "limit=0x10",
    "limit=", "limit=0", "limit=1001", "limit=00000005", "limit=5&limit=6", "limt=5",
    "cursor=%FF%FE", "cursor=" + "A" * 5000, "cursor=a+b", "cursor=AAAA", "cursor=%00",
    "cursor=" + "_" * 40, "limit=5&cursor=kwIBxA", "%FF=1",
])
def test_query_parameters_are_parsed_strictly(server, query):
    status, _, body = get(server, f"/views/customer?{query}")
    assert status == 400, body
    assert b'"bad_request"' in body or b'"bad_cursor"' in body


def test_no_query_string_reaches_a_500(server):
    rng = random.Random(11)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\x00", "\xff", "²", "٣", "\u202e", "é"]
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
        f = s.makefile("rb")
        for _ in range(300):
            name = rng.choice(["limit", "cursor", "x"])
            value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            target = (f"/views/customer?{name}=" + urllib.parse.quote(value, safe="")
                      if rng.random() < 0.8 else "/views/customer/" + urllib.parse.quote(value))
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n{AUTH}\r\n".encode())
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
            assert status in (200, 400, 404), target
    assert get(server, "/views/customer?limit=0005")[0] == 200  # leading zeros: 1-4 digits


# ---- no redirects ---------------------------------------------------------------------------


def test_a_trailing_slash_is_404_not_a_redirect_to_the_host_header(server):
    for target in ("/healthz/", "/metrics/", "/views/customer/c1/", "/readyz/"):
        raw = (f"GET {target} HTTP/1.1\r\nHost: evil.example\r\n{AUTH}"
               "Connection: close\r\n\r\n").encode()
        status, headers, _ = exchange(server, raw)
        assert status == 404, target
        assert "location" not in headers


# ---- the probes and the token -------------------------------------------------------------


def test_probes_need_no_token_and_readyz_always_has_status_age(server):
    status, _, body = get(server, "/readyz", "")  # no status file: not running
    assert status == 503
    assert b'"status_age_s":null' in body and b"no status file" in body
    assert get(server, "/healthz", "")[0] == 200
    assert get(server, "/metrics", "")[0] == 401
    assert get(server, "/views/customer/c1", "")[0] == 401


def test_token_file(data_dir, tmp_path):
    path = tmp_path / "http-token"
    path.write_text("from-a-file\n")  # as `echo ... >`, systemd-creds and secrets write it
    proc = serve(data_dir, token_file=str(path))
    try:
        ok = "Authorization: Bearer from-a-file\r\n"
        assert get(proc.port, "/views/customer/c1", ok)[0] == 200
        assert get(proc.port, "/views/customer/c1", "")[0] == 401
    finally:
        proc.terminate()
        proc.join(10)
