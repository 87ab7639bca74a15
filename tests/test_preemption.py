"""Preemption signals: SIGTERM and the AWS/GCE/Azure metadata notices, served by a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
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
                        return self._send(200, json.dumps({"action": "terminate", "time": "2026-01-01T00:00:00Z"}).encode())
                    return self._send(404)
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    return self._send(200, b"TRUE" if owner.notice else b"FALSE")
                if self.path.startswith("/metadata/scheduledevents"):
                    if self.headers.get("Metadata") != "true":
                        return self._send(400)
                    events = [{"EventId": "1", "EventType": "Preempt", "ResourceType": "VirtualMachine"}] if owner.notice else []
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
    watch = PreemptionWatch(["gce", "aws", "azure"], endpoints={c: "http://127.0.0.1:9" for c in ("gce", "aws", "azure")},
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
