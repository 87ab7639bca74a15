"""Preemption signals: SIGTERM and the AWS/GCE/Azure metadata notices, served by a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cloudckpt.errors import ConfigurationError
from cloudckpt.preemption import PreemptionWatch, detect_cloud, resolve_sources


class Metadata:
    """A local metadata server speaking the three clouds' preemption endpoints; ``notice`` flips them on."""

    def __init__(self):
        self.notice = False
        self.token = "tok-1"
        self.requests: list[tuple[str, str, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=b""):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                owner.requests.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(200, owner.token.encode())
                self._send(400)

            def do_GET(self):
                owner.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != owner.token:
                        return self._send(401)
                    if owner.notice:
                        notice = {"action": "terminate", "time": "2026-01-01T00:00:00Z"}
                        return self._send(200, json.dumps(notice).encode())
                    return self._send(404)
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    return self._send(200, b"TRUE" if owner.notice else b"FALSE")
                if self.path.startswith("/metadata/scheduledevents"):
                    if self.headers.get("Metadata") != "true":
                        return self._send(400)
                    event = {"EventId": "1", "EventType": "Preempt", "ResourceType": "VirtualMachine"}
                    events = [event] if owner.notice else []
                    return self._send(200, json.dumps({"DocumentIncarnation": 1, "Events": events}).encode())
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata():
    m = Metadata()
    yield m
    m.close()


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("cloud,reason", [("aws", "AWS spot"), ("gce", "GCE instance/preempted"),
                                          ("azure", "Azure Scheduled Events: Preempt")])
def test_cloud_notice_triggers_only_when_announced(metadata, cloud, reason):
    watch = PreemptionWatch([cloud], endpoints={cloud: metadata.url}, interval=0.05, timeout=1)
    watch.start()
    try:
        assert wait_for(lambda: len(metadata.requests) >= 3)
        assert not watch.triggered, "no notice yet: nothing triggers"
        metadata.notice = True
        assert watch.event.wait(10)
        assert watch.reason.startswith(reason)
    finally:
        watch.stop()


def test_aws_uses_an_imdsv2_token_and_renews_it(metadata):
    watch = PreemptionWatch(["aws"], endpoints={"aws": metadata.url}, interval=0.05)
    watch.start()
    try:
        assert wait_for(lambda: sum(1 for r in metadata.requests if r[0] == "GET") >= 3)
        assert sum(1 for r in metadata.requests if r[0] == "PUT") == 1, "the token is fetched once and reused"
        metadata.token = "tok-2"  # expired: the next GET gets 401, the poller fetches a new token
        assert wait_for(lambda: any(r[2].get("x-aws-ec2-metadata-token") == "tok-2" for r in metadata.requests))
        metadata.notice = True
        assert watch.event.wait(10)
    finally:
        watch.stop()
    puts = [r for r in metadata.requests if r[0] == "PUT"]
    assert len(puts) == 2
    assert all(r[2].get("x-aws-ec2-metadata-token-ttl-seconds") for r in puts)


def test_unreachable_metadata_never_triggers_or_blocks():
    watch = PreemptionWatch(["gce", "aws", "azure"],
                            endpoints={c: "http://127.0.0.1:9" for c in ("gce", "aws", "azure")},
                            interval=0.05, timeout=0.2)
    t0 = time.monotonic()
    watch.start()
    time.sleep(0.3)
    watch.stop()
    assert not watch.triggered
    assert time.monotonic() - t0 < 5


def test_sigterm_sets_the_flag_and_stop_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch(["sigterm"])
    watch.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: watch.triggered, 5)
        assert watch.reason == "SIGTERM"
    finally:
        watch.stop()
    assert signal.getsignal(signal.SIGTERM) == before


def test_sources_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("CLOUDCKPT_PREEMPTION", raising=False)
    assert resolve_sources(None) == [] and resolve_sources("none") == []
    assert resolve_sources("sigterm,gce") == ["sigterm", "gce"]
    assert resolve_sources(["aws"]) == ["aws"]
    assert resolve_sources("auto")[0] == "sigterm"
    monkeypatch.setenv("CLOUDCKPT_PREEMPTION", "azure")
    assert resolve_sources("auto") == ["azure"]
    with pytest.raises(ConfigurationError, match="unknown preemption source"):
        resolve_sources("sigterm,ibm")


@pytest.mark.parametrize("files,cloud", [
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gce"),
    ({"sys_vendor": "Amazon EC2", "board_asset_tag": "i-0123456789abcdef0"}, "aws"),
    ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "7783-7084-3265-9085"}, "azure"),
    ({"sys_vendor": "QEMU", "product_name": "Standard PC"}, None),
    ({}, None),
])
def test_detect_cloud_from_dmi(tmp_path, files, cloud):
    for name, value in files.items():
        (tmp_path / name).write_text(value + "\n")
    assert detect_cloud(tmp_path) == cloud


def test_endpoints_come_from_the_environment(monkeypatch, metadata):
    monkeypatch.setenv("CLOUDCKPT_GCE_METADATA_URL", metadata.url)
    watch = PreemptionWatch(["gce"], interval=0.05)
    assert watch.endpoints == {"gce": metadata.url}
    metadata.notice = True
    watch.start()
    try:
        assert watch.event.wait(10)
    finally:
        watch.stop()


def test_a_second_sigterm_gets_the_previous_behaviour():
    seen = []
    before = signal.signal(signal.SIGTERM, lambda *a: seen.append("previous"))
    try:
        watch = PreemptionWatch(["sigterm"])
        watch.start()
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: watch.triggered, 5) and seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. fit() died and nothing polls the flag any more
        assert wait_for(lambda: seen == ["previous"], 5)
        watch.stop()
    finally:
        signal.signal(signal.SIGTERM, before)


