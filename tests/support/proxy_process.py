"""The shaping proxy in a process of its own, for timing clients through it.

In a thread, the proxy shares the timed client's interpreter lock: a Python client's threads (a pull's ranges, their
hashing) then slow the network it is timed on, while a client in a process of its own (s5cmd, the aws CLI) never
does. A real network is outside every client's process; so is this one. It counts what :class:`ShapingProxy` counts,
without the per-request list (faults and per-request checks are the in-thread proxy's, which tests use).

Example:
    >>> with ShapingProxyProcess("http://127.0.0.1:9000", rate=40e6, latency=0.03) as proxy:  # doctest: +SKIP
    ...     proxy.reset_stats(); run_a_client(proxy.endpoint); proxy.stats.body_bytes
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection

from .shaping_proxy import ShapingProxy, Stats


def _serve(conn: Connection, upstream: str, rate: float | None, latency: float, port: int) -> None:
    proxy = ShapingProxy(upstream, rate=rate, latency=latency, port=port).start()
    conn.send(proxy.endpoint)
    while True:
        command = conn.recv()
        if command == "stats":
            s = proxy.stats
            conn.send((s.body_bytes, s.sent_bytes, s.connections))
        elif command == "reset":
            proxy.reset_stats()
            conn.send(None)
        else:  # "stop"
            proxy.stop()
            conn.send(None)
            return


class ShapingProxyProcess:
    """:class:`ShapingProxy`'s network (``rate``, ``latency``) served from a spawned process; :attr:`stats` and
    :meth:`reset_stats` ask it for its counters."""

    def __init__(self, upstream: str, *, rate: float | None = None, latency: float = 0.0, port: int = 0) -> None:
        self._args = (upstream, rate, latency, port)
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self.endpoint = ""

    def start(self) -> ShapingProxyProcess:
        ctx = multiprocessing.get_context("spawn")  # no copy of the caller's threads or locks
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, *self._args), name="shaping-proxy", daemon=True)
        self._proc.start()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the shaping proxy's process did not start")
        self.endpoint = self._conn.recv()
        return self

    def _ask(self, command: str) -> object:
        assert self._conn is not None, "start() first"
        self._conn.send(command)
        if not self._conn.poll(30):
            raise RuntimeError(f"the shaping proxy's process did not answer {command!r}")
        return self._conn.recv()

    @property
    def stats(self) -> Stats:
        body, sent, connections = self._ask("stats")  # type: ignore[misc]
        return Stats(body_bytes=body, sent_bytes=sent, connections=connections)

    def reset_stats(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.is_alive():
                self._ask("stop")
        finally:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._proc = None

    def __enter__(self) -> ShapingProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
