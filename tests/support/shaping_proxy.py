"""A network that behaves like a cloud's, for tests and the bench: an HTTP/1.1 proxy in front of a local server
(moto, fake-gcs-server, Azurite) that caps each connection's bandwidth, delays every answer's first byte, and can
stall or reset a connection in the middle of an answer. It counts requests and bytes, so a test can assert what
was fetched.

It runs an asyncio loop in its own thread. Requests are parsed (a keep-alive connection carries many), their bodies
streamed upstream at the capped rate; an ``Expect: 100-continue`` is answered by the proxy itself and not forwarded
(NOTES.md: a buffered body with it left in made moto's objects empty). Answers are relayed as they come: the head
after ``latency`` seconds, the body at ``rate`` bytes per second per connection (Content-Length, chunked, or up to
EOF; a HEAD's Content-Length passes unchanged with no body).

Example:
    >>> with ShapingProxy("http://127.0.0.1:9000", rate=2e6, latency=0.03) as proxy:  # doctest: +SKIP
    ...     client = boto3.client("s3", endpoint_url=proxy.endpoint)
    ...     proxy.stats.body_bytes  # bytes of answer bodies sent to clients so far
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# The pacing step: a connection sends this much, then waits its turn (at 40 MB/s, every 1.6 ms). Each step costs
# the proxy's loop a wake-up, on the same two cores as the clients it times: relaying 100 x 10 MiB at 40 MB/s per
# connection took it 1.4 CPU-s (s5cmd's pull) and 2.1-2.5 CPU-s (ours) in 16 KiB steps, 1.05 and 1.75-1.85 in 64 KiB.
_BLOCK = 64 * 1024


@dataclass
class Request:
    """One request seen by the proxy, and what its answer carried."""

    method: str
    target: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0  # answer body bytes actually sent to the client
    cut: str = ""  # "reset" when the proxy broke the answer off

    @property
    def range(self) -> str | None:
        return self.headers.get("range") or self.headers.get("x-ms-range")


@dataclass
class Fault:
    """Break the answer of the next ``times`` requests that ``match``: after ``after`` body bytes, ``action`` is
    "reset" (the connection is closed at once) or "stall" (nothing is sent for ``seconds``, then it goes on)."""

    match: Callable[[Request], bool]
    after: int = 0
    action: str = "reset"
    seconds: float = 0.0
    times: int = 1
    fired: int = 0


@dataclass
class Stats:
    """Counters since the last :meth:`ShapingProxy.reset_stats`."""

    requests: list[Request] = field(default_factory=list)
    body_bytes: int = 0  # answer body bytes sent to clients
    sent_bytes: int = 0  # request body bytes forwarded upstream
    connections: int = 0

    def gets(self, contains: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and contains in r.target]


class ShapingProxy:
    """A shaping HTTP proxy to ``upstream`` (``http://host:port[/path]``); :attr:`endpoint` is the same URL with the
    proxy's host and port.

    Args:
        upstream: the real server's URL; its path (Azurite's ``/devstoreaccount1``) is kept in :attr:`endpoint`.
        rate: bytes per second per connection, each way (None: no cap).
        latency: seconds from a request's end to the first byte of its answer (time to first byte).
        port: the port to listen on (0: a free one).
    """

    def __init__(self, upstream: str, *, rate: float | None = None, latency: float = 0.0, port: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self._path = parts.path.rstrip("/")
        self.rate, self.latency, self._port = rate, latency, port
        self.stats = Stats()
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # --- control (any thread) ------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}{self._path}"

    def start(self) -> ShapingProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", self._port, limit=2**20)
            self._port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            assert self._loop is not None
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="shaping-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the shaping proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:  # a stalled answer, a relay waiting on a socket: ended here, not collected later
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_stats(self) -> Stats:
        """Start counting afresh; return the counters so far."""
        with self._lock:
            old, self.stats = self.stats, Stats()
        return old

    def shape(self, *, rate: float | None = None, latency: float | None = None) -> None:
        """Change the cap and the latency for connections' next bytes."""
        self.rate = rate
        if latency is not None:
            self.latency = latency

    def add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    # --- the relay (the proxy's loop) ----------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with self._lock:
            self.stats.connections += 1
        up_reader: asyncio.StreamReader | None = None
        up_writer: asyncio.StreamWriter | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target, version, headers, lines = _parse_head(head)
                req = Request(method, target, headers)
                with self._lock:
                    self.stats.requests.append(req)
                    stats = self.stats
                # a fresh upstream connection per request: a server closes an idle keep-alive connection when it
                # likes (Azurite after ~5 s), and a request sent on it would come back as a reset the client never
                # caused. The client's own connection stays kept alive, as a cloud's would.
                if up_writer is not None:
                    up_writer.transport.abort()
                up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port,
                                                                     limit=2**20)
                if headers.get("expect", "").lower() == "100-continue":
                    lines = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                up_writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
                await self._relay_body(reader, up_writer, headers, stats, upload=True)
                await up_writer.drain()
                keep = await self._answer(up_reader, writer, req, stats)
                if not keep or headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, _Reset, asyncio.CancelledError):
            return  # (cancelled: the proxy is stopping)
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            if up_writer is not None:
                up_writer.transport.abort()

    async def _answer(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, req: Request,
                      stats: Stats) -> bool:
        """Relay one answer (interim 1xx answers first); False when the connection must close after it."""
        started = time.monotonic()
        while True:
            head = await up.readuntil(b"\r\n\r\n")
            _, status_text, _, headers, _ = _parse_head(head)
            status = int(status_text)
            if status >= 200 or status == 101:
                break
            if req.headers.get("expect", "").lower() != "100-continue":
                writer.write(head)  # an interim answer the client asked for
        req.status = status
        wait = self.latency - (time.monotonic() - started)
        if wait > 0:
            await asyncio.sleep(wait)
        writer.write(head)
        await writer.drain()
        if req.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return True
        fault = self._fault_for(req)
        await self._relay_body(up, writer, headers, stats, req=req, fault=fault)
        return "content-length" in headers or headers.get("transfer-encoding", "").lower() == "chunked"

    def _fault_for(self, req: Request) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.fired < f.times and f.match(req):
                    f.fired += 1
                    return f
        return None

    async def _relay_body(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, headers: dict[str, str],
                          stats: Stats, *, upload: bool = False, req: Request | None = None,
                          fault: Fault | None = None) -> None:
        """Copy one message body from ``src`` to ``dst`` at the capped rate."""
        pacer = _Pacer(self)
        sent = 0
        fired = False

        async def send(data: bytes) -> None:
            nonlocal sent, fired
            view = memoryview(data)
            for i in range(0, len(view), _BLOCK):
                block = view[i:i + _BLOCK]
                if fault is not None and sent + len(block) > fault.after and not fired:
                    cut = max(0, fault.after - sent)
                    if cut:
                        self._count(stats, req, cut, upload)
                        dst.write(block[:cut])
                        await dst.drain()
                        sent += cut
                        block = block[cut:]
                    fired = True
                    if fault.action == "reset":
                        if req is not None:
                            req.cut = "reset"
                        raise _Reset()
                    await asyncio.sleep(fault.seconds)
                await pacer.wait(len(block))
                self._count(stats, req, len(block), upload)  # counted before the client can see it
                dst.write(block)
                await dst.drain()
                sent += len(block)

        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await src.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                dst.write(size_line)
                if size == 0:
                    while (trailer := await src.readuntil(b"\r\n")) != b"\r\n":
                        dst.write(trailer)
                    dst.write(b"\r\n")
                    await dst.drain()
                    return
                await send(await src.readexactly(size))
                dst.write(await src.readexactly(2))
            return
        if "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                data = await src.read(min(left, 256 * 1024))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                await send(data)
            return
        if upload:
            return  # a request without a length has no body
        while data := await src.read(256 * 1024):  # an answer that ends at EOF
            await send(data)

    def _count(self, stats: Stats, req: Request | None, n: int, upload: bool) -> None:
        with self._lock:
            if upload:
                stats.sent_bytes += n
            else:
                stats.body_bytes += n
                if req is not None:
                    req.body_bytes += n


class _Reset(Exception):
    pass


class _Pacer:
    """Sends at most ``proxy.rate`` bytes per second (read at each block, so :meth:`ShapingProxy.shape` applies at
    once)."""

    def __init__(self, proxy: ShapingProxy) -> None:
        self._proxy = proxy
        self._t0 = time.monotonic()
        self._sent = 0

    async def wait(self, n: int) -> None:
        rate = self._proxy.rate
        if rate:
            due = self._t0 + self._sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            self._t0, self._sent = time.monotonic(), 0
        self._sent += n


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], list[bytes]]:
    """A request or status line and its headers: ``(first, second, third word, {lower name: value}, raw lines)``."""
    lines = head[:-4].split(b"\r\n")
    first = lines[0].decode("latin-1").split(" ", 2)
    first += [""] * (3 - len(first))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return first[0], first[1], first[2], headers, lines
