"""A counting proxy in front of a test server whose answers can be slowed to a per-connection rate: the requests and
the bytes a pull really fetched, and transfers still in flight when a test interrupts them.

It is :class:`reliability.faultproxy.FaultProxy` (requests counted per ``(method, path)``) whose answers are written
to the client in 64 KiB slices at ``rate`` bytes per second (None: at once).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

from reliability.faultproxy import FaultProxy

SLICE = 64 * 1024


class _Slow:
    """A client socket whose ``sendall`` keeps to the proxy's current rate."""

    def __init__(self, sock: socket.socket, proxy: ShapedProxy) -> None:
        self._sock = sock
        self._proxy = proxy

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), SLICE):
            self._sock.sendall(view[i:i + SLICE])
            rate = self._proxy.rate
            if rate:
                time.sleep(len(view[i:i + SLICE]) / rate)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class ShapedProxy(FaultProxy):
    """Counts GETs and the body bytes answered per object name (the last path component), at ``rate``."""

    def __init__(self, upstream: str, *, rate: float | None = None, **kwargs) -> None:
        self.rate = rate
        self.got: Counter = Counter()  # object name -> GETs answered
        self.got_bytes: Counter = Counter()  # object name -> body bytes of those answers
        self._count_lock = threading.Lock()
        user = kwargs.pop("on_response", None)

        self.answered: Counter = Counter()  # (method, object name) -> answers passed on

        def on_response(method: str, target: str, head: bytes, body: bytes):
            name = unquote(urlsplit(target).path).rsplit("/", 1)[-1]
            with self._count_lock:
                self.answered[(method, name)] += 1
                if method == "GET":
                    self.got[name] += 1
                    self.got_bytes[name] += len(body)
            return user(method, target, head, body) if user is not None else (head, body)

        super().__init__(upstream, on_response=on_response, **kwargs)

    def _serve(self, client: socket.socket) -> None:
        super()._serve(_Slow(client, self))  # type: ignore[arg-type]

    def data_gets(self, *names: str) -> int:
        with self._count_lock:
            return sum(self.got[n] for n in names)

    def data_bytes(self, *names: str) -> int:
        with self._count_lock:
            return sum(self.got_bytes[n] for n in names)


@contextlib.contextmanager
def proxied_run(endpoint: str, url: str, kind: str = "s3") -> Iterator[tuple[str, ShapedProxy, dict]]:
    """``(url, proxy, env)``: the run, a proxy in front of the ``kind`` server (s3, gcs, az) at ``endpoint``, and
    the environment that sends a CLI process through it."""
    from support import servers

    upstream = endpoint.rsplit("/", 1)[0] if kind == "az" else endpoint
    with ShapedProxy(upstream) as proxy:
        env = dict(os.environ)
        env.pop("CLOUDCKPT_DEBUG", None)
        if kind == "s3":
            env.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        elif kind == "gcs":
            env.update(STORAGE_EMULATOR_HOST=proxy.endpoint)
        else:
            env.update(AZURE_STORAGE_CONNECTION_STRING=servers.azure_connection_string(
                f"{proxy.endpoint}/{servers.AZURITE_ACCOUNT}"))
        yield url, proxy, env
