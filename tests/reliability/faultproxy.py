"""A fault-injecting HTTP proxy for tests: sits on 127.0.0.1 in front of an S3 or GCS test server and, at
configurable rates, answers 500 / 503 SlowDown / 429 itself, resets the connection, drops the answer after the
server did the work, stalls past the client's timeout, or truncates the answer's body. With ``strip_conditions`` it
plays a store that ignores conditional writes: it removes ``If-Match`` / ``If-None-Match`` headers (S3) and the
``ifGenerationMatch``-style query parameters (GCS) from every request before forwarding it.

It forwards bytes unchanged (requests and answers, chunked or not), one upstream connection per client connection,
and counts every request per ``(method, path)`` so tests can bound the attempts of each logical operation.

Example:
    >>> proxy = FaultProxy("http://127.0.0.1:5000", rates={"503": 0.1, "reset": 0.1}).start()  # doctest: +SKIP
    >>> os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint  # doctest: +SKIP
"""

from __future__ import annotations

import random
import re
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from urllib.parse import parse_qsl, urlencode, urlsplit

_CONDITION_HEADERS = (b"if-match:", b"if-none-match:")
_CONDITION_PARAMS = {"ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch"}

KINDS = ("500", "503", "429", "reset", "drop_after", "stall", "truncate")

_S3_BODIES = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "429": (429, "Too Many Requests", "TooManyRequests", "Too many requests."),
}


class _Closed(Exception):
    pass


def _read_line(f) -> bytes:
    line = f.readline(65537)
    if not line:
        raise _Closed
    return line


def _read_head(f) -> tuple[bytes, list[tuple[str, str]], bytes]:
    """Start line, headers, and the raw head bytes."""
    raw = _read_line(f)
    start = raw
    headers = []
    while True:
        line = _read_line(f)
        raw += line
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return start, headers, raw


def _read_body(f, headers: list[tuple[str, str]], *, until_close: bool = False) -> bytes:
    h = dict(headers)
    if "chunked" in h.get("transfer-encoding", "").lower():
        raw = b""
        while True:
            size_line = _read_line(f)
            raw += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = _read_line(f)
                    raw += line
                    if line in (b"\r\n", b"\n"):
                        return raw
            raw += f.read(size + 2)
    if "content-length" in h:
        n = int(h["content-length"])
        data = f.read(n)
        if len(data) != n:
            raise _Closed
        return data
    return f.read() if until_close else b""


