"""Preemption signals: SIGTERM and the clouds' preemption notices, folded into one flag that training polls.

:class:`PreemptionWatch` sets its :attr:`~PreemptionWatch.event` when the process receives SIGTERM or a metadata
poller sees a notice:

- AWS: IMDSv2 ``/latest/meta-data/spot/instance-action`` (token from ``PUT /latest/api/token``); 404 means none.
- GCE: ``/computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``; ``TRUE`` means preempted.
- Azure: Scheduled Events ``/metadata/scheduledevents`` with ``Metadata: true``; an event of type ``Preempt``.

Pollers run on daemon threads with short timeouts, so they never slow training. They talk to the metadata server
directly, never through a proxy named by ``http_proxy``/``HTTP_PROXY`` (a proxy's answer could hide a notice, and
the IMDSv2 token must not leave the machine). The monotonic time of the notice is kept
(:attr:`PreemptionWatch.notice_time`)
so a deadline counts from the notice, not from when training got round to it. They are started only when asked
for, or with ``"auto"`` when the machine's DMI data (read from ``/sys``, no network) says it runs on that cloud.
Endpoints come from arguments or the environment — ``CLOUDCKPT_AWS_METADATA_URL`` (default
``http://169.254.169.254``), ``CLOUDCKPT_GCE_METADATA_URL`` (default ``http://$GCE_METADATA_HOST`` or
``http://metadata.google.internal``), ``CLOUDCKPT_AZURE_METADATA_URL`` (default ``http://169.254.169.254``) — and
``CLOUDCKPT_PREEMPTION`` overrides the sources (e.g. ``sigterm,gce`` or ``none``).

Example:
    >>> watch = PreemptionWatch(sources=["gce"], endpoints={"gce": "http://127.0.0.1:9"}, interval=0.1)
    >>> watch.start(); watch.stop()
    >>> watch.triggered
    False
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import ConfigurationError

log = logging.getLogger(__name__)

CLOUDS = ("aws", "gce", "azure")
SOURCES = ("sigterm", *CLOUDS)
DEFAULT_INTERVAL = {"aws": 5.0, "gce": 2.0, "azure": 5.0}
_DMI = Path("/sys/class/dmi/id")


def default_endpoint(cloud: str) -> str:
    if cloud == "aws":
        return os.environ.get("CLOUDCKPT_AWS_METADATA_URL", "http://169.254.169.254")
    if cloud == "gce":
        host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        return os.environ.get("CLOUDCKPT_GCE_METADATA_URL", f"http://{host}")
    if cloud == "azure":
        return os.environ.get("CLOUDCKPT_AZURE_METADATA_URL", "http://169.254.169.254")
    raise ConfigurationError(f"unknown cloud {cloud!r}; expected one of {CLOUDS}")


def _dmi(name: str, root: Path = _DMI) -> str:
    try:
        return (root / name).read_text().strip()
    except OSError:
        return ""


def detect_cloud(root: Path = _DMI) -> str | None:
    """The cloud this machine runs on according to its DMI data (local files only), or None."""
    vendor, product = _dmi("sys_vendor", root), _dmi("product_name", root)
    if "Google" in vendor or product == "Google Compute Engine":
        return "gce"
    if "Amazon" in vendor or _dmi("board_asset_tag", root).startswith("i-") or product.startswith("HVM domU"):
        return "aws"
    if vendor == "Microsoft Corporation" and _dmi("chassis_asset_tag", root) == "7783-7084-3265-9085":
        return "azure"
    return None


def resolve_sources(sources: str | Iterable[str] | bool | None) -> list[str]:
    """Turn the ``preemption=`` setting into a list of sources.

    ``"auto"`` (or True) means SIGTERM plus the detected cloud's poller; False/None/``"none"`` means nothing; a list or
    comma-separated string names them (``sigterm``, ``aws``, ``gce``, ``azure``). ``$CLOUDCKPT_PREEMPTION`` overrides
    ``"auto"``.
    """
    if sources is True:
        sources = "auto"
    if sources is None or sources is False:
        return []
    if isinstance(sources, str):
        if sources == "auto":
            sources = os.environ.get("CLOUDCKPT_PREEMPTION", "auto")
        if sources == "auto":
            cloud = detect_cloud()
            return ["sigterm"] + ([cloud] if cloud else [])
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    out = [s for s in sources if s != "none"]
    bad = [s for s in out if s not in SOURCES]
    if bad:
        raise ConfigurationError(f"unknown preemption source(s) {bad}; expected some of {SOURCES}, 'auto' or 'none'. "
                                 f"Received: preemption={sources!r}")
    return out


#: the metadata servers are link-local: never ask a proxy from the environment (``http_proxy``, ``HTTP_PROXY``...)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: Mapping[str, str], timeout: float, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=dict(headers), method=method)
    try:
        with _DIRECT.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(65536)
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def check_aws(base: str, timeout: float, state: dict[str, str]) -> str | None:
    """One IMDSv2 poll; a reason string when a spot interruption is scheduled."""
    if "token" not in state:
        status, body = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, timeout,
                            "PUT")
        if status != 200:
            return None
        state["token"] = body.decode()
    status, body = _get(f"{base}/latest/meta-data/spot/instance-action",
                        {"X-aws-ec2-metadata-token": state["token"]}, timeout)
    if status == 401:
        state.pop("token", None)
    if status != 200:
        return None
    try:
        action = json.loads(body).get("action", "terminate")
    except (ValueError, AttributeError):
        action = "terminate"
    return f"AWS spot instance-action: {action}"


def check_gce(base: str, timeout: float, state: dict[str, str]) -> str | None:
    """One GCE metadata poll; a reason string when the instance is being preempted."""
    status, body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}, timeout)
    if status == 200 and body.strip().upper() == b"TRUE":
        return "GCE instance/preempted: TRUE"
    return None


def check_azure(base: str, timeout: float, state: dict[str, str]) -> str | None:
    """One Azure Scheduled Events poll; a reason string when a Preempt event is scheduled."""
    status, body = _get(f"{base}/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"}, timeout)
    if status != 200:
        return None
    try:
        events = json.loads(body).get("Events", [])
    except (ValueError, AttributeError):
        return None
    if any(isinstance(e, dict) and e.get("EventType") == "Preempt" for e in events):
        return "Azure Scheduled Events: Preempt"
    return None


CHECKS = {"aws": check_aws, "gce": check_gce, "azure": check_azure}


class PreemptionWatch:
    """Watches for SIGTERM and cloud preemption notices; :attr:`event` is set when one arrives.

    Args:
        sources: which signals to watch — ``"auto"`` (SIGTERM + the detected cloud), a list/comma string of
            ``sigterm``/``aws``/``gce``/``azure``, or None for nothing. Default ``"auto"``.
        endpoints: metadata base URLs per cloud; default from the environment (see the module docstring).
        interval: seconds between polls; default 5 s for AWS and Azure, 2 s for GCE.
        timeout: seconds each metadata request may take. Default 1.
    """

    def __init__(self, sources: str | Iterable[str] | bool | None = "auto", *,
                 endpoints: Mapping[str, str] | None = None, interval: float | None = None,
                 timeout: float = 1.0) -> None:
        self.sources = resolve_sources(sources)
        self.endpoints = {c: (endpoints or {}).get(c) or default_endpoint(c) for c in self.sources if c in CLOUDS}
        self.interval = interval
        self.timeout = timeout
        self.event = threading.Event()
        self.reason: str | None = None
        self.notice_time: float | None = None  # time.monotonic() when the first notice arrived
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._previous_handler: object = None
        self._installed = False
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._sigterm_at: float | None = None  # when the first SIGTERM reached the process (its wakeup byte)

    @property
    def triggered(self) -> bool:
        return self.event.is_set()

    def trigger(self, reason: str, at: float | None = None) -> None:
        """Record the first notice (its reason and monotonic time ``at``, default now) and set :attr:`event`."""
        if not self.event.is_set():
            self.notice_time = at if at is not None else time.monotonic()
            self.reason = reason
            log.warning("preemption notice: %s; checkpointing at the next batch boundary", reason)
        self.event.set()

    def start(self) -> None:
        """Install the SIGTERM handler (main thread only) and start the pollers."""
        if "sigterm" in self.sources:
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
                self._installed = True
                self._time_signals()
            else:
                log.warning("not on the main thread: SIGTERM is not watched (signal handlers need the main thread)")
        for cloud, base in self.endpoints.items():
            t = threading.Thread(target=self._poll, args=(cloud, base.rstrip("/")), name=f"cloudckpt-{cloud}-notice",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Restore the previous SIGTERM handler and stop the pollers."""
        self._stop.set()
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)  # type: ignore[arg-type]
            self._installed = False
        if self._wakeup is not None:
            try:
                signal.set_wakeup_fd(-1)
                self._wakeup[1].close()  # the reader sees EOF and ends
            except ValueError:  # not the main thread: the fd stays registered, so the pair stays open
                self._threads = [t for t in self._threads if t.name != "cloudckpt-sigterm-time"]
                self._wakeup = None
        for t in self._threads:
            t.join(timeout=self.timeout + 1)
        self._threads.clear()
        if self._wakeup is not None:
            self._wakeup[0].close()
            self._wakeup = None

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.event.is_set() and self._installed:  # a second SIGTERM: stop waiting, act as before we came
            log.warning("second SIGTERM: restoring the previous handler and re-raising it")
            signal.signal(signal.SIGTERM, self._previous_handler)  # type: ignore[arg-type]
            self._installed = False
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.trigger("SIGTERM", at=self._sigterm_at)

    def _time_signals(self) -> None:
        """Python runs a signal handler only when the main thread is back in the interpreter, which a long native
        training step delays by seconds. The interpreter's C handler writes each signal's number to the wakeup fd
        at once: a thread reading it records when SIGTERM really arrived. Skipped if another wakeup fd (an asyncio
        loop's) is in place."""
        try:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (OSError, ValueError):
            return
        if old != -1:
            signal.set_wakeup_fd(old)
            reader.close()
            writer.close()
            return
        self._wakeup = (reader, writer)
        t = threading.Thread(target=self._read_signals, args=(reader,), name="cloudckpt-sigterm-time", daemon=True)
        t.start()
        self._threads.append(t)

    def _read_signals(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if int(signal.SIGTERM) in data and self._sigterm_at is None:
                self._sigterm_at = time.monotonic()

    def _poll(self, cloud: str, base: str) -> None:
        check, state = CHECKS[cloud], dict[str, str]()
        interval = self.interval if self.interval is not None else DEFAULT_INTERVAL[cloud]
        failures = 0
        while not self._stop.is_set() and not self.event.is_set():
            try:
                reason = check(base, self.timeout, state)
                failures = 0
            except OSError as exc:  # unreachable metadata server: keep trying, quietly
                failures += 1
                if failures == 3:
                    log.warning("%s metadata server at %s does not answer (%s); still polling", cloud, base, exc)
                reason = None
            if reason:
                self.trigger(reason)
                return
            self._stop.wait(interval)


def exit_at_deadline(notice: float, deadline: float, what: str, status: int = 143) -> threading.Timer:
    """A started daemon timer that logs that ``what`` was NOT committed and ends the process with ``status``
    (``os._exit``: a hung collective or upload can't hold it) ``deadline`` seconds after ``notice`` (a
    ``time.monotonic()``; at least 1 s from now). Cancel it once the commit's outcome is known."""
    def give_up() -> None:
        log.error("preemption: %s was NOT committed within %gs of the notice; exiting", what, deadline)
        logging.shutdown()
        os._exit(status)

    timer = threading.Timer(max(deadline - (time.monotonic() - notice), 1.0), give_up)
    timer.daemon = True
    timer.start()
    return timer
