"""A recording HTTP proxy in front of a real storage server (moto's S3, fake-gcs-server), and the mapping from S3
requests to IAM actions (see gcs_recorder.py for GCS).

The proxy forwards every request unchanged and records method, path, query, the keys a multi-object delete names and
the headers that change which permission a request needs. Requests matching ``fail_when`` get an S3 error answer
instead (to drive the clients' failure paths, e.g. a multipart upload that must be aborted); they are recorded too,
since the client did send them.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "expect", "content-length"}
_S3_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidRequest</Code>'
             b"<Message>injected by the test proxy</Message></Error>")
_LIST_PARAMS = {"list-type", "prefix", "delimiter", "max-keys", "marker", "encoding-type", "continuation-token",
                "start-after", "fetch-owner", "expected-bucket-owner", "optional-object-attributes"}


@dataclass(frozen=True)
class S3Call:
    """One request as the server saw it."""

    method: str
    bucket: str
    key: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)
    delete_keys: tuple[str, ...] = ()

    @property
    def action(self) -> str:
        return s3_action(self)


def s3_action(call: S3Call) -> str:
    """The IAM action AWS authorizes for this request (path-style addressing). Unknown requests map to a string
    starting with ``UNMAPPED`` so that a test comparing action sets fails loudly on them."""
    m, q = call.method, call.query
    unmapped = f"UNMAPPED {m} /{call.bucket}/{call.key}?{'&'.join(sorted(q))}"
    if not call.bucket:
        return "s3:ListAllMyBuckets" if m == "GET" else unmapped
    if not call.key:  # bucket-level requests
        if m == "HEAD" and not q:
            return "s3:ListBucket"  # HeadBucket
        if m == "GET":
            if set(q) <= _LIST_PARAMS:
                return "s3:ListBucket"  # ListObjects / ListObjectsV2
            for sub, action in (("uploads", "s3:ListBucketMultipartUploads"), ("versions", "s3:ListBucketVersions"),
                                ("location", "s3:GetBucketLocation"), ("versioning", "s3:GetBucketVersioning")):
                if sub in q:
                    return action
        if m == "POST" and set(q) == {"delete"}:
            return "s3:DeleteObject"  # DeleteObjects: authorized as DeleteObject on each key
        if m == "PUT" and not q:
            return "s3:CreateBucket"
        if m == "DELETE" and not q:
            return "s3:DeleteBucket"
        return unmapped
    if "x-amz-copy-source" in call.headers:
        return unmapped  # CopyObject / UploadPartCopy also need s3:GetObject on the source: not expected here
    subresources = set(q) - {"partNumber", "uploadId", "versionId", "response-content-type", "x-id"}
    if m in ("GET", "HEAD"):
        if "uploadId" in q and m == "GET":
            return "s3:ListMultipartUploadParts"
        if subresources == {"attributes"}:
            return "s3:GetObjectAttributes"
        if subresources:
            return unmapped
        return "s3:GetObjectVersion" if "versionId" in q else "s3:GetObject"
    if m == "PUT" and not subresources:
        return "s3:PutObject"  # PutObject (incl. If-Match / If-None-Match) and UploadPart
    if m == "POST" and (set(q) == {"uploads"} or set(q) == {"uploadId"}):
        return "s3:PutObject"  # CreateMultipartUpload / CompleteMultipartUpload
    if m == "DELETE" and set(q) == {"uploadId"}:
        return "s3:AbortMultipartUpload"
    if m == "DELETE" and not q:
        return "s3:DeleteObject"
    if m == "DELETE" and set(q) == {"versionId"}:
        return "s3:DeleteObjectVersion"
    return unmapped


def _parse(method: str, target: str, headers, body: bytes) -> S3Call:
    parts = urlsplit(target)
    path = unquote(parts.path).lstrip("/")
    bucket, _, key = path.partition("/")
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    keep = {k.lower(): v for k, v in headers.items() if k.lower() in ("x-amz-copy-source", "if-match", "if-none-match")}
    delete_keys: tuple[str, ...] = ()
    if method == "POST" and "delete" in query:
        delete_keys = tuple(re.findall(r"<Key>([^<]*)</Key>", body.decode("utf-8", "replace")))
    return S3Call(method, bucket, key, query, keep, delete_keys)


class RecordingProxy:
    """``with RecordingProxy(upstream) as proxy:`` — point clients at ``proxy.endpoint``; ``proxy.calls`` lists
    what they sent. ``fail_when(call)`` returning True answers the request with a 400 S3 error, returning
    ``(status, content_type, body)`` answers with that; falsy forwards it."""

    def __init__(self, upstream: str, fail_when: Callable[[S3Call], bool] | None = None,
                 parse: Callable[..., object] | None = None) -> None:
        up = urlsplit(upstream)
        parse = parse or _parse
        self.upstream = (up.hostname, up.port)
        self.fail_when = fail_when
        self.calls: list[S3Call] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                call = parse(self.command, self.path, self.headers, body)
                with proxy._lock:
                    proxy.calls.append(call)
                fault = proxy.fail_when(call) if proxy.fail_when is not None else None
                if fault:
                    status, ctype, err = fault if isinstance(fault, tuple) else (400, "application/xml", _S3_ERROR)
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP_BY_HOP:
                            conn.putheader(k, v)
                    if body or self.command in ("PUT", "POST"):
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP:
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-recorder", daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def take(self) -> list[S3Call]:
        """The calls recorded since the last take()."""
        with self._lock:
            out, self.calls = self.calls, []
        return out