def _reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: the client sees 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class FaultProxy:
    """Forward to ``upstream`` (``http://host:port``), injecting faults at ``rates`` (kind -> probability).

    Args:
        upstream: the real server.
        rates: probability of each fault kind per request (see :data:`KINDS`); their sum must be <= 1.
        seed: random seed (the sequence of faults is reproducible for one request order).
        stall: seconds a stalled request hangs before the connection is closed (set it past the client timeout).
        fault_filter: only requests for which ``fault_filter(method, target)`` is true may be faulted (``target``:
            path and query).
        max_faults: stop injecting after this many faults (None: no limit).
        strip_conditions: remove the conditions of conditional requests (see the module docstring); ``stripped``
            counts the requests that lost one.
        on_request: ``on_request(method, target)`` is called once a request has been read, before it is forwarded
            (a test's event "mid-upload", e.g. rewriting the file being pushed when part 2 arrives).
        on_response: ``on_response(method, target, head, body) -> (head, body)`` may rewrite an answer (raw head
            bytes and the body as read) before it goes to the client.
        on_request_body: ``on_request_body(method, target, body) -> body`` may rewrite a request's body (as read,
            same length) before it is forwarded: bytes damaged in transit.
    """

    def __init__(self, upstream: str, *, rates: dict[str, float] | None = None, seed: int = 0, stall: float = 3.0,
                 fault_filter=None, max_faults: int | None = None, strip_conditions: bool = False,
                 on_request=None, on_response=None, on_request_body=None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rates = dict(rates or {})
        unknown = set(self.rates) - set(KINDS)
        if unknown or sum(self.rates.values()) > 1:
            raise ValueError(f"bad rates {self.rates}: kinds are {KINDS}, sum <= 1")
        self.stall = stall
        self.fault_filter = fault_filter
        self.max_faults = max_faults
        self.strip_conditions = strip_conditions
        self.stripped = 0
        self.on_request = on_request
        self.on_response = on_response
        self.on_request_body = on_request_body
        self._rnd = random.Random(seed)
        self._lock = threading.Lock()
        self.faults: Counter = Counter()  # kind -> injected
        self.requests: Counter = Counter()  # (method, path) -> attempts
        self.forwarded = 0
        self._server: socketserver.ThreadingTCPServer | None = None
        self._conns: set[socket.socket] = set()

    # --- control -----------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="faultproxy").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for s in list(self._conns):
                    _reset(s)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_rates(self, rates: dict[str, float]) -> None:
        with self._lock:
            self.rates = dict(rates)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- one client connection -------------------------------------------------------------------------------------

    def _pick(self, method: str, target: str, body: bytes = b"") -> str | None:
        with self._lock:
            self.requests[_operation(method, target, body)] += 1
            if self.fault_filter is not None and not self.fault_filter(method, target):
                return None
            if self.max_faults is not None and sum(self.faults.values()) >= self.max_faults:
                return None
            x = self._rnd.random()
            for kind, rate in self.rates.items():
                if x < rate:
                    self.faults[kind] += 1
                    return kind
                x -= rate
            return None

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        cfile = client.makefile("rb")
        with self._lock:
            self._conns.add(client)
        try:
            while True:
                start, headers, head = _read_head(cfile)
                if dict(headers).get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # answer it here; upstream never sees it
                    head = b"".join(line + b"\r\n" for line in head.split(b"\r\n")[:-1]
                                    if not line.lower().startswith(b"expect:"))
                body = _read_body(cfile, headers)
                if self.strip_conditions:
                    head = self._strip(head)
                    start = head.split(b"\r\n", 1)[0] + b"\r\n"
                method, target = start.decode("latin-1").split(" ")[:2]
                path = urlsplit(target).path
                kind = self._pick(method, target, body)
                if self.on_request is not None:
                    self.on_request(method, target)
                if self.on_request_body is not None:
                    body = self.on_request_body(method, target, body)
                if kind in _S3_BODIES:
                    client.sendall(self._error(kind, path))
                    continue
                if kind == "reset":
                    _reset(client)
                    return
                if kind == "stall":
                    time.sleep(self.stall)
                    _reset(client)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=120)
                    ufile = upstream.makefile("rb")
                upstream.sendall(head + body)
                rstart, rheaders, rhead = _read_head(ufile)
                while int(rstart.split()[1]) == 100:
                    rstart, rheaders, rhead = _read_head(ufile)
                status = int(rstart.split()[1])
                no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                h = dict(rheaders)
                close_delimited = not no_body and "content-length" not in h and "chunked" not in h.get(
                    "transfer-encoding", "").lower()
                rbody = b"" if no_body else _read_body(ufile, rheaders, until_close=close_delimited)
                with self._lock:
                    self.forwarded += 1
                if kind == "drop_after":
                    _reset(client)
                    return
                if kind == "truncate" and len(rbody) > 1:
                    client.sendall(rhead + rbody[: len(rbody) // 2])
                    _reset(client)
                    return
                if self.on_response is not None:
                    rhead, rbody = self.on_response(method, target, rhead, rbody)
                client.sendall(rhead + rbody)
                if close_delimited or h.get("connection", "").lower() == "close":
                    return
        except (_Closed, OSError, ValueError, IndexError):
            return
        finally:
            with self._lock:
                self._conns.discard(client)
            try:
                client.close()
            except OSError:
                pass
            if upstream is not None:
                upstream.close()

    def _strip(self, head: bytes) -> bytes:
        """The request head without its conditions: If-Match / If-None-Match headers, GCS precondition parameters."""
        lines = head.split(b"\r\n")
        method, target, version = lines[0].split(b" ", 2)
        parts = urlsplit(target.decode("latin-1"))
        params = parse_qsl(parts.query, keep_blank_values=True)
        kept = [(k, v) for k, v in params if k not in _CONDITION_PARAMS]
        if len(kept) != len(params):
            target = (parts.path + ("?" + urlencode(kept) if kept else "")).encode("latin-1")
        headers = [line for line in lines[1:] if not line.lower().startswith(_CONDITION_HEADERS)]
        if len(kept) != len(params) or len(headers) != len(lines) - 1:
            with self._lock:
                self.stripped += 1
        return b"\r\n".join([b" ".join((method, target, version)), *headers])

    @staticmethod
    def _error(kind: str, path: str) -> bytes:
        status, reason, code, message = _S3_BODIES[kind]
        if path.startswith(("/storage/", "/upload/", "/download/")) or path.startswith("/b/"):
            body = ('{"error": {"code": %d, "message": "%s", "errors": [{"reason": "%s"}]}}'  # noqa: UP031 (JSON braces)
                    % (status, message, code)).encode()
            ctype = "application/json"
        else:
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<RequestId>faultproxy</RequestId></Error>").encode()
            ctype = "application/xml"
        return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"x-amz-request-id: faultproxy\r\n\r\n").encode() + body


def _operation(method: str, target: str, body: bytes) -> tuple[str, str]:
    """What the attempts of one operation share: the method and the path, and the object's name where the path
    doesn't carry it (a GCS upload POSTs every object to ``/upload/storage/v1/b/<bucket>/o``, naming it in the
    query or in the JSON metadata part of a multipart body)."""
    parts = urlsplit(target)
    name = dict(parse_qsl(parts.query)).get("name")
    if name is None and method == "POST" and parts.path.startswith("/upload/"):
        found = re.search(rb'"name":\s*"([^"]*)"', body[:4096])
        name = found.group(1).decode("utf-8", "replace") if found else None
    return method, parts.path + (f"?name={name}" if name else "")