class Proxy:
    """An HTTP proxy from the environment that answers every request with 200 and a body that reads as a notice
    (``TRUE``, an instance-action, a Preempt event) and records what it was asked: a poller must never talk to it."""

    BODY = json.dumps({"action": "terminate", "Events": [{"EventType": "Preempt"}]}).encode()

    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self):
                owner.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = b"TRUE" if "preempted" in self.path else Proxy.BODY
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("cloud", ["aws", "gce", "azure"])
def test_pollers_read_the_metadata_server_directly_whatever_http_proxy_says(metadata, monkeypatch, cloud):
    import urllib.request

    proxy = Proxy()
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.setattr(urllib.request, "_opener", None)  # as in a fresh process: urlopen reads the proxy env anew
    watch = PreemptionWatch([cloud], endpoints={cloud: metadata.url}, interval=0.05, timeout=1)
    watch.start()
    try:
        assert wait_for(lambda: len(metadata.requests) >= 3), f"the metadata server was never asked ({proxy.requests})"
        assert not watch.triggered, f"no notice was posted, yet it triggered: {watch.reason}"
        metadata.notice = True
        assert watch.event.wait(10)
    finally:
        watch.stop()
        proxy.close()
    assert proxy.requests == [], "the proxy saw metadata requests (and, for AWS, the IMDSv2 token)"


@pytest.mark.parametrize("slow,deadline", [(1.5, 8.0), (4.0, 1.5)])
def test_the_deadline_counts_from_the_notice_not_from_the_next_batch_boundary(metadata, tmp_path, caplog, slow,
                                                                               deadline):
    """A training step that goes on for ``slow`` seconds after a GCE notice: the commit is either inside the
    deadline counted from the notice, or the log says by how much it missed it."""
    keras = pytest.importorskip("keras")
    import re

    from support.keras_job import build_model, data

    from cloudckpt.keras import CloudCheckpoint
    from cloudckpt.store import CheckpointStore

    x, y = data()
    cb = CloudCheckpoint(str(tmp_path / "ckpt" / "m.weights.h5"), save_weights_only=True,
                         remote=str(tmp_path / "store"), preemption=["gce"],
                         preemption_endpoints={"gce": metadata.url}, preemption_deadline=deadline,
                         exit_on_preemption=False)
    seen: dict[str, float] = {}

    class SlowStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2 and not seen:
                metadata.notice = True  # posted while this step is running
                assert wait_for(lambda: cb._watch.triggered, 10)
                seen["notice"] = time.monotonic()
                seen["step"] = int(self.model.optimizer.iterations.numpy())
                time.sleep(slow)  # the rest of a long step

    caplog.set_level(logging.INFO, logger="cloudckpt")
    keras.utils.set_random_seed(1)
    build = build_model()
    build.fit(x[:640], y[:640], batch_size=64, epochs=2, verbose=0, callbacks=[SlowStep(), cb])
    done = time.monotonic()
    assert cb.preempted
    with CheckpointStore(str(tmp_path / "store")) as store:
        assert store.latest().step == seen["step"], "the preemption checkpoint was committed"
    text = "\n".join(r.getMessage() for r in caplog.records if "preemption (" in r.getMessage())
    took = re.search(r"committed ([\d.]+)s after the notice", text)
    assert took, text
    reported = float(took.group(1))
    assert slow <= reported <= done - seen["notice"] + 0.5, f"elapsed time counted from the notice: {text}"
    missed = re.search(r"missed the [\d.]+s deadline by ([\d.]+)s", text)
    if reported <= deadline:
        assert not missed, text
    else:
        assert missed, f"committed after the deadline, and the log does not say by how much: {text}"
        assert abs(float(missed.group(1)) - (reported - deadline)) < 0.05


def test_a_sigterm_during_a_long_native_call_is_timed_when_it_arrives():
    """Python runs the SIGTERM handler only once the main thread is back in the interpreter (a long TensorFlow step
    keeps it out for seconds); the notice time is still the moment the signal arrived."""
    import hashlib

    def seconds(rounds: int) -> float:
        t = time.monotonic()
        hashlib.pbkdf2_hmac("sha256", b"k", b"salt", rounds)  # one native call that never looks at signals
        return time.monotonic() - t

    # the fastest of a few samples: a sample slowed by other processes would make the call below too short to
    # outlast the signal by the margin asserted (it took 0.9 s instead of 2.5 in a loaded suite run)
    rounds = int(50_000 * 3.0 / max(min(seconds(50_000) for _ in range(3)), 1e-3))
    # The watch steps aside when another wakeup fd is installed (an asyncio loop's); in a long pytest session an
    # earlier test's loop may have left one: this test is about the watch's own timing, so it starts without one.
    previous = signal.set_wakeup_fd(-1)
    watch = PreemptionWatch(["sigterm"])
    watch.start()
    sent: dict[str, float] = {}

    def kill() -> None:
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        threading.Timer(0.3, kill).start()
        hashlib.pbkdf2_hmac("sha256", b"k", b"salt", rounds)
        back = time.monotonic()
        assert watch.event.wait(5)
    finally:
        watch.stop()
        try:
            signal.set_wakeup_fd(previous)
        except ValueError:  # its owner closed it meanwhile
            pass
    assert back - sent["at"] > 1.0, "the signal arrived while the native call ran"
    assert watch.notice_time - sent["at"] < 0.3, (watch.notice_time - sent["at"], back - sent["at"])
