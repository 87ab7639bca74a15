"""The shaping proxy in a process of its own, for timing clients through it.

In a thread, the proxy shares the timed client's interpreter lock: a Python client's threads (a pull's ranges, their
hashing) then slow the network it is timed on, while a client in a process of its own (s5cmd, the aws CLI) never
does. A real network is outside every client's process; so is this one. It counts what :class:`ShapingProxy` counts,
without the per-request list (faults and per-request checks are the in-thread proxy's, which tests use).

The child is a plain ``python`` process driven by one line per command on its stdin (``stats``, ``reset``,
``stop``), answering one JSON line each: no multiprocessing, so the caller's main module is never imported again.

Example:
    >>> with ShapingProxyProcess("http://127.0.0.1:9000", rate=40e6, latency=0.03) as proxy:  # doctest: +SKIP
    ...     proxy.reset_stats(); run_a_client(proxy.endpoint); proxy.stats.body_bytes
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

from .shaping_proxy import Stats

_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from shaping_proxy import ShapingProxy
upstream, rate, latency, port = sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
proxy = ShapingProxy(upstream, rate=rate, latency=latency, port=port).start()
print(json.dumps(proxy.endpoint), flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "stats":
        s = proxy.stats
        print(json.dumps([s.body_bytes, s.sent_bytes, s.connections]), flush=True)
    elif command == "reset":
        proxy.reset_stats()
        print("null", flush=True)
    else:
        break
proxy.stop()
print("null", flush=True)
"""


class ShapingProxyProcess:
    """:class:`ShapingProxy`'s network (``rate``, ``latency``) served from a process of its own; :attr:`stats` and
    :meth:`reset_stats` ask it for its counters."""

    def __init__(self, upstream: str, *, rate: float | None = None, latency: float = 0.0, port: int = 0) -> None:
        self._argv = [sys.executable, "-c", _CHILD, str(Path(__file__).parent), upstream, json.dumps(rate),
                      str(latency), str(port)]
        self._proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self) -> ShapingProxyProcess:
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint = self._answer(60, "start")
        return self

    def _answer(self, timeout: float, command: str):  # noqa: ANN202 - JSON
        assert self._proc is not None and self._proc.stdout is not None, "start() first"
        if not select.select([self._proc.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"the shaping proxy's process did not answer {command!r} within {timeout}s")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the shaping proxy's process ended (exit {self._proc.wait()}) on {command!r}")
        return json.loads(line)

    def _ask(self, command: str):  # noqa: ANN202 - JSON
        assert self._proc is not None and self._proc.stdin is not None, "start() first"
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._answer(30, command)

    @property
    def stats(self) -> Stats:
        body, sent, connections = self._ask("stats")
        return Stats(body_bytes=body, sent_bytes=sent, connections=connections)

    def reset_stats(self) -> None:
        self._ask("reset")

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.poll() is None:
                self._ask("stop")
            self._proc.wait(10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            self._proc = None

    def __enter__(self) -> ShapingProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
